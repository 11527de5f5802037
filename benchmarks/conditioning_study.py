"""Does conditioning work? Measured on the conditional demo brains, whose size is a known covariate (brain_scale) and
which come with tissue label maps. Writes the figures docs/conditioning.md reports, as JSON and a markdown table.

Run from the repository root (CPU, about half an hour with the defaults):

    python benchmarks/conditioning_study.py --workdir runs/conditioning-study --out docs/conditioning-study.json

What it does, all through the project's own commands and functions:

1. trains ``config/examples/conditional_demo.yaml``: the autoencoder, the LDM conditioned on brain_scale (with
   condition dropout for classifier-free guidance) and the ControlNet on the training split's label maps (each a
   real ``monai-diffusion train-*`` run in a subprocess, its wall time recorded);
2. covariate: generates ``--levels`` x ``--seeds`` volumes at brain_scale evenly spaced over the demo's 0.8-1.2, at
   guidance 1 and 3 and with the null condition (the same seeds in all three), and measures each one's brain
   volume by thresholding (voxels above ``--threshold`` of the [0, 1] intensity range). Reported: Spearman's rank
   correlation between brain_scale and volume, the least-squares slope (mL per +0.1 brain_scale) and the mean
   volume of the lowest and highest two levels, beside the same figures for the real training volumes;
3. label maps: for every held-out brain (the validation split, never trained on), generates ``--seeds`` volumes with
   its label map through the ControlNet, and as baselines with the LDM's null condition and with the conditional
   LDM told the brain's true brain_scale (guidance 3); reported is the Dice between each sample's threshold
   segmentation and the map's brain (labels > 0), beside the real held-out images' own Dice, how often the ControlNet
   sample beats the null-condition one of the same map and seed, and the rank correlation between the map's brain
   volume and the sample's.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "examples" / "conditional_demo.yaml"
COVARIATE = "brain_scale"


# ------------------------------------------------------------------------------------------------- measures


def ranks(values: list[float]) -> list[float]:
    """Ranks 1..n, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            result[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return result


def pearson(x: list[float], y: list[float]) -> float:
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation: Pearson's on the ranks."""
    return pearson(ranks(x), ranks(y))


def slope(x: list[float], y: list[float]) -> float:
    mx, my = statistics.fmean(x), statistics.fmean(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def dice(a, b) -> float:
    a, b = a.bool(), b.bool()
    total = int(a.sum()) + int(b.sum())
    return 2 * int((a & b).sum()) / total if total else 1.0


def covariate_summary(conditions: list[float], volumes_ml: list[float]) -> dict:
    """Rank correlation, slope per +0.1 and the means at the lowest and highest two levels."""
    levels = sorted(set(conditions))
    low = [v for c, v in zip(conditions, volumes_ml) if c in levels[:2]]
    high = [v for c, v in zip(conditions, volumes_ml) if c in levels[-2:]]
    return {
        "n": len(volumes_ml),
        "spearman": round(spearman(conditions, volumes_ml), 3),
        "slope_ml_per_0.1": round(0.1 * slope(conditions, volumes_ml), 1),
        "mean_ml_lowest_levels": round(statistics.fmean(low), 1),
        "mean_ml_highest_levels": round(statistics.fmean(high), 1),
    }


# ------------------------------------------------------------------------------------------------- panels


def write_panels(samples: Path, panels: Path, held_out: list[dict], mask_chain, mask_key: str,
                 guidance: float) -> list[Path]:
    """Two PNGs from the study's samples: the first seed at the lowest, middle and highest brain_scale with guidance
    (and the null condition), and for the first two held-out brains their label map beside the ControlNet's sample
    and the null-condition LDM's sample of the same seed."""
    import csv

    import nibabel as nib
    import numpy as np
    import torch

    from monai_diffusion.conditioning import MASK_KEY
    from monai_diffusion.engine.logging import save_png, volume_panel

    def read(path: Path) -> np.ndarray:
        return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)

    panels.mkdir(parents=True, exist_ok=True)
    guided = samples / f"guidance-{guidance:g}"
    with open(guided / "samples.csv") as handle:
        rows = list(csv.DictReader(handle))
    levels = sorted({float(row[COVARIATE]) for row in rows})
    first = {}  # level -> its first sample
    for row in rows:
        first.setdefault(float(row[COVARIATE]), guided / row["file"])
    chosen = [levels[0], levels[len(levels) // 2], levels[-1]]
    covariate = [(f"{COVARIATE} {level:g}, guidance {guidance:g}", read(first[level])) for level in chosen]
    covariate.append(("null condition", read(sorted((samples / "null-condition").glob("sample-000*.nii.gz"))[0])))
    written = [panels / "covariate.png"]
    save_png(volume_panel(covariate, value_range=(0.0, 1.0)), written[0])

    masks = []
    for number, item in enumerate(held_out[:2]):
        label = torch.as_tensor(mask_chain({MASK_KEY: item[mask_key]})[MASK_KEY])[0].numpy()
        masks += [(f"held-out label map {number + 1}", label / max(float(label.max()), 1.0)),
                  ("ControlNet sample", read(sorted((samples / f"ControlNet-(mask)-{number}").glob("*.nii.gz"))[0])),
                  ("LDM, null condition", read(sorted((samples / f"LDM-null-condition-{number}").glob("*.nii.gz"))[0]))]
    written.append(panels / "masks.png")
    save_png(volume_panel(masks, value_range=(0.0, 1.0)), written[1])
    return written


# ------------------------------------------------------------------------------------------------- the study


def timed_run(command: list[str], log: Path) -> float:
    """Wall time in s of ``command`` run from the repository root, its output appended to ``log``; ends the study
    when the command fails."""
    with open(log, "a") as handle:
        print("$", *command, file=handle, flush=True)
        start = time.perf_counter()
        try:
            subprocess.run(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, check=True)
        except subprocess.CalledProcessError as error:
            raise SystemExit(f"failed ({error.returncode}): {' '.join(command)}; see {log}") from None
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "conditioning-study")
    parser.add_argument("--out", type=Path, default=None, help="JSON with every figure (default: <workdir>/study.json)")
    parser.add_argument("--ae-steps", type=int, default=400)
    parser.add_argument("--ldm-steps", type=int, default=1500)
    parser.add_argument("--controlnet-steps", type=int, default=600)
    parser.add_argument("--levels", type=int, default=9, help="brain_scale values from 0.8 to 1.2")
    parser.add_argument("--seeds", type=int, default=2, help="samples per level, and per held-out label map")
    parser.add_argument("--guidance", type=float, default=3.0, help="the strong guidance compared with 1")
    parser.add_argument("--inference-steps", type=int, default=50)
    parser.add_argument("--threshold", type=float, default=0.2, help="brain: intensity above this (range [0, 1])")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="more config overrides")
    parser.add_argument("--panels", type=Path, default=None,
                        help="folder for the PNG panels of docs/conditioning.md (default: <workdir>/panels)")
    parser.add_argument("--panels-only", action="store_true",
                        help="only draw the panels from the samples a finished study left in --workdir")
    args = parser.parse_args(argv)

    import nibabel as nib
    import numpy as np
    import torch

    from monai_diffusion.config import load_config
    from monai_diffusion.conditioning import MASK_KEY
    from monai_diffusion.data import build_transforms, list_volumes
    from monai_diffusion.data.transforms import build_mask_transforms
    from monai_diffusion.generation import sample

    torch.set_num_threads(max(1, torch.get_num_threads()))
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "log.txt"
    overrides = [f"output.output_dir={workdir}", f"autoencoder.training.max_steps={args.ae_steps}",
                 f"ldm.training.max_steps={args.ldm_steps}", f"controlnet.training.max_steps={args.controlnet_steps}",
                 f"ldm.sampling.num_inference_steps={args.inference_steps}", *args.overrides]
    sets = [option for override in overrides for option in ("--set", override)]
    config = load_config(str(CONFIG), overrides)
    results: dict = {"settings": {"config": str(CONFIG.relative_to(ROOT)), "overrides": overrides,
                                  "threshold": args.threshold, "levels": args.levels, "seeds": args.seeds,
                                  "guidance": args.guidance, "torch_threads": torch.get_num_threads()},
                     "wall_time_s": {}}

    # ---- 1. train the three stages, each a real run of the command
    cli = [sys.executable, "-m", "monai_diffusion.cli"]
    for stage in () if args.panels_only else ("train-autoencoder", "train-ldm", "train-controlnet"):
        print(f"{stage} ...", flush=True)
        results["wall_time_s"][stage] = round(timed_run([*cli, stage, "--config", str(CONFIG), *sets], log), 1)
    ldm_run = max(workdir.glob("ldm-*/checkpoints/last.pt"), key=lambda p: p.stat().st_mtime)
    controlnet_run = max(workdir.glob("controlnet-*/checkpoints/last.pt"), key=lambda p: p.stat().st_mtime)

    voxel_ml = math.prod(config.data.spacing) / 1000
    image_chain = build_transforms(config.data, train=False, expected_channels=config.autoencoder.in_channels)
    mask_chain = build_mask_transforms(config.data, MASK_KEY)

    def brain(volume) -> torch.Tensor:
        return torch.as_tensor(volume).as_subclass(torch.Tensor)[0] > args.threshold

    def load_samples(paths: list[Path]) -> list[torch.Tensor]:
        # Samples are already on the data grid and in the intensity range: read as written.
        return [brain(torch.as_tensor(np.asarray(nib.load(str(p)).dataobj, dtype=np.float32))[None]) for p in paths]

    def generate(name: str, **kwargs) -> list[Path]:
        return sample(config, checkpoint=kwargs.pop("checkpoint", ldm_run), out=workdir / "samples" / name,
                      steps=args.inference_steps, **kwargs)

    # ---- 2. the covariate: real volumes, then samples at evenly spaced brain_scale
    train_items, held_out = list_volumes(config.data, config.seed)
    panels = args.panels or workdir / "panels"
    if args.panels_only:
        for path in write_panels(workdir / "samples", panels, held_out, mask_chain, config.data.mask_key, args.guidance):
            print(f"wrote {path}")
        return 0
    real = [(float(item[COVARIATE]), int(brain(image_chain(dict(item))["image"]).sum()) * voxel_ml)
            for item in train_items]
    results["covariate"] = {"real training volumes": covariate_summary(*map(list, zip(*real)))}
    low, high = 0.8, 1.2
    levels = [round(low + (high - low) * i / (args.levels - 1), 4) for i in range(args.levels)]
    rows = [{COVARIATE: level} for level in levels for _ in range(args.seeds)]
    start = time.perf_counter()
    for label, kwargs in (("guidance 1", {"conditions": rows, "guidance": 1.0}),
                          (f"guidance {args.guidance:g}", {"conditions": rows, "guidance": args.guidance}),
                          ("null condition", {"num_samples": len(rows)})):
        print(f"sampling {label} ...", flush=True)
        volumes = [int(b.sum()) * voxel_ml for b in load_samples(generate(label.replace(" ", "-"), **kwargs))]
        results["covariate"][label] = covariate_summary([r[COVARIATE] for r in rows], volumes)
    results["wall_time_s"]["covariate sampling"] = round(time.perf_counter() - start, 1)

    # ---- 3. label maps of held-out brains: ControlNet vs the LDM alone
    start = time.perf_counter()
    scores: dict[str, list[float]] = {"real held-out images": [], "ControlNet (mask)": [], "LDM, null condition": [],
                                      f"LDM, true brain_scale, guidance {args.guidance:g}": []}
    volumes: dict[str, list[tuple[float, float]]] = {label: [] for label in scores}  # (mask's, sample's) in mL
    for number, item in enumerate(held_out):
        mask = torch.as_tensor(mask_chain({MASK_KEY: item[config.data.mask_key]})[MASK_KEY])[0] > 0
        real_brain = brain(image_chain(dict(item))["image"])
        scores["real held-out images"].append(dice(real_brain, mask))
        volumes["real held-out images"].append((int(mask.sum()) * voxel_ml, int(real_brain.sum()) * voxel_ml))
        runs = {
            "ControlNet (mask)": {"checkpoint": controlnet_run, "mask": Path(item[config.data.mask_key]),
                                  "num_samples": args.seeds},
            "LDM, null condition": {"num_samples": args.seeds},
            f"LDM, true brain_scale, guidance {args.guidance:g}": {
                "conditions": [{COVARIATE: item[COVARIATE]}] * args.seeds, "guidance": args.guidance},
        }
        for label, kwargs in runs.items():
            print(f"held-out brain {number + 1}/{len(held_out)}: {label} ...", flush=True)
            for generated in load_samples(generate(f"{label}-{number}".replace(" ", "-").replace(",", ""), **kwargs)):
                scores[label].append(dice(generated, mask))
                volumes[label].append((int(mask.sum()) * voxel_ml, int(generated.sum()) * voxel_ml))
    # Paired: the same held-out map and the same seed, with and without the ControlNet.
    wins = sum(a > b for a, b in zip(scores["ControlNet (mask)"], scores["LDM, null condition"]))
    results["masks"] = {
        label: {"n": len(values), "mean_dice": round(statistics.fmean(values), 3), "min_dice": round(min(values), 3),
                "volume_spearman": round(spearman(*map(list, zip(*volumes[label]))), 3)}
        for label, values in scores.items()
    }
    results["masks"]["ControlNet (mask)"]["beats null condition"] = f"{wins} of {len(scores['LDM, null condition'])}"
    results["wall_time_s"]["mask sampling"] = round(time.perf_counter() - start, 1)

    for path in write_panels(workdir / "samples", panels, held_out, mask_chain, config.data.mask_key, args.guidance):
        print(f"wrote {path}")
    out = args.out or workdir / "study.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
