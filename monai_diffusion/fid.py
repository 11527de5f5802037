"""FID by named protocol (``monai-diffusion evaluate --fid``): which network reads the volumes, how a volume becomes
its input, where the weights come from, and the Frechet distance of each feature set (MONAI's ``FIDMetric``).

- ``medicalnet``: MedicalNet's 3D ResNet-10 (23 datasets), 512 features per volume, as MONAI's generative work
  computes them (Pinaya et al.'s brain LDM evaluation, ``Warvito/generative_brain`` ``compute_fid.py``): each volume
  z-scored over all its voxels (MONAI's ``NormalizeIntensity``), the network's last feature map averaged over
  space, one feature vector per volume.
- ``medicalnet-resnet50``: the same with MedicalNet's ResNet-50 (2048 features), the network that script uses.
- ``radimagenet-2.5d``: MAISI's protocol, RadImageNet's 2D ResNet-50 on the slices of each plane (2048 features per
  slice), one FID per plane and their mean (:func:`maisi_planes`; NV-Generate-CTMR
  ``scripts/compute_fid_2-5d_ct.py``).
- a ``torch.export`` file (``.pt2``) of your own 3D network: MedicalNet's preprocessing, its output averaged over
  space when it is a feature map.

The networks come from ``networks/feature_networks.py`` (MONAI's ResNet in the hub entries' layout) and their
weights are the released files of Project-MONAI/perceptual-models' torch-hub entries: ``--fid-weights`` names one,
else it is looked up where those entries keep it (torch hub's folder), else fetched through torch hub.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from monai.metrics import FIDMetric
from monai.transforms import NormalizeIntensity

from monai_diffusion.config.schema import IntensityConfig
from monai_diffusion.engine.weights import load_weights, read_weights
from monai_diffusion.networks.feature_networks import STAGE_WIDTHS, medicalnet_resnet, radimagenet_resnet50

__all__ = [
    "PROTOCOLS",
    "FeatureNetwork",
    "Protocol",
    "features",
    "fid_weights_option",
    "frechet",
    "load_feature_network",
    "maisi_intensity",
    "maisi_planes",
    "protocol_names",
]

logger = logging.getLogger("monai_diffusion")

HUB_REPO = "Project-MONAI/perceptual-models:main"
RELEASES = "https://huggingface.co/MONAI/checkpoints"
# The three planes of MAISI's 2.5D FID, named as its script names them: slices along the array's last, first and
# second spatial axis (axial, sagittal, coronal in RAS).
PLANES = ("xy", "yz", "zx")
# MAISI's script clips every volume to this Hounsfield range before anything else (ScaleIntensityRanged with
# a_min=b_min=-1000, a_max=b_max=1000, clip=True; compute_fid_2-5d_ct.py line 570).
MAISI_HU_RANGE = (-1000.0, 1000.0)
# The share of each axis' central slices it reads: its published command's --enable_center_slices_ratio 0.4
# (the script's docstring, line 32, and docs/evaluation.md); the script's own default None would read all slices.
MAISI_CENTER_SLICES_RATIO = 0.4
# Subtracted from the channels after the flip to BGR (subtract_mean, lines 155-165): ImageNet's means, BGR order.
MAISI_CHANNEL_MEANS = (0.406, 0.456, 0.485)
# Slices through the 2D network at once (the results do not depend on it: the network runs in eval mode).
SLICE_BATCH = 64


@dataclass(frozen=True)
class Protocol:
    """A named way from volumes to FID features.

    Attributes:
        name: the ``--fid`` value.
        network: what reads the volumes, for the report.
        build: the network, untrained, at a width factor (1: the released width; a file of the same layout at
            another width, as the tests save, is read at its own); the weights are loaded into it.
        hub_entry: the Project-MONAI/perceptual-models torch-hub entry that fetches the weights.
        weight_file: the released file's name.
        hub_paths: where that entry keeps the file, relative to torch hub's folder, in the order it looks.
        feature_dim: features per sample.
        planes: the feature sets FID is computed on: ``("3d",)`` (one sample per volume) or :data:`PLANES` (one
            sample per slice, FID per plane, then their mean).
        scale: the summary table prints FID x ``scale`` (MedicalNet's raw FIDs are of order 1e-3; summary.json
            keeps the raw value and the factor).
    """

    name: str
    network: str
    build: Callable[[float], torch.nn.Module] | None
    hub_entry: str | None
    weight_file: str | None
    hub_paths: tuple[str, ...]
    feature_dim: int | None
    planes: tuple[str, ...]
    scale: float


PROTOCOLS = {
    protocol.name: protocol
    for protocol in (
        Protocol(name="medicalnet", network="MedicalNet 3D ResNet-10 (23 datasets)",
                 build=lambda widen: medicalnet_resnet(10, widen), hub_entry="medicalnet_resnet10_23datasets",
                 weight_file="medicalnet_resnet_10_23dataset.pth",
                 hub_paths=("monai_checkpoints/medicalnet_resnet_10_23dataset.pth",), feature_dim=512,
                 planes=("3d",), scale=1e3),
        Protocol(name="medicalnet-resnet50", network="MedicalNet 3D ResNet-50 (23 datasets)",
                 build=lambda widen: medicalnet_resnet(50, widen), hub_entry="medicalnet_resnet50_23datasets",
                 weight_file="medicalnet_resnet50_23datasets.pth",
                 hub_paths=("monai_checkpoints/medicalnet_resnet50_23datasets.pth",), feature_dim=2048,
                 planes=("3d",), scale=1e3),
        Protocol(name="radimagenet-2.5d", network="RadImageNet 2D ResNet-50 on the slices of 3 planes (MAISI)",
                 build=radimagenet_resnet50, hub_entry="radimagenet_resnet50",
                 weight_file="RadImageNet-ResNet50_notop.pth",
                 hub_paths=("RadImageNet-ResNet50_notop.pth", "monai_checkpoints/RadImageNet-ResNet50_notop.pth"),
                 feature_dim=2048, planes=PLANES, scale=1.0),
    )
}


@dataclass(frozen=True)
class FeatureNetwork:
    """A protocol's network with its weights, and where they came from (for the report).

    Attributes:
        protocol: the protocol (for a ``torch.export`` file, one named after the file).
        network: the network, in eval mode, on its device.
        weights: the weight file (the ``.pt2`` file itself for a network of your own).
        sha256: the weight file's SHA-256.
        source: "--fid-weights", "torch hub's folder" or "fetched through torch hub".
    """

    protocol: Protocol
    network: torch.nn.Module
    weights: Path
    sha256: str
    source: str


# ------------------------------------------------------------------------------------------------ options


def _is_export_file(value: str) -> bool:
    return Path(value).suffix == ".pt2"


def protocol_names(values: Sequence[str]) -> list[str]:
    """The ``--fid`` values, checked: protocol names or ``.pt2`` files, each once; ``none`` alone gives [].

    Raises:
        ValueError: an unknown name, a repeated one, or ``none`` beside others.
        FileNotFoundError: a ``.pt2`` file that does not exist.
    """
    values = list(values)
    if "none" in values:
        if len(values) > 1:
            raise ValueError(f"--fid {' '.join(values)}: 'none' turns FID off; it cannot stand beside protocols")
        return []
    for value in values:
        if _is_export_file(value):
            if not Path(value).expanduser().is_file():
                raise FileNotFoundError(f"--fid {value}: no such torch.export file")
        elif value not in PROTOCOLS:
            raise ValueError(f"--fid {value}: expected one of {', '.join(PROTOCOLS)}, a torch.export file (.pt2) "
                             "or none")
    if len(set(values)) < len(values):
        raise ValueError(f"--fid {' '.join(values)}: a protocol is named twice")
    return values


def fid_weights_option(entries: Sequence[str], protocols: Sequence[str]) -> dict[str, Path]:
    """``--fid-weights`` entries (``PROTOCOL=FILE``, or a bare ``FILE`` when ``--fid`` names one protocol that takes
    weights) as protocol -> file.

    Args:
        entries: the option's values, as given.
        protocols: the checked ``--fid`` values (:func:`protocol_names`).

    Raises:
        ValueError: a protocol not among ``--fid``'s (or one without released weights), a bare file when several
            protocols take weights, or a protocol given twice.
        FileNotFoundError: a file that does not exist.
    """
    weighted = [name for name in protocols if name in PROTOCOLS]
    files: dict[str, Path] = {}
    for entry in entries:
        name, found, file = entry.partition("=")
        if not found or name not in PROTOCOLS:
            if len(weighted) != 1:
                raise ValueError(f"--fid-weights {entry}: name the protocol (PROTOCOL=FILE), as --fid lists "
                                 f"{len(weighted)} protocols with released weights ({', '.join(weighted) or 'none'})")
            name, file = weighted[0], entry
        if name not in weighted:
            raise ValueError(f"--fid-weights {entry}: {name} is not among --fid's protocols "
                             f"({', '.join(protocols) or 'none'})")
        if name in files:
            raise ValueError(f"--fid-weights: two files for {name}")
        path = Path(file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--fid-weights {entry}: no such file {path}")
        files[name] = path
    return files


# ------------------------------------------------------------------------------------------------ weights


def sha256(path: Path) -> str:
    """The file's SHA-256, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cached(protocol: Protocol) -> Path | None:
    hub = Path(torch.hub.get_dir())
    return next((hub / relative for relative in protocol.hub_paths if (hub / relative).is_file()), None)


