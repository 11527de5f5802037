"""Measuring a stage's training step: the peak memory and time of the step that trains, on random data.

A measurement takes a config and builds one stage with the builders of :mod:`monai_diffusion.steps` (the networks,
the loss with its weights, optimizers, scalers, LR schedule, EMA), then runs warm-up and timed optimizer steps,
each ``gradient_accumulation_steps`` micro-batches, through the very functions the recipes call. Stages:

- ``autoencoder``: the generator step, and the discriminator's when ``adv_weight > 0`` (the adversarial terms
  count, as they do from ``adv_start_step`` on), with the perceptual and SSIM terms the config asks for;
- ``ldm``: the UNet step from cached posteriors, or after encoding the batch when ``ldm.training.cache_latents``
  is false; the frozen autoencoder sits on the device either way, as in training;
- ``encode``: the frozen encoder's forward alone (the first phase of an on-the-fly LDM step);
- ``controlnet``: the ControlNet step beside the frozen UNet, from cached posteriors with their control input, or
  from label maps on the image grid when ``controlnet.training.cache_latents`` is false.

A config with ``data.conditions`` measures the conditional UNet with a batch of conditions (categorical ones
without ``categories`` get two stand-in categories).

A measurement reports (MiB, seconds):

- ``peak_mb``: the peak over a step above what is held between steps (gradients, activations, the step's
  transients). CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated between steps; CPU: the peak
  resident set size (``VmHWM``, reset through ``/proc/self/clear_refs`` before each step, glibc's free heap trimmed
  first) minus the resident size between steps after warm-up;
- ``peak_total_mb``: the peak as the device counts it (CUDA: everything allocated; CPU: the whole process);
- ``state_mb``: what the step keeps whatever the volume size, counted on the built objects: weights of every
  network on the device (trained and frozen), their gradients, the optimizer state, the EMA copy;
  ``gradients_mb`` is the gradients' share;
- ``step_s`` (median after warm-up), ``voxels_per_s``, ``params`` (trained), ``latent_shape``, ``device``.

:func:`run_measurement` runs one in a fresh Python process (``python -m monai_diffusion.memory.probe``), so
allocator caches and out-of-memory crashes of one measurement never colour the next; :func:`measure` runs it in
this process. Harness options that are not training settings (MONAI's stock network for comparison, another
slab size, channels-last) live in :class:`Options`; ``torch.compile`` is the config's ``device.compile``, applied
as the training commands apply it (:func:`~monai_diffusion.steps.training_model`).
"""

from __future__ import annotations

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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from monai_diffusion.conditioning import MODALITY_KEY, ConditionEncoder
from monai_diffusion.config.schema import Config
from monai_diffusion.config.stages import downsampling, step_config
from monai_diffusion.engine.loop import train_step
from monai_diffusion.engine.precision import Precision, resolve_precision
from monai_diffusion.latents import SPACING_KEY
from monai_diffusion.losses import perceptual_weights_at_hand
from monai_diffusion.networks.builders import build_autoencoder, build_unet
from monai_diffusion.steps import (
    build_autoencoder_training,
    build_controlnet_training,
    build_ldm_training,
    ldm_latents,
)

__all__ = [
    "STAGES",
    "CpuPeak",
    "Options",
    "Step",
    "build_step",
    "check_options",
    "device_name",
    "measure",
    "rss_mb",
    "run_measurement",
    "state_bytes",
]

STAGES = ("autoencoder", "ldm", "encode", "controlnet")
RESULT_PREFIX = "MEASUREMENT "


