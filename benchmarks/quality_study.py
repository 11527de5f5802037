"""What a stronger downsampling factor costs in reconstruction quality: one autoencoder recipe, the same step
budget, several factor settings, each scored by ``monai-diffusion evaluate`` beside trilinear resampling at the
same number of values. Writes a markdown report (docs/quality.md by default) with one panel per setting. With
several ``--steps`` it measures how quality grows with training instead: one run per budget (docs/quality-steps.md,
a table and a learning-curve chart per setting); ``--training-seeds`` repeats every run per seed and reports the mean
and the spread. A run that validated at least three times (``autoencoder.training.val_every_n_epochs``) also gets
its held-out PSNR along the run, as a table and a chart.

Run from the repository root:

    python benchmarks/quality_study.py                       # the CPU study of docs/quality.md (about 45 min)
    python benchmarks/quality_study.py --only "[4,2]" --steps 350 700 1400 2800 5600 --reuse
                                                             # docs/quality-steps.md (about 95 min on 2 cores)
    python benchmarks/quality_study.py --size 256 256 64 --spacing 1 1 2 --device cuda --steps 2000 \\
        --out docs/quality-gpu.md                            # the same table at 256x256x64 on a GPU
    python benchmarks/quality_study.py --only "[4,2]" --steps 3000 --size 96 96 96 --spacing 2 2 2 \\
        --set autoencoder.training.val_every_n_epochs=10 --out docs/quality-96.md
                                                             # one longer run at 96^3 / 2 mm (about 2 h on 2 cores)

Every setting is a real ``monai-diffusion train-autoencoder`` run (config ``benchmarks/quality_study.yaml`` plus
the setting's ``--set`` options), evaluated on the demo set's held-out volumes; step time and peak memory come from
the run's own TensorBoard scalars (median of the logged step times, the first left out; peak memory as the run logs it: CUDA
max allocated, or the process's peak resident set on CPU, data cache included).
"""

from __future__ import annotations

import argparse
import json
import math
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


def logged_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar the run logged to TensorBoard, read once: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def run(command: list[str], log: Path) -> None:
    with open(log, "a") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        result = subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}; see {log}")


def run_name(name: str, steps: int, seed: int | None, args: argparse.Namespace) -> str:
    """One run folder per setting, budget and training seed (the budget and seed only when the study varies them)."""
    parts = [f"factors-{slug(name)}"]  # a bare "16" would read as a number in --set
    if len(args.steps) > 1:
        parts.append(f"{steps}-steps")
    if seed is not None:
        parts.append(f"seed-{seed}")
    return "-".join(parts)


def study_setting(name: str, options: list[str], args: argparse.Namespace, work: Path, *, steps: int,
                  seed: int | None) -> dict:
    """Train and evaluate one setting at one step budget and training seed; returns its row for the report."""
    run_name_ = run_name(name, steps, seed, args)
    seed_option = [] if seed is None else ["--set", f"seed={seed}"]
    common = ["--set", f"output.output_dir={work}", "--set", f"output.run_name={run_name_}", *seed_option,
              "--set", f"autoencoder.training.max_steps={steps}", "--set", f"device.device={args.device}",
              "--set", f"data.voxel_size={list(args.size)}".replace(" ", ""),
              "--set", f"data.spacing={list(args.spacing)}".replace(" ", "")]
    for option in options + args.set:
        common += ["--set", option]
    run_dir = work / run_name_
    log = work / f"{run_name_}.log"
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
    if report.get("checkpoint_step") != steps:  # e.g. the trainer found the folder taken and wrote to another
        raise SystemExit(f"{run_dir}: evaluated a checkpoint of step {report.get('checkpoint_step')}, not the {steps} "
                         f"this run trained; see {log}")
    logged = logged_scalars(run_dir)
    step_times = [value for _, value in logged.get("train/step_time_s", [])]
    memory = [value for _, value in logged.get("train/peak_memory_mb", [])]
    ssim_by_step = dict(logged.get("val/ssim", []))
    return {
        "name": name,
        "steps": steps,
        "seed": seed,
        "report": report,
        "step_time_s": statistics.median(step_times[1:]) if len(step_times) > 1 else None,
        "peak_memory_mib": max(memory) if memory else None,
        "train_minutes": trained / 60,
        # train-autoencoder's own validation (every autoencoder.training.val_every_n_epochs) on the same held-out volumes
        "validation": [{"step": step, "psnr": psnr, "ssim": ssim_by_step.get(step)}
                       for step, psnr in logged.get("val/psnr", [])],
        "panel": run_dir / "evaluation" / "reconstruction-worst.png",
    }