def weight_file(protocol: Protocol, given: Path | None) -> tuple[Path, str]:
    """The protocol's weight file and where it came from: ``given`` (``--fid-weights``), else where its torch-hub
    entry keeps it, else fetched by running that entry (which saves it there).

    Raises:
        FileNotFoundError: ``given`` does not exist; or the file is not in torch hub's folder and torch hub cannot
            fetch it (no internet): the message says where to put the file.
    """
    if given is not None:
        if not Path(given).is_file():
            raise FileNotFoundError(f"--fid-weights {protocol.name}={given}: no such file")
        return Path(given), "--fid-weights"
    cached = _cached(protocol)
    if cached is not None:
        return cached, "torch hub's folder"
    place = Path(torch.hub.get_dir()) / protocol.hub_paths[-1]
    try:
        torch.hub.load(HUB_REPO, model=protocol.hub_entry, trust_repo=True)
    except Exception as exc:  # offline: URLError; a failed download: HTTPError, RuntimeError from MONAI's download
        raise FileNotFoundError(
            f"--fid {protocol.name}: its weights {protocol.weight_file} are not in torch hub's folder and torch hub "
            f"could not fetch them ({type(exc).__name__}: {exc}). Run once where the internet is reachable, or copy "
            f"the file ({RELEASES}/resolve/main/{protocol.weight_file}, what the torch-hub entry {HUB_REPO} "
            f"{protocol.hub_entry} downloads) to {place}, or pass --fid-weights {protocol.name}=FILE"
        ) from exc
    cached = _cached(protocol)
    if cached is None:
        raise FileNotFoundError(f"--fid {protocol.name}: torch hub's {protocol.hub_entry} ran but left no "
                                f"{protocol.weight_file} at {place}; pass --fid-weights {protocol.name}=FILE")
    return cached, "fetched through torch hub"


