"""Console logging, a run's scalars and images (TensorBoard, MLflow), slice panels of 3D volumes, NIfTI outputs and
peak memory.

Everything here is rank-aware only through its arguments: the training loop builds a :class:`RunLogger` with
``enabled=dist_info.is_main`` (:func:`open_run_logger`) and the recipes call :func:`save_png` on rank 0.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from monai_diffusion.config.schema import OutputConfig

__all__ = [
    "LOGGER_NAME",
    "exit_status",
    "get_logger",
    "set_log_rank",
    "RunLogger",
    "MLflowRun",
    "open_run_logger",
    "flatten_config",
    "volume_panel",
    "save_png",
    "save_nifti",
    "save_sample",
    "peak_memory_mb",
]

LOGGER_NAME = "monai_diffusion"
_FORMAT = "%(asctime)s %(levelname).1s %(message)s"
_DATEFMT = "%H:%M:%S"
_HANDLER_FLAG = "_monai_diffusion_handler"


# ------------------------------------------------------------------ console


def get_logger() -> logging.Logger:
    """Return the package logger ``"monai_diffusion"``, configured once.

    The first call adds one stderr handler with a concise ``HH:MM:SS L message`` format and sets
    the level to INFO; later calls return the same logger untouched. Records still propagate to
    the root logger, so an application (or pytest's ``caplog``) that configures logging sees them.

    Returns:
        The configured logger.
    """
    logger = logging.getLogger(LOGGER_NAME)
    if not any(getattr(h, _HANDLER_FLAG, False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT, _DATEFMT))
        setattr(handler, _HANDLER_FLAG, True)
        logger.addHandler(handler)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    return logger


def exit_status(work: Callable[[], object]) -> int:
    """A command's exit status for ``work()``: 0 when it returns; 1 when it raises ValueError, FileNotFoundError
    or RuntimeError (a bad input or a failed step: the message, which names it, goes to the console)."""
    try:
        work()
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        get_logger().error("%s", exc)
        return 1
    return 0


def set_log_rank(rank: int, world_size: int) -> None:
    """Make console output readable under DDP: INFO from rank 0 only, warnings from every rank.

    With ``world_size > 1`` each line gets a ``[rank N]`` prefix and ranks other than 0 are
    raised to WARNING, so N processes do not print N copies of every progress line.
    :func:`monai_diffusion.engine.distributed.init_distributed` calls this itself.

    Args:
        rank: global rank of this process.
        world_size: number of processes.
    """
    logger = get_logger()
    fmt = _FORMAT if world_size <= 1 else _FORMAT.replace("%(message)s", f"[rank {rank}] %(message)s")
    for handler in logger.handlers:
        if getattr(handler, _HANDLER_FLAG, False):
            handler.setFormatter(logging.Formatter(fmt, _DATEFMT))
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)


# ------------------------------------------------------- TensorBoard, MLflow


class RunLogger:
    """What a training run logs: TensorBoard event files and/or an MLflow run; a silent no-op when disabled (every
    rank but 0). The training loop builds it with :func:`open_run_logger` from ``output.loggers``.

    Args:
        log_dir: folder for the event files (created if missing).
        enabled: write anything at all; pass ``dist_info.is_main``.
        tensorboard: write TensorBoard event files in ``log_dir``.
        mlflow: an MLflow run that receives the same scalars and images (its panels as PNG artifacts) and the
            tags; :meth:`close` ends it.
    """

    def __init__(self, log_dir: Path, enabled: bool = True, *, tensorboard: bool = True,
                 mlflow: MLflowRun | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.enabled = enabled
        self._writer = None
        self._mlflow = mlflow if enabled else None
        if enabled and tensorboard:
            # Imported here: tensorboard is slow to import and unused on ranks > 0.
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def scalars(self, values: Mapping[str, float | torch.Tensor | None], step: int) -> None:
        """Write each ``tag: value`` at ``step``; None values are left out.

        Args:
            values: tag -> number (a one-element tensor is fine), e.g. ``{"train/loss": 0.12}``.
            step: global optimizer step (the x axis).
        """
        numbers = {tag: float(value) for tag, value in values.items() if value is not None}
        if self._writer is not None:
            for tag, value in numbers.items():
                self._writer.add_scalar(tag, value, step)
        if self._mlflow is not None and numbers:
            self._mlflow.scalars(numbers, step)

    def image(self, tag: str, image_hwc_uint8: np.ndarray, step: int) -> None:
        """Write an ``H x W x 3`` (or ``H x W``) uint8 image, e.g. from :func:`volume_panel`.

        Args:
            tag: TensorBoard tag, e.g. ``"val/reconstruction"`` (MLflow: the artifact
                ``val/reconstruction-step<N>.png``).
            image_hwc_uint8: the image.
            step: global optimizer step.
        """
        if self._writer is None and self._mlflow is None:
            return
        image = _check_image(image_hwc_uint8)
        if self._writer is not None:
            self._writer.add_image(tag, image, step, dataformats="HWC" if image.ndim == 3 else "HW")
        if self._mlflow is not None:
            self._mlflow.image(tag, image, step)

    def tags(self, values: Mapping[str, str]) -> None:
        """Tag the MLflow run, e.g. ``{"checkpoint": ".../last.pt"}`` (TensorBoard has no tags: nothing there)."""
        if self._mlflow is not None:
            self._mlflow.tags(values)

    def flush(self) -> None:
        """Push pending events to disk (TensorBoard otherwise flushes every 2 minutes)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self, status: str = "FINISHED") -> None:
        """Flush and close the writer and end the MLflow run with ``status`` (``FINISHED``, ``FAILED``,
        ``KILLED``); safe to call twice (the first status stays)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._mlflow is not None:
            self._mlflow.end(status)
            self._mlflow = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_run_logger(output: OutputConfig, run_dir: Path, *, command: str, config: Mapping[str, Any],
                    enabled: bool, resumed: bool) -> RunLogger:
    """The :class:`RunLogger` of a training run in ``run_dir``: TensorBoard in ``<run_dir>/tensorboard`` and/or an
    MLflow run, as ``output.loggers`` says.

    Args:
        output: the config's ``output`` section (loggers, MLflow tracking URI and experiment).
        run_dir: the run folder; the default MLflow store is ``<run_dir>/mlruns``.
        command: ``autoencoder``, ``ldm`` or ``controlnet``; the default experiment is ``train-<command>``.
        config: the resolved config (``model_dump(mode="json")``), logged as parameters.
        enabled: write anything at all; pass ``dist_info.is_main``.
        resumed: the run continues a checkpoint in ``run_dir``: its MLflow run continues too, when found.

    Raises:
        RuntimeError: MLflow could not start or find the run (the message names the tracking URI).
    """
    mlflow = None
    if enabled and "mlflow" in output.loggers:
        uri = output.mlflow_tracking_uri or (Path(run_dir) / "mlruns").resolve().as_uri()
        mlflow = MLflowRun(uri, output.mlflow_experiment_name or f"train-{command}", run_dir=run_dir,
                           params=flatten_config(config), resume=resumed)
    return RunLogger(Path(run_dir) / "tensorboard", enabled=enabled, tensorboard="tensorboard" in output.loggers,
                     mlflow=mlflow)


# MLflow's own limit on a parameter's value in characters, where mlflow does not say (older releases: 500).
MLFLOW_PARAM_LENGTH = 500
# Parameters per MLflow log_batch call (MLflow's limit: 100).
MLFLOW_PARAMS_PER_BATCH = 100
# The tag that ties an MLflow run to its run folder, so a resumed run continues it.
MLFLOW_RUN_DIR_TAG = "monai_diffusion.run_dir"
# What ends a parameter value cut to MLflow's limit (the whole config is the run's config.yaml artifact).
CUT_MARK = "...[cut]"


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys and text values, the way MLflow takes parameters.

    ``{"autoencoder": {"num_channels": [32, 64], "training": {"lr": 1e-4}}}`` gives
    ``{"autoencoder.num_channels": "[32, 64]", "autoencoder.training.lr": "0.0001"}``: sections become key
    prefixes, lists and other values stay whole as JSON (strings as they are). Characters MLflow refuses in a
    key (a user's class name in ``data.intensity_by_class``, say) become ``_``.
    """
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = re.sub(r"[^\w./\- ]", "_", f"{prefix}{key}")
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value)
    return flat