def number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def group_runs(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """Runs keyed by (setting, step budget), in study order; each list holds one run per training seed."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["name"], row["steps"]), []).append(row)
    return groups


def seed_mean(runs: list[dict], key: str) -> float:
    """The mean over training seeds of each run's held-out mean of ``key``."""
    return statistics.fmean(run["report"]["summary"][key]["mean"] for run in runs)


def psnr_cell(runs: list[dict]) -> str:
    """One run: mean ± std over the held-out volumes. Several seeds: mean over seeds (lowest-highest seed)."""
    values = [run["report"]["summary"]["autoencoder_psnr"] for run in runs]
    if len(runs) == 1:
        return f"{values[0]['mean']:.2f} ± {values[0]['std']:.2f}"
    means = [value["mean"] for value in values]
    return f"{statistics.fmean(means):.2f} ({min(means):.2f}-{max(means):.2f})"


def gain_cell(runs: list[dict]) -> str:
    gains = [run["report"]["summary"]["autoencoder_psnr"]["mean"] - run["report"]["summary"]["trilinear_psnr"]["mean"]
             for run in runs]
    if len(runs) == 1:
        return f"{gains[0]:+.2f}"
    return f"{statistics.fmean(gains):+.2f} ({min(gains):+.2f} to {max(gains):+.2f})"


def line_chart(series: dict[str, list[tuple[float, float]]], *, title: str, y_label: str, x_ticks: list[int],
               size: tuple[int, int] = (560, 360)):
    """A small line chart (log2 x axis) as an H x W x 3 uint8 array, drawn with Pillow: one line per series, the
    series whose name starts with "trilinear" dashed."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    width, height = size
    left, right, top, bottom = 58, 150, 28, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    xs = [math.log2(x) for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x_low, x_high = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    pad = (max(ys) - min(ys)) * 0.08 or 0.5
    y_low, y_high = min(ys) - pad, max(ys) + pad

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (math.log2(x) - x_low) / (x_high - x_low) * (width - left - right),
                top + (y_high - y) / (y_high - y_low) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for tick in x_ticks:
        x, _ = at(tick, y_low)
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
        draw.text((x - 3 * len(str(tick)), height - bottom + 6), str(tick), fill="black", font=font)
    for i in range(5):
        value = y_low + (y_high - y_low) * i / 4
        _, y = at(2 ** x_low, value)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((4, y - 5), f"{value:.2f}", fill="black", font=font)
    draw.text((left + 70, 8), title, fill="black", font=font)
    draw.text((left + (width - left - right) // 2 - 30, height - 14), "optimizer steps", fill="black", font=font)
    draw.text((4, top - 16), y_label, fill="black", font=font)
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    for index, (name, points) in enumerate(series.items()):
        colour = colours[index % len(colours)]
        corners = [at(x, y) for x, y in sorted(points)]
        if name.startswith("trilinear"):
            for (x0, y0), (x1, y1) in zip(corners, corners[1:]):
                dashes = max(1, int(math.hypot(x1 - x0, y1 - y0) // 8))
                for d in range(0, dashes, 2):
                    a, b = d / dashes, min(1.0, (d + 1) / dashes)
                    draw.line([x0 + (x1 - x0) * a, y0 + (y1 - y0) * a, x0 + (x1 - x0) * b, y0 + (y1 - y0) * b],
                              fill=colour, width=2)
        else:
            draw.line(corners, fill=colour, width=2)
            for x, y in corners:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.line([width - right + 10, top + 10 + 16 * index, width - right + 30, top + 10 + 16 * index], fill=colour,
                  width=2)
        draw.text((width - right + 34, top + 4 + 16 * index), name[:18], fill="black", font=font)
    return np.asarray(image, dtype=np.uint8).copy()


def render_factor_table(groups: dict[tuple[str, int], list[dict]]) -> list[str]:
    lines = [
        "| setting | total factor | latent | values | PSNR (dB) | SSIM | MS-SSIM | trilinear PSNR / SSIM / MS-SSIM "
        "| gain (dB) | step (s) | peak memory (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (name, _), runs in groups.items():
        r = runs[0]["report"]
        latent = r["latent_shape"]
        total = [a // b for a, b in zip(r["image_shape"][1:], latent[1:])]
        step_times = [run["step_time_s"] for run in runs if run["step_time_s"] is not None]
        memory = [run["peak_memory_mib"] for run in runs if run["peak_memory_mib"] is not None]
        lines.append(
            f"| {name} | {'x'.join(map(str, total))} | {'x'.join(map(str, latent))} | {r['latent_values']:,} "
            f"| {psnr_cell(runs)} | {seed_mean(runs, 'autoencoder_ssim'):.3f} "
            f"| {seed_mean(runs, 'autoencoder_ms_ssim'):.3f} | {seed_mean(runs, 'trilinear_psnr'):.2f} / "
            f"{seed_mean(runs, 'trilinear_ssim'):.3f} / {seed_mean(runs, 'trilinear_ms_ssim'):.3f} | {gain_cell(runs)} "
            f"| {number(statistics.median(step_times) if step_times else None, '.2f')} "
            f"| {number(max(memory) if memory else None, ',.0f')} |"
        )
    return lines


def render_learning_curves(groups: dict[tuple[str, int], list[dict]], panels_dir: Path, out: Path) -> list[str]:
    """The budgets table (with what each doubling of the budget bought) and one chart per setting."""
    from monai_diffusion.engine.logging import save_png

    lines = [
        "| setting | steps | train time (min) | PSNR (dB) | SSIM | MS-SSIM | gain over trilinear (dB) "
        "| PSNR bought since the previous budget (dB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = list(dict.fromkeys(name for name, _ in groups))
    for name in names:
        budgets = sorted(steps for setting, steps in groups if setting == name)
        previous = None
        for steps in budgets:
            runs = groups[(name, steps)]
            psnr = seed_mean(runs, "autoencoder_psnr")
            bought = "" if previous is None else f"{psnr - previous:+.2f}"
            lines.append(
                f"| {name} | {steps:,} | {statistics.fmean(run['train_minutes'] for run in runs):.1f} "
                f"| {psnr_cell(runs)} | {seed_mean(runs, 'autoencoder_ssim'):.3f} "
                f"| {seed_mean(runs, 'autoencoder_ms_ssim'):.3f} | {gain_cell(runs)} | {bought} |"
            )
            previous = psnr
        trilinear = seed_mean(groups[(name, budgets[0])], "trilinear_psnr")
        lines.append(f"| trilinear at equal values | | | {trilinear:.2f} | "
                     f"{seed_mean(groups[(name, budgets[0])], 'trilinear_ssim'):.3f} | "
                     f"{seed_mean(groups[(name, budgets[0])], 'trilinear_ms_ssim'):.3f} | | |")
    lines.append("")
    for name in names:
        budgets = sorted(steps for setting, steps in groups if setting == name)
        chart = line_chart(
            {name: [(steps, seed_mean(groups[(name, steps)], "autoencoder_psnr")) for steps in budgets],
             "trilinear": [(steps, seed_mean(groups[(name, steps)], "trilinear_psnr")) for steps in budgets]},
            title=f"{name}: held-out PSNR by step budget", y_label="PSNR (dB)", x_ticks=budgets)
        target = panels_dir / f"learning-curve-{slug(name)}.png"
        save_png(chart, target)
        lines += [f"![{name}: held-out PSNR by step budget]({target.relative_to(out.parent).as_posix()})", ""]
    return lines


def render_validation_curves(groups: dict[tuple[str, int], list[dict]], panels_dir: Path, out: Path) -> list[str]:
    """Quality along one run: the held-out PSNR / SSIM that train-autoencoder's own validation logged at its steps
    (the run's cosine schedule still running, so a point is not what a run of that budget would reach), with the
    trilinear line, for every run that validated at least three times."""
    from monai_diffusion.engine.logging import save_png

    lines: list[str] = []
    for (name, steps), runs in groups.items():
        run = runs[0]
        points = run.get("validation") or []
        if len(points) < 3:
            continue
        trilinear = run["report"]["summary"]["trilinear_psnr"]["mean"]
        lines += [f"### {name}, {steps:,} steps: held-out quality along the run", "",
                  "The run's own validation on the same held-out volumes, every "
                  f"{points[1]['step'] - points[0]['step']:,} steps; the learning-rate schedule spans the whole run, "
                  "so a point is where this run stood then, not what a run of that many steps would reach.", "",
                  "| step | PSNR (dB) | SSIM | gain over trilinear (dB) |", "|---|---|---|---|"]
        lines += [f"| {p['step']:,} | {p['psnr']:.2f} | {number(p['ssim'], '.3f')} | {p['psnr'] - trilinear:+.2f} |"
                  for p in points]
        ticks = [points[0]["step"], points[len(points) // 2]["step"], points[-1]["step"]]
        chart = line_chart({name: [(p["step"], p["psnr"]) for p in points],
                            "trilinear": [(p["step"], trilinear) for p in points]},
                           title=f"{name}: held-out PSNR along the run", y_label="PSNR (dB)", x_ticks=ticks)
        target = panels_dir / f"validation-curve-{slug(name)}-{steps}-steps.png"
        save_png(chart, target)
        lines += ["", f"![{name}: held-out PSNR along the run]({target.relative_to(out.parent).as_posix()})", ""]
    return lines


def render(rows: list[dict], args: argparse.Namespace, device_name: str, panels_dir: Path, out: Path) -> str:
    size = "x".join(map(str, args.size))
    groups = group_runs(rows)
    budgets = ", ".join(f"{steps:,}" for steps in args.steps)
    seeds = args.training_seeds
    curves = len(args.steps) > 1
    seeds_text = (f" Each setting and budget was trained once per training seed ({', '.join(map(str, seeds))}); "
                  "a figure is the mean over seeds, with the lowest and highest seed's in brackets."
                  if seeds and len(seeds) > 1 else "")
    lines = [
        "# How reconstruction quality grows with training" if curves else "# Reconstruction quality by downsampling factor",
        "",
        f"Written by `benchmarks/quality_study.py` on {time.strftime('%Y-%m-%d')}, {device_name}: the same autoencoder "
        f"recipe (`benchmarks/quality_study.yaml`) trained for {budgets} optimizer steps "
        f"{'(each budget its own run, with its own cosine schedule) ' if curves else ''}on the demo brains at "
        f"{size} voxels of {'x'.join(map(str, args.spacing))} mm, then scored by `monai-diffusion evaluate` on the "
        f"{rows[0]['report']['volumes']} held-out volumes. \"Trilinear\" shrinks each volume to a grid with as many "
        "values as the setting's latent and interpolates back; \"gain\" is the autoencoder's PSNR minus the "
        "baseline's. Step time is the median of the run's logged steps, memory the run's logged peak "
        f"({'CUDA max allocated' if args.device == 'cuda' else 'process peak resident set on CPU, data cache included'})."
        + seeds_text,
        "",
    ]
    lines += render_learning_curves(groups, panels_dir, out) if curves else render_factor_table(groups)
    along = render_validation_curves(groups, panels_dir, out)
    if along:
        lines += ["", "## Along the run", "", *along]
    lines += ["", f"MS-SSIM uses {rows[0]['report']['ms_ssim_scales']} scales at this size (the most that fit).", "",
              "## Panels", "",
              "The held-out volume each setting reconstructs worst (input, autoencoder, trilinear)"
              + (", at its largest budget" if curves else "") + (", first training seed" if seeds and len(seeds) > 1
                                                                else "") + ":", ""]
    for name in dict.fromkeys(name for name, _ in groups):
        largest = max(steps for setting, steps in groups if setting == name)
        target = panels_dir / f"{slug(name)}{f'-{largest}-steps' if curves else ''}.png"
        shutil.copyfile(groups[(name, largest)][0]["panel"], target)
        label = f"{name}, {largest:,} steps" if curves else name
        lines += [f"**{label}**", "", f"![{label}]({target.relative_to(out.parent).as_posix()})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[700],
                        help="optimizer steps per setting (default 700, the quickstart's); several budgets train one "
                        "run per budget and write the learning-curve report (table, chart per setting)")
    parser.add_argument("--training-seeds", type=int, nargs="+", default=None,
                        help="train every setting and budget once per seed (--set seed=S); the report gives the "
                        "mean over seeds and the lowest and highest seed's figure (default: the config's seed, once)")
    parser.add_argument("--size", type=int, nargs=3, default=[64, 64, 64], help="data.voxel_size (default 64 64 64)")
    parser.add_argument("--spacing", type=float, nargs=3, default=[3.0, 3.0, 3.0], help="data.spacing in mm")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--only", nargs="+", default=None, choices=list(SETTINGS), help="run these settings only")
    parser.add_argument("--set", action="append", default=[], help="extra --set option for every run (repeatable)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep runs an earlier call already trained and evaluated in --work (same options): "
                        "a study stopped half way goes on where it stopped")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "quality-study", help="run folders")
    parser.add_argument("--out", type=Path, default=None,
                        help="the report (default: docs/quality.md, or docs/quality-steps.md with several --steps)")
    args = parser.parse_args(argv)
    if any(steps < 1 for steps in args.steps):
        parser.error(f"--steps: budgets must be positive, got {args.steps}")
    args.steps = sorted(set(args.steps))
    if args.out is None:
        args.out = ROOT / "docs" / ("quality-steps.md" if len(args.steps) > 1 else "quality.md")
    args.work.mkdir(parents=True, exist_ok=True)
    panels_dir = args.out.parent / (args.out.stem + "-panels")
    panels_dir.mkdir(parents=True, exist_ok=True)

    import platform

    import torch

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), torch {torch.__version__}")
    rows = []
    for name in args.only or SETTINGS:
        for seed in args.training_seeds or [None]:
            for steps in args.steps:
                print(f"[{time.strftime('%H:%M:%S')}] {name}, {steps} steps"
                      + ("" if seed is None else f", seed {seed}"), flush=True)
                row = study_setting(name, SETTINGS[name], args, args.work, steps=steps, seed=seed)
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