def load_feature_network(name: str, weights: Path | None, device: torch.device) -> FeatureNetwork:
    """The network of protocol ``name`` (or of a ``torch.export`` file) with its weights, on ``device``.

    Args:
        name: a :data:`PROTOCOLS` name or a ``.pt2`` file (``torch.export.save`` of a 3D network exported with
            ``torch.export.export(net, (torch.zeros(1, C, *voxel_size),))``; it runs as exported).
        weights: ``--fid-weights``' file for it, or None to use torch hub's.
        device: where the network runs.

    Raises:
        FileNotFoundError: no weights (see :func:`weight_file`).
        CheckpointError, ValueError: a weight file that does not hold the protocol's network (the first differing
            keys are named).
    """
    if _is_export_file(name):
        path = Path(name).expanduser()
        protocol = Protocol(name=path.name, network=f"torch.export file {path.name}", build=None, hub_entry=None,
                            weight_file=path.name, hub_paths=(), feature_dim=None, planes=("3d",), scale=1.0)
        return FeatureNetwork(protocol=protocol, network=torch.export.load(str(path)).module().to(device),
                              weights=path, sha256=sha256(path), source="--fid")
    protocol = PROTOCOLS[name]
    path, source = weight_file(protocol, weights)
    what = f"--fid-weights {name}" if source == "--fid-weights" else f"--fid {name}"
    found = read_weights(path, "features", what=what)
    stem = found.weights.get("conv1.weight")
    network = protocol.build(1.0 if stem is None else stem.shape[0] / STAGE_WIDTHS[0])
    load_weights(network, found, strict=True, what=what, kind="features",
                 remedy=f"Give the released {protocol.weight_file} ({protocol.network}).")
    return FeatureNetwork(protocol=protocol, network=network.to(device).eval(), weights=path, sha256=sha256(path),
                          source=source)


