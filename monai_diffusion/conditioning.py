"""Conditional generation: covariates as MONAI's UNet takes them, classifier-free guidance, and the label maps a
ControlNet follows.

- :class:`ConditionEncoder`: ``data.conditions`` fitted on the training split (mean and standard deviation of each
  continuous value, the vocabulary of each categorical one), kept in the checkpoint, and turned into the UNet's
  inputs: a cross-attention ``context`` of shape (B, 1, D) and/or ``class_labels`` of shape (B,) for MONAI's
  ``num_class_embeds`` (``ldm.conditioning.categorical_via``). The context starts with a 1 that says "conditioned";
  the null condition of classifier-free guidance is all zeros there and class 0, so no real value can be mistaken
  for it.
- :class:`Conditioning`: one batch's encoded conditions; :meth:`Conditioning.dropped` replaces each sample's by the
  null condition with ``ldm.conditioning.dropout`` while training.
- :func:`control_input`: a label map as the ControlNet sees it, each non-background label's share of a voxel at the
  resolution its conditioning embedding takes.
- :func:`unet_output` and :class:`Denoiser`: the UNet with its conditions and the ControlNet's residuals; the
  denoiser the sampler calls mixes the conditional and the unconditional prediction by the guidance scale
  (``uncond + w (cond - uncond)``, as MONAI's inferers' ``cfg``).
- :func:`parse_condition_args` and :func:`read_condition_table`: what ``sample --condition`` and ``--conditions``
  give, with the place each value came from for error messages.

MAISI's UNet (``ldm.unet.architecture: maisi``) has two inputs of its own, which the same encoder gives it: each
volume's voxel spacing (mm, times 100 as MAISI feeds it; from the volume's affine, never dropped) and its modality, a
code of MAISI's vocabulary as its class label (a datalist field or one configured value; 0, 'unknown', is its null
condition, and training drops it as MAISI's does: to 'unknown', and ct_* / mri_* codes to ct / mri, each with
``ldm.conditioning.dropout``).
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from monai_diffusion.config.schema import MAISI_MODALITIES, ConditionConfig, Config, DataConfig
from monai_diffusion.data.sources import condition_value, label_problem
from monai_diffusion.data.transforms import build_mask_transforms
from monai_diffusion.latents import SPACING_KEY, voxel_spacing

__all__ = [
    "MODALITY_KEY",
    "ConditionEncoder",
    "Conditioning",
    "Denoiser",
    "batch_spacing",
    "format_spacing",
    "maisi_modality_dropout",
    "control_input",
    "control_size",
    "parse_condition_args",
    "read_control",
    "read_condition_table",
    "unet_output",
]

# Categorical conditions without a configured vocabulary get this many placeholder categories when a step is
# measured without data (the memory probe): the vocabulary changes one embedding's size, not the step's memory.
PROBE_CATEGORIES = 2
# The key a lone label map travels under through the data chain.
MASK_KEY = "mask"
# The key a volume's modality (MAISI's UNet) travels under in rows of conditions and cached batches.
MODALITY_KEY = "modality"
# MAISI feeds its UNet the voxel spacing in mm times this (NV-Generate-CTMR's diff_model_train.py: x * 1e2).
MAISI_SPACING_SCALE = 100.0


# ------------------------------------------------------------------------------------------------- encoding


@dataclass
class Conditioning:
    """One batch's conditions as MONAI's DiffusionModelUNet and ControlNet (and MAISI's) take them.

    Attributes:
        context: (B, 1, D) float cross-attention context, None when the UNet has no cross-attention conditioning.
        class_labels: (B,) int64 class indices, None when it has no class embedding; 0 is the null class.
        spacing: (B, 3) float voxel spacing as MAISI's UNet takes it (mm x 100), None for other UNets. It is no
            condition to guide towards: the null condition keeps it.
        modality: the class labels are MAISI's modality codes (dropped as MAISI's training drops them).
    """

    context: torch.Tensor | None = None
    class_labels: torch.Tensor | None = None
    spacing: torch.Tensor | None = None
    modality: bool = False

    def inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of the UNet's forward (a ControlNet takes all but ``spacing_tensor``)."""
        inputs = {}
        if self.context is not None:
            inputs["context"] = self.context
        if self.class_labels is not None:
            inputs["class_labels"] = self.class_labels
        if self.spacing is not None:
            inputs["spacing_tensor"] = self.spacing
        return inputs

    def _map(self, function) -> Conditioning:
        """Each tensor through ``function`` (None stays None)."""
        return dataclasses.replace(self, **{name: function(getattr(self, name)) if getattr(self, name) is not None
                                            else None for name in ("context", "class_labels", "spacing")})

    def to(self, device: torch.device | str) -> Conditioning:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def null(self) -> Conditioning:
        """The null condition for every sample of the batch (classifier-free guidance's unconditional input); the
        spacing stays (MAISI's guidance keeps it too)."""
        return dataclasses.replace(self, context=torch.zeros_like(self.context) if self.context is not None else None,
                                   class_labels=torch.zeros_like(self.class_labels)
                                   if self.class_labels is not None else None)

    def dropped(self, probability: float) -> Conditioning:
        """Each sample's conditions replaced by the null condition with ``probability`` (classifier-free guidance
        training; MAISI's modality as :func:`maisi_modality_dropout`). The draws come from torch's global CPU
        generator, whose state every checkpoint keeps: a resumed run drops the same samples."""
        if probability <= 0:
            return self
        context, class_labels = self.context, self.class_labels
        if context is not None or (class_labels is not None and not self.modality):
            keep = torch.rand(len(context if context is not None else class_labels)) >= probability
            if context is not None:
                context = context * keep.to(context).view(-1, 1, 1)
            if class_labels is not None and not self.modality:
                class_labels = class_labels * keep.to(class_labels)
        if class_labels is not None and self.modality:
            class_labels = maisi_modality_dropout(class_labels, probability)
        return dataclasses.replace(self, context=context, class_labels=class_labels)

    def repeat(self, count: int) -> Conditioning:
        """The batch repeated ``count`` times along its first axis (one condition for several samples)."""
        return self._map(lambda t: t.repeat_interleave(count, dim=0))

    @staticmethod
    def cat(first: Conditioning, second: Conditioning) -> Conditioning:
        """Two batches' conditions one after the other (guidance runs both halves in one UNet pass)."""
        pairs = {name: (getattr(first, name), getattr(second, name)) for name in ("context", "class_labels", "spacing")}
        return dataclasses.replace(first, **{name: torch.cat([a, b]) if a is not None else None
                                             for name, (a, b) in pairs.items()})