@contextlib.contextmanager
def _file_store_allowed(uri: str) -> Iterator[None]:
    """Let MLflow open a file store (``file:`` URI or a plain path) while the client is built.

    MLflow 3 keeps the file store in maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE`` is true; a
    run folder's own store is one by design (no server, no database package). A value the user set is left alone.
    MLflow caches the store per URI, so the client keeps it after this.
    """
    scheme = uri.split(":", 1)[0] if re.match(r"^[a-zA-Z][\w+.-]+:", uri) else ""
    if scheme not in ("", "file") or "MLFLOW_ALLOW_FILE_STORE" in os.environ:
        yield
        return
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)


class MLflowRun:
    """One MLflow run beside a training run: the resolved config as parameters (and ``config.yaml`` as an
    artifact), the scalars TensorBoard gets as metrics, panels as PNG artifacts, tags (the final checkpoint).

    Args:
        tracking_uri: where MLflow keeps runs (a ``file:`` store, ``sqlite:///...``, ``http://host:port``).
        experiment: the experiment's name; created when missing.
        run_dir: the training run's folder: names the MLflow run and is tagged on it (``monai_diffusion.run_dir``).
        params: parameters (:func:`flatten_config`); a value longer than MLflow's limit is cut, ending in
            ``...[cut]``.
        resume: continue the MLflow run tagged with ``run_dir`` when there is one (its parameters keep their first
            values: MLflow does not change a logged parameter); else start a new one.

    Raises:
        RuntimeError: MLflow could not open the store or start the run.
    """

    def __init__(self, tracking_uri: str, experiment: str, *, run_dir: Path, params: Mapping[str, str],
                 resume: bool) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        run_dir = Path(run_dir).resolve()
        try:
            with _file_store_allowed(tracking_uri):
                self._client = MlflowClient(tracking_uri=tracking_uri)
            found = self._client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found is not None else self._client.create_experiment(experiment)
            run = self._find_run(experiment_id, run_dir) if resume else None
            continued = run is not None
            if run is None:
                run = self._client.create_run(experiment_id, run_name=run_dir.name,
                                              tags={MLFLOW_RUN_DIR_TAG: str(run_dir)})
                logged: Mapping[str, str] = {}
            else:
                self._client.update_run(run.info.run_id, status="RUNNING")
                logged = run.data.params
            self.run_id = run.info.run_id
            self._log_params(params, logged)
            if (run_dir / "config.yaml").is_file():
                self._client.log_artifact(self.run_id, str(run_dir / "config.yaml"))
        except MlflowException as exc:
            raise RuntimeError(f"output.loggers 'mlflow': could not start a run in experiment {experiment!r} at "
                               f"{tracking_uri} (output.mlflow_tracking_uri): {exc}") from exc
        get_logger().info("MLflow run %s%s in experiment %r at %s", self.run_id, " (continued)" if continued else "",
                          experiment, tracking_uri)

    def _find_run(self, experiment_id: str, run_dir: Path):
        """The run tagged with ``run_dir`` (the newest), or None."""
        if "'" in str(run_dir):  # not expressible in MLflow's filter syntax: a new run
            return None
        runs = self._client.search_runs([experiment_id], f"tags.`{MLFLOW_RUN_DIR_TAG}` = '{run_dir}'",
                                        max_results=1, order_by=["attributes.start_time DESC"])
        return runs[0] if runs else None

    def _log_params(self, params: Mapping[str, str], logged: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        try:
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as limit
        except ImportError:
            limit = MLFLOW_PARAM_LENGTH
        values = {key: value if len(value) <= limit else value[: limit - len(CUT_MARK)] + CUT_MARK
                  for key, value in params.items()}
        changed = sorted(key for key, value in values.items() if key in logged and logged[key] != value)
        if changed:
            get_logger().warning("MLflow keeps a run's parameters as first logged: %s changed since and keep their "
                                 "values there (config.yaml has the new ones)", ", ".join(changed))
        new = [Param(key, value) for key, value in values.items() if key not in logged]
        for start in range(0, len(new), MLFLOW_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=new[start : start + MLFLOW_PARAMS_PER_BATCH])

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Log ``tag: value`` metrics at ``step``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(tag, value, now, step) for tag, value in values.items()])

    def image(self, tag: str, image: np.ndarray, step: int) -> None:
        """Log an image as the PNG artifact ``<tag>-step<N>.png`` (``val/reconstruction`` -> folder ``val``)."""
        folder, _, name = tag.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}-step{step:08d}.png"
            save_png(image, path)
            self._client.log_artifact(self.run_id, str(path), artifact_path=folder or None)

    def tags(self, values: Mapping[str, str]) -> None:
        """Set tags on the run."""
        for key, value in values.items():
            self._client.set_tag(self.run_id, key, value)

    def end(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (``FINISHED``, ``FAILED`` or ``KILLED``)."""
        self._client.set_terminated(self.run_id, status)


# ------------------------------------------------------------------- panels


def _as_volume(volume: torch.Tensor | np.ndarray, title: str) -> np.ndarray:
    """First item/channel of a (B, C, X, Y, Z) / (C, X, Y, Z) / (X, Y, Z) tensor as float32 numpy."""
    array = volume.detach().float().cpu().numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
    if array.ndim < 3:
        raise ValueError(f"volume_panel row {title!r}: expected a 3D volume, got shape {tuple(array.shape)}")
    while array.ndim > 3:
        array = array[0]
    return np.nan_to_num(array.astype(np.float32, copy=False))


def _middle_slices(volume: np.ndarray) -> list[np.ndarray]:
    """Middle axial, coronal and sagittal slices, rotated so RAS anatomy is upright.

    MONAI's ``LoadImage`` + ``Orientation("RAS")`` gives array axes (x, y, z) pointing to
    Right, Anterior, Superior. ``np.rot90`` of a 2D slice puts its second axis on the rows,
    reversed, so anterior (axial) and superior (coronal, sagittal) end up at the top. Axial
    and coronal views show the patient's right on the image right (neurological convention).
    """
    x, y, z = (s // 2 for s in volume.shape)
    return [np.rot90(volume[:, :, z]), np.rot90(volume[:, y, :]), np.rot90(volume[x, :, :])]


def _window(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] to [0, 255] uint8, clipping outside values."""
    if not high > low:  # a constant slice: avoid dividing by zero
        high = low + 1.0
    scaled = (image - low) / (high - low)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def volume_panel(
    rows: Sequence[tuple[str, torch.Tensor | np.ndarray]],
    value_range: tuple[float, float] | None = None,
    gap: int = 2,
    scale: int | None = None,
) -> np.ndarray:
    """Middle axial, coronal and sagittal slices of each volume side by side, one row per volume.

    Typical use: ``volume_panel([("input", x), ("reconstruction", x_hat)])`` for TensorBoard/PNG.
    Panels are padded (centred, black) to a common height and rows to a common width, so
    volumes of different shapes can share a panel. The row title is drawn at the left with
    Pillow's default font.

    Args:
        rows: ``(title, volume)`` pairs; a volume is ``(X, Y, Z)``, ``(C, X, Y, Z)`` or
            ``(B, C, X, Y, Z)`` (the first item and channel are shown), in RAS array order.
        value_range: ``(low, high)`` intensity window for every panel. Default: each view's
            min/max in the first row, applied to that view in all rows, so a reconstruction is
            shown on its input's scale and intensity errors stay visible.
        gap: black pixels between panels and between rows.
        scale: integer nearest-neighbour upscaling of the slices; None picks the smallest that makes
            every slice at least 128 pixels on its short side (a 48^3 volume is otherwise tiny).

    Returns:
        ``H x W x 3`` uint8 image.

    Raises:
        ValueError: no rows, a volume with fewer than 3 dimensions, or ``scale < 1``.
    """
    from PIL import Image, ImageDraw, ImageFont

    if not rows:
        raise ValueError("volume_panel: no rows to draw")
    if scale is not None and scale < 1:
        raise ValueError(f"volume_panel: scale must be >= 1, got {scale}")
    slices = [_middle_slices(_as_volume(volume, title)) for title, volume in rows]
    if scale is None:
        scale = max(1, -(-128 // min(min(s.shape) for s in slices[0])))
    if value_range is not None:
        windows = [tuple(map(float, value_range))] * 3
    else:
        windows = [(float(s.min()), float(s.max())) for s in slices[0]]
    views = [
        [np.kron(_window(s, *w), np.ones((scale, scale), np.uint8)) for s, w in zip(row, windows)]
        for row in slices
    ]

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    boxes = [measure.textbbox((0, 0), title, font=font) for title, _ in rows]
    text_w = max(b[2] - b[0] for b in boxes)
    text_h = max(b[3] - b[1] for b in boxes)
    margin = text_w + 2 * max(gap, 4)  # title column at the left
    height = max(text_h, max(v.shape[0] for row in views for v in row))
    row_widths = [sum(v.shape[1] for v in row) + gap * (len(row) - 1) for row in views]
    width = margin + max(row_widths)

    canvas = np.zeros((len(views) * height + (len(views) - 1) * gap, width), np.uint8)
    for r, row in enumerate(views):
        top = r * (height + gap)
        left = margin
        for view in row:
            offset = top + (height - view.shape[0]) // 2
            canvas[offset : offset + view.shape[0], left : left + view.shape[1]] = view
            left += view.shape[1] + gap

    image = Image.fromarray(canvas).convert("RGB")
    draw = ImageDraw.Draw(image)
    for r, ((title, _), box) in enumerate(zip(rows, boxes)):
        top = r * (height + gap) + (height - (box[3] - box[1])) // 2 - box[1]
        draw.text((max(gap, 4) - box[0], top), title, fill=(255, 255, 255), font=font)
    return np.asarray(image, dtype=np.uint8).copy()


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ValueError(f"expected an H x W x 3 uint8 image, got {image.dtype} array of shape {image.shape}")
    return image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image


def save_png(image_hwc_uint8: np.ndarray, path: Path) -> None:
    """Write an image as PNG atomically (temp file in the same folder, then ``os.replace``).

    A reader (or a crash) never sees a half-written PNG.

    Args:
        image_hwc_uint8: ``H x W x 3`` (or ``H x W``, ``H x W x 4``) uint8 image.
        path: destination; parent folders are created.

    Raises:
        ValueError: the array is not a uint8 image.
    """
    from PIL import Image

    image = _check_image(image_hwc_uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            Image.fromarray(image).save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------- NIfTI


# NIfTI-1's header description holds at most this many bytes.
NIFTI_DESCRIPTION_BYTES = 80


def save_nifti(volume: torch.Tensor, affine: torch.Tensor | np.ndarray, path: Path, description: str | None = None) -> None:
    """Write a (C, *spatial) volume as NIfTI with ``affine`` (voxel -> RAS mm), atomically.

    One channel is written as a plain 3D image, several as 4D (x, y, z, c). ``description`` goes into the header's
    ``descrip`` field (ASCII, cut to its 80 bytes).
    """
    import nibabel as nib

    array = volume.detach().float().cpu().numpy()
    array = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    affine = np.asarray(torch.as_tensor(affine, dtype=torch.float64).cpu().numpy(), dtype=np.float64)
    image = nib.Nifti1Image(np.ascontiguousarray(array, dtype=np.float32), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    if description:
        image.header["descrip"] = description.encode("ascii", "replace")[:NIFTI_DESCRIPTION_BYTES]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{uuid.uuid4().hex}.tmp.nii.gz")  # nibabel picks the format from the suffix
    try:
        nib.save(image, str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_sample(volume: torch.Tensor, affine, folder: Path, stem: str, *, value_range=None, title: str = "sample",
                description: str | None = None):
    """Write a (C, *spatial) volume as ``<folder>/<stem>.nii.gz`` (``description`` in its header) and, for 3D,
    ``<folder>/<stem>.png`` (middle slices). Returns (NIfTI path, panel or None)."""
    folder = Path(folder)
    nifti = folder / f"{stem}.nii.gz"
    save_nifti(volume, affine, nifti, description)
    panel = None
    if volume.ndim == 4:
        panel = volume_panel([(title, volume)], value_range=value_range)
        save_png(panel, folder / f"{stem}.png")
    return nifti, panel


# ------------------------------------------------------------------- memory


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far, in MiB.

    Args:
        device: on CUDA, ``torch.cuda.max_memory_allocated`` (tensors only, not the caching
            allocator's reserve; reset with ``torch.cuda.reset_peak_memory_stats``). Otherwise the
            process's peak resident set size (everything, including Python and libraries).

    Returns:
        Megabytes (2**20 bytes).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows: no getrusage
        import psutil

        info = psutil.Process().memory_info()
        return getattr(info, "peak_wset", info.rss) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in bytes on macOS, in KiB on Linux/BSD.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
