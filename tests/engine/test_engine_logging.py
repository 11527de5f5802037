"""Slice panels, PNG writing, TensorBoard event files, MLflow runs in a file store, logger setup, peak memory."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from monai_diffusion.config import config_from_dict
from monai_diffusion.engine.logging import (RunLogger, flatten_config, get_logger, open_run_logger, peak_memory_mb,
                                            save_png, volume_panel)


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


# ------------------------------------------------------------------- MLflow


def mlflow_client(uri: str):
    """A client that reads a file store (MLflow 3 opens one only when MLFLOW_ALLOW_FILE_STORE is true)."""
    mlflow = pytest.importorskip("mlflow")
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        return mlflow.tracking.MlflowClient(tracking_uri=uri)
    finally:
        del os.environ["MLFLOW_ALLOW_FILE_STORE"]


def test_flatten_config_gives_dotted_keys_and_json_values():
    flat = flatten_config({"autoencoder": {"num_channels": [32, 64], "training": {"lr": 1e-4, "patch_size": None}},
                           "data": {"intensity_by_class": {}, "glob": "*.nii*", "conditions": [{"name": "age"}]},
                           "classes": {"CT (HU)": {"b_min": -1}}, "seed": 42, "fast_dev_run": False})
    assert flat == {
        "autoencoder.num_channels": "[32, 64]", "autoencoder.training.lr": "0.0001",
        "autoencoder.training.patch_size": "null", "data.intensity_by_class": "{}", "data.glob": "*.nii*",
        "data.conditions": '[{"name": "age"}]', "classes.CT _HU_.b_min": "-1", "seed": "42", "fast_dev_run": "false",
    }


def test_mlflow_run_gets_params_scalars_panels_tags_and_its_end(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    output = config_from_dict({"output": {"loggers": ["mlflow"]}}).output
    run_dir = tmp_path / "autoencoder-1"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("seed: 42\n")
    long = "x" * (MAX_PARAM_VAL_LENGTH + 10)
    with open_run_logger(output, run_dir, command="autoencoder", config={"seed": 42, "data": {"glob": long}},
                         enabled=True, resumed=False) as run_logger:
        assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # allowed for the client only
        run_logger.scalars({"train/loss": 0.5, "train/lr": torch.tensor(1e-4), "skip": None}, step=1)
        run_logger.image("val/reconstruction", volume_panel([("x", _ramp())]), step=1)
        run_logger.tags({"checkpoint": str(run_dir / "checkpoints" / "last.pt")})
    assert not (run_dir / "tensorboard").exists()  # loggers: [mlflow] only

    client = mlflow_client((run_dir / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("train-autoencoder")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "autoencoder-1"
    assert run.data.tags["monai_diffusion.run_dir"] == str(run_dir.resolve())
    assert run.data.tags["checkpoint"] == str(run_dir / "checkpoints" / "last.pt")
    assert run.data.params["seed"] == "42"
    glob = run.data.params["data.glob"]  # cut to MLflow's limit; config.yaml (an artifact) holds it whole
    assert len(glob) == MAX_PARAM_VAL_LENGTH and glob.endswith("...[cut]") and glob.startswith("xxx")
    assert run.data.metrics == {"train/loss": 0.5, "train/lr": pytest.approx(1e-4)}
    assert "skip" not in run.data.metrics
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml", "val"]
    [panel] = client.list_artifacts(run.info.run_id, "val")
    assert panel.path == "val/reconstruction-step00000001.png"
    with Image.open(client.download_artifacts(run.info.run_id, panel.path, str(tmp_path))) as png:
        assert png.format == "PNG"


def test_a_resumed_run_continues_its_mlflow_run(tmp_path, caplog):
    pytest.importorskip("mlflow")
    output = config_from_dict({"output": {"loggers": ["mlflow"], "mlflow_experiment_name": "brains"}}).output
    run_dir = tmp_path / "ldm-1"
    run_dir.mkdir()
    with open_run_logger(output, run_dir, command="ldm", config={"seed": 1}, enabled=True, resumed=False) as first:
        first.scalars({"train/loss": 1.0}, step=1)
        first.close(status="KILLED")
    with open_run_logger(output, run_dir, command="ldm", config={"seed": 2, "max_steps": 4}, enabled=True,
                         resumed=True) as second:
        second.scalars({"train/loss": 0.5}, step=2)
    assert "seed changed since" in caplog.text
    client = mlflow_client((run_dir / "mlruns").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("brains").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params == {"seed": "1", "max_steps": "4"}  # MLflow keeps a parameter's first value
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [(1, 1.0),
                                                                                                      (2, 0.5)]


def test_a_disabled_run_logger_starts_no_mlflow_run(tmp_path):
    output = config_from_dict({"output": {"loggers": ["tensorboard", "mlflow"]}}).output
    open_run_logger(output, tmp_path, command="ldm", config={}, enabled=False, resumed=False).close()
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_tracking_store_names_the_key(tmp_path):
    pytest.importorskip("mlflow")
    output = config_from_dict({"output": {"loggers": ["mlflow"],
                                          "mlflow_tracking_uri": "nosuchscheme://x"}}).output
    with pytest.raises(RuntimeError, match="output.mlflow_tracking_uri"):
        open_run_logger(output, tmp_path, command="ldm", config={}, enabled=True, resumed=False)
