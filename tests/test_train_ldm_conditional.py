"""train-ldm with data.conditions: statistics of the training split in the checkpoint, the latent cache shared with
unconditional runs, MONAI's conditioning inputs in the UNet, exact resume with condition dropout, clear errors."""

from __future__ import annotations

import json

import pytest
from signal_hook import TEST_SIGNAL_ENV
from helpers import conditional_raw, differences, save_autoencoder, write_conditional_data

from monai_diffusion import latents
from monai_diffusion import train_ldm as recipe
from monai_diffusion.config import apply_overrides, config_from_dict
from monai_diffusion.engine.checkpoint import load_checkpoint
from monai_diffusion.engine.loop import TrainingStopped


@pytest.fixture
def setup(tmp_path):
    """Six blob volumes (and two validation ones) with covariates, and an autoencoder run; returns raw -> Config."""
    datalist = write_conditional_data(tmp_path / "data", count=6, validation=2)
    base = config_from_dict(conditional_raw(datalist, tmp_path / "out"))
    save_autoencoder(base, tmp_path / "out" / "autoencoder-1" / "checkpoints" / "best.pt")

    def make(*overrides: str, categorical_via: str = "cross_attention"):
        return config_from_dict(apply_overrides(conditional_raw(datalist, tmp_path / "out", categorical_via),
                                                list(overrides)))

    return make


def training_radii(tmp_path) -> list[float]:
    return [entry["radius"] for entry in json.loads((tmp_path / "data" / "list.json").read_text())["training"]]


@pytest.mark.parametrize("categorical_via, unet_key", [("cross_attention", "attn2.to_k.weight"),
                                                      ("class_embedding", "class_embedding.weight")])
def test_conditions_reach_the_unet_and_their_statistics_the_checkpoint(setup, tmp_path, categorical_via, unet_key):
    run = recipe.train(setup(categorical_via=categorical_via))
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    radius, shape = state["conditioning"]["conditions"]
    radii = training_radii(tmp_path)  # the validation entries' radii do not count
    assert radius["mean"] == pytest.approx(sum(radii) / len(radii))
    assert shape == {"name": "shape", "type": "categorical", "categories": ["a", "b"]}
    assert state["conditioning"]["categorical_via"] == categorical_via
    assert any(key.endswith(unet_key) for key in state["unet"])
    if categorical_via == "class_embedding":
        assert state["unet"]["class_embedding.weight"].shape[0] == 1 + 2  # the null class and 'a', 'b'
    assert (run / "samples" / "sample-step00000001.nii.gz").is_file()  # sampled with the first volume's conditions


def test_conditional_and_unconditional_runs_share_one_latent_cache(setup, tmp_path, monkeypatch):
    calls = []
    original = latents.encode_volume
    monkeypatch.setattr(latents, "encode_volume", lambda *a, **k: calls.append(1) or original(*a, **k))
    unconditional = setup("data.conditions=[]", "data.cache=memory", "ldm.training.cache_latents=true")
    assert "conditioning" not in load_checkpoint(recipe.train(unconditional) / "checkpoints" / "last.pt")
    recipe.train(setup("data.cache=memory", "ldm.training.cache_latents=true"))
    assert len(calls) == 6 and len(list((tmp_path / "out" / "latent_cache").iterdir())) == 1


def test_on_the_fly_encoding_reads_the_conditions_from_the_batches(setup):
    run = recipe.train(setup("ldm.training.cache_latents=false"))
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 1


@pytest.mark.parametrize("cache", [True, False])
def test_a_stop_signal_then_resume_is_bit_exact_with_condition_dropout(setup, tmp_path, monkeypatch, cache):
    # 6 volumes, batch 2, accumulation 2: 3 micro-batches, 2 optimizer steps per epoch; 3 steps, stopped during the
    # first one (its state saved after it) and resumed mid-epoch.
    options = ["ldm.training.max_steps=3", "ldm.training.gradient_accumulation_steps=2",
               f"ldm.training.cache_latents={str(cache).lower()}"]
    straight = recipe.train(setup(*options, categorical_via="class_embedding"))
    reference = {p.name: load_checkpoint(p) for p in (straight / "checkpoints").glob("*.pt")}
    straight.rename(tmp_path / "straight")  # out of --resume auto's reach

    monkeypatch.setenv(TEST_SIGNAL_ENV, "SIGTERM:1")
    with pytest.raises(TrainingStopped) as stopped:
        recipe.train(setup(*options, categorical_via="class_embedding"))
    assert load_checkpoint(stopped.value.checkpoint)["step"] == 1
    monkeypatch.delenv(TEST_SIGNAL_ENV)
    run = recipe.train(setup(*options, categorical_via="class_embedding"), resume="auto")
    resumed = {p.name: load_checkpoint(p) for p in (run / "checkpoints").glob("*.pt")}
    assert resumed.keys() == reference.keys()
    for name in reference:
        reference[name].pop("config"), resumed[name].pop("config")
    assert differences(reference, resumed) == []  # UNet, EMA, optimizer, RNG (the dropout draws), conditioning


def test_resuming_with_other_conditions_is_refused(setup):
    recipe.train(setup())
    with pytest.raises(ValueError) as info:
        recipe.train(setup("ldm.training.max_steps=2", "data.conditions=[{name: radius}]"), resume="true")
    message = str(info.value)
    assert "  - data.conditions: checkpoint [" in message and '"name": "shape"' in message


def test_a_missing_covariate_stops_the_run_before_it_starts_naming_the_row(setup, tmp_path):
    path = tmp_path / "data" / "list.json"
    content = json.loads(path.read_text())
    del content["training"][4]["radius"]
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"\['training'\]\[4\]: 'radius' is missing \(data.conditions\)"):
        recipe.train(setup())
    assert not list((tmp_path / "out").glob("ldm-*"))