# ------------------------------------------------------------------------------------------------ inputs


def maisi_intensity(volumes: torch.Tensor, intensity: IntensityConfig) -> tuple[torch.Tensor, str]:
    """Volumes in the run's intensity range back in Hounsfield units and clipped to [-1000, 1000], as MAISI's script
    reads its files (line 570), and a sentence for the report on what was done.

    ``data.intensity.mode`` 'range' maps [lower, upper] to [b_min, b_max], so the map is inverted (lower and upper
    taken as Hounsfield units); 'none' leaves the files' own values; 'percentile' has no fixed map back: no clip,
    only the min-max per plane that follows (:func:`maisi_planes`).
    """
    low, high = MAISI_HU_RANGE
    if intensity.mode == "range":
        span = (intensity.upper - intensity.lower) / (intensity.b_max - intensity.b_min)
        volumes = intensity.lower + (volumes - intensity.b_min) * span
        how = (f"[{intensity.b_min:g}, {intensity.b_max:g}] mapped back to data.intensity's [{intensity.lower:g}, "
               f"{intensity.upper:g}] (taken as HU) and clipped to [{low:g}, {high:g}] HU")
    elif intensity.mode == "none":
        how = f"the files' own values (taken as HU) clipped to [{low:g}, {high:g}]"
    else:
        return volumes, ("data.intensity.mode percentile has no map back to Hounsfield units: not clipped, only the "
                         "min-max per plane applies")
    return volumes.clamp(low, high), how


def center_slices(size: int, ratio: float) -> slice:
    """The central ``ratio`` of ``size`` slices, as MAISI's script picks them (lines 289-291)."""
    return slice(int((1.0 - ratio) / 2.0 * size), int((1.0 + ratio) / 2.0 * size))


