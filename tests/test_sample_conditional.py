"""sample with conditions: --condition / --conditions / --guidance, names and samples.csv, the NIfTI description, and
the errors that name the row and key."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import conditional_raw, save_autoencoder, write_conditional_data

from monai_diffusion import sample as sampler
from monai_diffusion.config import apply_overrides, config_from_dict
from monai_diffusion.generation import SEED_STRIDE, sample
from monai_diffusion.train_ldm import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A conditional LDM (radius, shape; 2 steps) and an unconditional one on the same volumes: name -> (config, run)."""
    root = tmp_path_factory.mktemp("conditional")
    datalist = write_conditional_data(root / "data", count=4)
    runs = {}
    for name, overrides in (("conditional", ["ldm.training.max_steps=2"]),
                            ("unconditional", ["data.conditions=[]", "ldm.sampling.guidance_scale=1.0"]),
                            ("no dropout", ["ldm.conditioning.dropout=0.0"])):
        config = config_from_dict(apply_overrides(conditional_raw(datalist, root / name.replace(" ", "-")), overrides))
        save_autoencoder(config, root / name.replace(" ", "-") / "autoencoder-1" / "checkpoints" / "best.pt")
        runs[name] = (config, train(config))
    return runs


def read(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def test_the_command_line_names_and_lists_each_samples_conditions_and_seed(trained, tmp_path):
    config, run = trained["conditional"]
    out = tmp_path / "gen"
    result = subprocess.run(
        [sys.executable, "-m", "monai_diffusion.cli", "sample", "--checkpoint", str(run), "--set", "device.device=cpu",
         "--condition", "radius=0.5", "--condition", "shape=a", "--guidance", "2", "-n", "2", "--seed", "7",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    names = ["sample-000_seed7_radius-0.5_shape-a.nii.gz", "sample-001_seed7_radius-0.5_shape-a.nii.gz"]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == names
    with open(out / "samples.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["file"], r["index"], r["seed"], r["generator_seed"], r["guidance"], r["radius"], r["shape"])
            for r in rows] == [(name, str(i), "7", str(7 * SEED_STRIDE + i), "2.0", "0.5", "a")
                               for i, name in enumerate(names)]
    header = nib.load(str(out / names[1])).header
    assert header["descrip"].item().decode() == "radius=0.5 shape=a guidance=2 seed=7#1"
    assert not np.array_equal(read(out / names[0]), read(out / names[1]))  # two seeds, two volumes


def test_a_table_gives_one_sample_per_row_and_its_errors_name_the_line(trained, tmp_path, caplog):
    config, run = trained["conditional"]
    table = tmp_path / "table.csv"
    table.write_text("radius,shape\n0.3,a\n0.8,b\n")
    common = ["--checkpoint", str(run), "--set", "device.device=cpu", "--out", str(tmp_path / "gen")]
    assert sampler.main(["--conditions", str(table), *common]) == 0
    assert sorted(p.name for p in (tmp_path / "gen").glob("*.nii.gz")) == [
        "sample-000_seed42_radius-0.3_shape-a.nii.gz", "sample-001_seed42_radius-0.8_shape-b.nii.gz"]  # the default seed

    table.write_text("radius,shape\n0.3,a\n0.8,c\n")
    assert sampler.main(["--conditions", str(table), *common]) == 1
    assert f"{table} line 3: 'shape' = 'c' is not a category the LDM was trained with (['a', 'b'])" in caplog.text
    table.write_text("radius,shape\nbig,a\n")
    assert sampler.main(["--conditions", str(table), *common]) == 1
    assert f"{table} line 2: 'radius' is 'big', not a number" in caplog.text
    table.write_text("radius,shape,age\n0.3,a,7\n")
    assert sampler.main(["--conditions", str(table), *common]) == 1
    assert "['age'] not among them" in caplog.text
    table.write_text("radius,shape\n0.3,a\n0.4,a\n")
    assert sampler.main(["--conditions", str(table), "-n", "3", *common]) == 1
    assert "2 rows of conditions make 2 samples, not --num-samples 3" in caplog.text
    assert sampler.main(["--condition", "radius=0.4", *common]) == 1
    assert "give ['shape'] too (every condition, or none for unconditional samples)" in caplog.text


def test_conditions_and_guidance_change_the_samples_and_the_same_seed_repeats_them(trained, tmp_path):
    config, run = trained["conditional"]

    def one(name: str, **kwargs) -> np.ndarray:
        (path,) = sample(config, checkpoint=run, out=tmp_path / name, seed=1, **kwargs)
        return read(path)

    small = one("small", conditions=[{"radius": 0.3, "shape": "a"}], guidance=1.0)
    assert np.array_equal(small, one("again", conditions=[{"radius": "0.3", "shape": "a"}], guidance=1.0))
    assert not np.array_equal(small, one("large", conditions=[{"radius": 0.8, "shape": "a"}], guidance=1.0))
    assert not np.array_equal(small, one("guided", conditions=[{"radius": 0.3, "shape": "a"}], guidance=3.0))
    # Without conditions a conditional LDM samples its unconditional model, under the plain name and no manifest.
    null = one("null", num_samples=1)
    assert not np.array_equal(small, null)
    assert [p.name for p in (tmp_path / "null").iterdir()] and not (tmp_path / "null" / "samples.csv").exists()
    assert (tmp_path / "null" / "sample-000.nii.gz").is_file()


def test_conditions_for_a_run_trained_without_them_and_guidance_without_an_unconditional_model(trained, tmp_path):
    config, run = trained["unconditional"]
    with pytest.raises(ValueError, match="was trained without conditions .* sample it without --condition"):
        sample(config, checkpoint=run, out=tmp_path, conditions=[{"radius": 0.5}], where=["--condition"])
    with pytest.raises(ValueError, match="--guidance 3 steers samples towards their conditions"):
        sample(config, checkpoint=run, out=tmp_path, guidance=3.0)
    config, run = trained["no dropout"]
    with pytest.raises(ValueError, match="trained with ldm.conditioning.dropout 0"):
        sample(config, checkpoint=run, out=tmp_path, conditions=[{"radius": 0.5, "shape": "a"}], guidance=2.0)
    # Guidance 1 needs no unconditional model.
    assert len(sample(config, checkpoint=run, out=tmp_path, conditions=[{"radius": 0.5, "shape": "a"}],
                      guidance=1.0)) == 1