@dataclass
class Options:
    """How to measure a config's step (what to measure is the config).

    Attributes:
        stage: ``autoencoder``, ``ldm``, ``encode`` or ``controlnet`` (see the module docstring).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        steps, warmup: timed optimizer steps and untimed ones before them.
        threads: CPU threads (None: torch's default).
        network: ``ours`` or ``monai`` (MONAI's stock AutoencoderKL built from the same section, for comparison;
            its ``use_checkpoint`` recomputes the whole encoder and decoder; factors must be 2).
        whole_checkpoint: recompute our encoder and decoder each as one checkpoint (MONAI's way, emulated so it
            can be compared at any factors); the config's ``use_gradient_checkpointing`` should be off.
        chunk_elements: slab size of the memory-saving path (None: the network's default).
        channels_last: a CUDA option tried by the GPU suite.
        perceptual_stand_in: build the perceptual network with random weights when its pretrained ones are not on
            this machine (``plan`` on a compute node without internet): the step's memory does not depend on their
            values. The record then says ``perceptual_weights: random``.
    """

    stage: str = "autoencoder"
    device: str = "auto"
    steps: int = 3
    warmup: int = 1
    threads: int | None = None
    network: str = "ours"
    whole_checkpoint: bool = False
    chunk_elements: int | None = None
    channels_last: bool = False
    perceptual_stand_in: bool = False

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.network not in ("ours", "monai"):
            raise ValueError(f"network must be 'ours' or 'monai', got {self.network!r}")


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
# One stage's step, built from the config
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Step:
    """A built step: ``run()`` takes one optimizer step; the rest is what it keeps between steps."""

    run: Callable[[], None]
    modules: list[torch.nn.Module]
    optimizers: list[torch.optim.Optimizer]
    params: int


def _whole_checkpoint(module: torch.nn.Module) -> None:
    """Wrap a module's forward in one ``torch.utils.checkpoint`` call, as MONAI's ``use_checkpoint`` does."""
    from torch.utils.checkpoint import checkpoint

    inner_forward = module.forward

    def forward(x):
        if module.training and torch.is_grad_enabled():
            return checkpoint(inner_forward, x, use_reentrant=False)
        return inner_forward(x)

    module.forward = forward


def check_options(config: Config, options: Options) -> None:
    """Raise ValueError when the options cannot measure this config (MONAI's stock network at other factors)."""
    if options.network == "monai" and any(f != 2 for level in downsampling(config).per_axis for f in level):
        raise ValueError("MONAI's stock AutoencoderKL only downsamples by 2 (autoencoder.downsample_factors)")


def _autoencoder_network(config: Config, options: Options) -> torch.nn.Module | None:
    """The network the options ask for instead of the config's own (None: the builder's)."""
    ae, spatial_dims = config.autoencoder, len(config.data.voxel_size)
    check_options(config, options)
    if options.network == "monai":
        from monai.networks.nets import AutoencoderKL as MonaiAutoencoderKL

        levels = len(ae.num_channels)
        return MonaiAutoencoderKL(
            spatial_dims=spatial_dims, in_channels=ae.in_channels, out_channels=ae.in_channels,
            channels=tuple(ae.num_channels), latent_channels=ae.latent_channels, norm_num_groups=ae.norm_num_groups,
            num_res_blocks=ae.num_res_blocks if isinstance(ae.num_res_blocks, int) else tuple(ae.num_res_blocks),
            attention_levels=tuple(ae.attention_levels) if ae.attention_levels is not None else (False,) * levels,
            with_encoder_nonlocal_attn=ae.with_encoder_nonlocal_attn,
            with_decoder_nonlocal_attn=ae.with_decoder_nonlocal_attn, use_convtranspose=ae.use_convtranspose,
            use_flash_attention=ae.use_flash_attention, use_checkpoint=ae.training.use_gradient_checkpointing,
        )
    if options.whole_checkpoint or options.chunk_elements is not None:
        network = build_autoencoder(ae, spatial_dims, chunk_elements=options.chunk_elements)
        if options.whole_checkpoint:
            _whole_checkpoint(network.encoder)
            _whole_checkpoint(network.decoder)
        return network
    return None