def maisi_planes(volume: torch.Tensor, ratio: float = MAISI_CENTER_SLICES_RATIO) -> dict[str, torch.Tensor]:
    """One (already clipped, :func:`maisi_intensity`) volume as the 2D network's input per plane, the steps of
    MAISI's ``get_features_2p5d`` and ``radimagenet_intensity_normalisation`` (NV-Generate-CTMR,
    scripts/compute_fid_2-5d_ct.py):

    1. one channel repeated to three (lines 279-280), then flipped RGB -> BGR (line 283);
    2. per plane, the central ``ratio`` of the slices along the array's last axis (xy), first (yz) and second
       (zx) spatial axis (lines 288-291, 310-313, 330-333), stacked into a batch (lines 300, 322, 342);
    3. that stack min-max scaled to [0, 1] as a whole (``(x - min) / (max - min + 1e-10)``, lines 235-240: one
       minimum and maximum per plane and volume, not per slice);
    4. the channel means 0.406, 0.456, 0.485 subtracted (lines 155-165).

    No resizing: the script feeds each slice at its own size (its volumes were first padded and cropped to 512^3
    at 1 mm, lines 561-568; here both sets are at the run's size). Empty slices are kept (drop_empty is off).

    Args:
        volume: (1, X, Y, Z).
        ratio: the share of each axis' central slices.

    Returns:
        plane -> (slices, 3, height, width).

    Raises:
        ValueError: not one channel and three spatial axes, or a ratio that leaves no slice.
    """
    if volume.ndim != 4 or volume.shape[0] != 1:
        raise ValueError(f"radimagenet-2.5d: expected a (1, X, Y, Z) volume, got shape {tuple(volume.shape)}")
    image = volume[None].float().repeat(1, 3, 1, 1, 1)[:, [2, 1, 0]]
    planes = {}
    for plane, axis in zip(PLANES, (4, 2, 3)):
        picked = center_slices(image.shape[axis], ratio)
        if picked.stop <= picked.start:
            raise ValueError(f"radimagenet-2.5d: {ratio} of {image.shape[axis]} slices is none")
        slab = image.narrow(axis, picked.start, picked.stop - picked.start)
        stack = torch.cat(torch.unbind(slab, dim=axis), dim=0)
        stack = (stack - stack.min()) / (stack.max() - stack.min() + 1e-10)
        planes[plane] = stack - torch.tensor(MAISI_CHANNEL_MEANS).view(1, 3, 1, 1)
    return planes


def medicalnet_input(volume: torch.Tensor) -> torch.Tensor:
    """(1, C, *spatial): the volume z-scored over all its voxels (MONAI's ``NormalizeIntensity``, as the MedicalNet
    FID of MONAI's generative work; a constant volume is only centred)."""
    return torch.as_tensor(NormalizeIntensity()(volume.float())).as_subclass(torch.Tensor)[None]


# ------------------------------------------------------------------------------------------------ features


@torch.no_grad()
def features(feature_network: FeatureNetwork, volumes: torch.Tensor, device: torch.device, *,
             intensity: IntensityConfig) -> dict[str, torch.Tensor]:
    """Feature set -> (samples, features): ``{"3d": one row per volume}``, or for a 2.5D protocol one (slices of
    all volumes, 2048) set per plane (MAISI stacks its slices' features the same way, lines 611-617).

    Args:
        feature_network: the protocol's network.
        volumes: (N, C, *spatial) in the run's intensity range.
        device: where the network runs.
        intensity: the run's ``data.intensity`` (the 2.5D protocol maps back to Hounsfield units).
    """
    network = feature_network.network
    if feature_network.protocol.planes == ("3d",):
        rows = []
        for volume in volumes:
            out = network(medicalnet_input(volume).to(device))
            rows.append(out.flatten(2).mean(2) if out.ndim > 2 else out)
        return {"3d": torch.cat(rows).float().cpu()}
    clipped, _ = maisi_intensity(volumes.float(), intensity)
    sets: dict[str, list[torch.Tensor]] = {plane: [] for plane in PLANES}
    for volume in clipped:
        for plane, stack in maisi_planes(volume).items():
            for batch in torch.split(stack, SLICE_BATCH):
                out = network(batch.to(device))
                sets[plane].append((out.flatten(2).mean(2) if out.ndim > 2 else out).float().cpu())
    return {plane: torch.cat(rows) for plane, rows in sets.items()}


def frechet(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """MONAI's ``FIDMetric`` per feature set (``first`` as its y_pred, ``second`` as y: MAISI's order, lines
    712-714)."""
    metric = FIDMetric()
    return {name: float(metric(first[name], second[name])) for name in first}