def maisi_modality_dropout(labels: torch.Tensor, probability: float) -> torch.Tensor:
    """MAISI's modality augmentation (NV-Generate-CTMR's ``augment_modality_label``, at ``probability``): each ct_*
    code (2-7) becomes ct (1), each mri_* code (>= 9) mri (8), and each label 'unknown' (0, the null condition), each
    with ``probability``. Drawn on the CPU from torch's global generator."""
    labels = labels.clone()
    device = labels.device
    coarse_ct = (labels >= 2) & (labels < 8) & (torch.rand(labels.shape) < probability).to(device)
    labels[coarse_ct] = 1
    coarse_mri = (labels >= 9) & (torch.rand(labels.shape) < probability).to(device)
    labels[coarse_mri] = 8
    return labels * (torch.rand(labels.shape) >= probability).to(device, labels.dtype)


@dataclass(frozen=True)
class ConditionEncoder:
    """``data.conditions`` as fitted on a training split: how each value becomes the UNet's input.

    Attributes:
        conditions: one dict per condition, in ``data.conditions`` order: ``{"name", "type": "continuous", "mean",
            "std"}`` or ``{"name", "type": "categorical", "categories": [...]}``.
        categorical_via: ``ldm.conditioning.categorical_via`` (cross_attention or class_embedding).
        maisi: MAISI's UNet's own inputs (None for MONAI's UNet): ``{"spacing": bool`` (it takes the voxel
            spacing), ``"modalities"``: the vocabulary {name: code} (None: no modality input), ``"modality_key"``:
            the datalist field holding each volume's modality (None: one configured value), ``"modality"``: the
            default modality (the configured one, or the training split's most frequent)``}``.
    """

    conditions: tuple[dict, ...]
    categorical_via: str
    maisi: dict | None = None

    # ---- building and storing

    @classmethod
    def fit(cls, config: Config, items: Sequence[dict]) -> ConditionEncoder | None:
        """Fit ``config.data.conditions`` on the training ``items`` (None when there are none).

        Raises:
            ValueError: a value is missing or not a number (naming the image and key), a categorical value is not
                among the configured ``categories``, or a continuous value is the same in every item (nothing to
                condition on).
        """
        specs, maisi = config.data.conditions, _fit_maisi(config, items)
        if not specs and maisi is None:
            return None
        fitted = []
        for index, spec in enumerate(specs):
            values = [_value(spec, item, f"training volume {item['image']}") for item in items]
            if spec.type == "continuous":
                mean = sum(values) / len(values)
                std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
                if std == 0:
                    raise ValueError(f"data.conditions[{index}]: '{spec.name}' is {values[0]} in every one of the "
                                     f"{len(values)} training volume(s): there is nothing to condition on")
                fitted.append({"name": spec.name, "type": "continuous", "mean": mean, "std": std})
                continue
            if spec.categories is not None:
                unknown = sorted({v for v in values if v not in spec.categories})
                if unknown:
                    raise ValueError(f"data.conditions[{index}].categories: the training split has '{spec.name}' "
                                     f"values {unknown} outside {spec.categories}")
            categories = list(spec.categories) if spec.categories is not None else sorted(set(values))
            fitted.append({"name": spec.name, "type": "categorical", "categories": categories})
        return cls(tuple(fitted), config.ldm.conditioning.categorical_via, maisi)

    @classmethod
    def placeholder(cls, config: Config) -> ConditionEncoder | None:
        """The encoder's layout without data, for measuring a step: continuous values standardised as they are,
        categorical ones with their configured vocabulary or ``PROBE_CATEGORIES`` stand-ins."""
        maisi = _fit_maisi(config, [])
        if not config.data.conditions and maisi is None:
            return None
        fitted = [
            {"name": spec.name, "type": "continuous", "mean": 0.0, "std": 1.0} if spec.type == "continuous" else
            {"name": spec.name, "type": "categorical",
             "categories": list(spec.categories or [str(i) for i in range(PROBE_CATEGORIES)])}
            for spec in config.data.conditions
        ]
        return cls(tuple(fitted), config.ldm.conditioning.categorical_via, maisi)

    @classmethod
    def from_state(cls, state: Mapping | None) -> ConditionEncoder | None:
        """The encoder a checkpoint keeps (its ``"conditioning"`` entry; None or absent: unconditional)."""
        if not state:
            return None
        maisi = dict(state["maisi"]) if state.get("maisi") is not None else None
        return cls(tuple(dict(c) for c in state["conditions"]), state["categorical_via"], maisi)

    def state(self) -> dict:
        """What a checkpoint keeps: plain lists, numbers and strings."""
        return {"conditions": [dict(c) for c in self.conditions], "categorical_via": self.categorical_via,
                **({"maisi": dict(self.maisi)} if self.maisi is not None else {})}

    # ---- the UNet's shape

    @property
    def names(self) -> list[str]:
        """The covariates' names (``data.conditions``)."""
        return [c["name"] for c in self.conditions]

    @property
    def takes_spacing(self) -> bool:
        """MAISI's UNet with its spacing input."""
        return self.maisi is not None and bool(self.maisi["spacing"])

    @property
    def modalities(self) -> dict[str, int] | None:
        """MAISI's modality vocabulary when the UNet takes a modality, else None."""
        return self.maisi.get("modalities") if self.maisi is not None else None

    @property
    def row_names(self) -> list[str]:
        """What a row of conditions holds (``encode``): the covariates, then MAISI's spacing and modality."""
        return self.names + ([SPACING_KEY] if self.takes_spacing else []) \
            + ([MODALITY_KEY] if self.modalities is not None else [])

    def item_fields(self, item: Mapping) -> dict:
        """What a training item carries into its batches besides its image: its covariates and its modality (under
        ``MODALITY_KEY``); the spacing comes with the image (its affine, or the cache entry's)."""
        fields = {name: item[name] for name in self.names}
        if self.modalities is not None:
            key = self.maisi["modality_key"]
            fields[MODALITY_KEY] = item[key] if key is not None else self.maisi["modality"]
        return fields

    def _in_context(self, condition: dict) -> bool:
        return condition["type"] == "continuous" or self.categorical_via == "cross_attention"

    @property
    def context_dim(self) -> int | None:
        """Length of the context vector (MONAI's ``cross_attention_dim``), None when nothing goes through it."""
        features = [1 if c["type"] == "continuous" else len(c["categories"])
                    for c in self.conditions if self._in_context(c)]
        return 1 + sum(features) if features else None

    @property
    def num_class_embeds(self) -> int | None:
        """Classes of MONAI's class embedding: one per combination of categories, plus the null class 0."""
        if self.categorical_via != "class_embedding":
            return None
        sizes = [len(c["categories"]) for c in self.conditions if c["type"] == "categorical"]
        return 1 + math.prod(sizes) if sizes else None

    def unet_arguments(self) -> dict:
        """The conditioning arguments of MONAI's DiffusionModelUNet / ControlNet for this encoder."""
        dim = self.context_dim
        return {"with_conditioning": dim is not None, "cross_attention_dim": dim,
                "num_class_embeds": self.num_class_embeds}

    # ---- values -> inputs

    def encode(self, rows: Sequence[Mapping], where: Sequence[str] | None = None, *,
               covariates: bool = True) -> Conditioning:
        """The UNet's inputs for one row of raw values per sample (numbers or text, as a datalist or the command
        line gives them).

        Args:
            rows: ``{name: value}`` per sample; every condition must be there (MAISI's UNet: its spacing under
                ``SPACING_KEY`` and its modality under ``MODALITY_KEY`` too).
            where: where each row came from, for error messages (default: ``sample <i>``).
            covariates: False: the covariates' null condition (the rows need not hold them), MAISI's inputs from
                the rows.

        Raises:
            ValueError: a value is missing, not a number where continuous, or not in the vocabulary (naming the
                row, the key and the known categories).
        """
        where = where or [f"sample {index}" for index in range(len(rows))]
        specs = [ConditionConfig(name=c["name"], type=c["type"]) for c in self.conditions]
        context, classes, spacings = [], [], []
        for row, place in zip(rows, where):
            if self.takes_spacing:
                spacings.append(_spacing(row, place))
            if self.modalities is not None:
                classes.append(self._modality_code(row, place))
            if not covariates:
                context.append([0.0] * (self.context_dim or 0))
                if self.num_class_embeds is not None:
                    classes.append(0)
                continue
            features, class_index, stride = [1.0], 0, 1
            for condition, spec in zip(self.conditions, specs):
                value = _value(spec, row, place)
                if condition["type"] == "continuous":
                    features.append((value - condition["mean"]) / condition["std"])
                    continue
                categories = condition["categories"]
                if value not in categories:
                    raise ValueError(f"{place}: '{condition['name']}' = {value!r} is not a category the LDM was "
                                     f"trained with ({categories})")
                code = categories.index(value)
                if self.categorical_via == "cross_attention":
                    features += [1.0 if i == code else 0.0 for i in range(len(categories))]
                else:
                    class_index += code * stride
                    stride *= len(categories)
            context.append(features)
            if self.num_class_embeds is not None:
                classes.append(1 + class_index)
        return Conditioning(
            torch.tensor(context, dtype=torch.float32)[:, None, :] if self.context_dim is not None else None,
            torch.tensor(classes, dtype=torch.int64) if classes else None,
            torch.tensor(spacings, dtype=torch.float32) * MAISI_SPACING_SCALE if self.takes_spacing else None,
            modality=self.modalities is not None,
        )

    def _modality_code(self, row: Mapping, where: str) -> int:
        """A row's modality as MAISI's class label."""
        if MODALITY_KEY not in row:
            raise ValueError(f"{where}: the modality is missing (MAISI's UNet takes one, e.g. --modality ct)")
        value = str(row[MODALITY_KEY])
        if value not in self.modalities:
            raise ValueError(f"{where}: modality {value!r} is not in MAISI's vocabulary ({', '.join(self.modalities)})")
        return self.modalities[value]

    def null(self, batch_size: int) -> Conditioning:
        """The null condition for ``batch_size`` samples: what the UNet learnt as "unconditioned" (a conditional UNet
        needs it spelt out: without a context MONAI's cross-attention would attend to the image itself)."""
        dim = self.context_dim
        return Conditioning(torch.zeros(batch_size, 1, dim) if dim is not None else None,
                            torch.zeros(batch_size, dtype=torch.int64) if self.num_class_embeds is not None else None)

    def encode_batch(self, batch: Mapping) -> Conditioning:
        """The UNet's inputs for a collated batch of items (each condition's values under its name: a tensor of
        numbers or a list of text; MAISI's modality under ``MODALITY_KEY`` or its datalist field, and the voxel
        spacing as :func:`batch_spacing` finds it)."""
        size = len(batch["mu"] if "mu" in batch else batch["image"])
        columns = {name: batch[name] for name in self.names}
        if self.takes_spacing:
            columns[SPACING_KEY] = batch_spacing(batch)
        if self.modalities is not None:
            # Image batches carry it under its datalist field, cached ones under MODALITY_KEY; else the configured one.
            field = self.maisi["modality_key"]
            key = field if field is not None and field in batch else MODALITY_KEY if MODALITY_KEY in batch else None
            columns[MODALITY_KEY] = batch[key] if key is not None else [self.maisi["modality"]] * size
        rows = [{name: _element(values, i) for name, values in columns.items()} for i in range(size)]
        return self.encode(rows, [f"batch item {i}" for i in range(size)])

    def describe(self, row: Mapping) -> str:
        """``name=value`` of a row's conditions in order, for file headers and logs."""
        return " ".join(f"{name}={_text(row[name]) if name != SPACING_KEY else format_spacing(row[name])}"
                        for name in self.row_names if name in row)


