"""``monai-diffusion benchmark``: peak memory and step time of training steps, each case in its own process.

A *case* is one training step of one network at one setting: our AutoencoderKL or MONAI's stock class, the
generator step (L1 + KL), the full adversarial step, or one LDM UNet step (from cached latents, or encoding
with the frozen autoencoder on the fly). Every case runs in a fresh subprocess, so one case's allocations,
caches and crashes (out of memory) never colour the next. A case reports:

- peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over a step (the total, and the increase over the
  memory held between steps); on CPU the peak resident set size over a step minus the resident size between
  steps, i.e. of the built model and its optimizer state after warm-up (``VmHWM`` reset through
  ``/proc/self/clear_refs`` before each step, glibc's free heap trimmed first);
- the median step time after warm-up, and voxels per second;
- the parameter count and the latent shape.

Results go to a markdown table and a JSON block, with the device name, torch version and date, into a marked
section of ``docs/benchmarks.md`` (other sections are left as they are), and optionally a JSON file.

Examples::

    monai-diffusion benchmark --suite cpu                       # the issue's CPU setting, 128x128x64
    monai-diffusion benchmark --suite gpu --size 256 256 64     # the GPU set
    monai-diffusion benchmark --suite tiny --output none        # seconds: does it run and report
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

STEPS = ("ae", "adv", "ldm_cache", "ldm_fly", "encode")
MODELS = ("ours", "monai")
CHECKPOINTS = ("none", "ours", "whole")
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class Case:
    """One benchmark case: a training step of one network at one setting.

    Attributes:
        label: short name shown in the table.
        model: ``ours`` (monai_diffusion's AutoencoderKL) or ``monai`` (monai.networks.nets.AutoencoderKL; factors
            must be 2 everywhere).
        step: ``ae`` generator step (L1 + KL, forward, backward, optimizer), ``adv`` the full adversarial step
            (generator with the frozen discriminator, then the discriminator), ``ldm_cache`` one UNet step from
            cached latents (mu, sigma), ``ldm_fly`` the same after encoding the batch with the frozen autoencoder,
            ``encode`` the frozen encoder alone (no grad; what building the latent cache costs).
        size: spatial size of one volume.
        channels, factors, attention_levels, num_res_blocks, latent_channels, norm_num_groups, in_channels,
        with_encoder_nonlocal_attn, with_decoder_nonlocal_attn, use_convtranspose: the autoencoder. ``factors``
            None means 2 everywhere; ``attention_levels`` None means attention at the deepest level.
        flash: attention through PyTorch's scaled_dot_product_attention.
        checkpoint: ``none``; ``ours`` (this project's per-block checkpointing with fused, sliced norm/conv units;
            for ``monai``: its own ``use_checkpoint=True``); ``whole`` (MONAI's way: the whole encoder and decoder
            recomputed, emulated on our network so it can be compared at any factors).
        precision: ``fp32``, or autocast ``fp16`` / ``bf16`` (GradScaler with fp16 on CUDA).
        batch: volumes per step.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        steps, warmup: timed steps and untimed warm-up steps.
        channels_last, compile, cudnn_benchmark: CUDA options tried by the GPU suite.
        chunk_elements: slab size of the fused units (None: the network's default).
        disc_channels, disc_num_layers: the PatchDiscriminator of the adversarial step.
        unet_channels, unet_attention_levels, unet_head_channels, unet_num_res_blocks, unet_norm_num_groups: the
            LDM UNet (defaults of ``ldm.unet``; norm groups None: min(norm_num_groups, channels)).
        threads: CPU threads (None: torch's default).
    """

    label: str
    model: str = "ours"
    step: str = "ae"
    size: tuple[int, ...] = (128, 128, 64)
    channels: tuple[int, ...] = (16, 32, 64)
    factors: list | None = None
    attention_levels: tuple[bool, ...] | None = None
    num_res_blocks: int | list[int] = 1
    latent_channels: int = 3
    norm_num_groups: int = 16
    flash: bool = True
    checkpoint: str = "none"
    precision: str = "fp32"
    batch: int = 1
    device: str = "auto"
    steps: int = 3
    warmup: int = 1
    channels_last: bool = False
    compile: bool = False
    cudnn_benchmark: bool = False
    chunk_elements: int | None = None
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_attention_levels: tuple[bool, ...] = (False, True, True)
    unet_head_channels: int = 16
    unet_num_res_blocks: int | list[int] = 1
    unet_norm_num_groups: int | None = None
    in_channels: int = 1
    with_encoder_nonlocal_attn: bool = True
    with_decoder_nonlocal_attn: bool = True
    use_convtranspose: bool = False
    disc_channels: int = 32
    disc_num_layers: int = 3
    threads: int | None = None

    def __post_init__(self) -> None:
        self.size = tuple(int(s) for s in self.size)
        self.channels = tuple(int(c) for c in self.channels)
        if self.attention_levels is not None:
            self.attention_levels = tuple(bool(a) for a in self.attention_levels)
        self.unet_channels = tuple(self.unet_channels)
        self.unet_attention_levels = tuple(self.unet_attention_levels)
        if self.model not in MODELS or self.step not in STEPS or self.checkpoint not in CHECKPOINTS:
            raise ValueError(f"bad case {self.label!r}: model/step/checkpoint out of {MODELS}/{STEPS}/{CHECKPOINTS}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"bad case {self.label!r}: precision must be one of {PRECISIONS}")
        if self.model == "monai" and self.factors is not None and any(
            f != 2 for level in self.factors for f in (level if isinstance(level, (list, tuple)) else [level])
        ):
            raise ValueError(f"bad case {self.label!r}: MONAI's stock AutoencoderKL only downsamples by 2")

    @property
    def factors_text(self) -> str:
        factors = self.factors if self.factors is not None else [2] * (len(self.channels) - 1)
        return json.dumps(factors).replace(" ", "")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Case:
        return cls(**json.loads(text))


# ---------------------------------------------------------------------------------------------------------------------
# Suites
# ---------------------------------------------------------------------------------------------------------------------


def suite(name: str, size: tuple[int, ...] | None = None, steps: int | None = None, warmup: int | None = None) -> list[Case]:
    """The named list of cases (``cpu``, ``gpu``, ``gpu-options``, ``tiny``), optionally at another size."""
    if name == "cpu":
        # One thread: on a shared 2-core machine two OpenMP threads stall at every barrier whenever the other core
        # is busy (seen: a 0.23 s UNet step taking 10 s), which would make the timings meaningless.
        base = dict(size=size or (128, 128, 64), threads=1, steps=2)
        cases = [
            Case("MONAI [2,2] SDPA", model="monai", **base),
            Case("ours [2,2]", **base),
            Case("MONAI [2,2] SDPA ckpt", model="monai", checkpoint="ours", **base),
            Case("ours [2,2] ckpt", checkpoint="ours", **base),
            Case("ours [4,2]", factors=[4, 2], **base),
            Case("ours [4,2] whole-ckpt (MONAI's way)", factors=[4, 2], checkpoint="whole", **base),
            Case("ours [4,2] ckpt", factors=[4, 2], checkpoint="ours", **base),
            Case("ours [8,2]", factors=[8, 2], **base),
            Case("ours [8,2] ckpt", factors=[8, 2], checkpoint="ours", **base),
            Case("ours [4,2] adversarial", factors=[4, 2], step="adv", **base),
            Case("LDM [4,2] cached latents", factors=[4, 2], step="ldm_cache", **base),
            Case("LDM [4,2] on the fly", factors=[4, 2], step="ldm_fly", **base),
        ]
    elif name == "gpu":
        base = dict(size=size or (256, 256, 64), precision="fp16", device="cuda", cudnn_benchmark=True)
        cases = [
            Case("MONAI [2,2] SDPA", model="monai", **base),
            Case("MONAI [2,2] SDPA ckpt", model="monai", checkpoint="ours", **base),
            Case("ours [2,2]", **base),
            Case("ours [2,2] ckpt", checkpoint="ours", **base),
            Case("ours [4,2]", factors=[4, 2], **base),
            Case("ours [4,2] whole-ckpt (MONAI's way)", factors=[4, 2], checkpoint="whole", **base),
            Case("ours [4,2] ckpt", factors=[4, 2], checkpoint="ours", **base),
            Case("ours [8,2]", factors=[8, 2], **base),
            Case("ours [8,2] ckpt", factors=[8, 2], checkpoint="ours", **base),
            Case("ours [4,2] adversarial", factors=[4, 2], step="adv", **base),
            Case("LDM [4,2] cached latents", factors=[4, 2], step="ldm_cache", **base),
            Case("LDM [4,2] on the fly", factors=[4, 2], step="ldm_fly", **base),
            # Last: without SDPA the attention matrices at 64x64x16 tokens need tens of GiB.
            Case("MONAI [2,2] stock (no SDPA)", model="monai", flash=False, **base),
        ]
    elif name == "gpu-large":
        base = dict(size=size or (512, 512, 128), precision="fp16", device="cuda", cudnn_benchmark=True)
        cases = [
            Case("ours [8,2] ckpt", factors=[8, 2], checkpoint="ours", **base),
            Case("ours [[8,8,4],[2,2,2]] ckpt", factors=[[8, 8, 4], [2, 2, 2]], checkpoint="ours", **base),
            Case("ours [8,2]", factors=[8, 2], **base),
        ]
    elif name == "gpu-options":
        base = dict(size=size or (256, 256, 64), precision="fp16", device="cuda", factors=[4, 2])
        cases = [
            Case("ours [4,2] plain", **base),
            Case("ours [4,2] cudnn.benchmark", cudnn_benchmark=True, **base),
            Case("ours [4,2] channels-last", cudnn_benchmark=True, channels_last=True, **base),
            Case("ours [4,2] torch.compile", cudnn_benchmark=True, compile=True, **base),
            Case("ours [4,2] ckpt cudnn.benchmark", cudnn_benchmark=True, checkpoint="ours", **base),
        ]
    elif name == "tiny":
        # Small enough for CI (seconds); 32^3 keeps the discriminator's and the UNet's deepest maps above 1 voxel.
        base = dict(size=size or (32, 32, 32), channels=(8, 16, 16), norm_num_groups=8, threads=1, steps=2)
        cases = [
            Case("MONAI [2,2]", model="monai", **base),
            Case("ours [2,2]", **base),
            Case("ours [4,2] ckpt", factors=[4, 2], checkpoint="ours", **base),
            Case("ours [4,2] whole-ckpt", factors=[4, 2], checkpoint="whole", **base),
            Case("ours [4,2] adversarial", factors=[4, 2], step="adv", **base),
            Case("LDM [4,2] cached latents", factors=[4, 2], step="ldm_cache", unet_channels=(8, 16, 16),
                 unet_head_channels=8, **base),
            Case("LDM [4,2] on the fly", factors=[4, 2], step="ldm_fly", unet_channels=(8, 16, 16),
                 unet_head_channels=8, **base),
        ]
    else:
        raise ValueError(f"unknown suite {name!r}")
    for case in cases:
        if steps is not None:
            case.steps = steps
        if warmup is not None:
            case.warmup = warmup
    return cases


SUITES = ("cpu", "gpu", "gpu-large", "gpu-options", "tiny")


# ---------------------------------------------------------------------------------------------------------------------
# Memory probes
# ---------------------------------------------------------------------------------------------------------------------


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    value = _status_mb("VmRSS")
    if value is not None:
        return value
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _trim_allocator() -> None:
    """Hand freed heap memory back to the OS (glibc), so the next step's peak starts from live memory only."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class CpuPeak:
    """Peak resident set size over a region: ``VmHWM`` reset via ``/proc/self/clear_refs``, else a sampler."""

    def __init__(self) -> None:
        self._sampler = None
        self._peak = 0.0

    def __enter__(self) -> CpuPeak:
        _trim_allocator()
        self._exact = False
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self._exact = _status_mb("VmHWM") is not None
        except OSError:
            pass
        if not self._exact:
            import threading

            self._peak = rss_mb()
            self._stop = threading.Event()

            def sample() -> None:
                while not self._stop.wait(0.002):
                    self._peak = max(self._peak, rss_mb())

            self._sampler = threading.Thread(target=sample, daemon=True)
            self._sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._exact:
            self._peak = _status_mb("VmHWM") or 0.0
        else:
            self._stop.set()
            self._sampler.join()
            self._peak = max(self._peak, rss_mb())

    @property
    def peak_mb(self) -> float:
        return self._peak


# ---------------------------------------------------------------------------------------------------------------------
# Building and running one case (inside the worker process)
# ---------------------------------------------------------------------------------------------------------------------


class _WholeCheckpoint:
    """Wrap a module's forward in one ``torch.utils.checkpoint`` call, as MONAI's ``use_checkpoint`` does."""

    @staticmethod
    def apply(module):
        import torch
        from torch.utils.checkpoint import checkpoint

        inner_forward = module.forward

        def forward(x):
            if module.training and torch.is_grad_enabled():
                return checkpoint(inner_forward, x, use_reentrant=False)
            return inner_forward(x)

        module.forward = forward
        return module


def build_autoencoder(case: Case):
    """The case's autoencoder (not yet on a device)."""
    levels = len(case.channels)
    attention = case.attention_levels if case.attention_levels is not None else (False,) * (levels - 1) + (True,)
    common = dict(
        spatial_dims=len(case.size),
        in_channels=case.in_channels,
        out_channels=case.in_channels,
        channels=case.channels,
        attention_levels=attention,
        num_res_blocks=case.num_res_blocks if isinstance(case.num_res_blocks, int) else tuple(case.num_res_blocks),
        latent_channels=case.latent_channels,
        norm_num_groups=case.norm_num_groups,
        use_flash_attention=case.flash,
        with_encoder_nonlocal_attn=case.with_encoder_nonlocal_attn,
        with_decoder_nonlocal_attn=case.with_decoder_nonlocal_attn,
        use_convtranspose=case.use_convtranspose,
    )
    if case.model == "monai":
        from monai.networks.nets import AutoencoderKL as MonaiAutoencoderKL

        return MonaiAutoencoderKL(use_checkpoint=case.checkpoint != "none", **common)
    from monai_diffusion.networks.autoencoderkl import AutoencoderKL

    model = AutoencoderKL(downsample_factors=case.factors, use_checkpoint=case.checkpoint == "ours",
                          chunk_elements=case.chunk_elements, **common)
    if case.checkpoint == "whole":
        _WholeCheckpoint.apply(model.encoder)
        _WholeCheckpoint.apply(model.decoder)
    return model


def latent_shape(case: Case) -> tuple[int, ...]:
    """Spatial latent shape of the case's autoencoder for its input size."""
    from monai_diffusion.factors import latent_shape as latent, per_axis_factors, total_factor

    levels = per_axis_factors(case.factors, len(case.channels) - 1, len(case.size))
    return latent(case.size, total_factor(levels, len(case.size)))


def _autocast(case: Case, device):
    import torch

    if case.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[case.precision]))


