"""A network's weights from a file made elsewhere or earlier: where a stage starts (``*.training.init_checkpoint``)
and the frozen autoencoder an LDM works over (``ldm.autoencoder_checkpoint``).

This module is the one place that knows what each kind of file holds and under which keys:

- a checkpoint of this tool, or a run folder (its ``checkpoints/best.pt``, else ``last.pt``): its network
  (``autoencoder``, ``unet``, ``controlnet``, by its ``kind``); an LDM's or ControlNet's EMA weights when it kept
  them; an LDM's latent ``scale_factor``;
- a plain state dict (parameter names -> tensors), as MONAI's tutorials and model-zoo bundles save
  ``models/model.pt``, in today's key names or in MONAI Generative's older ones (attention projections on the block
  itself, ``proj_attn``, ``to_out.0``, the upsampling ``conv``), which are renamed;
- a released file that wraps a state dict in a dict: NV-Generate-CTMR (MAISI) saves its diffusion UNet as
  ``{"unet_state_dict": ..., "scale_factor": ..., "epoch": ..., ...}``, its ControlNet as
  ``{"controlnet_state_dict": ..., ...}``, and reads an autoencoder file either plain or under ``unet_state_dict``;
  a ``state_dict`` entry (PyTorch Lightning, MONAI's perceptual network files) is read the same way;
- a feature network's released file (kind ``features``, what FID reads): MedicalNet's ``{"state_dict": ...}``,
  RadImageNet's plain state dict.

Keys saved through ``DataParallel`` (``module.`` before every name, as in MedicalNet's files) lose that prefix.

Loading compares every tensor's name and shape with the network the config builds: what differs is an error that
lists the first differing keys with both shapes, or, with ``strict`` false, is left out and logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from monai_diffusion.engine.checkpoint import CheckpointError, as_checkpoint, find_checkpoint, read_torch_file
from monai_diffusion.engine.ema import ema_weights

__all__ = ["FileWeights", "LoadReport", "init_network", "load_weights", "read_weights"]

logger = logging.getLogger("monai_diffusion")

# A checkpoint of this tool: the entry holding each kind's network (a feature network is never in one).
NETWORK_KEYS = {"autoencoder": "autoencoder", "ldm": "unet", "controlnet": "controlnet"}
# A released file's dict: the entries that hold each kind's state dict, in order of preference.
WRAPPER_KEYS = {
    "autoencoder": ("unet_state_dict", "state_dict"),
    "ldm": ("unet_state_dict", "state_dict"),
    "controlnet": ("controlnet_state_dict", "state_dict"),
    "features": ("state_dict",),
}
NETWORK_NAMES = {"autoencoder": "autoencoder", "ldm": "diffusion UNet", "controlnet": "ControlNet",
                 "features": "FID feature network"}
# DataParallel's prefix on every key of a network saved through it.
DATA_PARALLEL_PREFIX = "module."
CHECKPOINT_NAMES = {"autoencoder": "an autoencoder", "ldm": "an LDM", "controlnet": "a ControlNet"}
# How many differing keys an error or a report names (of each sort).
SHOWN = 5


@dataclass(frozen=True)
class FileWeights:
    """A network's weights as read from a file (:func:`read_weights`).

    Attributes:
        path: the file (a run folder resolved to its checkpoint).
        weights: parameter and buffer names -> tensors, in the file's own key layout.
        layout: what the file is, for messages: "monai-diffusion ldm checkpoint, its EMA weights", "plain state
            dict", "MAISI-style file, its 'unet_state_dict'".
        scale_factor: the latent scale factor the file carries (an LDM checkpoint's, a MAISI diffusion file's); None
            when it has none.
        checkpoint: the whole checkpoint when the file is one of this tool's (its config, its record); else None.
    """

    path: Path
    weights: dict[str, torch.Tensor]
    layout: str
    scale_factor: float | None = None
    checkpoint: dict | None = None


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_weights` did with a file's tensors.

    Attributes:
        loaded: network tensors given the file's values.
        total: tensors of the network.
        renamed: of those, found under MONAI Generative's names.
        mismatched: (network key, file shape, network shape) of tensors the file has in another shape.
        missing: network tensors the file lacks (kept as built).
        unexpected: file tensors the network has no place for.
    """

    loaded: int
    total: int
    renamed: int
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    missing: list[str]
    unexpected: list[str]

    @property
    def complete(self) -> bool:
        return not (self.mismatched or self.missing or self.unexpected)

    def differences(self) -> list[str]:
        """One line per sort of difference, naming the first :data:`SHOWN` keys (with both shapes)."""
        lines = []
        if self.mismatched:
            shown = "; ".join(f"{key}: file {list(a)}, network {list(b)}" for key, a, b in self.mismatched[:SHOWN])
            lines.append(f"{len(self.mismatched)} tensor(s) of another shape: {shown}{_more(self.mismatched)}")
        if self.missing:
            lines.append(f"{len(self.missing)} tensor(s) of the network not in the file: "
                         f"{', '.join(self.missing[:SHOWN])}{_more(self.missing)}")
        if self.unexpected:
            lines.append(f"{len(self.unexpected)} tensor(s) of the file with no place in the network: "
                         f"{', '.join(self.unexpected[:SHOWN])}{_more(self.unexpected)}")
        return lines


