"""``monai-diffusion evaluate``: measure what a trained run produces, next to a baseline.

Autoencoder run: every held-out volume (the run's validation split, or ``--data``) is reconstructed and scored
(L1, PSNR, SSIM, MS-SSIM; MONAI metrics) beside plain trilinear resampling through a grid with as many values as
the latent holds: a per-volume CSV, a summary table, and panels of the best and worst volumes.

LDM run: ``--num-samples`` (n) volumes are generated and compared with n real ones, each figure beside its floor,
the same measure between two disjoint halves of the real volumes at the same n: MMD (MONAI's MMDMetric) and FID
(MONAI's FIDMetric) by named protocol (``--fid``: MedicalNet's 3D features, or MAISI's 2.5D RadImageNet protocol),
and diversity (mean pairwise MS-SSIM among samples, beside the real volumes' figure and the ratio).

Everything lands in ``<run>/evaluation/`` (CSV, ``summary.json``, ``summary.md``, PNG panels) and in the run's
TensorBoard under ``eval/``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.metrics import MMDMetric, PSNRMetric, SSIMMetric
from tqdm import tqdm

from monai_diffusion import command_description
from monai_diffusion.config.loading import apply_overrides, config_from_dict
from monai_diffusion.config.schema import Config, IntensityConfig
from monai_diffusion.config.stages import downsampling, stage_config
from monai_diffusion.data import build_transforms, list_volumes
from monai_diffusion.data.sources import list_folder, read_csv_datalist, read_json_datalist
from monai_diffusion.engine.checkpoint import find_checkpoint, load_checkpoint
from monai_diffusion.engine.distributed import init_distributed
from monai_diffusion.engine.logging import RunLogger, exit_status, get_logger, save_png, volume_panel
from monai_diffusion.engine.precision import resolve_precision
from monai_diffusion.fid import (
    MAISI_CENTER_SLICES_RATIO,
    PROTOCOLS,
    FeatureNetwork,
    features,
    fid_weights_option,
    frechet,
    load_feature_network,
    maisi_intensity,
    protocol_names,
)
from monai_diffusion.generation import sample
from monai_diffusion.latents import reconstruct
from monai_diffusion.metrics import SSIM_WINDOW, ms_ssim, ms_ssim_scales, resampling_baseline
from monai_diffusion.networks.builders import build_autoencoder

METRICS = ("l1", "psnr", "ssim", "ms_ssim")


# ------------------------------------------------------------------------------------------------ inputs


def held_out_items(config: Config, data: Path | None) -> list[dict]:
    """``--data`` (a folder of NIfTI files, or a JSON/CSV datalist: all its entries), else the run's validation
    split (the same seeded split the run trained with)."""
    if data is None:
        _, validation = list_volumes(config.data, config.seed)
        if not validation:
            raise ValueError(
                "The run has no validation volumes (data.val_fraction is 0 and the source gives no split); "
                "pass --data FOLDER_OR_DATALIST"
            )
        return validation
    data = Path(data)
    if data.is_dir():
        return list_folder(data, config.data.glob)
    if not data.is_file():
        raise FileNotFoundError(f"--data {data}: no such folder or datalist file")
    training, validation = read_csv_datalist(data) if data.suffix.lower() == ".csv" else read_json_datalist(data)
    return list(training) + list(validation or [])


def training_items(config: Config, data: Path | None) -> list[dict]:
    """Real volumes for an LDM run: ``--data``, else the run's training split (the distribution it learned)."""
    if data is not None:
        return held_out_items(config, data)
    training, _ = list_volumes(config.data, config.seed)
    return training


def stored_config(state: dict, checkpoint: Path, overrides: list[str]) -> Config:
    """The config the run trained with, plus the user's ``--set`` overrides (device, data paths, workers...)."""
    return config_from_dict(apply_overrides(state["config"], overrides), source=f"{checkpoint} (stored config)")