def _value(spec: ConditionConfig, row: Mapping, where: str) -> float | str:
    """A row's value of condition ``spec``, parsed; errors name ``where`` and the key."""
    if spec.name not in row:
        raise ValueError(f"{where}: '{spec.name}' is missing")
    try:
        return condition_value(spec, row[spec.name])
    except ValueError as error:
        raise ValueError(f"{where}: '{spec.name}' {error}") from None


def _element(values, index: int):
    """Element ``index`` of a collated column as a plain Python value (a row of a 2D tensor as a list)."""
    value = values[index]
    if isinstance(value, torch.Tensor):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _fit_maisi(config: Config, items: Sequence[dict]) -> dict | None:
    """The ``maisi`` part of a :class:`ConditionEncoder` for ``config``'s UNet (None for MONAI's): with a modality
    field, every item's modality checked and the most frequent one the default.

    Raises:
        ValueError: an item without the field, or with a modality outside MAISI's vocabulary or the embedding.
    """
    unet = config.ldm.unet
    if unet.architecture != "maisi":
        return None
    maisi = {"spacing": unet.include_spacing_input, "modalities": None, "modality_key": None, "modality": None}
    if unet.num_class_embeds is None:
        return maisi
    vocabulary = {name: code for name, code in MAISI_MODALITIES.items() if code < unet.num_class_embeds}
    maisi |= {"modalities": vocabulary, "modality_key": unet.modality_key, "modality": unet.modality}
    key = unet.modality_key
    if key is not None:
        for item in items:
            place = f"training volume {item['image']}"
            if key not in item:
                raise ValueError(f"{place}: no '{key}' field (ldm.unet.modality_key: each volume's modality)")
            if str(item[key]) not in vocabulary:
                raise ValueError(f"{place}: '{key}' = {item[key]!r} is not a modality of MAISI's vocabulary "
                                 f"({', '.join(vocabulary)})")
        counts = Counter(str(item[key]) for item in items)
        maisi["modality"] = counts.most_common(1)[0][0] if counts else next(iter(vocabulary))
    return maisi


