"""``monai-diffusion plan``: predict the peak memory of a config's training steps and propose a change that fits.

How it predicts: the probe (:mod:`monai_diffusion.memory.probe`) builds the config's own training steps, the ones
train-autoencoder and train-ldm run (the perceptual, SSIM and adversarial terms, the EMA and the prediction type the
config sets), and measures them in a fresh process. The autoencoder step is measured at a reduced volume size (the
"probe", about :data:`PROBE_VOXELS` voxels, each axis a multiple of the total downsampling factor). A prediction is

- what the step keeps whatever the volume size: the weights of every network on the device (trained and frozen),
  their gradients, the optimizer state and the EMA, counted on the built objects; plus
- what a step allocates besides its gradients (activations, transients), measured at the probe size and scaled in
  proportion to the number of voxels. Every activation of these networks scales with the voxel count (attention
  included, since it runs through PyTorch's memory-efficient SDPA; without SDPA the quadratic attention matrices
  are added analytically).

On the CPU the probe runs with glibc's mmap threshold scaled by the same ratio as the volume: at full size maps above
32 MiB are mmapped and returned to the system when freed while smaller ones fragment the heap, and the probe
reproduces that split (without it a probe overstates the per-voxel peak by ~30%). The LDM step from cached latents is
measured at full size (latents are small); encoding on the fly adds the frozen encoder's forward, measured like the
autoencoder step (the step's peak is the larger of its two phases).

Where it measures: on the GPU when there is one (``torch.cuda.max_memory_allocated``, the config's precision);
otherwise on the CPU (peak RSS). A CPU measurement answers for a CPU run; for a GPU budget on a machine without one
the measurement is taken in float32 and its activations converted with fixed factors (see :data:`GPU_FROM_CPU`),
marked as an estimate. A step that cannot be measured is an error naming it (exit status 1), never a verdict.

A perceptual network whose pretrained weights are not on this machine (a compute node without internet access) is
measured with its architecture and random weights, and the output says so: the memory does not depend on the
weights' values.

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

import torch

from monai_diffusion import command_description
from monai_diffusion.config.arguments import add_config_arguments, config_from_args
from monai_diffusion.config.loading import ConfigError, apply_overrides, config_from_dict
from monai_diffusion.config.rules import MIN_SPLIT_VOXELS
from monai_diffusion.config.schema import Config
from monai_diffusion.config.stages import downsampling, stage_config, step_config
from monai_diffusion.engine.precision import precision_name
from monai_diffusion.factors import per_axis_factors, total_factor
from monai_diffusion.memory.probe import Options, run_measurement

GIB = 1024.0  # MiB per GiB
# Default size of the probe, in voxels (half an issue-size volume): a CPU step at this size takes seconds.
PROBE_VOXELS = 2**19
# GPU activations (fp16 AMP where asked) from CPU float32 ones, calibrated against the harness: at 256x256x64 the
# H200 measured 4.9 GiB ([4,2], fp16 AMP) and 1.40 GiB (the same with checkpointing) where the CPU fp32 peak scales
# to 6.8 and 3.2 GiB. Standard autocast keeps GroupNorm and the SiLU after it in float32 (activations ~0.7-0.83x);
# the fused checkpointing units store every map in half precision (~0.45x). Weights, gradients and optimizer state
# stay float32 under AMP: they are not converted.
GPU_FROM_CPU = {("fp32", False): 1.0, ("fp32", True): 1.0, ("amp", False): 0.72, ("amp", True): 0.45}
# Reserve on a GPU: the CUDA context and cuDNN workspaces (not counted by max_memory_allocated), fragmentation.
CUDA_RESERVE_MIB = 600.0
USABLE_FRACTION = 0.9
# glibc mmaps allocations above this (its dynamic threshold's ceiling, reached in any real step).
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20
STEP_NAMES = {"autoencoder": "autoencoder training step", "ldm": "LDM training step", "encode": "frozen encoder"}


def parse_memory(text: str) -> float:
    """'24GB', '24G', '24 GiB', '800MB' or a bare number of GiB -> MiB."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?i?b?)?\s*", text.lower())
    if not match:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 24GB, 800MB)")
    value, unit = float(match.group(1)), (match.group(2) or "g").rstrip("b").rstrip("i")
    return value * {"k": 1 / 1024, "m": 1.0, "g": 1024.0, "t": 1024.0**2, "": 1024.0}[unit]