def _random_perceptual_weights(config: Config, options: Options) -> bool:
    """Whether the autoencoder step's perceptual network is built with random weights (see :class:`Options`)."""
    t = config.autoencoder.training
    return (options.stage == "autoencoder" and options.perceptual_stand_in and t.use_perceptual_loss
            and not perceptual_weights_at_hand(t))


def _frozen_autoencoder(config: Config, device: torch.device) -> torch.nn.Module:
    """The autoencoder as train-ldm holds it (see ``latents.load_autoencoder``): built plain, frozen, in eval mode."""
    autoencoder = build_autoencoder(config.autoencoder, len(config.data.voxel_size), use_checkpoint=False)
    return autoencoder.to(device).eval().requires_grad_(False)


def build_step(config: Config, options: Options, device: torch.device, precision: Precision) -> Step:
    """The config's step of ``options.stage`` on ``device``: the stage the training command builds, run by the
    training loop's own :func:`~monai_diffusion.engine.loop.train_step` on random batches of the training batch's
    shape (made on the CPU and moved, as a DataLoader's are; the adversarial terms on when the config has them).
    """
    size = tuple(config.data.voxel_size)
    images_shape = (config.autoencoder.in_channels, *size)
    memory_format = torch.channels_last_3d if options.channels_last and len(size) == 3 else torch.contiguous_format

    if options.stage == "autoencoder":
        t = config.autoencoder.training
        stage = build_autoencoder_training(config, device, precision, max_steps=_schedule_steps(t),
                                           autoencoder=_autoencoder_network(config, options), max_epochs=t.max_epochs,
                                           random_perceptual_weights=_random_perceptual_weights(config, options))
        if options.channels_last:
            stage.autoencoder.to(memory_format=memory_format)
        stage.wrap(config.device)  # compiled with device.compile as in training (no DDP: one process)

        def images() -> dict[str, torch.Tensor]:
            return {"image": torch.rand(t.batch_size, *images_shape).to(device).contiguous(memory_format=memory_format)}

        def run() -> None:
            train_step(stage, [images() for _ in range(t.gradient_accumulation_steps)], step=t.adv_start_step)

        modules = [m for m in (stage.autoencoder, stage.discriminator, stage.perceptual) if m is not None]
        optimizers = [o for o in (stage.optimizer_g, stage.optimizer_d) if o is not None]
        return Step(run, modules, optimizers, _trained_params(optimizers))

    autoencoder = _frozen_autoencoder(config, device)
    latent = (config.autoencoder.latent_channels, *downsampling(config).latent_shape(size))
    t = config.controlnet.training if options.stage == "controlnet" else config.ldm.training
    encoder = ConditionEncoder.placeholder(config)

    def batch() -> dict:
        """A batch as the latent loader gives it: cached posteriors or images, and each condition's values."""
        if options.stage in ("ldm", "controlnet") and t.cache_latents:
            data = {"mu": torch.randn(t.batch_size, *latent), "sigma": torch.rand(t.batch_size, *latent) * 0.1}
        else:
            data = {"image": torch.rand(t.batch_size, *images_shape)}
        for spec in encoder.conditions if encoder is not None else ():
            data[spec["name"]] = [0.0 if spec["type"] == "continuous" else spec["categories"][0]] * t.batch_size
        if encoder is not None and encoder.maisi is not None:  # MAISI's UNet: each volume's spacing and modality
            data[SPACING_KEY] = torch.ones(t.batch_size, len(size))
            data[MODALITY_KEY] = [encoder.maisi["modality"]] * t.batch_size
        return data

    if options.stage == "encode":
        def run() -> None:
            ldm_latents(batch(), autoencoder, 1.0, precision, device=device)

        return Step(run, [autoencoder], [], 0)

    if options.stage == "controlnet":
        unet = build_unet(config.ldm, latent[0], len(size),
                          encoder.unet_arguments() if encoder is not None else None).to(device)
        stage = build_controlnet_training(config, config, unet, latent, device=device, precision=precision,
                                          max_steps=_schedule_steps(t), max_epochs=t.max_epochs,
                                          autoencoder=autoencoder, encoder=encoder)
        stage.wrap(config.device)

        def controlled() -> dict:
            data = batch()
            if t.cache_latents:
                data["control"] = torch.rand(t.batch_size, config.controlnet.num_labels - 1, *stage.control_size)
            else:
                data["mask"] = torch.randint(0, config.controlnet.num_labels, (t.batch_size, 1, *size))
            return data

        def run() -> None:
            train_step(stage, [controlled() for _ in range(t.gradient_accumulation_steps)], step=0)

        modules = [m for m in (stage.controlnet, stage.ema, stage.unet, autoencoder) if m is not None]
        return Step(run, modules, [stage.optimizer], _trained_params([stage.optimizer]))

    stage = build_ldm_training(config, latent, device, precision, max_steps=_schedule_steps(t),
                               max_epochs=t.max_epochs, autoencoder=autoencoder, encoder=encoder)
    stage.wrap(config.device)

    def run() -> None:
        train_step(stage, [batch() for _ in range(t.gradient_accumulation_steps)], step=0)

    modules = [m for m in (stage.unet, stage.ema, autoencoder) if m is not None]
    return Step(run, modules, [stage.optimizer], _trained_params([stage.optimizer]))