def _more(items: list) -> str:
    return f" (and {len(items) - SHOWN} more)" if len(items) > SHOWN else ""


def _is_state_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(key, str) and isinstance(tensor, torch.Tensor) for key, tensor in value.items())


def _without_data_parallel(weights: dict[str, torch.Tensor], layout: str) -> tuple[dict[str, torch.Tensor], str]:
    """``weights`` without DataParallel's ``module.`` when every key has it (and the layout saying so)."""
    if all(key.startswith(DATA_PARALLEL_PREFIX) for key in weights):
        weights = {key[len(DATA_PARALLEL_PREFIX):]: value for key, value in weights.items()}
        return weights, f"{layout}, 'module.' dropped"
    return weights, layout


def read_weights(path: Path | str, kind: str, *, what: str) -> FileWeights:
    """The weights of a ``kind`` network (``autoencoder``, ``ldm``: the diffusion UNet, ``controlnet``, ``features``:
    an FID feature network) in ``path``.

    Args:
        path: a checkpoint of this tool or its run folder, a plain state dict, or a released file that wraps one
            (see the module's documentation).
        kind: which network.
        what: the config key ``path`` came from, named first in the errors.

    Raises:
        FileNotFoundError: nothing at ``path``, or a folder without a checkpoint.
        CheckpointError: an unreadable file, one a safe load refuses, a checkpoint of another format version, or a
            file that holds none of the above.
        ValueError: a checkpoint of this tool of another kind.
    """
    path = find_checkpoint(path, what=what)
    content = read_torch_file(path)
    if isinstance(content, dict) and "format_version" in content:
        if kind not in NETWORK_KEYS:
            raise CheckpointError(f"{what}: {path} is a monai-diffusion checkpoint, not a {NETWORK_NAMES[kind]}'s "
                                  "weights file")
        state = as_checkpoint(content, path)
        if state.get("kind") != kind or NETWORK_KEYS[kind] not in state:
            name = CHECKPOINT_NAMES[kind]
            raise ValueError(f"{what}: {path} is not {name} checkpoint (kind={state.get('kind')!r}); name {name} "
                             "checkpoint, run folder or weights file")
        network = state[NETWORK_KEYS[kind]]
        if kind != "autoencoder" and state.get("ema") is not None:
            weights, which = ema_weights(state["ema"]), "its EMA weights"
        else:
            weights, which = network, "its weights" if kind == "autoencoder" else "its raw weights (no EMA saved)"
        scale = state.get("scale_factor") if kind == "ldm" else None
        return FileWeights(path=path, weights=weights, layout=f"monai-diffusion {kind} checkpoint, {which}",
                           scale_factor=float(scale) if scale is not None else None, checkpoint=state)
    if _is_state_dict(content):
        weights, layout = _without_data_parallel(content, "plain state dict")
        return FileWeights(path=path, weights=weights, layout=layout)
    if isinstance(content, dict):
        for key in WRAPPER_KEYS[kind]:
            if _is_state_dict(content.get(key)):
                scale = content.get("scale_factor")
                weights, layout = _without_data_parallel(content[key], f"MAISI-style file, its {key!r}"
                                                         if kind != "features" else f"released file, its {key!r}")
                return FileWeights(path=path, weights=weights, layout=layout,
                                   scale_factor=float(scale) if scale is not None else None)
    keys = sorted(map(str, content))[:10] if isinstance(content, dict) else type(content).__name__
    raise CheckpointError(
        f"{what}: {path} is not a monai-diffusion checkpoint nor a {NETWORK_NAMES[kind]}'s weights: expected a state "
        f"dict (names -> tensors) or a dict with one in {' or '.join(repr(k) for k in WRAPPER_KEYS[kind])}; it "
        f"holds {keys}"
    )


# ---------------------------------------------------------------------------------------------------- matching