# ---------------------------------------------------------------------------------------------------------------------
# Probing and extrapolation
# ---------------------------------------------------------------------------------------------------------------------


def probe_size(config: Config, stage: str, probe_voxels: int = PROBE_VOXELS) -> tuple[int, ...]:
    """The size to measure ``stage`` at: about ``probe_voxels`` voxels, each axis a multiple of the total factor (and
    large enough for the discriminator); the full size when it is already that small, or for the LDM step."""
    size, factor = tuple(config.data.voxel_size), _size_multiples(config)
    if math.prod(size) <= probe_voxels or stage == "ldm":
        return size
    adversarial = stage == "autoencoder" and config.autoencoder.training.adv_weight > 0
    # The discriminator halves every axis num_layers times and normalises what is left: keep that above 1 voxel.
    minimum = [max(f, 2 ** (config.autoencoder.training.disc_num_layers + 2) if adversarial else 2 * f) for f in factor]
    minimum = [math.ceil(m / f) * f for m, f in zip(minimum, factor)]
    ratio = (probe_voxels / math.prod(size)) ** (1 / len(size))
    return tuple(min(s, max(m, int(s * ratio) // f * f)) for s, f, m in zip(size, factor, minimum))


def _size_multiples(config: Config) -> tuple[int, ...]:
    """What each axis of a size the autoencoder runs at must be a multiple of: the total factor, and along MAISI's
    dim_split enough for num_splits slabs of MIN_SPLIT_VOXELS at every level (the config rules' condition)."""
    factor = list(downsampling(config).total)
    ae = config.autoencoder
    if ae.architecture == "maisi" and ae.num_splits > 1 and len(factor) == 3:
        deepest = 2 ** (len(ae.num_channels) - 1)
        factor[ae.dim_split] = math.lcm(factor[ae.dim_split], ae.num_splits * MIN_SPLIT_VOXELS * deepest)
    return tuple(factor)


def at_size(config: Config, size: tuple[int, ...], **device: Any) -> Config:
    """``config`` with ``data.voxel_size = size`` (and ``device`` settings replaced). Not re-validated: a probe size
    may be too small for the other stage's rules (the UNet's levels), which do not concern the measured step."""
    data = config.data.model_copy(update={"voxel_size": list(size)})
    return config.model_copy(update={"data": data, "device": config.device.model_copy(update=device)}, deep=True)


def _attention_matrix_mib(config: Config, stage: str, size: tuple[int, ...], precision: str) -> float:
    """Memory of the autoencoder's explicit attention matrices (use_flash_attention=False) kept for backward, MiB."""
    ae = config.autoencoder
    if ae.use_flash_attention or stage == "ldm":
        return 0.0
    tokens = math.prod(s // f for s, f in zip(size, downsampling(config).total))
    blocks = int(ae.with_encoder_nonlocal_attn) + int(ae.with_decoder_nonlocal_attn)
    res = ae.num_res_blocks if isinstance(ae.num_res_blocks, int) else max(ae.num_res_blocks)
    if ae.attention_levels and ae.attention_levels[-1]:
        blocks += 2 * res
    # scores and probabilities, float32 (or half under AMP), per block and volume; the deepest level only.
    bytes_per = 2 if precision in ("fp16", "bf16") else 4
    batch = ae.training.batch_size if stage == "autoencoder" else config.ldm.training.batch_size
    return blocks * 2 * batch * tokens**2 * bytes_per / 2**20


@dataclass
class Prediction:
    """A predicted peak (MiB) and how it was made.

    Attributes:
        peak_mib: ``state_mib + activations_mib``.
        state_mib: weights, gradients, optimizer state and EMA: kept whatever the volume size.
        activations_mib: what a step allocates besides its gradients, scaled to the full size.
        step_s: the probe's step time scaled by the voxel ratio (rough), None when not measured.
        probes: the probe records (each with its ``stage`` and ``size``).
        measured_on: the device the probes ran on.
        estimated: converted from a CPU float32 measurement for a GPU.
        error: why the step could not be measured (then the figures are NaN).
    """

    peak_mib: float
    state_mib: float
    activations_mib: float
    step_s: float | None
    probes: list[dict[str, Any]] = field(default_factory=list)
    measured_on: str = ""
    estimated: bool = False
    error: str | None = None


def failed(error: str, probes: list[dict[str, Any]]) -> Prediction:
    return Prediction(math.nan, math.nan, math.nan, None, probes, error=error)


def predict(config: Config, stage: str, device: str, probe_voxels: int = PROBE_VOXELS, *, steps: int = 1,
            timeout: float | None = None) -> Prediction:
    """Predict the peak of ``config``'s ``stage`` step from a probe at a reduced size (see the module docstring)."""
    target, size = tuple(config.data.voxel_size), probe_size(config, stage, probe_voxels)
    env = None
    if device != "cuda" and math.prod(size) < math.prod(target):
        # Maps that would be mmapped at full size are mmapped in the probe too (see the module docstring).
        ratio = math.prod(size) / math.prod(target)
        env = {"MALLOC_MMAP_THRESHOLD_": str(max(2**17, int(GLIBC_MMAP_THRESHOLD_MAX * ratio)))}
    options = Options(stage=stage, device=device, steps=steps, warmup=1, perceptual_stand_in=True)
    record = {"stage": stage, "size": list(size)} | run_measurement(at_size(config, size), options, timeout, env)
    if "error" in record:
        return failed(record["error"], [record])
    scale = math.prod(target) / math.prod(size)
    precision = precision_name(config.device.mixed_precision, "cuda" if device == "cuda" else "cpu")
    activations = max(record["peak_mb"] - record["gradients_mb"], 0.0) * scale
    activations += (_attention_matrix_mib(config, stage, target, precision)
                    - _attention_matrix_mib(config, stage, size, precision) * scale)
    return Prediction(record["state_mb"] + activations, record["state_mb"], activations, record["step_s"] * scale,
                      [record], measured_on=record.get("device", "?"))


def to_gpu_estimate(prediction: Prediction, gpu_precision: str, checkpointing: bool) -> Prediction:
    """A CPU float32 prediction converted to a GPU one: activations by :data:`GPU_FROM_CPU`, the state as it is."""
    factor = GPU_FROM_CPU[("amp" if gpu_precision in ("fp16", "bf16") else "fp32", checkpointing)]
    activations = prediction.activations_mib * factor
    return dataclasses.replace(prediction, peak_mib=prediction.state_mib + activations, activations_mib=activations,
                               estimated=True)


# ---------------------------------------------------------------------------------------------------------------------
# Planning: predictions for a config, and the smallest change that fits
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    autoencoder: Prediction
    ldm: Prediction
    budget_mib: float | None
    usable_mib: float | None
    target: str
    fits: bool | None
    change: list[str] = field(default_factory=list)
    change_prediction: Prediction | None = None
    change_note: str = ""

    @property
    def errors(self) -> list[str]:
        """'<step>: <why>' for every step that could not be measured."""
        steps = (("autoencoder training step", self.autoencoder), ("LDM training step", self.ldm))
        return [f"{name}: {prediction.error}" for name, prediction in steps if prediction.error]


class Planner:
    """Predicts a config's steps on ``device`` ('cpu' or 'cuda') for a ``target`` device ('cpu' or 'cuda')."""

    def __init__(self, device: str, target: str, probe_voxels: int = PROBE_VOXELS, steps: int = 1,
                 *, timeout: float | None = None, verbose: bool = False) -> None:
        self.device, self.target = device, target
        self.probe_voxels, self.steps, self.timeout, self.verbose = probe_voxels, steps, timeout, verbose
        self._cache: dict[str, Prediction] = {}

    def _predict(self, config: Config, stage: str) -> Prediction:
        # What the stage trains on: its own precision, and the autoencoder's volume or patch size.
        config = step_config(config, "autoencoder" if stage == "autoencoder" else "ldm")
        convert = self.target == "cuda" and self.device == "cpu"
        # For a GPU estimate the CPU measures float32, which the conversion factors were calibrated against (MAISI's
        # float16 GroupNorm outputs need fp16 autocast: measured in float32 too).
        probe_config = at_size(config, config.data.voxel_size, mixed_precision=False) if convert else config
        if convert and probe_config.autoencoder.norm_float16:
            probe_config.autoencoder.norm_float16 = False
        key = json.dumps(probe_config.model_dump(mode="json"), sort_keys=True) + stage
        if key not in self._cache:
            if self.verbose:
                size = "x".join(map(str, probe_size(config, stage, self.probe_voxels)))
                print(f"  measuring the {STEP_NAMES[stage]} at {size} ...", flush=True)
            prediction = predict(probe_config, stage, self.device, self.probe_voxels, steps=self.steps,
                                 timeout=self.timeout)
            if convert and prediction.error is None:
                checkpointing = stage == "autoencoder" and config.autoencoder.training.use_gradient_checkpointing
                gpu_precision = precision_name(config.device.mixed_precision, "cuda")
                prediction = to_gpu_estimate(prediction, gpu_precision, checkpointing)
            self._cache[key] = prediction
        return self._cache[key]

    def autoencoder(self, config: Config) -> Prediction:
        return self._predict(config, "autoencoder")

    def ldm(self, config: Config) -> Prediction:
        """The LDM step; encoding on the fly at a size the probe would shrink is predicted as its two phases, the
        frozen encoder's forward (scaled) and the UNet step (measured at full size), whichever is larger."""
        lt = config.ldm.training
        if lt.cache_latents or math.prod(config.data.voxel_size) <= self.probe_voxels:
            return self._predict(config, "ldm")
        cached = config.model_copy(deep=True)
        cached.ldm.training.cache_latents = True
        unet, encode = self._predict(cached, "ldm"), self._predict(config, "encode")
        if unet.error or encode.error:
            return failed(unet.error or encode.error, unet.probes + encode.probes)
        activations = max(unet.activations_mib, encode.activations_mib)
        return dataclasses.replace(unet, peak_mib=unet.state_mib + activations, activations_mib=activations,
                                   step_s=unet.step_s + encode.step_s, probes=unet.probes + encode.probes)


def _candidates(config: Config, target: str) -> list[tuple[list[str], str]]:
    """(--set options, note) from the least to the most intrusive change."""
    t = config.autoencoder.training
    out: list[tuple[list[str], str]] = []
    ckpt = [] if t.use_gradient_checkpointing else ["autoencoder.training.use_gradient_checkpointing=true"]
    # The autoencoder's own precision, where it has one, is the key that changes it.
    amp_key = "autoencoder.training.mixed_precision" if t.mixed_precision is not None else "device.mixed_precision"
    amp_now = stage_config(config, "autoencoder").device.mixed_precision
    amp = [] if precision_name(amp_now, target) != "fp32" or target != "cuda" else [f"{amp_key}=true"]
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
    patches = _patch_candidates(config)
    # Smaller patches before stronger factors (which cost detail); whole-volume training is offered patches last.
    if t.patch_size is not None:
        out += [(ckpt + amp + [patch], note) for patch, note in patches]
    factors = downsampling(config).factors
    size = config.data.voxel_size
    for _ in range(3):
        if not factors:
            break
        first = factors[0] if isinstance(factors[0], list) else [factors[0]] * len(size)
        candidate = [[f * 2 for f in first] if isinstance(factors[0], list) else first[0] * 2] + list(factors[1:])
        total = total_factor(per_axis_factors(candidate, len(candidate), len(size)), len(size))
        if any(s % f for s, f in zip(size, total)):
            break
        factors = candidate
        text = json.dumps(candidate).replace(" ", "")
        out.append((ckpt + amp + [f"autoencoder.downsample_factors={text}"],
                    "stronger downsampling at level 0: a smaller latent, less detail in reconstructions "
                    "(raise latent_channels to compensate)"))
    if t.patch_size is None:
        out += [(ckpt + amp + [patch], note) for patch, note in patches]
    return out


def _patch_candidates(config: Config) -> list[tuple[str, str]]:
    """Training the autoencoder on smaller random patches (of its volume, or of its current patches): the largest
    axis halved, twice, each a multiple of the total factor and large enough for the discriminator."""
    t = config.autoencoder.training
    volume = list(t.voxel_size or config.data.voxel_size)
    patch, factor = list(t.patch_size or volume), downsampling(config).total
    minimum = [max(f, 2 ** (t.disc_num_layers + 2) if t.adv_weight > 0 else 2 * f) for f in factor]
    out = []
    for _ in range(2):
        axis = max(range(len(patch)), key=lambda a: patch[a])
        smaller = patch[axis] // 2 // factor[axis] * factor[axis]
        if smaller < minimum[axis]:
            break
        patch[axis] = smaller
        out.append((f"autoencoder.training.patch_size={json.dumps(patch).replace(' ', '')}",
                    f"train on random {'x'.join(map(str, patch))} patches of the {'x'.join(map(str, volume))} "
                    "volumes (validation and evaluate reconstruct whole volumes window by window; the LDM keeps "
                    "whole-volume latents): less memory per step, less context per patch"))
    return out


def candidates(config: Config, target: str) -> list[tuple[list[str], str]]:
    """The candidate changes that give a valid config (the config's cross-field rules hold)."""
    valid = []
    for overrides, note in _candidates(config, target):
        try:
            _apply(config, overrides)
        except ConfigError:
            continue
        valid.append((overrides, note))
    return valid


def _apply(config: Config, overrides: list[str]) -> Config:
    return config_from_dict(apply_overrides(config.model_dump(mode="json"), overrides), "<plan>")


def make_plan(config: Config, budget_mib: float | None, planner: Planner) -> Plan:
    """Predict the config's steps; if a budget is given and they do not fit, find the first candidate that does.

    With a step that could not be measured there is no verdict (``fits`` stays None; see :attr:`Plan.errors`).
    """
    autoencoder = planner.autoencoder(config)
    ldm = planner.ldm(config)
    usable = None
    if budget_mib is not None:
        usable = budget_mib * USABLE_FRACTION - (CUDA_RESERVE_MIB if planner.target == "cuda" else 0.0)
    plan = Plan(autoencoder, ldm, budget_mib, usable, planner.target, None)
    if usable is None or plan.errors:
        return plan
    plan.fits = max(autoencoder.peak_mib, ldm.peak_mib) <= usable
    if plan.fits:
        return plan
    if autoencoder.peak_mib > usable:
        options = candidates(config, planner.target)
        predict_change = planner.autoencoder
    else:
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
        predict_change = planner.ldm
    for overrides, note in options:
        try:
            candidate = _apply(config, overrides)
        except ConfigError:
            continue
        prediction = predict_change(candidate)
        if prediction.error is None and prediction.peak_mib <= usable:
            plan.change, plan.change_prediction, plan.change_note = overrides, prediction, note
            break
    return plan


def _gib(mib: float) -> str:
    return f"{mib / GIB:.2f} GiB"


def describe(config: Config, plan: Plan, source: str) -> str:
    ae = config.autoencoder
    t = ae.training
    factors = json.dumps(downsampling(config).factors).replace(" ", "")
    patches = f" (the autoencoder on {'x'.join(map(str, t.patch_size))} patches)" if t.patch_size else ""
    lines = [
        f"config: {source}: {'x'.join(map(str, config.data.voxel_size))}{patches}, channels {ae.num_channels}, factors "
        f"{factors}, batch {t.batch_size}, mixed_precision={config.device.mixed_precision}, checkpointing="
        f"{str(t.use_gradient_checkpointing).lower()}, adversarial={'on' if t.adv_weight > 0 else 'off'}",
    ]
    measured = [p for p in (plan.autoencoder, plan.ldm) if p.error is None]
    if measured:
        sizes = sorted({"x".join(map(str, r["size"])) for p in measured for r in p.probes})
        how = "estimated for a GPU from a CPU float32 measurement" if measured[0].estimated else "measured"
        lines.append(f"{how} on {measured[0].measured_on} at {', '.join(sizes)}, extrapolated to the full size")
        if any(r.get("perceptual_weights") == "random" for p in measured for r in p.probes):
            lines.append(f"the perceptual network ({t.perceptual_network}) with random weights: its pretrained ones "
                         "are not on this machine, and the memory does not depend on their values")
    lines.append("")
    mode = "from cached latents" if config.ldm.training.cache_latents else "encoding on the fly"
    for name, prediction in (("autoencoder training step", plan.autoencoder), (f"LDM training step ({mode})", plan.ldm)):
        if prediction.error:
            lines.append(f"  {name}  could not be measured: {prediction.error}")
            continue
        # A step time measured on another device than the target's says nothing about it: shown only when it does.
        timing = (f"   ~{prediction.step_s:.1f} s/step (rough: scaled from the probe)"
                  if prediction.step_s and not prediction.estimated else "")
        lines.append(f"  {name}  {_gib(prediction.peak_mib):>10}  (weights, gradients, optimizer state "
                     f"{_gib(prediction.state_mib)})" + timing)
    if plan.errors:
        return "\n".join(lines + ["", "not every training step could be measured: no verdict on the memory."])
    if plan.budget_mib is None:
        return "\n".join(lines)
    lines.append("")
    lines.append(f"budget {_gib(plan.budget_mib)} ({plan.target}); usable {_gib(plan.usable_mib)} after "
                 + ("the CUDA context and " if plan.target == "cuda" else "") + "a 10% fragmentation reserve")
    if plan.fits:
        lines.append("fits.")
    elif plan.change:
        which = "autoencoder" if plan.autoencoder.peak_mib > plan.usable_mib else "LDM"
        lines.append("does not fit. Smallest change that fits "
                     f"({which} step {_gib(plan.change_prediction.peak_mib)}; {plan.change_note}):")
        lines.append("  " + " ".join(f"--set {o}" for o in plan.change))
    else:
        lines.append("does not fit, and no single change tried fits: reduce voxel_size or num_channels.")
    return "\n".join(lines)


EXIT_STATUSES = """\
exit status:
  0  the prediction is printed; with --gpu-memory, it fits or the change that fits is printed
  1  a training step could not be measured (the error names it): no verdict
  2  the config or the command line is invalid
  3  it does not fit, and no single change tried fits"""


def memory_budget(text: str) -> float:
    """``--gpu-memory``: a memory size in MiB; an unreadable one is a usage error (exit 2), not a traceback."""
    try:
        return parse_memory(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="monai-diffusion plan", description=command_description(__doc__),
                                     epilog=EXIT_STATUSES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--gpu-memory", type=memory_budget, default=None, metavar="SIZE",
                        help="memory budget, e.g. 24GB (a GPU's, or RAM with --target cpu)")
    parser.add_argument("--target", choices=("auto", "cpu", "cuda"), default="auto",
                        help="device the training will run on (auto: cuda when --gpu-memory is given, else where this runs)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run the probes")
    parser.add_argument("--probe-voxels", type=int, default=PROBE_VOXELS, help="voxels of the larger probe volume")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per probe")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    target = args.target
    if target == "auto":
        target = "cuda" if args.gpu_memory or device == "cuda" else "cpu"
    budget = args.gpu_memory
    planner = Planner(device, target, args.probe_voxels, timeout=args.timeout, verbose=not args.json)
    plan = make_plan(config, budget, planner)
    if args.json:
        print(json.dumps(dataclasses.asdict(plan) | {"errors": plan.errors}, indent=1, default=str))
    else:
        print(describe(config, plan, args.config or "<defaults>"))
    if plan.errors:
        for error in plan.errors:
            print(f"error: could not measure the {error}", file=sys.stderr)
        return 1
    return 0 if plan.fits in (None, True) or plan.change else 3


if __name__ == "__main__":
    sys.exit(main())
