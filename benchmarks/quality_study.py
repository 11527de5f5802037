"""What a stronger downsampling factor costs in reconstruction quality: one autoencoder recipe, the same step
budget, several factor settings, each scored by ``monai-diffusion evaluate`` beside trilinear resampling at the
same number of values. Writes a markdown report (docs/quality.md by default) with one panel per setting.

Run from the repository root:

    python benchmarks/quality_study.py                       # the CPU study of docs/quality.md (about 45 min)
    python benchmarks/quality_study.py --size 256 256 64 --spacing 1 1 2 --device cuda --steps 2000 \\
        --out docs/quality-gpu.md                            # the same table at 256x256x64 on a GPU

Every setting is a real ``monai-diffusion train-autoencoder`` run (config ``benchmarks/quality_study.yaml`` plus
the setting's ``--set`` options), evaluated on the demo set's held-out volumes; step time and peak memory come from
the run's own TensorBoard scalars (median of the logged step times, the first left out; peak memory as the run logs it: CUDA
max allocated, or the process's peak resident set on CPU, data cache included).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "benchmarks" / "quality_study.yaml"

# name -> --set options on top of the study config. Channels stay the same; the [16] setting has one level less.
SETTINGS: dict[str, list[str]] = {
    "[2,2]": ["autoencoder.downsample_factors=[2,2]"],
    "[4,2]": ["autoencoder.downsample_factors=[4,2]"],
    "[8,2]": ["autoencoder.downsample_factors=[8,2]"],
    "[16]": ["autoencoder.downsample_factors=[16]", "autoencoder.num_channels=[8,32]"],
    "[[4,4,2],[2,2,2]]": ["autoencoder.downsample_factors=[[4,4,2],[2,2,2]]"],
    "[4,2], 8 latent channels": ["autoencoder.downsample_factors=[4,2]", "autoencoder.latent_channels=8"],
    "[8,2], 8 latent channels": ["autoencoder.downsample_factors=[8,2]", "autoencoder.latent_channels=8"],
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-").replace("--", "-")


def scalars(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    return [event.value for event in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def run(command: list[str], log: Path) -> None:
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        result = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}; see {log}")


def study_setting(name: str, options: list[str], args: argparse.Namespace, work: Path) -> dict:
    """Train and evaluate one setting; returns its row for the report."""
    run_name = f"factors-{slug(name)}"  # a bare "16" would read as a number in --set
    common = ["--set", f"output.output_dir={work}", "--set", f"output.run_name={run_name}",
              "--set", f"autoencoder.training.max_steps={args.steps}", "--set", f"device.device={args.device}",
              "--set", f"data.voxel_size={list(args.size)}".replace(" ", ""),
              "--set", f"data.spacing={list(args.spacing)}".replace(" ", "")]
    for option in options + args.set:
        common += ["--set", option]
    run_dir = work / run_name
    log = work / f"{run_name}.log"
    timing = run_dir / "study-train-seconds.txt"
    if args.reuse and (run_dir / "evaluation" / "summary.json").is_file() and timing.is_file():
        trained = float(timing.read_text())  # evaluated by an earlier call with the same --work
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)
        log.unlink(missing_ok=True)
        started = time.time()
        run([sys.executable, "-m", "monai_diffusion.cli", "train-autoencoder", "--config", str(CONFIG), *common], log)
        trained = time.time() - started
        run([sys.executable, "-m", "monai_diffusion.cli", "evaluate", str(run_dir), "--set",
             f"device.device={args.device}"], log)
        timing.write_text(f"{trained:.1f}\n")
    report = json.loads((run_dir / "evaluation" / "summary.json").read_text())
    step_times = scalars(run_dir, "train/step_time_s")
    memory = scalars(run_dir, "train/peak_memory_mb")
    return {
        "name": name,
        "report": report,
        "step_time_s": statistics.median(step_times[1:]) if len(step_times) > 1 else None,
        "peak_memory_mib": max(memory) if memory else None,
        "train_minutes": trained / 60,
        "panel": run_dir / "evaluation" / "reconstruction-worst.png",
    }


def number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def render(rows: list[dict], args: argparse.Namespace, device_name: str, panels_dir: Path, out: Path) -> str:
    size = "x".join(map(str, args.size))
    lines = [
        "# Reconstruction quality by downsampling factor",
        "",
        f"Written by `benchmarks/quality_study.py` on {time.strftime('%Y-%m-%d')}, {device_name}: the same autoencoder "
        f"recipe (`benchmarks/quality_study.yaml`) trained for {args.steps} optimizer steps on the demo brains at "
        f"{size} voxels of {'x'.join(map(str, args.spacing))} mm, then scored by `monai-diffusion evaluate` on the "
        f"{rows[0]['report']['volumes']} held-out volumes. \"Trilinear\" shrinks each volume to a grid with as many "
        "values as the setting's latent and interpolates back; \"gain\" is the autoencoder's PSNR minus the "
        "baseline's. Step time is the median of the run's logged steps, memory the run's logged peak "
        f"({'CUDA max allocated' if args.device == 'cuda' else 'process peak resident set on CPU, data cache included'}).",
        "",
        "| setting | total factor | latent | values | PSNR (dB) | SSIM | MS-SSIM | trilinear PSNR / SSIM / MS-SSIM "
        "| gain (dB) | step (s) | peak memory (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = row["report"]
        s = r["summary"]
        latent = r["latent_shape"]
        total = [a // b for a, b in zip(r["image_shape"][1:], latent[1:])]
        mean = lambda key: s[key]["mean"]  # noqa: E731
        lines.append(
            f"| {row['name']} | {'x'.join(map(str, total))} | {'x'.join(map(str, latent))} | {r['latent_values']:,} "
            f"| {mean('autoencoder_psnr'):.2f} ± {s['autoencoder_psnr']['std']:.2f} | {mean('autoencoder_ssim'):.3f} "
            f"| {mean('autoencoder_ms_ssim'):.3f} | {mean('trilinear_psnr'):.2f} / {mean('trilinear_ssim'):.3f} / "
            f"{mean('trilinear_ms_ssim'):.3f} | {mean('autoencoder_psnr') - mean('trilinear_psnr'):+.2f} "
            f"| {number(row['step_time_s'], '.2f')} | {number(row['peak_memory_mib'], ',.0f')} |"
        )
    lines += ["", f"MS-SSIM uses {rows[0]['report']['ms_ssim_scales']} scales at this size (the most that fit).", "",
              "## Panels", "", "The held-out volume each setting reconstructs worst (input, autoencoder, trilinear):", ""]
    for row in rows:
        target = panels_dir / f"{slug(row['name'])}.png"
        shutil.copyfile(row["panel"], target)
        lines += [f"**{row['name']}**", "", f"![{row['name']}]({target.relative_to(out.parent).as_posix()})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=700, help="optimizer steps per setting (default 700, the "
                        "quickstart's)")
    parser.add_argument("--size", type=int, nargs=3, default=[64, 64, 64], help="data.voxel_size (default 64 64 64)")
    parser.add_argument("--spacing", type=float, nargs=3, default=[3.0, 3.0, 3.0], help="data.spacing in mm")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--only", nargs="+", default=None, choices=list(SETTINGS), help="run these settings only")
    parser.add_argument("--set", action="append", default=[], help="extra --set option for every run (repeatable)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep settings an earlier call already trained and evaluated in --work (same options)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "quality-study", help="run folders")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "quality.md", help="the report")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    panels_dir = args.out.parent / (args.out.stem + "-panels")
    panels_dir.mkdir(parents=True, exist_ok=True)

    import platform

    import torch

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}")
    rows = []
    for name in args.only or SETTINGS:
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
        row = study_setting(name, SETTINGS[name], args, args.work)
        s = row["report"]["summary"]
        print(f"    PSNR {s['autoencoder_psnr']['mean']:.2f} dB (trilinear {s['trilinear_psnr']['mean']:.2f}), "
              f"SSIM {s['autoencoder_ssim']['mean']:.3f} (trilinear {s['trilinear_ssim']['mean']:.3f}), "
              f"{row['train_minutes']:.1f} min", flush=True)
        rows.append(row)
    args.out.write_text(render(rows, args, device_name, panels_dir, args.out) + "\n")
    (args.out.with_suffix(".json")).write_text(json.dumps(
        [{k: v for k, v in row.items() if k != "panel"} for row in rows], indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
