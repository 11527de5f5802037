"""How close the LDM's samples get to the real data as it trains: one LDM recipe over one trained autoencoder, at
several step budgets (each its own run), each scored by ``monai-diffusion evaluate``: MMD and MS-SSIM diversity of
n samples against n real volumes, beside the real-vs-real floor (n other real volumes against the same n). Writes a
markdown table and each budget's sample panel.

Run from the repository root, after training the autoencoder (the quickstart's: docs/quality-steps.md):

    python benchmarks/ldm_budget_study.py --autoencoder runs/autoencoder-<time> --steps 600 1200 2400 \\
        --out docs/ldm-budgets.md

Every budget is a real ``monai-diffusion train-ldm`` run of ``--config`` (default the quickstart's) with
``ldm.training.max_steps`` set, then ``monai-diffusion evaluate`` with ``--fid none`` by default (the FID protocols'
released weights need a connected machine once; pass ``--fid medicalnet`` where they are in torch hub's folder).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from quality_study import ROOT, run  # run as a script, benchmarks/ is on sys.path


def study_budget(steps: int, args: argparse.Namespace) -> dict:
    """Train the LDM for ``steps`` optimizer steps and evaluate it; returns its row (``--reuse``: an evaluated run
    of an earlier call is read, not retrained)."""
    name = f"ldm-{steps}-steps"
    run_dir = args.work / name
    log = args.work / f"{name}.log"
    timing = run_dir / "study-train-seconds.txt"
    summary = run_dir / "evaluation" / "summary.json"
    if not (args.reuse and summary.is_file() and timing.is_file()):
        if run_dir.exists():
            shutil.rmtree(run_dir)
        log.unlink(missing_ok=True)
        sets = [f"output.output_dir={args.work}", f"output.run_name={name}", f"ldm.training.max_steps={steps}",
                f"ldm.autoencoder_checkpoint={args.autoencoder}", *args.set]
        options = [part for option in sets for part in ("--set", option)]
        cli = [sys.executable, "-m", "monai_diffusion.cli"]
        started = time.time()
        run([*cli, "train-ldm", "--config", str(args.config), *options], log)
        timing.write_text(f"{time.time() - started:.1f}\n")
        run([*cli, "evaluate", str(run_dir), "--num-samples", str(args.num_samples), "--seed", str(args.seed),
             "--fid", *args.fid, *[part for option in args.set for part in ("--set", option)]], log)
    return {"steps": steps, "train_seconds": float(timing.read_text()), "report": json.loads(summary.read_text()),
            "panel": run_dir / "evaluation" / "samples.png"}


def render(rows: list[dict], args: argparse.Namespace, out: Path, panels: Path) -> str:
    first = rows[0]["report"]
    lines = [
        "# How the LDM's samples approach the real data with training",
        "",
        f"Written by `benchmarks/ldm_budget_study.py` on {time.strftime('%Y-%m-%d')}: `{args.config}` trained over "
        f"the autoencoder run `{args.autoencoder.name}` for each budget (its own run), then `monai-diffusion evaluate` with "
        f"{args.num_samples} samples (seed {args.seed}). Each figure compares n samples with n real training volumes "
        "(half B); the floor compares n other real volumes (half A) with the same half B, so a model is as close to "
        "the data as this n can tell when its figure reaches the floor. MMD is MONAI's unbiased estimate over "
        "voxels with its default linear kernel, i.e. of the squared distance between the two sets' mean volumes "
        "(about 0 for independent draws of the same distribution, and it can go below 0); diversity is the "
        "mean pairwise MS-SSIM (lower = more diverse), the ratio samples / real (1 = as diverse as the data).",
        "",
        "| LDM steps | train time (min) | n | MMD samples vs real | MMD real vs real (floor) | MS-SSIM among samples "
        "| among real | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = row["report"]
        lines.append(f"| {row['steps']:,} | {row['train_seconds'] / 60:.1f} | {r['n']} | {r['mmd']:.4g} "
                     f"| {r['mmd_floor']:.4g} | {r['diversity_ms_ssim_samples']:.4f} "
                     f"| {r['diversity_ms_ssim_real']:.4f} | {r['diversity_ratio']:.3f} |")
    warnings = first.get("warnings") or []
    if warnings:
        lines += ["", *[f"Warning (from evaluate): {warning}" for warning in warnings]]
    lines += ["", "## Samples", "", "Each budget's first samples and a real volume (evaluate's panel):", ""]
    for row in rows:
        target = panels / f"ldm-{row['steps']}-steps.png"
        shutil.copyfile(row["panel"], target)
        lines += [f"**{row['steps']:,} steps**", "", f"![{row['steps']} steps]({target.relative_to(out.parent).as_posix()})",
                  ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--autoencoder", type=Path, required=True, help="the trained autoencoder (run or checkpoint)")
    parser.add_argument("--config", type=Path, default=Path("config/examples/quickstart.yaml"))
    parser.add_argument("--steps", type=int, nargs="+", default=[600, 1200, 2400], help="LDM step budgets")
    parser.add_argument("--num-samples", type=int, default=14,
                        help="n: samples per budget; 2n real volumes are read (default 14: the quickstart's 28 "
                        "training brains make two halves of 14)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--fid", nargs="+", default=["none"], help="evaluate's --fid (default none)")
    parser.add_argument("--set", action="append", default=[], help="extra --set option for every run (repeatable)")
    parser.add_argument("--reuse", action="store_true", help="keep budgets an earlier call trained and evaluated")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "ldm-budget-study", help="run folders")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "ldm-budgets.md", help="the report")
    args = parser.parse_args(argv)
    if any(steps < 1 for steps in args.steps):
        parser.error(f"--steps: budgets must be positive, got {args.steps}")
    if args.num_samples < 2:
        parser.error("--num-samples: at least 2")
    args.steps = sorted(set(args.steps))
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    panels = args.out.parent / (args.out.stem + "-panels")
    panels.mkdir(parents=True, exist_ok=True)
    rows = []
    for steps in args.steps:
        print(f"[{time.strftime('%H:%M:%S')}] LDM, {steps} steps", flush=True)
        row = study_budget(steps, args)
        r = row["report"]
        print(f"    MMD {r['mmd']:.4g} (floor {r['mmd_floor']:.4g}), diversity ratio {r['diversity_ratio']:.3f}, "
              f"{row['train_seconds'] / 60:.1f} min", flush=True)
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(rows, args, args.out, panels) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(
        [{k: v for k, v in row.items() if k != "panel"} for row in rows], indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