def _make_step(case: Case, device):
    """Build everything a case needs; returns (step function, parameter count)."""
    import torch
    import torch.nn.functional as F

    from monai_diffusion.losses import kl_loss

    torch.manual_seed(0)
    memory_format = torch.channels_last_3d if case.channels_last and len(case.size) == 3 else torch.contiguous_format
    scaler = torch.amp.GradScaler(device.type, enabled=case.precision == "fp16" and device.type == "cuda")
    images = torch.rand(case.batch, case.in_channels, *case.size, device=device).contiguous(memory_format=memory_format)

    if case.step in ("ae", "adv"):
        autoencoder = build_autoencoder(case).to(device).train()
        if case.channels_last:
            autoencoder = autoencoder.to(memory_format=memory_format)
        forward = torch.compile(autoencoder) if case.compile else autoencoder
        optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=1e-4)
        params = sum(p.numel() for p in autoencoder.parameters())
        discriminator = opt_d = None
        if case.step == "adv":
            from monai.losses import PatchAdversarialLoss
            from monai.networks.nets import PatchDiscriminator

            # Same network as networks.builders.build_discriminator with the config's defaults.
            discriminator = PatchDiscriminator(
                spatial_dims=len(case.size),
                in_channels=case.in_channels,
                channels=case.disc_channels,
                num_layers_d=case.disc_num_layers,
                norm="INSTANCE",
            ).to(device)
            opt_d = torch.optim.AdamW(discriminator.parameters(), lr=5e-4)
            scaler_d = torch.amp.GradScaler(device.type, enabled=scaler.is_enabled())
            adversarial = PatchAdversarialLoss(criterion="least_squares")
            params += sum(p.numel() for p in discriminator.parameters())

        def step() -> None:
            with _autocast(case, device):
                reconstruction, z_mu, z_sigma = forward(images)
            loss = F.l1_loss(reconstruction.float(), images.float()) + 1e-6 * kl_loss(z_mu, z_sigma)
            if discriminator is not None:
                discriminator.requires_grad_(False)
                with _autocast(case, device):
                    logits_fake = discriminator(reconstruction)[-1]
                loss = loss + 0.01 * adversarial(logits_fake.float(), target_is_real=True, for_discriminator=False)
                discriminator.requires_grad_(True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if discriminator is not None:
                with _autocast(case, device):
                    logits_fake = discriminator(reconstruction.detach())[-1]
                    logits_real = discriminator(images)[-1]
                loss_d = 0.5 * (
                    adversarial(logits_fake.float(), target_is_real=False, for_discriminator=True)
                    + adversarial(logits_real.float(), target_is_real=True, for_discriminator=True)
                )
                scaler_d.scale(0.01 * loss_d).backward()
                scaler_d.step(opt_d)
                scaler_d.update()
                opt_d.zero_grad(set_to_none=True)

        return step, params

    if case.step == "encode":
        autoencoder = build_autoencoder(dataclasses.replace(case, checkpoint="none")).to(device).eval()
        autoencoder.requires_grad_(False)

        def step() -> None:
            with torch.no_grad(), _autocast(case, device):
                z_mu, z_sigma = autoencoder.encode(images)
            del z_mu, z_sigma

        return step, sum(p.numel() for p in autoencoder.parameters())

    # LDM: the UNet built as the project builds it, the autoencoder frozen.
    from monai_diffusion.config.schema import LDMConfig, UNetConfig
    from monai_diffusion.networks.builders import build_scheduler, build_unet

    ldm = LDMConfig(
        unet=UNetConfig(
            num_channels=list(case.unet_channels),
            attention_levels=list(case.unet_attention_levels),
            num_head_channels=case.unet_head_channels,
            num_res_blocks=case.unet_num_res_blocks,
            norm_num_groups=case.unet_norm_num_groups or min(case.norm_num_groups, *case.unet_channels),
        )
    )
    unet = build_unet(ldm, case.latent_channels, spatial_dims=len(case.size)).to(device).train()
    scheduler = build_scheduler(ldm.scheduler)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    params = sum(p.numel() for p in unet.parameters())
    latent = (case.batch, case.latent_channels, *latent_shape(case))
    cached_mu = torch.randn(latent, device=device)
    cached_sigma = torch.rand(latent, device=device) * 0.1
    autoencoder = None
    if case.step == "ldm_fly":
        autoencoder = build_autoencoder(dataclasses.replace(case, checkpoint="none")).to(device).eval()
        autoencoder.requires_grad_(False)

    def step() -> None:
        if autoencoder is not None:
            with torch.no_grad(), _autocast(case, device):
                z_mu, z_sigma = autoencoder.encode(images)
        else:
            z_mu, z_sigma = cached_mu, cached_sigma
        z = (z_mu.float() + z_sigma.float() * torch.randn_like(z_sigma, dtype=torch.float32))
        noise = torch.randn_like(z)
        timesteps = torch.randint(0, scheduler.num_train_timesteps, (z.shape[0],), device=device).long()
        noisy = scheduler.add_noise(original_samples=z, noise=noise, timesteps=timesteps)
        with _autocast(case, device):
            prediction = unet(noisy, timesteps=timesteps)
        loss = F.mse_loss(prediction.float(), noise)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step, params


def measure(case: Case) -> dict[str, Any]:
    """Run one case in this process and return its measurements (see the module docstring)."""
    import torch

    if case.threads:
        torch.set_num_threads(case.threads)
    want_cuda = case.device == "cuda" or (case.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("case asks for CUDA but none is available")
    device = torch.device("cuda" if want_cuda else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = case.cudnn_benchmark

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    step, params = _make_step(case, device)
    sync()
    _trim_allocator()
    built = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else rss_mb()
    for _ in range(case.warmup):
        step()
    sync()
    _trim_allocator()
    # The baseline is taken between steps, after warm-up: the built model plus what the first step leaves for good
    # (optimizer state; on CPU also oneDNN's primitive caches and thread pools, which would otherwise count as
    # step memory at small sizes). Only activations and gradients of a step count as its peak.
    baseline = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else rss_mb()
    times, peaks, totals = [], [], []
    for _ in range(case.steps):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
            total = torch.cuda.max_memory_allocated() / 2**20
            totals.append(total)
            peaks.append(total - baseline)
        else:
            with CpuPeak() as probe:
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            peaks.append(probe.peak_mb - baseline)
            totals.append(probe.peak_mb)
    median = statistics.median(times)
    voxels = case.batch * math.prod(case.size)
    return {
        "peak_mb": round(max(peaks), 1),
        "peak_total_mb": round(max(totals), 1),
        "baseline_mb": round(baseline, 1),
        "built_mb": round(built, 1),
        "step_s": round(median, 4),
        "step_times_s": [round(t, 4) for t in times],
        "voxels_per_s": round(voxels / median, 1),
        "params": params,
        "latent_shape": list(latent_shape(case)),
        "device": _device_name(device),
        "threads": torch.get_num_threads(),
    }


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    return f"CPU: {name} ({os.cpu_count()} cores)"


# ---------------------------------------------------------------------------------------------------------------------
# Driver: one subprocess per case, then the report
# ---------------------------------------------------------------------------------------------------------------------

RESULT_PREFIX = "BENCHMARK_RESULT "


def run_case(case: Case, timeout: float | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``case`` in a fresh Python process; always returns a record (with ``error`` when it failed).

    ``env``: extra environment variables for that process (the planner sets glibc's mmap threshold).
    """
    record: dict[str, Any] = {"case": dataclasses.asdict(case)}
    command = [sys.executable, "-m", "monai_diffusion.benchmark", "--worker", case.to_json()]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        record["error"] = f"timed out after {timeout:.0f} s"
        return record
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode == 0 and lines:
        record.update(json.loads(lines[-1][len(RESULT_PREFIX):]))
        return record
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    killed = done.returncode < 0 or done.returncode == 137
    reason = "killed (out of memory?)" if killed else f"exit code {done.returncode}"
    record["error"] = f"{reason}: {' | '.join(tail)[-300:]}" if tail else reason
    return record


def run_case_in_process(case: Case) -> dict[str, Any]:
    """Run ``case`` in this process (CUDA: peaks are reset per step, so cases do not see each other's); saves the
    start-up of a fresh process per case where device time is scarce. Errors (out of memory) become records."""
    import torch

    record: dict[str, Any] = {"case": dataclasses.asdict(case)}
    try:
        record.update(measure(case))
    except Exception as exc:  # noqa: BLE001 - any failure of a case is a result, not the end of the run
        record["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return record


def environment() -> dict[str, Any]:
    """Versions and the date, stored with every report."""
    import monai
    import torch

    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
    return info


def markdown_table(records: list[dict[str, Any]]) -> str:
    """The results as a markdown table (one row per case)."""
    header = (
        "| case | model | step | size x batch | factors | ckpt | precision | latent | params | peak GiB | "
        "time s | Mvox/s | device |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [header]
    for record in records:
        case = Case(**record["case"])
        size = "x".join(map(str, case.size)) + f" x{case.batch}"
        options = [o for o, on in (("channels-last", case.channels_last), ("compile", case.compile)) if on]
        precision = case.precision + ("" if case.flash else ", no SDPA") + ("".join(", " + o for o in options))
        if "error" in record:
            rows.append(
                f"| {case.label} | {case.model} | {case.step} | {size} | {case.factors_text} | {case.checkpoint} | "
                f"{precision} | - | - | **failed** | - | - | {record['error'][:80].replace('|', '/')} |"
            )
            continue
        latent = "x".join(map(str, record["latent_shape"]))
        peak = record["peak_total_mb"] if "CPU" not in record["device"] else record["peak_mb"]
        rows.append(
            f"| {case.label} | {case.model} | {case.step} | {size} | {case.factors_text} | {case.checkpoint} | "
            f"{precision} | {latent} | {record['params'] / 1e6:.2f} M | {peak / 1024:.2f} | {record['step_s']:.2f} | "
            f"{record['voxels_per_s'] / 1e6:.2f} | {record['device']} |"
        )
    return "\n".join(rows)


def write_report(
    records: list[dict[str, Any]], output: Path, section: str, title: str, command: str, env: dict | None = None
) -> None:
    """Write (or replace) the marked section ``section`` of the markdown file ``output``.

    ``env`` (versions, date) defaults to this process's; pass the stored one when re-rendering a saved run.
    """
    env = env or environment()
    devices = sorted({r.get("device", "?") for r in records if "device" in r}) or ["?"]
    peak_note = (
        "peak = `torch.cuda.max_memory_allocated` over a step (model, optimizer state and activations)"
        if any("CPU" not in d for d in devices)
        else "peak = peak RSS over a step minus the RSS of the built model"
    )
    body = "\n".join(
        [
            f"<!-- benchmark:{section}:start -->",
            f"### {title}",
            "",
            f"Device: {', '.join(devices)}; torch {env['torch']}, MONAI {env['monai']}, Python {env['python']}"
            + (f", CUDA {env['cuda']}" if env["cuda"] else "")
            + f"; {env['date']}. Command: `{command}`. {peak_note}; time = median step after warm-up.",
            "",
            markdown_table(records),
            "",
            "<details><summary>JSON</summary>",
            "",
            "```json",
            '{"environment": ' + json.dumps(env) + ', "results": [',
            ",\n".join(json.dumps(r) for r in records),
            "]}",
            "```",
            "",
            "</details>",
            f"<!-- benchmark:{section}:end -->",
        ]
    )
    text = output.read_text() if output.exists() else "# Benchmarks\n"
    start, end = f"<!-- benchmark:{section}:start -->", f"<!-- benchmark:{section}:end -->"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + body + after
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="monai-diffusion benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="cpu", choices=SUITES, help="which list of cases (default: cpu)")
    parser.add_argument("--size", type=int, nargs="+", default=None, help="override the suite's volume size")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default: 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps per case (default: 1)")
    parser.add_argument("--only", action="append", default=[], help="run only cases whose label contains this")
    parser.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"), help="override the cases' device")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per case")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per case before it counts as failed")
    parser.add_argument(
        "--output", default="docs/benchmarks.md", help="markdown file to write the section into ('none': do not)"
    )
    parser.add_argument("--section", default=None, help="section name in the markdown file (default: the suite)")
    parser.add_argument("--json", default=None, help="also write the records to this JSON file")
    parser.add_argument(
        "--in-process", action="store_true", help="run the cases in this process instead of one process each (CUDA)"
    )
    parser.add_argument(
        "--from-json", default=None, help="render a saved run (a --json file, e.g. from another machine) into --output"
    )
    parser.add_argument("--title", default=None, help="section title (default: the suite and size)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        result = measure(Case.from_json(args.worker))
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0

    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        section = args.section or Path(args.from_json).stem
        title = args.title or f"Suite `{section}`"
        command = saved.get("command") or f"monai-diffusion benchmark --suite {section}"
        write_report(saved["results"], Path(args.output), section, title, command, saved["environment"])
        print(markdown_table(saved["results"]))
        return 0

    cases = suite(args.suite, tuple(args.size) if args.size else None, args.steps, args.warmup)
    if args.only:
        cases = [c for c in cases if any(o.lower() in c.label.lower() for o in args.only)]
    for case in cases:
        if args.device:
            case.device = args.device
        if args.threads:
            case.threads = args.threads
    command = "monai-diffusion benchmark " + " ".join(argv if argv is not None else sys.argv[1:])
    section = args.section or args.suite
    title = args.title or f"Suite `{args.suite}`" + (f" at {'x'.join(map(str, args.size))}" if args.size else "")

    def save(records: list[dict[str, Any]]) -> None:
        # After every case, so a run cut short (a time limit, a crash) keeps what it measured.
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            saved = {"environment": environment(), "command": command.strip(), "results": records}
            Path(args.json).write_text(json.dumps(saved, indent=1))
        if args.output.lower() != "none":
            write_report(records, Path(args.output), section, title, command.strip())

    records: list[dict[str, Any]] = []
    for index, case in enumerate(cases, 1):
        record = run_case_in_process(case) if args.in_process else run_case(case, args.timeout)
        records.append(record)
        if "error" in record:
            print(f"[{index}/{len(cases)}] {case.label}: FAILED {record['error']}", flush=True)
        else:
            print(
                f"[{index}/{len(cases)}] {case.label}: peak {record['peak_mb']:.0f} MiB over baseline "
                f"(total {record['peak_total_mb']:.0f}), {record['step_s']:.3f} s/step, "
                f"{record['params'] / 1e6:.2f} M params, latent {record['latent_shape']}",
                flush=True,
            )
        save(records)
    print()
    print(markdown_table(records))
    if args.output.lower() != "none":
        print(f"\nwrote section '{section}' of {args.output}")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