def _old_names(key: str) -> list[str]:
    """The names MONAI Generative gave the tensor MONAI (>= 1.4) calls ``key`` (the renames of MONAI's
    ``load_old_state_dict`` of AutoencoderKL, DiffusionModelUNet and ControlNet), most likely first."""
    names = []
    if ".attn.out_proj." in key:  # a self-attention block's output projection
        names += [key.replace(".attn.out_proj.", ".proj_attn."), key.replace(".out_proj.", ".to_out.0.")]
    elif ".out_proj." in key:  # a transformer block's (cross-)attention
        names.append(key.replace(".out_proj.", ".to_out.0."))
    for name in ("to_q", "to_k", "to_v"):
        if f".attn.{name}." in key:
            names.append(key.replace(f".attn.{name}.", f".{name}."))
    if "postconv" in key:
        names.append(key.replace("postconv", "conv"))
    return names


def _missing_projection(key: str, current: torch.Tensor, file: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """An old self-attention block without an output projection (MONAI Generative's autoencoder blocks had none):
    the identity and a zero bias, which keep its output what it was. None for any other key."""
    block, found, part = key.partition(".attn.out_proj.")
    if not found or f"{block}.to_q.weight" not in file:
        return None
    if part == "weight" and current.ndim == 2 and current.shape[0] == current.shape[1]:
        return torch.eye(current.shape[0], dtype=current.dtype)
    return torch.zeros_like(current, device="cpu") if part == "bias" else None


def match_weights(target: dict[str, torch.Tensor], file: dict[str, torch.Tensor]
                  ) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The file's tensors under the network's names (``target``: its state dict), and what did not match."""
    left = dict(file)
    matched, renamed, mismatched, missing = {}, 0, [], []
    for key, current in target.items():
        name = key if key in left else next((old for old in _old_names(key) if old in left), None)
        if name is None:
            filler = _missing_projection(key, current, file)
            if filler is None:
                missing.append(key)
            else:
                matched[key] = filler
            continue
        value = left.pop(name)
        if tuple(value.shape) != tuple(current.shape):
            mismatched.append((key, tuple(value.shape), tuple(current.shape)))
            continue
        matched[key] = value
        renamed += name != key
    report = LoadReport(loaded=len(matched), total=len(target), renamed=renamed, mismatched=mismatched,
                        missing=missing, unexpected=list(left))
    return matched, report


def load_weights(network: torch.nn.Module, found: FileWeights, *, strict: bool, what: str, kind: str,
                 remedy: str) -> LoadReport:
    """Copy ``found``'s weights into ``network`` (in place, on its device).

    Args:
        network: the network the config builds.
        found: the file's weights (:func:`read_weights`).
        strict: every tensor must match by name and shape, both ways; False loads what matches, keeps the rest of
            the network as built, and returns what it left out.
        what: the config key the file came from (the errors name it).
        kind: which network (``autoencoder``, ``ldm``, ``controlnet``), named in the errors.
        remedy: the error's last sentence: what to change.

    Raises:
        ValueError: strict and anything differs (the first differing keys of each sort with both shapes, and the
            file); or nothing at all matches.
    """
    target = network.state_dict()
    matched, report = match_weights(target, found.weights)
    problem = (not report.complete and strict) or report.loaded == 0
    if problem:
        listing = "\n".join(f"  - {line}" for line in report.differences())
        raise ValueError(
            f"{what}: {found.path} does not fit the {NETWORK_NAMES[kind]} the config builds ({found.layout}; "
            f"{report.loaded} of {report.total} tensors match):\n{listing}\n{remedy}"
        )
    network.load_state_dict({**target, **matched})
    return report


def init_network(network: torch.nn.Module, path: Path | str, *, kind: str, strict: bool, section: str) -> FileWeights:
    """Start ``network`` from the weights in ``path`` (``<section>.init_checkpoint``) and log what was loaded, and
    with ``strict`` false what was left out and what stayed as built.

    Args:
        network: the stage's network, as built.
        path: the file or run folder.
        kind: ``autoencoder``, ``ldm`` (the diffusion UNet) or ``controlnet``.
        strict: ``<section>.init_strict``.
        section: the stage's training section, e.g. ``ldm.training``.

    Returns:
        The file's weights (its ``scale_factor``, for the LDM).

    Raises:
        FileNotFoundError, CheckpointError, ValueError: as :func:`read_weights` and :func:`load_weights`.
    """
    what = f"{section}.init_checkpoint"
    found = read_weights(path, kind, what=what)
    remedy = (f"Set the config's network settings to the network the file holds, or {section}.init_strict: false "
              "to load only the tensors that fit.")
    report = load_weights(network, found, strict=strict, what=what, kind=kind, remedy=remedy)
    renamed = f", {report.renamed} under MONAI Generative's names" if report.renamed else ""
    logger.info("%s: the %s starts from %s (%s): %d of %d tensors%s", what, NETWORK_NAMES[kind], found.path,
                found.layout, report.loaded, report.total, renamed)
    if not report.complete:
        logger.warning("%s (init_strict false): %s; the network's other tensors keep their initial values", what,
                       "; ".join(report.differences()))
    return found
