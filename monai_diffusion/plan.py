"""``monai-diffusion plan``: predict the peak memory of a config's training steps and propose a change that fits.

How it predicts: the benchmark harness (:mod:`monai_diffusion.benchmark`) runs the config's own autoencoder
training step, in a fresh process, at a reduced volume size (the "probe", about :data:`PROBE_VOXELS` voxels,
each axis a multiple of the total downsampling factor), and the peak is scaled up in proportion to the number of
voxels. Every activation of these networks scales with the voxel count (attention included, since it runs through
PyTorch's memory-efficient SDPA; without SDPA the quadratic attention matrices are added analytically), and the
peak is measured over what is held between steps, so it has no constant part. On the CPU the probe runs with
glibc's mmap threshold scaled by the same ratio as the volume: at full size maps above 32 MiB are mmapped and
returned to the system when freed while smaller ones fragment the heap, and the probe reproduces that split (without
it a probe overstates the per-voxel peak by ~30%). The LDM step from cached latents is measured directly at the
full latent size (latents are small); encoding on the fly adds the frozen encoder's forward, predicted like the
autoencoder step.

Where it measures: on the GPU when there is one (``torch.cuda.max_memory_allocated``, the config's precision);
otherwise on the CPU (peak RSS increase, float32). A CPU measurement answers for a CPU run; for a GPU budget on
a machine without one it is converted with fixed factors (see :data:`GPU_FROM_CPU`) and marked as an estimate.

If the prediction does not fit the budget, candidate changes are tried from the least to the most intrusive
(gradient checkpointing, mixed precision, smaller batch with more accumulation, stronger downsampling), each
predicted the same way, and the first that fits is printed as ``--set`` options to paste.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from monai_diffusion.benchmark import Case, run_case
from monai_diffusion.config.arguments import add_config_arguments, config_from_args
from monai_diffusion.config.schema import Config

GIB = 1024.0  # MiB per GiB
# Default size of the probe, in voxels (half an issue-size volume): a CPU step at this size takes seconds.
PROBE_VOXELS = 2**19
# GPU peak (fp16 AMP where asked) from a CPU float32 peak, calibrated against the harness: at 256x256x64 the H200
# measured 4.9 GiB ([4,2], fp16 AMP) and 1.40 GiB (the same with checkpointing) where the CPU fp32 peak scales to
# 6.8 and 3.2 GiB. Standard autocast keeps GroupNorm and the SiLU after it in float32 (activations ~0.7-0.83x);
# the fused checkpointing units store every map in half precision (~0.45x).
GPU_FROM_CPU = {("fp32", False): 1.0, ("fp32", True): 1.0, ("amp", False): 0.72, ("amp", True): 0.45}
# Reserve on a GPU: the CUDA context and cuDNN workspaces (not counted by max_memory_allocated), fragmentation.
CUDA_RESERVE_MIB = 600.0
USABLE_FRACTION = 0.9


def parse_memory(text: str) -> float:
    """'24GB', '24G', '24 GiB', '800MB' or a bare number of GiB -> MiB."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?i?b?)?\s*", text.lower())
    if not match:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 24GB, 800MB)")
    value, unit = float(match.group(1)), (match.group(2) or "g").rstrip("b").rstrip("i")
    return value * {"k": 1 / 1024, "m": 1.0, "g": 1024.0, "t": 1024.0**2, "": 1024.0}[unit]


# ---------------------------------------------------------------------------------------------------------------------
# Config -> benchmark cases
# ---------------------------------------------------------------------------------------------------------------------


def _precision_name(config: Config, device_type: str) -> str:
    from monai_diffusion.engine.precision import precision_name

    return precision_name(config.device.mixed_precision, device_type)