def _schedule_steps(t) -> int | None:
    """Where the LR schedule ends: the section's max_steps; without one (a run derives it from the data, which the
    probe has not got) max_epochs stands in: a schedule's length changes no step's memory."""
    return t.max_steps if t.max_steps is not None else t.max_epochs


def _trained_params(optimizers: list[torch.optim.Optimizer]) -> int:
    return sum(p.numel() for o in optimizers for group in o.param_groups for p in group["params"])


def state_bytes(step: Step) -> tuple[int, int]:
    """(bytes kept between steps, bytes of gradients): every distinct weight and buffer of the step's modules, the
    optimizer state, and a gradient per trained parameter (freed between steps, alive through each step)."""
    storages: dict[int, int] = {}
    tensors = [t for m in step.modules for t in (*m.parameters(), *m.buffers())]
    tensors += [v for o in step.optimizers for s in o.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    for tensor in tensors:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    gradients = sum(p.numel() * p.element_size() for o in step.optimizers for g in o.param_groups for p in g["params"])
    return sum(storages.values()) + gradients, gradients


# ---------------------------------------------------------------------------------------------------------------------
# Measuring it
# ---------------------------------------------------------------------------------------------------------------------


def _device(options: Options) -> torch.device:
    want_cuda = options.device == "cuda" or (options.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("the measurement asks for CUDA but none is available")
    return torch.device("cuda" if want_cuda else "cpu")


def measure(config: Config, options: Options) -> dict[str, Any]:
    """Measure the step in this process and return its record (see the module docstring).

    The stage's own settings apply (:func:`~monai_diffusion.config.stages.step_config`): its precision, and for the
    autoencoder its volume size or the patches it trains on.

    Raises:
        Whatever building or running the step raises (out of memory, missing perceptual weights...).
    """
    config = step_config(config, options.stage if options.stage in ("autoencoder", "controlnet") else "ldm")
    if options.threads:
        torch.set_num_threads(options.threads)
    device = _device(options)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = config.device.cudnn_benchmark

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def allocated_mb() -> float:
        return torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else rss_mb()

    torch.manual_seed(config.seed)
    step = build_step(config, options, device, resolve_precision(config.device.mixed_precision, device))
    for _ in range(options.warmup):
        step.run()
    sync()
    _trim_allocator()
    # Between steps, after warm-up: the networks, the optimizer state (and on CPU oneDNN's caches and thread pools,
    # which would otherwise count as step memory at small sizes). What a step adds on top is its peak.
    baseline = allocated_mb()
    times, peaks, totals = [], [], []
    for _ in range(options.steps):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            step.run()
            sync()
            times.append(time.perf_counter() - start)
            totals.append(torch.cuda.max_memory_allocated() / 2**20)
        else:
            with CpuPeak() as probe:
                start = time.perf_counter()
                step.run()
                times.append(time.perf_counter() - start)
            totals.append(probe.peak_mb)
        peaks.append(totals[-1] - baseline)
    state, gradients = state_bytes(step)
    median = statistics.median(times)
    # Volumes one optimizer step sees: the micro-batch times the accumulation (the encoder alone: one batch).
    t = {"autoencoder": config.autoencoder.training, "controlnet": config.controlnet.training}.get(
        options.stage, config.ldm.training)
    volumes = t.batch_size * (t.gradient_accumulation_steps if options.stage != "encode" else 1)
    return {
        "peak_mb": round(max(peaks), 1),
        "peak_total_mb": round(max(totals), 1),
        "baseline_mb": round(baseline, 1),
        "state_mb": round(state / 2**20, 1),
        "gradients_mb": round(gradients / 2**20, 1),
        "step_s": round(median, 4),
        "step_times_s": [round(t, 4) for t in times],
        "voxels_per_s": round(volumes * math.prod(config.data.voxel_size) / median, 1),
        "params": step.params,
        "latent_shape": list(downsampling(config).latent_shape(config.data.voxel_size)),
        "device": device_name(device),
        "threads": torch.get_num_threads(),
    } | ({"perceptual_weights": "random"} if _random_perceptual_weights(config, options) else {})


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and core count."""
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


def run_measurement(config: Config, options: Options, timeout: float | None = None,
                    env: dict[str, str] | None = None, *, in_process: bool = False) -> dict[str, Any]:
    """Measure the step in a fresh Python process; always returns a record (with ``error`` when it failed).

    Args:
        config: the config to measure (schema-valid; the cross-field rules are not checked again, so a probe may
            shrink the volume below what the other stage's rules allow).
        options: how to measure.
        timeout: seconds before the measurement counts as failed (a fresh process only).
        env: extra environment variables for that process (the planner sets glibc's mmap threshold).
        in_process: measure in this process instead: where device time is scarce this saves a process start per
            measurement (CUDA peaks are reset per step, so measurements do not see each other's).
    """
    if in_process:
        try:
            return measure(config, options)
        except Exception as exc:  # noqa: BLE001 - a failed measurement is a result, not the end of the run
            return {"error": _describe_failure(exc)}
        finally:
            if config.device.compile:
                torch._dynamo.reset()  # the next measurement compiles afresh, never over the recompilation limit
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    command = [sys.executable, "-m", "monai_diffusion.memory.probe",
               json.dumps(config.model_dump(mode="json")), json.dumps(dataclasses.asdict(options))]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if lines:
        return json.loads(lines[-1][len(RESULT_PREFIX):])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    killed = done.returncode < 0 or done.returncode == 137
    reason = "killed (out of memory?)" if killed else f"exit code {done.returncode}"
    return {"error": f"{reason}: {' | '.join(tail)[-300:]}" if tail else reason}


def _describe_failure(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def main(argv: list[str] | None = None) -> int:
    """Worker entry: ``python -m monai_diffusion.memory.probe CONFIG_JSON OPTIONS_JSON`` prints one record (with
    ``error`` and exit status 1 when the step cannot be built or run)."""
    config_json, options_json = sys.argv[1:] if argv is None else argv
    try:
        record = measure(Config.model_validate(json.loads(config_json)), Options(**json.loads(options_json)))
    except Exception as exc:  # noqa: BLE001 - reported to the driver, which names the measurement
        record = {"error": _describe_failure(exc)}
    print(RESULT_PREFIX + json.dumps(record), flush=True)
    return 1 if "error" in record else 0


if __name__ == "__main__":
    sys.exit(main())
