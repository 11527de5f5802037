"""Slice panels, PNG writing, TensorBoard event files, logger setup, peak memory."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from monai_diffusion.engine.logging import RunLogger, get_logger, peak_memory_mb, save_png, volume_panel


def _ramp(shape=(16, 20, 24)) -> torch.Tensor:
    """Brightest towards Right, Anterior, Superior (array axes x, y, z of RAS data)."""
    x, y, z = torch.meshgrid(*(torch.arange(float(s)) for s in shape), indexing="ij")
    return x / shape[0] + y / shape[1] + z / shape[2]


def test_volume_panel_shape_and_dtype():
    volume = _ramp()
    image = volume_panel([("input", volume), ("reconstruction", volume[None, None] * 0.5)], gap=2, scale=1)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    # two rows of height max(Y, Z) = 24 plus a gap; width: title + X + Y(... ) panels
    assert image.shape[0] == 2 * 24 + 2
    panels_width = 16 + 16 + 20 + 2 * 2  # axial (X wide), coronal (X), sagittal (Y)
    assert image.shape[1] > panels_width  # plus the title column
    title_width = image.shape[1] - panels_width
    assert image[:, :title_width].max() > 0  # the titles were drawn


def test_volume_panel_orientation_and_windowing():
    volume = _ramp()
    image = volume_panel([("a", volume), ("b", volume * 0.0)], scale=1, gap=2)[..., 0]
    title_width = image.shape[1] - (16 + 16 + 20 + 4)
    axial = image[:24, title_width : title_width + 16]  # rows: Y=20 padded to 24 (2 above, 2 below)
    axial = axial[2:22]
    # anterior at the top, patient's right on the right: brightest corner is top-right
    assert axial[0, -1] > axial[-1, 0] and axial[0, -1] > axial[0, 0] and axial[0, -1] > axial[-1, -1]
    # the second row (all zeros) is windowed on the first row, so it is black, not mid-grey
    assert image[26:, title_width:].max() == 0


def test_volume_panel_value_range_and_errors():
    image = volume_panel([("x", torch.full((4, 4, 4), 5.0))], value_range=(0.0, 10.0))
    assert 120 <= image[2, -2, 0] <= 135  # 5 in [0, 10] -> mid-grey
    with pytest.raises(ValueError, match="3D"):
        volume_panel([("flat", torch.zeros(4, 4))])
    with pytest.raises(ValueError, match="no rows"):
        volume_panel([])


def test_save_png_is_readable(tmp_path):
    image = volume_panel([("input", _ramp())])
    path = tmp_path / "sub" / "panel.png"
    save_png(image, path)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (image.shape[1], image.shape[0])
        np.testing.assert_array_equal(np.asarray(png.convert("RGB")), image)
    assert [p.name for p in path.parent.iterdir()] == ["panel.png"]  # no temp file left
    with pytest.raises(ValueError, match="uint8"):
        save_png(image.astype(np.float32), path)


def test_run_logger_writes_event_file(tmp_path):
    with RunLogger(tmp_path / "tb") as run_logger:
        run_logger.scalars({"train/loss": 0.5, "train/lr": torch.tensor(1e-4), "skip": None}, step=1)
        run_logger.image("val/panel", volume_panel([("x", _ramp())]), step=1)
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(tmp_path / "tb"))
    accumulator.Reload()
    assert accumulator.Scalars("train/loss")[0].value == pytest.approx(0.5)
    assert "val/panel" in accumulator.Tags()["images"]


def test_disabled_run_logger_writes_nothing(tmp_path):
    run_logger = RunLogger(tmp_path / "tb", enabled=False)
    run_logger.scalars({"a": 1.0}, step=0)
    run_logger.image("b", np.zeros((2, 2, 3), np.uint8), step=0)
    run_logger.close()
    assert not (tmp_path / "tb").exists()


def test_get_logger_configured_once():
    logger = get_logger()
    assert logger is get_logger() and logger.name == "monai_diffusion"
    assert len(logger.handlers) == len(get_logger().handlers)
    assert logger.isEnabledFor(logging.INFO)


def test_peak_memory_cpu():
    assert peak_memory_mb(torch.device("cpu")) > 10  # a Python process with torch loaded


def test_volume_panel_enlarges_small_volumes_by_default():
    image = volume_panel([("x", torch.rand(16, 20, 24))])
    # the shortest slice side (16) is enlarged to at least 128 pixels: scale 8
    assert image.shape[0] == 24 * 8