def _spacing(row: Mapping, where: str) -> list[float]:
    """A row's voxel spacing in mm: three numbers, or text like ``1.5x1.5x2``."""
    if SPACING_KEY not in row:
        raise ValueError(f"{where}: the voxel spacing is missing (MAISI's UNet takes one, e.g. --spacing 1.5 1.5 2)")
    value = row[SPACING_KEY]
    try:
        values = [float(v) for v in (value.split("x") if isinstance(value, str) else value)]
    except (TypeError, ValueError):
        values = []
    if len(values) != 3 or any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"{where}: voxel spacing {value!r} is not three positive numbers of mm")
    return values


def format_spacing(spacing) -> str:
    """A voxel spacing as text: ``1.5x1.5x2``."""
    values = spacing.tolist() if isinstance(spacing, torch.Tensor) else spacing
    if isinstance(values, str):
        return values
    return "x".join(f"{float(v):g}" for v in values)


def batch_spacing(batch: Mapping) -> torch.Tensor:
    """(B, 3) voxel spacing in mm of a batch: the cache entries' (``SPACING_KEY``), or the image batch's affines.

    Raises:
        ValueError: the batch carries neither.
    """
    if SPACING_KEY in batch:
        return torch.as_tensor(batch[SPACING_KEY], dtype=torch.float64)
    affine = getattr(batch.get("image"), "affine", None)
    if affine is None:
        raise ValueError("the batch carries no voxel spacing (MAISI's UNet needs each volume's)")
    affine = torch.as_tensor(affine).as_subclass(torch.Tensor)
    return voxel_spacing(affine if affine.ndim == 3 else affine[None])


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------------ command-line values


