"""resolve_precision: the setting x device table, logging, and autocast dtypes."""

from __future__ import annotations

import logging

import pytest
import torch

from monai_diffusion.engine import precision as precision_mod
from monai_diffusion.engine.precision import Precision, precision_name, resolve_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("setting", "expected"),
    [(False, "fp32"), ("no", "fp32"), ("fp32", "fp32"), (True, "bf16"), ("bf16", "bf16")],
)
def test_cpu_table(setting, expected):
    p = resolve_precision(setting, CPU)
    assert p == Precision(expected, "cpu")


def test_true_on_cpu_is_bf16_and_logged_with_reason(caplog):
    with caplog.at_level(logging.INFO, logger="monai_diffusion"):
        p = resolve_precision(True, CPU)
    assert p.name == "bf16"
    text = caplog.text
    assert "bf16" in text and "CPU" in text and "mixed_precision=true" in text


def test_fp16_on_cpu_follows_torch_support(caplog, monkeypatch):
    # This torch: fp16 autocast on CPU either works (kept) or not (bf16 + warning).
    supported = precision_mod._cpu_fp16_supported()
    assert resolve_precision("fp16", CPU).name == ("fp16" if supported else "bf16")

    monkeypatch.setattr(precision_mod, "_cpu_fp16_supported", lambda: False)
    with caplog.at_level(logging.INFO, logger="monai_diffusion"):
        p = resolve_precision("fp16", CPU)
    assert p.name == "bf16"
    assert any(r.levelno == logging.WARNING and "fp16" in r.getMessage() for r in caplog.records)


def test_cuda_table_without_a_gpu(monkeypatch):
    # Resolution itself needs no GPU, except the bf16 capability query, which is stubbed.
    cuda = torch.device("cuda", 0)
    assert resolve_precision(True, cuda) == Precision("fp16", "cuda")
    assert resolve_precision("fp16", cuda).name == "fp16"
    assert resolve_precision(False, cuda).name == "fp32"
    monkeypatch.setattr(precision_mod, "_cuda_bf16_supported", lambda device: True)
    assert resolve_precision("bf16", cuda).name == "bf16"
    monkeypatch.setattr(precision_mod, "_cuda_bf16_supported", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(ValueError, match="bf16.*V100.*fp16"):
        resolve_precision("bf16", cuda)


def test_unknown_setting():
    with pytest.raises(ValueError, match="mixed_precision"):
        resolve_precision("fp8", CPU)


def test_autocast_dtypes_on_cpu():
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with Precision("bf16", "cpu").autocast():
        assert layer(x).dtype == torch.bfloat16
    with Precision("fp32", "cpu").autocast():
        assert layer(x).dtype == torch.float32


def test_scaler_enabled_only_for_fp16():
    assert not Precision("bf16", "cpu").make_scaler().is_enabled()
    assert not Precision("fp32", "cpu").make_scaler().is_enabled()
    assert Precision("fp16", "cpu").make_scaler().is_enabled()


@pytest.mark.parametrize("setting, device_type, name", [(False, "cuda", "fp32"), ("no", "cpu", "fp32"),
                                                         ("fp32", "cuda", "fp32"), (True, "cuda", "fp16"),
                                                         (True, "cpu", "bf16"), ("fp16", "cpu", "fp16"),
                                                         ("BF16", "cuda", "bf16")])
def test_precision_name_reads_the_setting_without_asking_the_hardware(setting, device_type, name):
    assert precision_name(setting, device_type) == name


def test_resolve_precision_starts_from_precision_name(monkeypatch):
    monkeypatch.setattr(precision_mod, "precision_name", lambda setting, device_type: "bf16")
    assert resolve_precision(False, torch.device("cpu")).name == "bf16"


def test_the_engine_and_the_schema_accept_the_same_settings():
    """Every value the config schema lets through resolves, and a value the engine refuses is refused by the schema
    too (with the key's path), before a run starts."""
    from typing import get_args

    from monai_diffusion.config import ConfigError, config_from_dict
    from monai_diffusion.config.schema import MixedPrecision

    names = get_args(get_args(MixedPrecision)[1])
    for setting in (True, False, *names):
        assert precision_name(setting, "cpu") in ("fp16", "bf16", "fp32")
        assert config_from_dict({"device": {"mixed_precision": setting}}).device.mixed_precision == setting
    with pytest.raises(ValueError, match="'fp32' or 'no'"):
        precision_name("fp8", "cpu")
    with pytest.raises(ConfigError, match="device.mixed_precision"):
        config_from_dict({"device": {"mixed_precision": "fp8"}})
