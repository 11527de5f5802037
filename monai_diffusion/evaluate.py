"""``monai-diffusion evaluate``: measure what a trained run produces, next to a baseline.

Autoencoder run: every held-out volume (the run's validation split, or ``--data``) is reconstructed and scored
(L1, PSNR, SSIM, MS-SSIM; MONAI metrics) beside plain trilinear resampling through a grid with as many values as
the latent holds: a per-volume CSV, a summary table, and panels of the best and worst volumes.

LDM run: ``--num-samples`` volumes are generated and compared with real ones: diversity (mean pairwise MS-SSIM
among samples, next to the same figure among real volumes), MMD (MONAI's MMDMetric) and FID on the features of a
3D network (MONAI's FIDMetric; MedicalNet by default, or a torch.export file of your own).

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
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.metrics import FIDMetric, MMDMetric, PSNRMetric, SSIMMetric
from tqdm import tqdm

from monai_diffusion import command_description
from monai_diffusion.config.loading import apply_overrides, config_from_dict
from monai_diffusion.config.schema import Config
from monai_diffusion.config.stages import downsampling, stage_config
from monai_diffusion.data import build_transforms, list_volumes
from monai_diffusion.data.sources import list_folder, read_csv_datalist, read_json_datalist
from monai_diffusion.engine.checkpoint import find_checkpoint, load_checkpoint
from monai_diffusion.engine.distributed import init_distributed
from monai_diffusion.engine.logging import RunLogger, exit_status, get_logger, save_png, volume_panel
from monai_diffusion.engine.precision import resolve_precision
from monai_diffusion.generation import sample
from monai_diffusion.latents import reconstruct
from monai_diffusion.metrics import SSIM_WINDOW, ms_ssim, ms_ssim_scales, resampling_baseline
from monai_diffusion.networks.builders import build_autoencoder

# The 3D networks MONAI's perceptual loss fetches through torch hub; any of them can give FID features.
HUB_FEATURE_NETWORKS = ("medicalnet_resnet10_23datasets", "medicalnet_resnet50_23datasets")
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


def load_feature_network(name: str, device: torch.device) -> torch.nn.Module:
    """The 3D network whose features FID compares: a MONAI perceptual-models hub name, or a ``torch.export`` file.

    A file of your own is a network exported with ``torch.export.export(net, (torch.zeros(1, C, *voxel_size),))``
    and saved with ``torch.export.save`` (it runs as exported, e.g. in eval mode if it was exported so).

    Raises:
        FileNotFoundError: the hub network cannot be fetched (no network, not in torch hub's folder).
    """
    path = Path(name).expanduser()
    if path.is_file():
        return torch.export.load(str(path)).module().to(device)
    if name in HUB_FEATURE_NETWORKS:
        try:
            network = torch.hub.load("Project-MONAI/perceptual-models:main", model=name, trust_repo=True)
        except OSError as exc:
            raise FileNotFoundError(
                f"--fid-network {name}: could not get it from torch hub ({type(exc).__name__}: {exc}). Run once "
                f"where the internet is reachable (it is then kept in {torch.hub.get_dir()}), pass a torch.export "
                f"file (.pt2) of your own feature network, or --fid-network none"
            ) from exc
        return network.to(device).eval()
    raise FileNotFoundError(f"--fid-network {name}: neither a file nor one of {', '.join(HUB_FEATURE_NETWORKS)} (or 'none')")


@torch.no_grad()
def features(network: torch.nn.Module, volumes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N, F) features: each volume z-scored (as MedicalNet was trained), the network's output averaged over space."""
    rows = []
    for volume in volumes:
        x = volume[None].to(device)
        x = (x - x.mean()) / x.std().clamp_min(1e-6)
        out = network(x)
        rows.append(out.flatten(2).mean(2) if out.ndim > 2 else out)
    return torch.cat(rows).float().cpu()


def mean_pairwise_ms_ssim(volumes: torch.Tensor, data_range: float) -> float:
    """Mean MS-SSIM over all pairs: high means the volumes look alike (low diversity)."""
    scales = ms_ssim_scales(volumes.shape[2:])
    values = [float(ms_ssim(volumes[i : i + 1], volumes[j : j + 1], data_range, scales))
              for i, j in itertools.combinations(range(len(volumes)), 2)]
    return statistics.fmean(values)


def evaluate_ldm(state: dict, checkpoint: Path, config: Config, run_dir: Path, *, real_items: list[dict], out: Path,
                 num_samples: int, seed: int, steps: int | None, fid_network: str) -> dict:
    """Generate ``num_samples`` volumes and compare them with real ones (diversity, MMD, FID)."""

    log = get_logger()
    if num_samples < 2:
        raise ValueError("--num-samples: at least 2 samples are needed for diversity, MMD and FID")
    if len(real_items) < 2:
        raise ValueError(f"Only {len(real_items)} real volume(s) to compare with; pass --data with at least 2")
    device = init_distributed(config.device.device).device
    network = load_feature_network(fid_network, device) if fid_network != "none" else None  # fail before sampling
    written = sample(config, num_samples=num_samples, steps=steps, seed=seed, out=out / "samples", checkpoint=checkpoint)
    generated = torch.stack([image for _, image in load_volumes([{"image": p} for p in written], _as_is(config))])
    real = torch.stack([image for _, image in load_volumes(real_items[:max(num_samples, 2)], config)])
    intensity = config.data.intensity
    data_range = intensity.b_max - intensity.b_min
    count = min(len(real), len(generated))

    report = {
        "kind": "ldm",
        "checkpoint_step": state.get("step"),
        "num_samples": len(generated),
        "num_real": len(real),
        "seed": seed,
        "ms_ssim_scales": ms_ssim_scales(generated.shape[2:]),
        "diversity_ms_ssim_samples": mean_pairwise_ms_ssim(generated, data_range),
        "diversity_ms_ssim_real": mean_pairwise_ms_ssim(real, data_range),
        "mmd": float(MMDMetric()(real[:count], generated[:count])),
        "fid_network": fid_network,
        "fid": None,
    }
    if network is not None:
        report["fid"] = float(FIDMetric()(features(network, generated, device), features(network, real, device)))
    panel = volume_panel([(f"sample {i}", v) for i, v in enumerate(generated[:4])] + [("real", real[0])],
                         value_range=(intensity.b_min, intensity.b_max))
    save_png(panel, out / "samples.png")
    table = ldm_table(report)
    finish(report, table, out, run_dir, step=state.get("step") or 0)
    log.info("generated vs real volumes:\n%s", table)
    return report


def _as_is(config: Config) -> Config:
    """Generated volumes are already at the run's size, orientation and intensity range: load them unchanged."""
    data = config.data.model_copy(update={"spacing": None, "intensity": config.data.intensity.model_copy(
        update={"mode": "none"})})
    return config.model_copy(update={"data": data})


def ldm_table(report: dict) -> str:
    fid = "not computed (--fid-network none)" if report["fid"] is None else f"{report['fid']:.4g} ({report['fid_network']})"
    return "\n".join([
        "| measure | value |",
        "|---|---|",
        f"| samples / real volumes | {report['num_samples']} / {report['num_real']} |",
        f"| mean pairwise MS-SSIM among samples ({report['ms_ssim_scales']} scales; lower = more diverse) "
        f"| {report['diversity_ms_ssim_samples']:.4f} |",
        f"| mean pairwise MS-SSIM among real volumes | {report['diversity_ms_ssim_real']:.4f} |",
        f"| MMD real vs generated (voxels) | {report['mmd']:.4g} |",
        f"| FID | {fid} |",
    ])


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
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "seed":
            scalars[f"eval/{key}"] = value
    with RunLogger(run_dir / "tensorboard") as writer:
        writer.scalars(scalars, step)


# --------------------------------------------------------------------------------------------------- main


def evaluate(run: Path, data: Path | None = None, overrides: list[str] | None = None, num_samples: int = 8,
             *, seed: int = 0, steps: int | None = None, fid_network: str = "medicalnet_resnet10_23datasets",
             tile_size: list[int] | None = None, out: Path | None = None) -> dict:
    """Evaluate the autoencoder or LDM run (folder or checkpoint) ``run``; returns the report (also written)."""
    overrides = list(overrides or [])
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
                            num_samples=num_samples,
                            seed=seed, steps=steps, fid_network=fid_network)
    raise ValueError(f"{checkpoint}: not an autoencoder or LDM checkpoint (kind={kind!r})")


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
    parser.add_argument("--num-samples", "-n", type=int, default=8, help="LDM: volumes to generate (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="LDM: sampling seed (default 0)")
    parser.add_argument("--steps", type=int, default=None, help="LDM: denoising steps (default: the run's setting)")
    parser.add_argument("--fid-network", default="medicalnet_resnet10_23datasets",
                        help="LDM: 3D feature network for FID: a MONAI perceptual-models name (fetched through torch "
                        "hub), a torch.export file (.pt2) of your own, or 'none'")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <run>/evaluation)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="monai-diffusion evaluate", description=command_description(__doc__))
    add_arguments(parser)
    args = parser.parse_args(argv)
    return exit_status(lambda: evaluate(args.run, args.data, args.overrides, args.num_samples, seed=args.seed,
                                        steps=args.steps,
                                        fid_network=args.fid_network, tile_size=args.tile_size, out=args.out))


if __name__ == "__main__":
    sys.exit(main())