def parse_condition_args(texts: Sequence[str]) -> dict[str, str]:
    """``["age=70", "sex=F"]`` (``sample --condition``) as ``{"age": "70", "sex": "F"}``.

    Raises:
        ValueError: a text without ``=`` or with an empty key, or a key given twice.
    """
    values: dict[str, str] = {}
    for text in texts:
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--condition {text!r}: expected KEY=VALUE, e.g. --condition age=70")
        if key in values:
            raise ValueError(f"--condition {key}: given twice ({values[key]!r} and {value.strip()!r})")
        values[key] = value.strip()
    return values


def read_condition_table(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    """The rows of a CSV with one column per condition (``sample --conditions``), and where each came from
    (``table.csv line 2``...).

    Raises:
        FileNotFoundError: no such file.
        ValueError: no header or no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--conditions: {path} does not exist (expected a CSV, one row per sample)")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        rows = [{str(k).strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    if not rows:
        raise ValueError(f"--conditions: {path} has no rows (expected a header row, then one row per sample)")
    return rows, [f"{path} line {line}" for line in range(2, len(rows) + 2)]


# ------------------------------------------------------------------------------------------ label maps


def control_size(latent_spatial: Sequence[int], embedding_channels: Sequence[int]) -> tuple[int, ...]:
    """The spatial size the ControlNet takes its control input at: the latent's, doubled once per halving of its
    conditioning embedding (``len(embedding_channels) - 1``)."""
    return tuple(int(s) * 2 ** (len(embedding_channels) - 1) for s in latent_spatial)


def control_input(mask: torch.Tensor, num_labels: int, size: Sequence[int]) -> torch.Tensor:
    """A batch of label maps as the ControlNet sees them: for each label 1..num_labels-1, its share of every voxel at
    ``size`` (one-hot, then area-averaged from the image grid; background is what the shares leave).

    Args:
        mask: (B, 1, *spatial) labels on the image grid (whole numbers, of any dtype).
        num_labels: label values 0..num_labels-1 (``controlnet.num_labels``).
        size: the control resolution (:func:`control_size`).

    Raises:
        ValueError: a value that is not a whole number in 0..num_labels-1.
    """
    values = torch.as_tensor(mask).as_subclass(torch.Tensor)[:, 0]
    problem = label_problem(values, num_labels)
    if problem:
        raise ValueError(problem)
    labels = values.round().long()
    one_hot = F.one_hot(labels, num_labels).movedim(-1, 1)[:, 1:].float()
    if tuple(one_hot.shape[2:]) == tuple(size):
        return one_hot
    return F.interpolate(one_hot, size=tuple(size), mode="area")


# ------------------------------------------------------------------------------------------ the denoiser


def read_control(path: Path, data: DataConfig, num_labels: int, size: Sequence[int]) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """A label-map file as the ControlNet's input: through the data chain's deterministic spatial transforms (as
    its image would be), then :func:`control_input`.

    Returns:
        (control input (num_labels - 1, *size), the transformed map's affine (voxel -> world), float64).

    Raises:
        ValueError: naming the file, when its values are not labels 0..num_labels-1.
    """
    mask = build_mask_transforms(data, MASK_KEY)({MASK_KEY: str(path)})[MASK_KEY]
    try:
        control = control_input(mask[None], num_labels, size)[0]
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    affine = torch.as_tensor(mask.affine).as_subclass(torch.Tensor).to(torch.float64).clone()
    return control, affine


def unet_output(unet: torch.nn.Module, x: torch.Tensor, timesteps: torch.Tensor,
                condition: Conditioning | None = None, *, controlnet: torch.nn.Module | None = None,
                control: torch.Tensor | None = None, control_scale: float = 1.0) -> torch.Tensor:
    """The UNet's prediction for ``x`` at ``timesteps`` with the batch's conditions and, with a ControlNet, its
    residuals for the ``control`` input added to the UNet's skip connections and mid-block (MONAI's
    ``ControlNetDiffusionInferer``)."""
    inputs = condition.inputs() if condition is not None else {}
    if controlnet is not None:  # MAISI's ControlNet takes no spacing (its UNet does)
        down, mid = controlnet(x=x, timesteps=timesteps, controlnet_cond=control, conditioning_scale=control_scale,
                               **{k: v for k, v in inputs.items() if k != "spacing_tensor"})
        inputs = {**inputs, "down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    return unet(x, timesteps=timesteps, **inputs)


class Denoiser(torch.nn.Module):
    """The network the sampler calls (``denoiser(z, timesteps=t)``): the UNet with one condition per sample, guided,
    and steered by a ControlNet when there is one.

    Args:
        unet: the trained diffusion UNet.
        condition: the samples' conditions (None: an unconditional UNet, or a conditional one's null condition).
        guidance: classifier-free guidance scale w; the prediction is ``uncond + w (cond - uncond)``, 1 being the
            conditional prediction alone (one UNet pass per step instead of two).
        controlnet: a trained ControlNet, or None.
        control: its input, (B, C, *control size), with a ControlNet.
        control_scale: the weight of its residuals (``controlnet.conditioning_scale``).
    """

    def __init__(self, unet: torch.nn.Module, condition: Conditioning | None = None, guidance: float = 1.0,
                 controlnet: torch.nn.Module | None = None, *, control: torch.Tensor | None = None,
                 control_scale: float = 1.0) -> None:
        super().__init__()
        self.unet, self.controlnet = unet, controlnet
        self.condition, self.guidance = condition, guidance
        self.control, self.control_scale = control, control_scale

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.condition is None or self.guidance == 1:
            return unet_output(self.unet, x, timesteps, self.condition, controlnet=self.controlnet,
                               control=self.control,
                               control_scale=self.control_scale)
        control = torch.cat([self.control, self.control]) if self.control is not None else None
        both = unet_output(self.unet, torch.cat([x, x]), torch.cat([timesteps, timesteps]),
                           Conditioning.cat(self.condition.null(), self.condition), controlnet=self.controlnet,
                           control=control,
                           control_scale=self.control_scale)
        unconditional, conditional = both.float().chunk(2)
        return unconditional + self.guidance * (conditional - unconditional)