def load_volumes(items: list[dict], config: Config) -> list[tuple[str, torch.Tensor]]:
    """(path, (C, *spatial) float32 tensor) per item, through the run's deterministic transform chain."""
    transform = build_transforms(config.data, train=False, expected_channels=config.autoencoder.in_channels)
    volumes = []
    for item in tqdm(items, desc="loading", unit="volume", disable=len(items) < 4, dynamic_ncols=True):
        image = transform(dict(item))["image"]
        volumes.append((str(item["image"]), torch.as_tensor(image).as_subclass(torch.Tensor).float()))
    return volumes


# ------------------------------------------------------------------------------------------------ scoring


class Scorer:
    """L1, PSNR, SSIM and MS-SSIM of one volume against its reference (MONAI metrics, fixed settings)."""

    def __init__(self, spatial_shape: tuple[int, ...], data_range: float) -> None:
        spatial_dims = len(spatial_shape)
        self.data_range = data_range
        self.ms_ssim_scales = ms_ssim_scales(spatial_shape)
        self.psnr = PSNRMetric(max_val=data_range)
        self.ssim = SSIMMetric(spatial_dims=spatial_dims, data_range=data_range, win_size=SSIM_WINDOW)

    def __call__(self, prediction: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
        prediction, reference = prediction.float(), reference.float()
        return {
            "l1": float(F.l1_loss(prediction, reference)),
            "psnr": float(self.psnr(prediction, reference).mean()),
            "ssim": float(self.ssim(prediction, reference).mean()),
            "ms_ssim": float(ms_ssim(prediction, reference, self.data_range, self.ms_ssim_scales).mean()),
        }


def summarise(rows: list[dict], prefixes: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Mean, standard deviation, min and max of ``<prefix>_<metric>`` over the rows."""
    summary = {}
    for prefix, metric in itertools.product(prefixes, METRICS):
        values = [row[f"{prefix}_{metric}"] for row in rows]
        summary[f"{prefix}_{metric}"] = {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values),
            "max": max(values),
        }
    return summary


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# ------------------------------------------------------------------------------------------- autoencoder


def evaluate_autoencoder(state: dict, config: Config, run_dir: Path, items: list[dict], *, out: Path,
                         device: torch.device, tile_size: list[int] | None = None) -> dict:
    """Score the autoencoder and the trilinear baseline on ``items``; write CSV, summary and panels to ``out``."""
    log = get_logger()
    spatial_dims = len(config.data.voxel_size)
    autoencoder = build_autoencoder(config.autoencoder, spatial_dims, use_checkpoint=False)
    autoencoder.load_state_dict(state["autoencoder"])
    autoencoder.to(device).eval().requires_grad_(False)
    precision = resolve_precision(config.device.mixed_precision, device)
    factors = downsampling(config)
    if tile_size is not None:
        factors.latent_shape(tile_size)  # a window must divide by the total factor like a whole volume

    latent_spatial = factors.latent_shape(config.data.voxel_size)
    latent_values = config.autoencoder.latent_channels * math.prod(latent_spatial)
    # The baseline gets as many values per image channel as the latent holds in all.
    baseline_values = latent_values // config.autoencoder.in_channels
    intensity = config.data.intensity
    data_range = intensity.b_max - intensity.b_min
    scorer = Scorer(tuple(config.data.voxel_size), data_range)

    rows, panels = [], {}
    for path, image in tqdm(load_volumes(items, config), desc="reconstructing", unit="volume", dynamic_ncols=True):
        x = image[None].to(device)
        with precision.autocast():  # window by window at tile_size when set: a volume too large at once still fits
            reconstruction = reconstruct(autoencoder, x, tile_size).float().cpu()
        baseline, grid = resampling_baseline(x.cpu(), baseline_values)
        row = {"volume": path}
        row |= {f"autoencoder_{k}": v for k, v in scorer(reconstruction, x.cpu()).items()}
        row |= {f"trilinear_{k}": v for k, v in scorer(baseline, x.cpu()).items()}
        rows.append(row)
        panels[path] = (image, reconstruction[0], baseline[0], grid)
    if not rows:
        raise ValueError("No volumes to evaluate")

    summary = summarise(rows, ("autoencoder", "trilinear"))
    report = {
        "kind": "autoencoder",
        "checkpoint_step": state.get("step"),
        "volumes": len(rows),
        "image_shape": [config.autoencoder.in_channels, *config.data.voxel_size],
        "latent_shape": [config.autoencoder.latent_channels, *latent_spatial],
        "latent_values": latent_values,
        "trilinear_grid": list(grid),
        "trilinear_values": math.prod(grid) * config.autoencoder.in_channels,
        "ms_ssim_scales": scorer.ms_ssim_scales,
        "data_range": data_range,
        "tile_size": tile_size,
        "summary": summary,
    }
    write_csv(rows, out / "reconstruction.csv")
    ranked = sorted(rows, key=lambda row: row["autoencoder_psnr"])
    for name, row in (("worst", ranked[0]), ("best", ranked[-1])):
        image, reconstruction, baseline, grid = panels[row["volume"]]
        panel = volume_panel(
            [
                ("input", image),
                (f"autoencoder {row['autoencoder_psnr']:.1f} dB", reconstruction),
                (f"trilinear {'x'.join(map(str, grid))} {row['trilinear_psnr']:.1f} dB", baseline),
            ],
            value_range=(intensity.b_min, intensity.b_max),
        )
        save_png(panel, out / f"reconstruction-{name}.png")
        report[f"{name}_volume"] = row["volume"]
    table = autoencoder_table(report)
    finish(report, table, out, run_dir, step=state.get("step") or 0)
    log.info("autoencoder vs trilinear resampling on %d volume(s):\n%s", len(rows), table)
    return report


def autoencoder_table(report: dict) -> str:
    """Markdown table: each metric's mean +- std for the autoencoder and the baseline, and the difference."""
    s = report["summary"]
    lines = [
        f"| metric | autoencoder (latent {'x'.join(map(str, report['latent_shape']))}, {report['latent_values']:,} "
        f"values) | trilinear ({'x'.join(map(str, report['trilinear_grid']))}, {report['trilinear_values']:,} values) "
        "| difference |",
        "|---|---|---|---|",
    ]
    for metric, label in (("l1", "L1"), ("psnr", "PSNR (dB)"), ("ssim", "SSIM"),
                          ("ms_ssim", f"MS-SSIM ({report['ms_ssim_scales']} scales)")):
        ours, theirs = s[f"autoencoder_{metric}"], s[f"trilinear_{metric}"]
        digits = 2 if metric == "psnr" else 4
        lines.append(
            f"| {label} | {ours['mean']:.{digits}f} ± {ours['std']:.{digits}f} | "
            f"{theirs['mean']:.{digits}f} ± {theirs['std']:.{digits}f} | {ours['mean'] - theirs['mean']:+.{digits}f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- LDM


def mean_pairwise_ms_ssim(volumes: torch.Tensor, data_range: float) -> float:
    """Mean MS-SSIM over all pairs: high means the volumes look alike (low diversity)."""
    scales = ms_ssim_scales(volumes.shape[2:])
    values = [float(ms_ssim(volumes[i : i + 1], volumes[j : j + 1], data_range, scales))
              for i, j in itertools.combinations(range(len(volumes)), 2)]
    return statistics.fmean(values)


def split_real(real: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The real volumes as two disjoint halves of n each, in the order read: A = the first n (the floor's other
    side), B = the next n (what the model and the floor are both compared with); n = ``num_samples``, or half the
    real volumes when there are fewer than twice as many.

    Raises:
        ValueError: fewer than 4 real volumes (each half needs 2).
    """
    n = min(num_samples, len(real) // 2)
    if n < 2:
        raise ValueError(f"Only {len(real)} real volume(s): the real-vs-real floor compares two halves of at least 2 "
                         "volumes each; pass --data with at least 4")
    return real[:n], real[n : 2 * n], n


def sample_size_warnings(n: int, fid: dict[str, dict]) -> list[str]:
    """What the report warns of at ``n`` volumes per set: below 100, and every FID whose samples per set do not
    exceed its features (a rank-deficient covariance)."""
    warnings = []
    if n < 100:
        warnings.append(f"n = {n} volumes per set, below 100: FID and MMD are noisy at this n and FID is biased "
                        "upward; compare runs only at the same n and against the real-vs-real floor")
    for name, entry in fid.items():
        samples, dim = entry["samples_per_set"], entry["feature_dim"]
        if samples <= dim:
            unit = "slices" if entry["planes"] else "volumes"
            warnings.append(f"FID {name}: {samples} {unit} per set for {dim} features: the covariance has rank at "
                            f"most {samples - 1} (FID needs more samples than features)")
    return warnings


def fid_entry(feature_network: FeatureNetwork, generated: torch.Tensor, half_a: torch.Tensor, half_b: torch.Tensor,
              *, device: torch.device, intensity: IntensityConfig) -> dict:
    """One protocol's FID of the generated volumes against half B and its floor (half A against half B), with what
    the report says of the network and its weights."""
    protocol = feature_network.protocol
    on_b = features(feature_network, half_b, device, intensity=intensity)
    model = frechet(features(feature_network, generated, device, intensity=intensity), on_b)
    floor = frechet(features(feature_network, half_a, device, intensity=intensity), on_b)
    samples, dim = next(iter(on_b.values())).shape
    entry = {
        "protocol": protocol.name,
        "network": protocol.network,
        "weights": str(feature_network.weights),
        "sha256": feature_network.sha256,
        "weights_source": feature_network.source,
        "n_generated": len(generated),
        "n_real": len(half_b),
        "feature_dim": dim,
        "samples_per_set": samples,
        "scale": protocol.scale,
        "fid": statistics.fmean(model.values()),
        "fid_floor": statistics.fmean(floor.values()),
        "planes": None,
    }
    if protocol.planes != ("3d",):
        entry["planes"] = {plane: {"fid": model[plane], "fid_floor": floor[plane]} for plane in protocol.planes}
        entry["intensity"] = maisi_intensity(half_b[:1], intensity)[1]
        entry["center_slices_ratio"] = MAISI_CENTER_SLICES_RATIO
    return entry


def evaluate_ldm(state: dict, checkpoint: Path, config: Config, run_dir: Path, *, real_items: list[dict], out: Path,
                 num_samples: int, seed: int, steps: int | None, fid: Sequence[str],
                 fid_weights: Mapping[str, Path]) -> dict:
    """Generate ``num_samples`` volumes and compare them with real ones (diversity, MMD, FID per protocol), each
    figure beside the same measure between two disjoint halves of the real volumes at the same count.

    Raises:
        ValueError: fewer than 2 samples, fewer than 4 real volumes, or a protocol for one-channel volumes on a run
            with more channels.
        FileNotFoundError: a protocol's weights are nowhere (before anything is generated).
    """
    log = get_logger()
    if num_samples < 2:
        raise ValueError("--num-samples: at least 2 samples are needed for diversity, MMD and FID")
    if len(real_items) < 4:
        raise ValueError(f"Only {len(real_items)} real volume(s) to compare with: the real-vs-real floor needs two "
                         "halves of at least 2; pass --data with at least 4")
    channels = config.autoencoder.in_channels
    if channels != 1 and any(name in PROTOCOLS for name in fid):
        raise ValueError(f"--fid {' '.join(fid)}: the released networks read one-channel volumes; this run's have "
                         f"{channels} (pass --fid none or a torch.export file of your own)")
    device = init_distributed(config.device.device).device
    networks = [load_feature_network(name, fid_weights.get(name), device) for name in fid]  # fail before sampling
    written = sample(config, num_samples=num_samples, steps=steps, seed=seed, out=out / "samples", checkpoint=checkpoint)
    generated = torch.stack([image for _, image in load_volumes([{"image": p} for p in written], _as_is(config))])
    real = torch.stack([image for _, image in load_volumes(real_items[: 2 * num_samples], config)])
    half_a, half_b, n = split_real(real, num_samples)
    intensity = config.data.intensity
    data_range = intensity.b_max - intensity.b_min

    notes = []
    if len(real) < 2 * num_samples:
        notes.append(f"only {len(real)} real volumes for {num_samples} samples: n = {n} per set (n generated "
                     "against n real needs 2n real volumes for the floor)")
    diversity_samples = mean_pairwise_ms_ssim(generated, data_range)
    diversity_real = mean_pairwise_ms_ssim(half_b, data_range)
    report = {
        "kind": "ldm",
        "checkpoint_step": state.get("step"),
        "num_samples": len(generated),
        "num_real": len(real),
        "n": n,
        "halves": f"real volumes 1-{n} (in the order of the run's training split or --data) are half A, "
                  f"{n + 1}-{2 * n} half B; model = the first {n} samples against B, floor = A against B",
        "seed": seed,
        "ms_ssim_scales": ms_ssim_scales(generated.shape[2:]),
        "diversity_ms_ssim_samples": diversity_samples,
        "diversity_ms_ssim_real": diversity_real,
        "diversity_ratio": diversity_samples / diversity_real if diversity_real else None,
        "mmd": float(MMDMetric()(half_b, generated[:n])),
        "mmd_floor": float(MMDMetric()(half_b, half_a)),
        "fid": {network.protocol.name: fid_entry(network, generated[:n], half_a, half_b, device=device,
                                                 intensity=intensity) for network in networks},
        "notes": notes,
    }
    report["warnings"] = sample_size_warnings(n, report["fid"])
    panel = volume_panel([(f"sample {i}", v) for i, v in enumerate(generated[:4])] + [("real", real[0])],
                         value_range=(intensity.b_min, intensity.b_max))
    save_png(panel, out / "samples.png")
    table = ldm_table(report)
    finish(report, table, out, run_dir, step=state.get("step") or 0)
    log.info("generated vs real volumes:\n%s", table)
    for warning in report["warnings"]:
        log.warning("%s", warning)
    return report


def _as_is(config: Config) -> Config:
    """Generated volumes are already at the run's size, orientation and intensity range: load them unchanged."""
    data = config.data.model_copy(update={"spacing": None, "intensity": config.data.intensity.model_copy(
        update={"mode": "none"})})
    return config.model_copy(update={"data": data})


def _scaled(value: float, scale: float) -> str:
    return f"{value * scale:.4g}"


def ldm_table(report: dict) -> str:
    """Markdown: each measure of the model beside its real-vs-real floor at the same n, the diversity, the weights,
    notes and warnings."""
    n = report["n"]
    lines = ["| measure | model: generated vs real half B | real-vs-real floor: half A vs half B | n per set |",
             "|---|---|---|---|"]
    for name, entry in report["fid"].items():
        scale = entry["scale"]
        factor = [] if scale == 1 else [f"x 10^{round(math.log10(scale))}"]
        samples = "" if entry["planes"] is None else f" ({entry['samples_per_set']} slices per plane)"
        what = ", ".join(["mean of 3 planes" if entry["planes"] else entry["network"], *factor])
        lines.append(f"| FID {name} ({what}) | {_scaled(entry['fid'], scale)} | {_scaled(entry['fid_floor'], scale)} "
                     f"| {n}{samples} |")
        for plane, values in (entry["planes"] or {}).items():
            label = ", ".join([f"{plane.upper()} plane", *factor])
            lines.append(f"| FID {name} ({label}) | {_scaled(values['fid'], scale)} | "
                         f"{_scaled(values['fid_floor'], scale)} | {n}{samples} |")
    if not report["fid"]:
        lines.append("| FID | not computed (--fid none) | | |")
    lines.append(f"| MMD (voxels) | {report['mmd']:.4g} | {report['mmd_floor']:.4g} | {n} |")
    ratio = report["diversity_ratio"]
    lines += ["", f"| diversity: mean pairwise MS-SSIM ({report['ms_ssim_scales']} scales; lower = more diverse) | "
              "samples | real (half B) | samples / real |", "|---|---|---|---|",
              f"| | {report['diversity_ms_ssim_samples']:.4f} ({report['num_samples']}) | "
              f"{report['diversity_ms_ssim_real']:.4f} ({n}) | {'-' if ratio is None else f'{ratio:.3f}'} |"]
    lines += ["", f"Halves: {report['halves']}."]
    for name, entry in report["fid"].items():
        lines.append(f"FID {name}: {entry['network']}; weights {entry['weights']} (SHA-256 {entry['sha256']}, "
                     f"{entry['weights_source']})" + (f"; intensities: {entry['intensity']}; the central "
                     f"{entry['center_slices_ratio']:g} of each axis' slices" if entry["planes"] else "") + ".")
    lines += [f"Note: {note}." for note in report["notes"]]
    lines += [f"**Warning:** {warning}." for warning in report["warnings"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- outputs


def finish(report: dict, table: str, out: Path, run_dir: Path, *, step: int) -> None:
    """``summary.json`` + ``summary.md`` in ``out``; every number also to the run's TensorBoard under ``eval/``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "summary.md").write_text(f"# Evaluation of {run_dir}\n\n{table}\n")
    scalars = {}
    for key, value in report.items():
        if key == "summary":
            scalars |= {f"eval/{name}": stats["mean"] for name, stats in value.items()}
        elif key == "fid":  # per protocol: the model's figure and its floor (raw), and each plane's
            for name, entry in value.items():
                scalars |= {f"eval/fid_{name}": entry["fid"], f"eval/fid_{name}_floor": entry["fid_floor"]}
                scalars |= {f"eval/fid_{name}_{plane}{part}": values[f"fid{part}"]
                            for plane, values in (entry["planes"] or {}).items() for part in ("", "_floor")}
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "seed":
            scalars[f"eval/{key}"] = value
    with RunLogger(run_dir / "tensorboard") as writer:
        writer.scalars(scalars, step)


# --------------------------------------------------------------------------------------------------- main


def evaluate(run: Path, data: Path | None = None, overrides: list[str] | None = None, num_samples: int = 8,
             *, seed: int = 0, steps: int | None = None, fid: Sequence[str] = ("medicalnet",),
             fid_weights: Mapping[str, Path] | None = None, tile_size: list[int] | None = None,
             out: Path | None = None) -> dict:
    """Evaluate the autoencoder or LDM run (folder or checkpoint) ``run``; returns the report (also written).

    Args:
        run: a run folder (its best.pt, else last.pt) or a checkpoint file.
        data: real volumes (folder or JSON/CSV datalist) instead of the run's split.
        overrides: ``KEY=VALUE`` overrides of the run's stored config.
        num_samples: LDM: volumes to generate; 2 x as many real volumes are read for the real-vs-real floor.
        seed: LDM: the sampling seed.
        steps: LDM: denoising steps (None: the run's setting).
        fid: LDM: FID protocols (:data:`monai_diffusion.fid.PROTOCOLS` names, ``.pt2`` files) or ``["none"]``.
        fid_weights: LDM: protocol -> its weight file (else torch hub's).
        tile_size: autoencoder: reconstruct window by window at this size.
        out: the output folder (default ``<run>/evaluation``).

    Raises:
        FileNotFoundError: no checkpoint, ``--data`` or weight file.
        ValueError: a bad option (named), too few volumes, or a checkpoint that is neither kind.
    """
    overrides = list(overrides or [])
    protocols = protocol_names(fid)
    fid_weights = dict(fid_weights or {})
    stray = sorted(set(fid_weights) - {name for name in protocols if name in PROTOCOLS})
    if stray:
        raise ValueError(f"--fid-weights {', '.join(stray)}: not among --fid's protocols "
                         f"({', '.join(protocols) or 'none'})")
    checkpoint = find_checkpoint(run)
    state = load_checkpoint(checkpoint)
    config = stored_config(state, checkpoint, overrides)
    run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    out = Path(out) if out is not None else run_dir / "evaluation"
    kind = state.get("kind")
    if kind == "autoencoder":
        device = init_distributed(config.device.device).device
        # The autoencoder stage's own volume size and precision (they may differ from the LDM stage's).
        config = stage_config(config, "autoencoder")
        if tile_size is None:  # trained on patches: whole volumes window by window at the patch size, as validated
            tile_size = config.autoencoder.training.patch_size
        return evaluate_autoencoder(state, config, run_dir, held_out_items(config, data), out=out, device=device,
                                    tile_size=tile_size)
    if kind == "ldm":
        return evaluate_ldm(state, checkpoint, config, run_dir, real_items=training_items(config, data), out=out,
                            num_samples=num_samples, seed=seed, steps=steps, fid=protocols, fid_weights=fid_weights)
    raise ValueError(f"{checkpoint}: not an autoencoder or LDM checkpoint (kind={kind!r})")


# The names --fid-network took, as the protocols they are now.
FID_NETWORK_NAMES = {"medicalnet_resnet10_23datasets": "medicalnet",
                     "medicalnet_resnet50_23datasets": "medicalnet-resnet50"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="run folder (its checkpoints/best.pt, else last.pt) or checkpoint file")
    parser.add_argument("--data", type=Path, default=None,
                        help="folder of NIfTI files or JSON/CSV datalist (default: the run's validation split for an "
                        "autoencoder, its training split for an LDM)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the run's stored config, e.g. --set device.device=cpu (repeatable)")
    parser.add_argument("--tile-size", type=int, nargs="+", default=None,
                        help="reconstruct large volumes window by window (image voxels per axis, divisible by the "
                        "total factor; default: the patch size of an autoencoder trained on patches)")
    parser.add_argument("--num-samples", "-n", type=int, default=8,
                        help="LDM: volumes to generate (default 8). Each figure compares n of them with n real "
                        "volumes (half B) beside the floor, n other real volumes (half A) against B, so 2n real "
                        "volumes are read. Below n = 100 the report warns: FID's covariance needs more samples than "
                        "features (512 for medicalnet, 2048 for medicalnet-resnet50 and radimagenet-2.5d, whose "
                        "samples are slices)")
    parser.add_argument("--seed", type=int, default=0, help="LDM: sampling seed (default 0)")
    parser.add_argument("--steps", type=int, default=None, help="LDM: denoising steps (default: the run's setting)")
    parser.add_argument("--fid", nargs="+", default=["medicalnet"], metavar="PROTOCOL",
                        help=f"LDM: FID protocol(s): {', '.join(PROTOCOLS)} (MAISI's: RadImageNet on the slices of "
                        "3 planes), a torch.export file (.pt2) of your own 3D network, or none (default medicalnet)")
    parser.add_argument("--fid-weights", action="append", default=[], metavar="PROTOCOL=FILE",
                        help="LDM: a protocol's released weight file (e.g. medicalnet=medicalnet_resnet_10_23dataset"
                        ".pth; a bare FILE when --fid names one protocol); default: torch hub's folder, else fetched "
                        "through torch hub (repeatable)")
    parser.add_argument("--fid-network", default=None, help=argparse.SUPPRESS)  # before --fid; still read
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <run>/evaluation)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="monai-diffusion evaluate", description=command_description(__doc__))
    add_arguments(parser)
    args = parser.parse_args(argv)
    fid = args.fid
    if args.fid_network is not None:
        fid = [FID_NETWORK_NAMES.get(args.fid_network, args.fid_network)]
        get_logger().warning("--fid-network is replaced by --fid: reading it as --fid %s", fid[0])

    def run() -> dict:
        protocols = protocol_names(fid)
        return evaluate(args.run, args.data, args.overrides, args.num_samples, seed=args.seed, steps=args.steps,
                        fid=protocols, fid_weights=fid_weights_option(args.fid_weights, protocols),
                        tile_size=args.tile_size, out=args.out)

    return exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