def autoencoder_case(config: Config, device_type: str, step: str | None = None) -> Case:
    """The benchmark case that is the config's autoencoder training step on ``device_type`` (cpu or cuda)."""
    ae = config.autoencoder
    t = ae.training
    levels = len(ae.num_channels)
    if step is None:
        step = "adv" if t.adv_weight > 0 else "ae"
    precision = _precision_name(config, device_type) if device_type == "cuda" else "fp32"
    return Case(
        label="autoencoder",
        step=step,
        size=tuple(config.data.voxel_size),
        channels=tuple(ae.num_channels),
        factors=ae.downsample_factors,
        attention_levels=tuple(ae.attention_levels) if ae.attention_levels is not None else (False,) * levels,
        num_res_blocks=ae.num_res_blocks,
        latent_channels=ae.latent_channels,
        norm_num_groups=ae.norm_num_groups,
        flash=ae.use_flash_attention,
        checkpoint="ours" if t.use_gradient_checkpointing else "none",
        precision=precision,
        batch=t.batch_size,
        device=device_type,
        in_channels=ae.in_channels,
        with_encoder_nonlocal_attn=ae.with_encoder_nonlocal_attn,
        with_decoder_nonlocal_attn=ae.with_decoder_nonlocal_attn,
        use_convtranspose=ae.use_convtranspose,
        disc_channels=t.disc_channels,
        disc_num_layers=t.disc_num_layers,
        cudnn_benchmark=config.device.cudnn_benchmark,
    )


