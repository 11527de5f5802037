"""Does conditioning work? Measured on the conditional demo brains, whose size is a known covariate (brain_scale) and
which come with tissue label maps. Writes the figures docs/conditioning.md reports, as JSON and a markdown table.

Run from the repository root (CPU, about 20 minutes with the defaults):

    python benchmarks/conditioning_study.py --workdir runs/conditioning-study --out docs/conditioning-study.json

and over several training seeds, to state only what holds in every one (about 55 minutes for three on 2 CPU cores):

    python benchmarks/conditioning_study.py --training-seeds 0 7 13 --workdir runs/conditioning-seeds

Each training seed S is a study of its own with ``--set seed=S`` (the seed of the weights, the sampling noise and
the train/held-out split: each seed holds out its own 6 brains), run in ``<workdir>/seed-S`` and written to
``<workdir>/seed-S/study.json``. ``<workdir>/study.json`` (or ``--out``) then holds every seed's results, the
aggregate (mean, standard deviation and min-max across seeds of each headline figure) and, per claim, whether it
holds in every seed; the aggregate is also printed as markdown tables. The study resumes: a seed whose study.json
exists is read, not run again (its settings must be this call's), unless ``--rerun`` names it (``--rerun`` alone:
every seed); a seed that runs starts from an empty folder, so runs of two attempts never mix. Without
``--training-seeds`` the study trains one seed, the config's, in ``<workdir>`` itself and writes its results to
``<workdir>/study.json``, as it always did.

What it does per seed, all through the project's own commands and functions:

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
   sample beats the null-condition one (and the brain_scale-told one) of the same map and seed, and the rank
   correlation between the map's brain volume and the sample's;
4. tissue pattern: for the same samples and the real held-out images, the mean intensity within each tissue region
   of the map (1 CSF, 2 grey, 3 white matter; background excluded). The real images' order of those means (over all
   held-out images; CSF < grey < white in these T1 brains) is the reference; reported per method are the share of
   samples whose three means lie in that order and the mean intensity per region. The order alone is weak (any
   brain-shaped sample roughly in place has it), so each sample is also segmented by intensity (every brain voxel
   takes the tissue whose real mean intensity is nearest) and scored by its tissue Dice: the mean over CSF, grey
   and white matter of the Dice with the map's region.

The claims checked in every seed: the ControlNet's mean Dice above the LDM told the true brain_scale's and above the
null condition's, Spearman at guidance 3 above guidance 1, the tissue order reproduced (the real images' order
is CSF < grey < white and more than half of the ControlNet's samples have it), and the ControlNet's tissue Dice above
the LDM told the true brain_scale's.

The ControlNet's recipe levers, each through the study's flags or ``--set`` (later ``--set`` wins):

    --controlnet-steps 600                                           its training steps (default 2000)
    --set controlnet.training.lr=0.0002                              its learning rate (preset 0.0005)
    --set controlnet.conditioning_embedding_num_channels=[16,32,64]  the map enters at the latent size x 2^(len - 1):
                                                                     [16,32] half the image's resolution, [16,32,64]
                                                                     full (at most 3 entries with the factor 4)
    --set controlnet.conditioning_scale=1                            weight of its residuals when sampling (training
                                                                     uses 1; preset 2)

An ablation is one workdir per setting, each with the same training seeds. The ControlNet's levers leave the
autoencoder and LDM as they were: ``--stages-from`` copies them from an earlier study's seeds (settings equal but for
``controlnet.*``) and trains only the ControlNet:

    python benchmarks/conditioning_study.py --training-seeds 0 7 13 --workdir runs/conditioning-seeds
    python benchmarks/conditioning_study.py --training-seeds 0 7 13 --controlnet-steps 600 \\
        --stages-from runs/conditioning-seeds --workdir runs/conditioning-controlnet-steps-600
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
CONFIG = ROOT / "config" / "examples" / "conditional_demo.yaml"
COVARIATE = "brain_scale"
# The demo's tissue labels (0, the background, is left out) and the share of the ControlNet's samples that must
# have the real images' order of their mean intensities for the tissue pattern to count as reproduced.
TISSUES = {1: "CSF", 2: "grey", 3: "white"}
TISSUE_MAJORITY = 0.5
# The methods of the label-map comparison (the third, the LDM told the true brain_scale, names its guidance).
REAL, CONTROLNET, NULL = "real held-out images", "ControlNet (mask)", "LDM, null condition"


def told(guidance: float) -> str:
    return f"LDM, true brain_scale, guidance {guidance:g}"


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


def region_means(image, labels, names: dict[int, str] = TISSUES) -> dict[str, float | None]:
    """The mean intensity of ``image`` within each labelled region of ``labels`` (same shape), by region name; None
    for a label the map does not hold. Labels not in ``names`` (the background) are left out."""
    means = {}
    for label, name in names.items():
        region = labels == label
        means[name] = float(image[region].double().mean()) if bool(region.any()) else None
    return means


def intensity_order(means: dict[str, float | None]) -> list[str]:
    """The regions from the darkest to the brightest (regions without a mean left out)."""
    return sorted((name for name, value in means.items() if value is not None), key=lambda name: means[name])


def follows_order(means: dict[str, float | None], order: list[str]) -> bool:
    """Whether every region of ``order`` has a mean and the means rise strictly along it."""
    values = [means.get(name) for name in order]
    return None not in values and all(a < b for a, b in zip(values, values[1:]))


def tissue_segmentation(image, brain_threshold: float, means: dict[str, float]):
    """A tissue label map read off an image by intensity alone: voxels above ``brain_threshold`` (the brain) get the
    label of the region (TISSUES) whose mean intensity ``means`` (the real held-out images') is nearest, the rest 0."""
    import torch

    labels = list(TISSUES)
    centres = torch.tensor([means[TISSUES[label]] for label in labels], dtype=image.dtype)
    nearest = torch.tensor(labels)[(image[..., None] - centres).abs().argmin(dim=-1)]
    return torch.where(image > brain_threshold, nearest, torch.zeros_like(nearest))


def tissue_dice(image, labels, brain_threshold: float, means: dict[str, float]) -> float:
    """The mean over the tissues of the Dice between the map's region and the image's intensity segmentation
    (``tissue_segmentation``): whether the sample has CSF, grey and white matter where the map has them."""
    segmentation = tissue_segmentation(image, brain_threshold, means)
    return statistics.fmean(dice(segmentation == label, labels == label) for label in TISSUES)


def tissue_summary(samples: list[dict[str, float | None]], order: list[str]) -> dict:
    """A method's tissue pattern: how many of its samples' region means (``region_means``) lie in ``order``, and
    each region's mean intensity over the samples that hold it."""
    in_order = sum(follows_order(means, order) for means in samples)
    mean_intensity = {}
    for name in samples[0] if samples else ():
        values = [means[name] for means in samples if means[name] is not None]
        mean_intensity[name] = round(statistics.fmean(values), 4) if values else None
    return {"n": len(samples), "in_real_order": in_order,
            "share_in_real_order": round(in_order / len(samples), 3) if samples else None,
            "mean_intensity": mean_intensity}


# ------------------------------------------------------------------------------------------------- across seeds


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (None for one value) and min-max of a figure across seeds."""
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def headline_figures(results: dict, *, guidance: float) -> dict[str, float]:
    """One seed's headline figures by name: Spearman and slope at guidance 1, ``guidance`` and the null condition,
    each method's mean Dice, the ControlNet's won pairs and each method's share of samples in the real tissue
    order."""
    figures = {}
    for label in ("guidance 1", f"guidance {guidance:g}", "null condition"):
        figures[f"Spearman, {label}"] = results["covariate"][label]["spearman"]
    for label in ("guidance 1", f"guidance {guidance:g}", "null condition"):
        figures[f"slope mL per +0.1, {label}"] = results["covariate"][label]["slope_ml_per_0.1"]
    for method, scores in results["masks"].items():
        figures[f"mean Dice, {method}"] = scores["mean_dice"]
    controlnet = results["masks"][CONTROLNET]
    figures["ControlNet beats null condition, pairs won"] = controlnet["wins_over_null_condition"]
    figures[f"ControlNet beats {told(guidance)}, pairs won"] = controlnet["wins_over_told_brain_scale"]
    for method, summary in results["tissue"]["methods"].items():
        figures[f"tissue order share, {method}"] = summary["share_in_real_order"]
    for method, summary in results["tissue"]["methods"].items():
        figures[f"tissue Dice, {method}"] = summary["mean_tissue_dice"]
    return figures


def claims(results: dict, *, guidance: float) -> dict[str, bool]:
    """Whether each claim of docs/conditioning.md holds in one seed's results."""
    masks, covariate, tissue = results["masks"], results["covariate"], results["tissue"]
    dice = {method: scores["mean_dice"] for method, scores in masks.items()}
    share = tissue["methods"][CONTROLNET]["share_in_real_order"]
    tissue_dice_ = {method: summary["mean_tissue_dice"] for method, summary in tissue["methods"].items()}
    return {
        "ControlNet Dice > LDM told the true brain_scale": dice[CONTROLNET] > dice[told(guidance)],
        "ControlNet Dice > null condition": dice[CONTROLNET] > dice[NULL],
        f"Spearman at guidance {guidance:g} > at guidance 1":
            covariate[f"guidance {guidance:g}"]["spearman"] > covariate["guidance 1"]["spearman"],
        "tissue order CSF < grey < white reproduced":
            tissue["real order"] == list(TISSUES.values()) and share is not None and share > TISSUE_MAJORITY,
        "ControlNet tissue Dice > LDM told the true brain_scale": tissue_dice_[CONTROLNET] > tissue_dice_[told(guidance)],
    }


def criteria(guidance: float) -> dict[str, str]:
    """What each claim of :func:`claims` compares, in words."""
    return {
        "ControlNet Dice > LDM told the true brain_scale":
            f"the ControlNet samples' mean Dice above the LDM's at the true brain_scale, guidance {guidance:g}",
        "ControlNet Dice > null condition": "the ControlNet samples' mean Dice above the LDM's null condition's",
        f"Spearman at guidance {guidance:g} > at guidance 1":
            f"rank correlation of brain_scale and brain volume higher at guidance {guidance:g} than at 1",
        "tissue order CSF < grey < white reproduced":
            f"the real held-out images' order of mean intensity per region is CSF < grey < white, and more than "
            f"{TISSUE_MAJORITY:.0%} of the ControlNet's samples have it",
        "ControlNet tissue Dice > LDM told the true brain_scale":
            "the ControlNet samples' CSF, grey and white matter (read off by intensity) overlap the map's regions "
            f"better, on average, than the LDM's at the true brain_scale, guidance {guidance:g}",
    }


def aggregate(per_seed: dict[str, dict], *, guidance: float) -> dict:
    """Across training seeds (``{seed: that seed's results}``): each headline figure's spread with its value per
    seed, and each claim's verdict per seed with whether it holds in every seed."""
    figures = {seed: headline_figures(results, guidance=guidance) for seed, results in per_seed.items()}
    verdicts = {seed: claims(results, guidance=guidance) for seed, results in per_seed.items()}
    names = list(next(iter(figures.values())))
    return {
        "seeds": list(per_seed),
        "figures": {name: spread([figures[seed][name] for seed in per_seed])
                    | {"per_seed": {seed: figures[seed][name] for seed in per_seed}} for name in names},
        "claims": {claim: {"holds_in_every_seed": all(verdicts[seed][claim] for seed in per_seed),
                           "per_seed": {seed: verdicts[seed][claim] for seed in per_seed},
                           "criterion": criteria(guidance)[claim]}
                   for claim in next(iter(verdicts.values()))},
    }


def number(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def markdown(summary: dict) -> str:
    """The aggregate as two markdown tables: the figures (mean, standard deviation, min-max, per seed) and the
    claims (in every seed, per seed)."""
    seeds = summary["seeds"]
    lines = [f"| figure | mean | std | min to max | seeds {', '.join(seeds)} |", "|---|---|---|---|---|"]
    for name, figure in summary["figures"].items():
        lines.append(f"| {name} | {number(figure['mean'])} | {number(figure['std'], 2)} | "
                     f"{number(figure['min'])} to {number(figure['max'])} | "
                     f"{', '.join(number(figure['per_seed'][seed]) for seed in seeds)} |")
    lines += ["", f"| claim | holds in every seed | seeds {', '.join(seeds)} |", "|---|---|---|"]
    for claim, verdict in summary["claims"].items():
        lines.append(f"| {claim} | {'yes' if verdict['holds_in_every_seed'] else '**no**'} | "
                     f"{', '.join('yes' if verdict['per_seed'][seed] else 'no' for seed in seeds)} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- panels


def write_panels(samples: Path, panels: Path, held_out: list[dict], mask_chain, *, mask_key: str,
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


def study_settings(args: argparse.Namespace, overrides: list[str]) -> dict:
    """What a seed's figures depend on, beside the code: kept in its results, compared when the study resumes."""
    return {"config": str(CONFIG.relative_to(ROOT)), "overrides": overrides, "threshold": args.threshold,
            "levels": args.levels, "seeds": args.seeds, "guidance": args.guidance}


def settings_problem(stored: dict, current: dict) -> str | None:
    """How a finished seed's settings differ from this call's (where the runs were written aside), or None."""
    def comparable(settings: dict) -> dict:
        kept = {key: value for key, value in settings.items() if key != "torch_threads"}
        kept["overrides"] = [o for o in settings.get("overrides", []) if not o.startswith("output.output_dir=")]
        return kept

    stored, current = comparable(stored), comparable(current)
    differing = [f"{key}: {stored.get(key)!r} there, {current.get(key)!r} now" for key in current
                 if stored.get(key) != current[key]]
    return "; ".join(differing) or None


def stages_source(folder: Path, args: argparse.Namespace, overrides: list[str]) -> Path:
    """``folder`` (an earlier study's seed) when its autoencoder and LDM are what this call would train: a finished
    seed whose settings differ from this call's only in ``controlnet.*`` overrides.

    Raises:
        SystemExit: the folder holds no finished seed, or its settings differ elsewhere (named).
    """
    done = folder / "study.json"
    if not done.is_file():
        raise SystemExit(f"--stages-from: {done} does not exist (the earlier study has not finished this seed)")

    def upstream(settings: dict) -> dict:
        kept = dict(settings)
        kept["overrides"] = [o for o in settings.get("overrides", []) if not o.startswith("controlnet.")]
        return kept

    problem = settings_problem(upstream(json.loads(done.read_text())["settings"]),
                               upstream(study_settings(args, overrides)))
    if problem:
        raise SystemExit(f"--stages-from: {done} trained its autoencoder or LDM with other settings ({problem})")
    return folder


def study_seed(args: argparse.Namespace, workdir: Path, overrides: list[str], *, panels: Path,
               stages_from: Path | None = None) -> dict:
    """The study of one training seed: trains the three stages into ``workdir`` with ``overrides`` (which give the
    seed and the output folder), samples, measures and draws its panels into ``panels``; returns its results. With
    ``stages_from`` (the same seed's folder of an earlier study) its autoencoder and LDM runs are copied in and only
    the ControlNet trains."""
    import nibabel as nib
    import numpy as np
    import torch

    from monai_diffusion.config import load_config
    from monai_diffusion.conditioning import MASK_KEY
    from monai_diffusion.data import build_transforms, list_volumes
    from monai_diffusion.data.transforms import build_mask_transforms
    from monai_diffusion.generation import sample

    log = workdir / "log.txt"
    sets = [option for override in overrides for option in ("--set", override)]
    config = load_config(str(CONFIG), overrides)
    results: dict = {"settings": study_settings(args, overrides) | {"torch_threads": torch.get_num_threads()},
                     "seed": config.seed, "wall_time_s": {}}

    # ---- 1. train the three stages, each a real run of the command
    cli = [sys.executable, "-m", "monai_diffusion.cli"]
    stages = ("train-autoencoder", "train-ldm", "train-controlnet")
    if stages_from is not None:
        earlier = json.loads((stages_from / "study.json").read_text())
        for stage, pattern in (("train-autoencoder", "autoencoder-*"), ("train-ldm", "ldm-*")):
            for run in stages_from.glob(pattern):
                shutil.copytree(run, workdir / run.name)
            results["wall_time_s"][stage] = earlier["wall_time_s"][stage]
        results["stages_from"] = str(stages_from)
        stages = ("train-controlnet",)
    for stage in stages:
        print(f"seed {config.seed}: {stage} ...", flush=True)
        results["wall_time_s"][stage] = round(timed_run([*cli, stage, "--config", str(CONFIG), *sets], log), 1)
    ldm_run = max(workdir.glob("ldm-*/checkpoints/last.pt"), key=lambda p: p.stat().st_mtime)
    controlnet_run = max(workdir.glob("controlnet-*/checkpoints/last.pt"), key=lambda p: p.stat().st_mtime)

    voxel_ml = math.prod(config.data.spacing) / 1000
    image_chain = build_transforms(config.data, train=False, expected_channels=config.autoencoder.in_channels)
    mask_chain = build_mask_transforms(config.data, MASK_KEY)

    def read(path: Path) -> torch.Tensor:
        # Samples are already on the data grid and in the intensity range: read as written.
        return torch.as_tensor(np.asarray(nib.load(str(path)).dataobj, dtype=np.float32))

    def plain(volume) -> torch.Tensor:
        """The first channel of a (channel, *spatial) data-chain output, as a plain tensor."""
        return torch.as_tensor(volume).as_subclass(torch.Tensor)[0]

    def brain(volume: torch.Tensor) -> torch.Tensor:
        return volume > args.threshold

    def generate(name: str, **kwargs) -> list[Path]:
        return sample(config, checkpoint=kwargs.pop("checkpoint", ldm_run), out=workdir / "samples" / name,
                      steps=args.inference_steps, **kwargs)

    # ---- 2. the covariate: real volumes, then samples at evenly spaced brain_scale
    train_items, held_out = list_volumes(config.data, config.seed)
    results["held_out"] = [Path(item["image"]).name for item in held_out]
    real = [(float(item[COVARIATE]), int(brain(plain(image_chain(dict(item))["image"])).sum()) * voxel_ml)
            for item in train_items]
    results["covariate"] = {"real training volumes": covariate_summary(*map(list, zip(*real)))}
    low, high = 0.8, 1.2
    levels = [round(low + (high - low) * i / (args.levels - 1), 4) for i in range(args.levels)]
    rows = [{COVARIATE: level} for level in levels for _ in range(args.seeds)]
    start = time.perf_counter()
    for label, kwargs in (("guidance 1", {"conditions": rows, "guidance": 1.0}),
                          (f"guidance {args.guidance:g}", {"conditions": rows, "guidance": args.guidance}),
                          ("null condition", {"num_samples": len(rows)})):
        print(f"seed {config.seed}: sampling {label} ...", flush=True)
        sizes = [int(brain(read(path)).sum()) * voxel_ml for path in generate(label.replace(" ", "-"), **kwargs)]
        results["covariate"][label] = covariate_summary([r[COVARIATE] for r in rows], sizes)
    results["wall_time_s"]["covariate sampling"] = round(time.perf_counter() - start, 1)

    # ---- 3. and 4. label maps of held-out brains: ControlNet vs the LDM alone, outline (Dice) and tissue pattern
    start = time.perf_counter()
    told_label = told(args.guidance)
    methods = [REAL, CONTROLNET, NULL, told_label]
    scores: dict[str, list[float]] = {method: [] for method in methods}
    volumes: dict[str, list[tuple[float, float]]] = {method: [] for method in methods}  # (mask's, sample's) in mL
    tissue: dict[str, list[dict]] = {method: [] for method in methods}  # per sample: mean intensity per region
    measured: dict[str, list[tuple]] = {method: [] for method in methods}  # per sample: (volume, its map)

    def measure(method: str, volume: torch.Tensor, labels: torch.Tensor) -> None:
        mask = labels > 0
        scores[method].append(dice(brain(volume), mask))
        volumes[method].append((int(mask.sum()) * voxel_ml, int(brain(volume).sum()) * voxel_ml))
        tissue[method].append(region_means(volume, labels))
        measured[method].append((volume, labels))

    for number, item in enumerate(held_out):
        labels = plain(mask_chain({MASK_KEY: item[config.data.mask_key]})[MASK_KEY])
        measure(REAL, plain(image_chain(dict(item))["image"]), labels)
        runs = {
            CONTROLNET: {"checkpoint": controlnet_run, "mask": Path(item[config.data.mask_key]),
                         "num_samples": args.seeds},
            NULL: {"num_samples": args.seeds},
            told_label: {"conditions": [{COVARIATE: item[COVARIATE]}] * args.seeds, "guidance": args.guidance},
        }
        for method, kwargs in runs.items():
            print(f"seed {config.seed}: held-out brain {number + 1}/{len(held_out)}: {method} ...", flush=True)
            for path in generate(f"{method}-{number}".replace(" ", "-").replace(",", ""), **kwargs):
                measure(method, read(path), labels)
    results["masks"] = {
        method: {"n": len(values), "mean_dice": round(statistics.fmean(values), 3), "min_dice": round(min(values), 3),
                 "volume_spearman": round(spearman(*map(list, zip(*volumes[method]))), 3)}
        for method, values in scores.items()
    }
    # Paired: the same held-out map and the same seed (the same noise), with and without the ControlNet.
    wins_null = sum(a > b for a, b in zip(scores[CONTROLNET], scores[NULL]))
    wins_told = sum(a > b for a, b in zip(scores[CONTROLNET], scores[told_label]))
    results["masks"][CONTROLNET] |= {"beats null condition": f"{wins_null} of {len(scores[NULL])}",
                                     "wins_over_null_condition": wins_null, "wins_over_told_brain_scale": wins_told,
                                     "pairs": len(scores[NULL])}
    real_means = tissue_summary(tissue[REAL], [])["mean_intensity"]
    real_order = intensity_order(real_means)
    results["tissue"] = {"real order": real_order, "real mean intensity": real_means,
                         "methods": {method: tissue_summary(tissue[method], real_order) for method in methods}}
    # Tissue Dice: each sample segmented by the nearest of the real images' region means, against its map.
    tissue_scores = {method: [tissue_dice(volume, labels, args.threshold, real_means)
                              for volume, labels in measured[method]] for method in methods}
    for method, values in tissue_scores.items():
        results["tissue"]["methods"][method]["mean_tissue_dice"] = round(statistics.fmean(values), 3)
    results["tissue"]["methods"][CONTROLNET] |= {
        "tissue_dice_wins_over_null_condition": sum(a > b for a, b in zip(tissue_scores[CONTROLNET],
                                                                            tissue_scores[NULL])),
        "tissue_dice_wins_over_told_brain_scale": sum(a > b for a, b in zip(tissue_scores[CONTROLNET],
                                                                             tissue_scores[told_label]))}
    results["wall_time_s"]["mask sampling"] = round(time.perf_counter() - start, 1)

    for path in write_panels(workdir / "samples", panels, held_out, mask_chain,
                             mask_key=config.data.mask_key, guidance=args.guidance):
        print(f"wrote {path}")
    return results


def draw_panels(workdir: Path, overrides: list[str], panels: Path, guidance: float) -> None:
    """The panels of a study that has finished in ``workdir``, drawn again from its samples."""
    from monai_diffusion.config import load_config
    from monai_diffusion.conditioning import MASK_KEY
    from monai_diffusion.data import list_volumes
    from monai_diffusion.data.transforms import build_mask_transforms

    config = load_config(str(CONFIG), overrides)
    _, held_out = list_volumes(config.data, config.seed)
    mask_chain = build_mask_transforms(config.data, MASK_KEY)
    for path in write_panels(workdir / "samples", panels, held_out, mask_chain,
                             mask_key=config.data.mask_key, guidance=guidance):
        print(f"wrote {path}")


def write_json(path: Path, content: dict) -> None:
    """Whole or not at all: a study stopped while writing leaves no results file a resume would take as done."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    tmp.replace(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "conditioning-study")
    parser.add_argument("--out", type=Path, default=None, help="JSON with every figure (default: <workdir>/study.json)")
    parser.add_argument("--training-seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help="run the study once per seed (--set seed=SEED, in <workdir>/seed-SEED) and report the "
                             "spread across them and which claims hold in every one (default: one seed, the "
                             "config's, in <workdir>)")
    parser.add_argument("--rerun", type=int, nargs="*", default=None, metavar="SEED",
                        help="with --training-seeds: run these seeds again although their results exist (no seed: "
                             "every one)")
    parser.add_argument("--ae-steps", type=int, default=400)
    parser.add_argument("--ldm-steps", type=int, default=1500)
    parser.add_argument("--controlnet-steps", type=int, default=2000)
    parser.add_argument("--levels", type=int, default=9, help="brain_scale values from 0.8 to 1.2")
    parser.add_argument("--seeds", type=int, default=2, help="samples per level, and per held-out label map")
    parser.add_argument("--guidance", type=float, default=3.0, help="the strong guidance compared with 1")
    parser.add_argument("--inference-steps", type=int, default=50)
    parser.add_argument("--threshold", type=float, default=0.2, help="brain: intensity above this (range [0, 1])")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="more config overrides")
    parser.add_argument("--panels", type=Path, default=None,
                        help="folder for the PNG panels of docs/conditioning.md (default: <workdir>/panels; with "
                             "--training-seeds each seed's are in its folder, and the first seed's also here)")
    parser.add_argument("--stages-from", type=Path, default=None, metavar="WORKDIR",
                        help="with --training-seeds: take each seed's autoencoder and LDM from this earlier study "
                        "(its seed-S folders, settings equal but for controlnet.* overrides) and train only the "
                        "ControlNet: an ablation of the ControlNet's recipe at about a third of the cost")
    parser.add_argument("--panels-only", action="store_true",
                        help="only draw the panels from the samples a finished study left in --workdir")
    return parser


def study_overrides(args: argparse.Namespace, output_dir: Path | None, *, seed: int | None = None) -> list[str]:
    """The config overrides of a study in ``output_dir``: the study's steps, then ``--set``, then the training
    seed (None: the config's)."""
    return ([f"output.output_dir={output_dir}"] if output_dir is not None else []) + [
        f"autoencoder.training.max_steps={args.ae_steps}", f"ldm.training.max_steps={args.ldm_steps}",
        f"controlnet.training.max_steps={args.controlnet_steps}",
        f"ldm.sampling.num_inference_steps={args.inference_steps}", *args.overrides,
    ] + ([f"seed={seed}"] if seed is not None else [])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.training_seeds is None and args.rerun is not None:
        parser.error("--rerun: only with --training-seeds (without them the study always runs)")
    if args.training_seeds is not None:
        if any(override.split("=", 1)[0].strip() == "seed" for override in args.overrides):
            parser.error("--set seed=... and --training-seeds: give the seeds with --training-seeds only")
        if len(set(args.training_seeds)) != len(args.training_seeds):
            parser.error(f"--training-seeds: each seed once, got {args.training_seeds}")
        if args.rerun and not set(args.rerun) <= set(args.training_seeds):
            parser.error(f"--rerun {args.rerun}: not among --training-seeds {args.training_seeds}")
    elif args.stages_from is not None:
        parser.error("--stages-from: only with --training-seeds (it reads the earlier study's seed-S folders)")

    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    out = args.out or workdir / "study.json"

    if args.training_seeds is None:  # one seed, the config's, in the workdir itself
        overrides = study_overrides(args, workdir)
        panels = args.panels or workdir / "panels"
        if args.panels_only:
            draw_panels(workdir, overrides, panels, args.guidance)
            return 0
        results = study_seed(args, workdir, overrides, panels=panels)
        write_json(out, results)
        print(json.dumps(results, indent=2))
        return 0

    # ---- several training seeds: each a study of its own in <workdir>/seed-S, then the spread across them
    rerun = set(args.training_seeds if args.rerun == [] else args.rerun or [])
    per_seed: dict[str, dict] = {}
    for seed in args.training_seeds:
        folder = workdir / f"seed-{seed}"
        overrides = study_overrides(args, folder, seed=seed)
        if args.panels_only:
            draw_panels(folder, overrides, folder / "panels", args.guidance)
            continue
        done = folder / "study.json"
        if done.is_file() and seed not in rerun:
            results = json.loads(done.read_text())
            problem = settings_problem(results["settings"], study_settings(args, overrides))
            if problem:
                raise SystemExit(f"{done}: seed {seed} ran with other settings ({problem}); run it again with "
                                 f"--rerun {seed}, or use another --workdir")
            print(f"seed {seed}: results of an earlier run, {done} (--rerun {seed} runs it again)", flush=True)
        else:
            if folder.exists():
                shutil.rmtree(folder)  # a half-finished attempt's runs must not be taken for this one's
            source = None
            if args.stages_from is not None:
                source = stages_source(args.stages_from.resolve() / f"seed-{seed}", args, overrides)
            folder.mkdir(parents=True)
            results = study_seed(args, folder, overrides, panels=folder / "panels", stages_from=source)
            write_json(done, results)
        per_seed[str(seed)] = results
    if args.panels:
        args.panels.mkdir(parents=True, exist_ok=True)
        for png in sorted((workdir / f"seed-{args.training_seeds[0]}" / "panels").glob("*.png")):
            shutil.copy2(png, args.panels / png.name)
            print(f"wrote {args.panels / png.name}")
    if args.panels_only:
        return 0

    summary = aggregate(per_seed, guidance=args.guidance)
    write_json(out, {"settings": study_settings(args, study_overrides(args, None))
                     | {"training_seeds": args.training_seeds},
                     "per_seed": per_seed, "aggregate": summary})
    table = markdown(summary)
    out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
