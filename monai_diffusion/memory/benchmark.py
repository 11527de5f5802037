"""``monai-diffusion benchmark``: peak memory and step time of training steps, each case in its own process.

A *case* is a label, the config changes (``--set`` style) that make its training config from the defaults, and how
to measure it (:class:`~monai_diffusion.memory.probe.Options`: the stage, and for comparison MONAI's stock
AutoencoderKL or MONAI's way of checkpointing emulated on our network). The step measured is the one the recipes
train, built from that config: its loss weights, perceptual and SSIM terms, adversarial step, EMA and precision.
Every case runs in a fresh subprocess (``--in-process`` on the GPU), so one case's allocations, caches and crashes
never colour the next. What a case reports is described in :mod:`monai_diffusion.memory.probe`.

Results go to a markdown table and a JSON block, with the device name, torch version and date, into a marked
section of a markdown file (``--output``, default ``benchmark-results/benchmarks.md``; other sections are left as they
are; the project's figures are ``--output docs/benchmarks.md``), and optionally a JSON file.

Examples::

    monai-diffusion benchmark --suite cpu                       # the CPU setting, 128x128x64
    monai-diffusion benchmark --suite gpu --size 256 256 64     # the GPU set
    monai-diffusion benchmark --suite tiny --output none        # seconds: does it run and report
    monai-diffusion benchmark --suite loader --workers 0 1 2    # volumes/s through the data pipeline

The ``loader`` suite measures the data pipeline instead of a step (:mod:`monai_diffusion.memory.throughput`):
CT-like NIfTI.gz volumes it writes itself, through the training transform chain of each cache and worker count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from monai_diffusion import command_description
from monai_diffusion.config.loading import apply_overrides, config_from_dict
from monai_diffusion.config.schema import Config
from monai_diffusion.config.stages import downsampling
from monai_diffusion.engine.precision import precision_name
from monai_diffusion.memory.probe import Options, check_options, run_measurement

SUITES = ("cpu", "gpu", "gpu-large", "gpu-options", "gpu-frontier", "gpu-whole", "gpu-compile", "tiny", "loader")


@dataclass
class Case:
    """One benchmark case: the training step of a config, measured one way.

    Attributes:
        label: the name shown in the table.
        overrides: ``key=value`` changes to the default config (as ``--set`` takes them).
        options: the stage and how to measure it.

    Raises:
        ConfigError: the overrides make an invalid config.
        ValueError: the options cannot measure it (MONAI's stock network at factors other than 2).
    """

    label: str
    overrides: list[str] = field(default_factory=list)
    options: Options = field(default_factory=Options)

    def __post_init__(self) -> None:
        check_options(self.config(), self.options)

    def config(self) -> Config:
        """The validated training config of this case."""
        return config_from_dict(apply_overrides(Config().model_dump(mode="json"), list(self.overrides)),
                                f"case {self.label!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "overrides": list(self.overrides), "options": dataclasses.asdict(self.options)}


def setting(case: Case, device_type: str) -> dict[str, Any]:
    """What the table shows of a case: network, step, size, batch, factors, checkpointing, precision."""
    config, options = case.config(), case.options
    ae, t = config.autoencoder, config.autoencoder.training
    if options.stage == "autoencoder":
        step, batch = ("adv" if t.adv_weight > 0 else "ae"), t.batch_size
        checkpoint = "whole" if options.whole_checkpoint else "ours" if t.use_gradient_checkpointing else "none"
    else:
        step = "encode" if options.stage == "encode" else "ldm_cache" if config.ldm.training.cache_latents else "ldm_fly"
        batch, checkpoint = config.ldm.training.batch_size, "none"
    precision = precision_name(config.device.mixed_precision, device_type)
    extras = [o for o, on in (("no SDPA", not ae.use_flash_attention), ("channels-last", options.channels_last),
                              ("compile", config.device.compile),
                              ("offload", options.stage == "autoencoder" and t.offload_activations)) if on]
    return {
        "model": options.network,
        "step": step,
        "size": list(config.data.voxel_size),
        "batch": batch,
        "factors": json.dumps(downsampling(config).factors).replace(" ", ""),
        "checkpoint": checkpoint,
        "precision": ", ".join([precision, *extras]),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Suites
# ---------------------------------------------------------------------------------------------------------------------

# The network of the suites: channels (16, 32, 64), one residual block per level, attention at the deepest level and
# in both mid-blocks (SDPA), 3 latent channels, batch 1; the autoencoder step without a discriminator unless a case
# says "adversarial", the LDM step at batch 1 with the default UNet, scheduler and EMA.
NETWORK = ["autoencoder.num_channels=[16,32,64]", "autoencoder.attention_levels=[false,false,true]",
           "autoencoder.training.adv_weight=0", "ldm.training.batch_size=1"]
CHECKPOINTING = "autoencoder.training.use_gradient_checkpointing=true"
ADVERSARIAL = "autoencoder.training.adv_weight=0.01"
OFFLOAD = "autoencoder.training.offload_activations=true"
COMPILE = "device.compile=true"


def factors(text: str) -> str:
    return f"autoencoder.downsample_factors={text}"


def on_gpu(*size: int) -> list[str]:
    """The GPU suites' setting: the suites' network at ``size`` (if given), fp16 autocast, cudnn.benchmark."""
    return NETWORK + ([f"data.voxel_size={list(size)}"] if size else []) + ["device.mixed_precision=fp16",
                                                                            "device.cudnn_benchmark=true"]


# The settings of the memory targets: ours against MONAI's stock class, factors, both ways of checkpointing, the
# adversarial step and the LDM step both ways.
MAIN_CASES = [
    ("MONAI [2,2] SDPA", [], dict(network="monai")),
    ("ours [2,2]", [], {}),
    ("MONAI [2,2] SDPA ckpt", [CHECKPOINTING], dict(network="monai")),
    ("ours [2,2] ckpt", [CHECKPOINTING], {}),
    ("ours [4,2]", [factors("[4,2]")], {}),
    ("ours [4,2] whole-ckpt (MONAI's way)", [factors("[4,2]")], dict(whole_checkpoint=True)),
    ("ours [4,2] ckpt", [factors("[4,2]"), CHECKPOINTING], {}),
    ("ours [8,2]", [factors("[8,2]")], {}),
    ("ours [8,2] ckpt", [factors("[8,2]"), CHECKPOINTING], {}),
    ("ours [4,2] adversarial", [factors("[4,2]"), ADVERSARIAL], {}),
    ("LDM [4,2] cached latents", [factors("[4,2]")], dict(stage="ldm")),
    ("LDM [4,2] on the fly", [factors("[4,2]"), "ldm.training.cache_latents=false"], dict(stage="ldm")),
]


def suite(name: str, size: tuple[int, ...] | None = None, steps: int | None = None,
          warmup: int | None = None) -> list[Case]:
    """The named list of cases (see :data:`SUITES`), optionally at another size and number of steps."""
    if name == "cpu":
        # One thread: on a shared 2-core machine two OpenMP threads stall at every barrier whenever the other core
        # is busy (seen: a 0.23 s UNet step taking 10 s), which would make the timings meaningless.
        base, measure = NETWORK + ["data.voxel_size=[128,128,64]"], dict(threads=1, steps=2)
        cases = MAIN_CASES
    elif name == "gpu":
        base = on_gpu(256, 256, 64)
        measure = dict(device="cuda")
        # Last: without SDPA the attention matrices at 64x64x16 tokens need tens of GiB.
        cases = MAIN_CASES + [("MONAI [2,2] stock (no SDPA)", ["autoencoder.use_flash_attention=false"],
                               dict(network="monai"))]
    elif name == "gpu-large":
        base = on_gpu(512, 512, 128)
        measure = dict(device="cuda")
        cases = [
            ("ours [8,2] ckpt", [factors("[8,2]"), CHECKPOINTING], {}),
            ("ours [[8,8,4],[2,2,2]] ckpt", [factors("[[8,8,4],[2,2,2]]"), CHECKPOINTING], {}),
            ("ours [8,2]", [factors("[8,2]")], {}),
        ]
    elif name == "gpu-options":
        base = NETWORK + ["data.voxel_size=[256,256,64]", "device.mixed_precision=fp16", factors("[4,2]")]
        measure = dict(device="cuda")
        cudnn = "device.cudnn_benchmark=true"
        cases = [
            ("ours [4,2] plain", ["device.cudnn_benchmark=false"], {}),
            ("ours [4,2] cudnn.benchmark", [cudnn], {}),
            ("ours [4,2] channels-last", [cudnn], dict(channels_last=True)),
            ("ours [4,2] torch.compile", [cudnn, COMPILE], {}),
            ("ours [4,2] ckpt cudnn.benchmark", [cudnn, CHECKPOINTING], {}),
        ]
    elif name == "gpu-frontier":
        # The memory targets at 256x256x64: [4,2] and [8,2] at or below 1.0 GiB (the shortcut gradient inside the fused
        # unit, then saved maps offloaded), beside the plain steps and MONAI's stock class.
        base = on_gpu(256, 256, 64)
        measure = dict(device="cuda")
        cases = [
            ("ours [4,2] ckpt", [factors("[4,2]"), CHECKPOINTING], {}),
            ("ours [8,2] ckpt", [factors("[8,2]"), CHECKPOINTING], {}),
            ("ours [4,2] ckpt offload", [factors("[4,2]"), CHECKPOINTING, OFFLOAD], {}),
            ("ours [8,2] ckpt offload", [factors("[8,2]"), CHECKPOINTING, OFFLOAD], {}),
            ("ours [8,2] offload (no ckpt)", [factors("[8,2]"), OFFLOAD], {}),
            ("MONAI [2,2] SDPA ckpt", [CHECKPOINTING], dict(network="monai")),
            ("ours [2,2] ckpt", [CHECKPOINTING], {}),
        ]
    elif name == "gpu-whole":
        # Whole CT volumes: 512x512x256 (target < 16 GiB) and 512x512x512 (target < 24 GiB), with and without offload.
        base = on_gpu() + [factors("[8,2]"), CHECKPOINTING]
        measure = dict(device="cuda")
        cases = [
            ("512x512x256 [8,2] ckpt", ["data.voxel_size=[512,512,256]"], {}),
            ("512x512x256 [8,2] ckpt offload", ["data.voxel_size=[512,512,256]", OFFLOAD], {}),
            ("512x512x512 [8,2] ckpt offload", ["data.voxel_size=[512,512,512]", OFFLOAD], {}),
            ("512x512x512 [8,2] ckpt", ["data.voxel_size=[512,512,512]"], {}),
        ]
    elif name == "gpu-compile":
        # Eager against torch.compile (device.compile), ours against MONAI's stock class, at 256x256x64. Each compiled
        # case compiles first (its warm-up steps): about a minute each.
        base = on_gpu(256, 256, 64)
        measure = dict(device="cuda")
        # The eager cases first, then the compiled ones by importance (a time limit cuts the last).
        cases = [
            ("MONAI [2,2] SDPA", [], dict(network="monai")),
            ("ours [2,2]", [], {}),
            ("ours [4,2] ckpt", [factors("[4,2]"), CHECKPOINTING], {}),
            ("ours [8,2] ckpt", [factors("[8,2]"), CHECKPOINTING], {}),
            ("LDM [4,2] cached latents", [factors("[4,2]")], dict(stage="ldm")),
            ("ours [4,2] ckpt compiled", [factors("[4,2]"), CHECKPOINTING, COMPILE], {}),
            ("ours [8,2] ckpt compiled", [factors("[8,2]"), CHECKPOINTING, COMPILE], {}),
            ("MONAI [2,2] SDPA compiled", [COMPILE], dict(network="monai")),
            ("ours [2,2] compiled", [COMPILE], {}),
            ("LDM [4,2] cached latents compiled", [factors("[4,2]"), COMPILE], dict(stage="ldm")),
        ]
    elif name == "tiny":
        # Small enough for CI (seconds); 32^3 keeps the discriminator's and the UNet's deepest maps above 1 voxel.
        base = NETWORK + ["data.voxel_size=[32,32,32]", "autoencoder.num_channels=[8,16,16]",
                          "autoencoder.norm_num_groups=8", "ldm.unet.num_channels=[8,16,16]",
                          "ldm.unet.num_head_channels=8", "ldm.unet.norm_num_groups=8"]
        measure = dict(threads=1, steps=2)
        cases = [
            ("MONAI [2,2]", [], dict(network="monai")),
            ("ours [2,2]", [], {}),
            ("ours [4,2] ckpt", [factors("[4,2]"), CHECKPOINTING], {}),
            ("ours [4,2] whole-ckpt", [factors("[4,2]")], dict(whole_checkpoint=True)),
            ("ours [4,2] adversarial", [factors("[4,2]"), ADVERSARIAL], {}),
            ("LDM [4,2] cached latents", [factors("[4,2]")], dict(stage="ldm")),
            ("LDM [4,2] on the fly", [factors("[4,2]"), "ldm.training.cache_latents=false"], dict(stage="ldm")),
        ]
    else:
        raise ValueError(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
    if size is not None:
        base = base + [f"data.voxel_size={list(size)}"]
    if steps is not None:
        measure = measure | {"steps": steps}
    if warmup is not None:
        measure = measure | {"warmup": warmup}
    return [Case(label, base + overrides, Options(**(measure | how))) for label, overrides, how in cases]


# The loader suite: CT-like files at 0.8 x 0.8 x 2 mm through a CT chain (resampled to 1 x 1 x 2 mm, a -1000..1000 HU
# window, padded back to the file's size, random flips), the plain chain against the preprocessed cache, by worker
# count; and 128^3 patches of the large volumes, where the memory-mapped cache reads only a patch's pages.
LOADER_DATA = ["data.spacing=[1.0,1.0,2.0]", "data.intensity.mode=range", "data.intensity.lower=-1000",
               "data.intensity.upper=1000", "data.augment.flip_prob=0.5", factors("[4,2]")]
LOADER_SIZES = ((256, 256, 64), (512, 512, 128))


@dataclass
class LoaderCase:
    """One loader measurement: the training chain of the defaults plus ``overrides`` at ``size``, on files of that
    size, with ``workers`` DataLoader workers."""

    label: str
    size: tuple[int, ...]
    cache: str
    workers: int
    overrides: list[str] = field(default_factory=list)

    def config(self, data_dir: Path) -> Config:
        overrides = [*LOADER_DATA, "data.source=folder", f"data.data_dir={data_dir}",
                     f"data.voxel_size={list(self.size)}", f"data.cache={self.cache}", *self.overrides]
        return config_from_dict(apply_overrides(Config().model_dump(mode="json"), overrides), f"case {self.label!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def loader_suite(workers: list[int], size: tuple[int, ...] | None = None) -> list[LoaderCase]:
    """The loader cases: each size, the plain chain and the preprocessed cache, each worker count; 128^3 patches of
    the largest size."""
    sizes = [size] if size is not None else list(LOADER_SIZES)
    cases = [LoaderCase(f"{'x'.join(map(str, s))} {cache}", s, cache, w)
             for s in sizes for cache in ("none", "preprocessed") for w in workers]
    large = max(sizes, key=math.prod)
    if all(n >= 128 for n in large):
        cases += [LoaderCase(f"{'x'.join(map(str, large))} {cache} 128^3 patches", large, cache, w,
                             ["autoencoder.training.patch_size=[128,128,128]"])
                  for cache in ("none", "preprocessed") for w in workers]
    return cases


def run_loader_suite(cases: list[LoaderCase], volumes: int, folder: Path | None,
                     save: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    """Write ``volumes`` files per size into ``folder`` (kept, reused) or a temporary folder, then measure each case
    in this process (workers are processes of their own), saving after each."""
    import torch

    from monai_diffusion.memory.throughput import measure_loader, write_ct_volumes
    from monai_diffusion.memory.probe import device_name

    device = device_name(torch.device("cpu"))
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(folder) if folder is not None else Path(scratch)
        for index, case in enumerate(cases, 1):
            data_dir = root / "x".join(map(str, case.size))
            items = [{"image": str(p)} for p in write_ct_volumes(data_dir, case.size, volumes)]
            try:
                record = {"case": case.to_dict(), "device": device} | measure_loader(
                    case.config(data_dir), items, case.workers, root / "cache" / case.label.replace(" ", "_"))
                print(f"[{index}/{len(cases)}] {case.label}, {case.workers} worker(s): {record['volumes_per_s']:.2f} "
                      f"volumes/s, {record['cpu_s_per_volume']:.2f} CPU s/volume (load {record['load_before']})",
                      flush=True)
            except Exception as exc:  # noqa: BLE001 - a failed case is a result, not the end of the run
                record = {"case": case.to_dict(), "device": device, "error": f"{type(exc).__name__}: {exc}"[:300]}
                print(f"[{index}/{len(cases)}] {case.label}: FAILED {record['error']}", flush=True)
            records.append(record)
            save(records)
            shutil.rmtree(root / "cache" / case.label.replace(" ", "_"), ignore_errors=True)
    return records


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """Versions and the date, stored with every report."""
    import monai
    import torch

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }


def markdown_table(records: list[dict[str, Any]]) -> str:
    """The results as a markdown table (one row per case)."""
    header = (
        "| case | model | step | size x batch | factors | ckpt | precision | latent | params | peak GiB | "
        "time s | Mvox/s | device |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [header]
    for record in records:
        s = record["setting"]
        size = "x".join(map(str, s["size"])) + f" x{s['batch']}"
        start = (f"| {record['case']['label']} | {s['model']} | {s['step']} | {size} | {s['factors']} | "
                 f"{s['checkpoint']} | {s['precision']} |")
        if "error" in record:
            rows.append(f"{start} - | - | **failed** | - | - | {record['error'][:80].replace('|', '/')} |")
            continue
        latent = "x".join(map(str, record["latent_shape"]))
        peak = record["peak_total_mb"] if "CPU" not in record["device"] else record["peak_mb"]
        rows.append(
            f"{start} {latent} | {record['params'] / 1e6:.2f} M | {peak / 1024:.2f} | {record['step_s']:.2f} | "
            f"{record['voxels_per_s'] / 1e6:.2f} | {record['device']} |"
        )
    return "\n".join(rows)


def loader_table(records: list[dict[str, Any]]) -> str:
    """The loader suite's results as a markdown table (one row per case)."""
    rows = ["| case | volume | cache | workers | volumes | volumes/s (wall) | CPU s/volume | first s | cache build s "
            "| load avg | device |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        c = r["case"]
        start = f"| {c['label']} | {'x'.join(map(str, c['size']))} | {c['cache']} | {c['workers']} |"
        if "error" in r:
            rows.append(f"{start} - | **failed** | - | - | - | - | {' '.join(r['error'].split())[:120].replace('|', '/')} |")
            continue
        rows.append(f"{start} {r['volumes']} | {r['volumes_per_s']:.2f} | {r['cpu_s_per_volume']:.2f} | "
                    f"{r['first_s']:.2f} | {r.get('build_s', '-')} | {r['load_before']}-{r['load_after']} | "
                    f"{r['device']} |")
    return "\n".join(rows)


def write_report(
    records: list[dict[str, Any]], output: Path, section: str, title: str, *, command: str, env: dict | None = None
) -> None:
    """Write (or replace) the marked section ``section`` of the markdown file ``output``.

    ``env`` (versions, date) defaults to this process's; pass the stored one when re-rendering a saved run.
    """
    env = env or environment()
    devices = sorted({r.get("device", "?") for r in records if "device" in r}) or ["?"]
    loader = any("workers" in r.get("case", {}) for r in records)
    peak_note = (
        "volumes/s = volumes read / wall time from the loader's start (workers' start-up included); CPU s/volume = "
        "CPU time of the process and its workers / volumes; load avg = the machine's 1-minute load before-after"
        if loader
        else "peak = `torch.cuda.max_memory_allocated` over a step (weights, gradients, optimizer state, activations)"
        if any("CPU" not in d for d in devices)
        else "peak = peak RSS over a step minus the RSS between steps (weights and optimizer state are not in it; "
        "`state_mb` in the JSON counts them)"
    )
    body = "\n".join(
        [
            f"<!-- benchmark:{section}:start -->",
            f"### {title}",
            "",
            f"Device: {', '.join(devices)}; torch {env['torch']}, MONAI {env['monai']}, Python {env['python']}"
            + (f", CUDA {env['cuda']}" if env["cuda"] else "")
            + f"; {env['date']}. Command: `{command}`. {peak_note}"
            + ("." if loader else "; time = median step after warm-up."),
            "",
            loader_table(records) if loader else markdown_table(records),
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


# ---------------------------------------------------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------------------------------------------------


def run_case(case: Case, timeout: float | None = None, in_process: bool = False) -> dict[str, Any]:
    """Measure one case; the record holds the case, what the table shows of it, and the measurement (or
    ``error``)."""
    import torch

    want_cuda = case.options.device == "cuda" or (case.options.device == "auto" and torch.cuda.is_available())
    record = {"case": case.to_dict(), "setting": setting(case, "cuda" if want_cuda else "cpu")}
    return record | run_measurement(case.config(), case.options, timeout, in_process=in_process)


DEFAULT_OUTPUT = "benchmark-results/benchmarks.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="monai-diffusion benchmark", description=command_description(__doc__))
    parser.add_argument("--suite", default="cpu", choices=SUITES, help="which list of cases (default: cpu)")
    parser.add_argument("--size", type=int, nargs="+", default=None, help="override the suite's volume size")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default: 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps per case (default: 1)")
    parser.add_argument("--only", action="append", default=[], help="run only cases whose label contains this")
    parser.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"), help="override the cases' device")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per case")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per case before it counts as failed")
    parser.add_argument(
        "--output", default=DEFAULT_OUTPUT, metavar="FILE",
        help=f"markdown file the section is written into, its other sections kept (default: {DEFAULT_OUTPUT} in "
        "the current folder; 'none': no file). This repository's figures are --output docs/benchmarks.md",
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
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                        help="loader suite: DataLoader worker counts to measure (default: 0 1 2)")
    parser.add_argument("--volumes", type=int, default=6, help="loader suite: volumes written and read per size")
    parser.add_argument("--loader-dir", type=Path, default=None,
                        help="loader suite: keep the written volumes here and reuse them (default: a temporary folder)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        section = args.section or Path(args.from_json).stem
        title = args.title or f"Suite `{section}`"
        command = saved.get("command") or f"monai-diffusion benchmark --suite {section}"
        write_report(saved["results"], Path(args.output), section, title, command=command, env=saved["environment"])
        print(markdown_table(saved["results"]))
        return 0

    if args.suite == "loader":
        return loader_main(args, argv)
    cases = suite(args.suite, tuple(args.size) if args.size else None, args.steps, args.warmup)
    if args.only:
        cases = [c for c in cases if any(o.lower() in c.label.lower() for o in args.only)]
    for case in cases:
        if args.device:
            case.options.device = args.device
        if args.threads:
            case.options.threads = args.threads
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
            write_report(records, Path(args.output), section, title, command=command.strip())

    records: list[dict[str, Any]] = []
    for index, case in enumerate(cases, 1):
        record = run_case(case, args.timeout, args.in_process)
        records.append(record)
        if "error" in record:
            print(f"[{index}/{len(cases)}] {case.label}: FAILED {record['error']}", flush=True)
        else:
            print(
                f"[{index}/{len(cases)}] {case.label}: peak {record['peak_mb']:.0f} MiB over the memory between steps "
                f"(total {record['peak_total_mb']:.0f}; weights, gradients and optimizer state "
                f"{record['state_mb']:.0f}), {record['step_s']:.3f} s/step, {record['params'] / 1e6:.2f} M params, "
                f"latent {record['latent_shape']}",
                flush=True,
            )
        save(records)
    print()
    print(markdown_table(records))
    if args.output.lower() != "none":
        print(f"\nwrote section '{section}' of {args.output}")
    return 1 if any("error" in r for r in records) else 0


def loader_main(args: argparse.Namespace, argv: list[str] | None) -> int:
    """``--suite loader``: the data pipeline's throughput (see :func:`loader_suite`)."""
    cases = loader_suite(args.workers, tuple(args.size) if args.size else None)
    if args.only:
        cases = [c for c in cases if any(o.lower() in c.label.lower() for o in args.only)]
    command = "monai-diffusion benchmark " + " ".join(argv if argv is not None else sys.argv[1:])
    title = args.title or "Loader suite: volumes per second through the training transform chain"

    def save(records: list[dict[str, Any]]) -> None:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            saved = {"environment": environment(), "command": command.strip(), "results": records}
            Path(args.json).write_text(json.dumps(saved, indent=1))
        if args.output.lower() != "none":
            write_report(records, Path(args.output), args.section or "loader", title, command=command.strip())

    records = run_loader_suite(cases, args.volumes, args.loader_dir, save)
    print()
    print(loader_table(records))
    return 1 if any("error" in r for r in records) else 0

if __name__ == "__main__":
    sys.exit(main())