def ldm_case(config: Config, device_type: str) -> Case:
    """The config's LDM UNet step from cached latents (batch ``ldm.training.batch_size``)."""
    unet = config.ldm.unet
    base = autoencoder_case(config, device_type, step="ldm_cache")
    return dataclasses.replace(
        base,
        label="ldm",
        checkpoint="none",
        batch=config.ldm.training.batch_size,
        unet_channels=tuple(unet.num_channels),
        unet_attention_levels=tuple(unet.attention_levels),
        unet_head_channels=unet.num_head_channels if isinstance(unet.num_head_channels, int) else unet.num_head_channels[0],
        unet_num_res_blocks=unet.num_res_blocks,
        unet_norm_num_groups=unet.norm_num_groups,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Probing and extrapolation
# ---------------------------------------------------------------------------------------------------------------------


def _total_factor(case: Case) -> tuple[int, ...]:
    from monai_diffusion.factors import per_axis_factors, total_factor

    return total_factor(per_axis_factors(case.factors, len(case.channels) - 1, len(case.size)), len(case.size))


def probe_sizes(case: Case, probe_voxels: int = PROBE_VOXELS) -> list[tuple[int, ...]]:
    """The reduced size to measure ``case`` at: about ``probe_voxels`` voxels, each axis a multiple of the total
    factor (and large enough for the discriminator); ``[case.size]`` when the size is already that small."""
    size, factor = case.size, _total_factor(case)
    # The discriminator halves every axis num_layers times and normalises what is left: keep that above 1 voxel.
    minimum = [max(f, 2 ** (case.disc_num_layers + 2) if case.step == "adv" else 2 * f) for f in factor]
    minimum = [math.ceil(m / f) * f for m, f in zip(minimum, factor)]
    if math.prod(size) <= probe_voxels or case.step == "ldm_cache":  # latents are small: measured at full size
        return [tuple(size)]
    ratio = (probe_voxels / math.prod(size)) ** (1 / len(size))
    probe = tuple(min(s, max(m, int(s * ratio) // f * f)) for s, f, m in zip(size, factor, minimum))
    return [probe]


# glibc mmaps allocations above this (its dynamic threshold's ceiling, reached in any real step).
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20


def _attention_matrix_mib(case: Case, size: tuple[int, ...]) -> float:
    """Memory of the explicit attention matrices (use_flash_attention=False) kept for backward, MiB."""
    if case.flash:
        return 0.0
    latent = [s // f for s, f in zip(size, _total_factor(case))]
    tokens = math.prod(latent)
    blocks = int(case.with_encoder_nonlocal_attn) + int(case.with_decoder_nonlocal_attn)
    levels = case.attention_levels or ()
    res = case.num_res_blocks if isinstance(case.num_res_blocks, int) else max(case.num_res_blocks)
    if levels and levels[-1]:
        blocks += 2 * res
    # scores and probabilities, float32 (or half under AMP), per block and volume; the deepest level only.
    bytes_per = 2 if case.precision in ("fp16", "bf16") else 4
    return blocks * 2 * case.batch * tokens**2 * bytes_per / 2**20


@dataclass
class Prediction:
    """A predicted peak (MiB) and how it was made."""

    peak_mib: float
    step_s: float | None
    probes: list[dict[str, Any]] = field(default_factory=list)
    measured_on: str = ""
    estimated: bool = False
    error: str | None = None


def _probe(case: Case, size: tuple[int, ...], target_voxels: int, steps: int, timeout: float | None) -> dict:
    probe = dataclasses.replace(case, size=size, steps=steps, warmup=1)
    env = None
    if case.device != "cuda" and math.prod(size) < target_voxels:
        # Maps that would be mmapped at full size are mmapped in the probe too (see the module docstring).
        ratio = math.prod(size) / target_voxels
        env = {"MALLOC_MMAP_THRESHOLD_": str(max(2**17, int(GLIBC_MMAP_THRESHOLD_MAX * ratio)))}
    return run_case(probe, timeout, env)


def predict(case: Case, probe_voxels: int = PROBE_VOXELS, steps: int = 1, timeout: float | None = None) -> Prediction:
    """Predict ``case``'s peak memory at its size from a probe at a reduced size (proportional to voxels)."""
    target = math.prod(case.size)
    (size,) = probe_sizes(case, probe_voxels)
    record = _probe(case, size, target, steps, timeout)
    if "error" in record:
        return Prediction(float("nan"), None, [record], error=record["error"])
    measured = record["peak_total_mb"] if case.device == "cuda" else record["peak_mb"]
    scale = target / math.prod(size)
    if case.device == "cuda":
        # The total includes parameters, gradients and optimizer state, which do not scale with the volume.
        fixed = record["baseline_mb"]
        peak = fixed + (measured - fixed) * scale
    else:
        peak = measured * scale
    peak += _attention_matrix_mib(case, case.size) - _attention_matrix_mib(case, size) * scale
    return Prediction(peak, record["step_s"] * scale, [record], measured_on=record.get("device", "?"))


def to_gpu_estimate(prediction: Prediction, case: Case, gpu_precision: str) -> Prediction:
    """A CPU float32 prediction converted to a GPU one (see :data:`GPU_FROM_CPU`)."""
    key = ("amp" if gpu_precision in ("fp16", "bf16") else "fp32", case.checkpoint == "ours")
    return dataclasses.replace(prediction, peak_mib=prediction.peak_mib * GPU_FROM_CPU[key], estimated=True)


# ---------------------------------------------------------------------------------------------------------------------
# Planning: predictions for a config, and the smallest change that fits
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    autoencoder: Prediction
    ldm: Prediction | None
    budget_mib: float | None
    usable_mib: float | None
    target: str
    fits: bool | None
    change: list[str] = field(default_factory=list)
    change_prediction: Prediction | None = None
    change_note: str = ""


class Planner:
    """Predicts config steps' peaks on ``device`` for a ``target`` device ('cpu' or 'cuda')."""

    def __init__(self, device: str, target: str, probe_voxels: int = PROBE_VOXELS, steps: int = 1,
                 timeout: float | None = None, verbose: bool = False) -> None:
        self.device, self.target = device, target
        self.probe_voxels, self.steps, self.timeout, self.verbose = probe_voxels, steps, timeout, verbose
        self._cache: dict[str, Prediction] = {}

    def _predict(self, case: Case, gpu_precision: str) -> Prediction:
        key = case.to_json() + gpu_precision
        if key not in self._cache:
            if self.verbose:
                print(f"  probing {case.step} {case.factors_text} ckpt={case.checkpoint} batch={case.batch} "
                      f"{case.precision} at {probe_sizes(case, self.probe_voxels)} ...", flush=True)
            prediction = predict(case, self.probe_voxels, self.steps, self.timeout)
            if self.target == "cuda" and self.device == "cpu" and prediction.error is None:
                prediction = to_gpu_estimate(prediction, case, gpu_precision)
            self._cache[key] = prediction
        return self._cache[key]

    def autoencoder(self, config: Config) -> Prediction:
        return self._predict(autoencoder_case(config, self.device), _precision_name(config, self.target))

    def ldm(self, config: Config) -> Prediction:
        gpu_precision = _precision_name(config, self.target)
        unet = self._predict(ldm_case(config, self.device), gpu_precision)
        if config.ldm.training.cache_latents or unet.error:
            return unet
        # Encoding on the fly: the frozen encoder's forward comes first, then the UNet step.
        encode_case = dataclasses.replace(autoencoder_case(config, self.device, step="encode"), checkpoint="none",
                                          batch=config.ldm.training.batch_size)
        encode = self._predict(encode_case, gpu_precision)
        return dataclasses.replace(unet, peak_mib=max(unet.peak_mib, encode.peak_mib), probes=unet.probes + encode.probes,
                                   error=encode.error)


def _candidates(config: Config, target: str) -> list[tuple[list[str], str]]:
    """(--set options, note) from the least to the most intrusive change."""
    t = config.autoencoder.training
    out: list[tuple[list[str], str]] = []
    ckpt = [] if t.use_gradient_checkpointing else ["autoencoder.training.use_gradient_checkpointing=true"]
    amp = [] if config.device.mixed_precision not in (False, "no", "fp32") or target != "cuda" else [
        "device.mixed_precision=true"
    ]
    if ckpt:
        out.append((ckpt, "recomputes norms/activations and some blocks in backward: ~1.1-1.4x step time, same results"))
    if amp:
        out.append((amp, "fp16 autocast: faster on GPUs, tiny numerical differences"))
    if ckpt and amp:
        out.append((ckpt + amp, "checkpointing and fp16 autocast"))
    batch, accumulation = t.batch_size, t.gradient_accumulation_steps
    while batch > 1:
        batch //= 2
        accumulation *= 2
        out.append((ckpt + amp + [f"autoencoder.training.batch_size={batch}",
                                  f"autoencoder.training.gradient_accumulation_steps={accumulation}"],
                    "same effective batch through gradient accumulation: more steps per update, same memory per step"))
    factors = config.autoencoder.downsample_factors or [2] * (len(config.autoencoder.num_channels) - 1)
    size = config.data.voxel_size
    for _ in range(3):
        if not factors:
            break
        first = factors[0] if isinstance(factors[0], list) else [factors[0]] * len(size)
        first = [f * 2 for f in first]
        candidate = [first if isinstance(factors[0], list) else first[0]] + list(factors[1:])
        per_axis = [1] * len(size)
        for level in candidate:
            level_axes = level if isinstance(level, list) else [level] * len(size)
            per_axis = [p * f for p, f in zip(per_axis, level_axes)]
        if any(s % f for s, f in zip(size, per_axis)):
            break
        factors = candidate
        text = json.dumps(candidate).replace(" ", "")
        out.append((ckpt + amp + [f"autoencoder.downsample_factors={text}"],
                    "stronger downsampling at level 0: a smaller latent, less detail in reconstructions "
                    "(raise latent_channels to compensate)"))
    return out


def candidates(config: Config, target: str) -> list[tuple[list[str], str]]:
    """The candidate changes that give a valid config (the config's cross-field rules hold)."""
    from monai_diffusion.config.loading import ConfigError

    valid = []
    for overrides, note in _candidates(config, target):
        try:
            _apply(config, overrides)
        except ConfigError:
            continue
        valid.append((overrides, note))
    return valid


def _apply(config: Config, overrides: list[str]) -> Config:
    from monai_diffusion.config.loading import apply_overrides, config_from_dict

    raw = apply_overrides(config.model_dump(mode="json"), overrides)
    return config_from_dict(raw, "<plan>")


def make_plan(config: Config, budget_mib: float | None, planner: Planner) -> Plan:
    """Predict the config's steps; if a budget is given and they do not fit, find the first candidate that does."""
    autoencoder = planner.autoencoder(config)
    ldm = planner.ldm(config)
    usable = None
    if budget_mib is not None:
        usable = budget_mib * USABLE_FRACTION - (CUDA_RESERVE_MIB if planner.target == "cuda" else 0.0)
    plan = Plan(autoencoder, ldm, budget_mib, usable, planner.target, None)
    if usable is None or autoencoder.error:
        return plan
    worst = max(autoencoder.peak_mib, ldm.peak_mib if ldm and not ldm.error else 0.0)
    plan.fits = worst <= usable
    if plan.fits:
        return plan
    if autoencoder.peak_mib > usable:
        for overrides, note in candidates(config, planner.target):
            candidate = _apply(config, overrides)
            prediction = planner.autoencoder(candidate)
            if prediction.error is None and prediction.peak_mib <= usable:
                plan.change, plan.change_prediction, plan.change_note = overrides, prediction, note
                break
    elif ldm is not None and ldm.peak_mib > usable:
        lt = config.ldm.training
        options = []
        if not lt.cache_latents:
            options.append((["ldm.training.cache_latents=true"], "encode each volume once and train from the cache"))
        batch, accumulation = lt.batch_size, lt.gradient_accumulation_steps
        while batch > 1:
            batch //= 2
            accumulation *= 2
            options.append(([f"ldm.training.batch_size={batch}", f"ldm.training.gradient_accumulation_steps={accumulation}"],
                            "same effective batch through gradient accumulation"))
        for overrides, note in options:
            try:
                candidate = _apply(config, overrides)
            except ValueError:
                continue
            prediction = planner.ldm(candidate)
            if prediction.error is None and prediction.peak_mib <= usable:
                plan.change, plan.change_prediction, plan.change_note = overrides, prediction, note
                break
    return plan


def _gib(mib: float) -> str:
    return f"{mib / GIB:.2f} GiB"


def describe(config: Config, plan: Plan, source: str) -> str:
    ae = config.autoencoder
    t = ae.training
    factors = json.dumps(ae.downsample_factors or [2] * (len(ae.num_channels) - 1)).replace(" ", "")
    lines = [
        f"config: {source}: {'x'.join(map(str, config.data.voxel_size))}, channels {ae.num_channels}, factors "
        f"{factors}, batch {t.batch_size}, mixed_precision={config.device.mixed_precision}, checkpointing="
        f"{str(t.use_gradient_checkpointing).lower()}, adversarial={'on' if t.adv_weight > 0 else 'off'}",
    ]
    a = plan.autoencoder
    if a.error:
        return "\n".join(lines + [f"could not measure the autoencoder step: {a.error}"])
    sizes = [("x".join(map(str, r["case"]["size"]))) for r in a.probes]
    how = "estimated for a GPU from a CPU float32 measurement" if a.estimated else "measured"
    lines.append(f"{how} on {a.measured_on} at {', '.join(sizes)}, extrapolated to the full size")
    lines.append("")
    # A step time measured on another device than the target's says nothing about it: shown only when it does.
    timing = f"   ~{a.step_s:.1f} s/step (rough: scaled from the probe)" if a.step_s and not a.estimated else ""
    lines.append(f"  autoencoder training step  {_gib(a.peak_mib):>10}" + timing)
    if plan.ldm is not None:
        mode = "from cached latents" if config.ldm.training.cache_latents else "encoding on the fly"
        ldm_text = f"could not measure: {plan.ldm.error}" if plan.ldm.error else _gib(plan.ldm.peak_mib)
        lines.append(f"  LDM training step ({mode})  {ldm_text}")
    if plan.budget_mib is None:
        return "\n".join(lines)
    lines.append("")
    lines.append(f"budget {_gib(plan.budget_mib)} ({plan.target}); usable {_gib(plan.usable_mib)} after "
                 + ("the CUDA context and " if plan.target == "cuda" else "") + "a 10% fragmentation reserve")
    if plan.fits:
        lines.append("fits.")
    elif plan.change:
        lines.append("does not fit. Smallest change that fits "
                     f"(autoencoder step {_gib(plan.change_prediction.peak_mib)}; {plan.change_note}):")
        lines.append("  " + " ".join(f"--set {o}" for o in plan.change))
    else:
        lines.append("does not fit, and no single change tried fits: reduce voxel_size or num_channels.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="monai-diffusion plan", description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--gpu-memory", default=None, help="memory budget, e.g. 24GB (a GPU's, or RAM with --target cpu)")
    parser.add_argument("--target", choices=("auto", "cpu", "cuda"), default="auto",
                        help="device the training will run on (auto: cuda when --gpu-memory is given, else where this runs)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run the probes")
    parser.add_argument("--probe-voxels", type=int, default=PROBE_VOXELS, help="voxels of the larger probe volume")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per probe")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    target = args.target
    if target == "auto":
        target = "cuda" if args.gpu_memory or device == "cuda" else "cpu"
    budget = parse_memory(args.gpu_memory) if args.gpu_memory else None
    planner = Planner(device, target, args.probe_voxels, timeout=args.timeout, verbose=not args.json)
    plan = make_plan(config, budget, planner)
    if args.json:
        print(json.dumps(dataclasses.asdict(plan), indent=1, default=str))
    else:
        print(describe(config, plan, args.config or "<defaults>"))
    if plan.autoencoder.error:
        return 1
    return 0 if plan.fits in (None, True) or plan.change else 3


if __name__ == "__main__":
    sys.exit(main())
