"""The evidence that conditioning works (docs/conditioning.md): the study's measures, and the study itself (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "conditioning_study.py"


def study_module():
    spec = importlib.util.spec_from_file_location("conditioning_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_studys_measures():
    study = study_module()
    assert study.ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert study.spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)  # ranks, not values
    assert study.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert study.slope([0.8, 1.0, 1.2], [1.0, 2.0, 3.0]) == pytest.approx(5.0)
    a = torch.zeros(4, 4, 4, dtype=torch.bool)
    b = a.clone()
    a[:2], b[1:3] = True, True
    assert study.dice(a, b) == pytest.approx(0.5) and study.dice(a, a) == 1.0
    summary = study.covariate_summary([0.8, 0.8, 1.0, 1.2, 1.2], [1.0, 3.0, 5.0, 7.0, 9.0])
    assert summary["spearman"] == pytest.approx(9 / 90 ** 0.5, abs=1e-3)  # tied ranks: Pearson on 1.5, 1.5, 3, 4.5, 4.5
    assert (summary["mean_ml_lowest_levels"], summary["mean_ml_highest_levels"]) == (3.0, 7.0)


def test_the_tissue_pattern_measure():
    """Mean intensity per label region (background left out), the order of those means and a method's summary."""
    study = study_module()
    image = torch.tensor([[[0.1, 0.2], [0.3, 0.4]], [[0.5, 0.6], [0.7, 0.8]]])
    labels = torch.tensor([[[0, 1], [1, 2]], [[2, 2], [3, 3]]]).float()  # 0.1 lies in the background
    means = study.region_means(image, labels)
    assert means == pytest.approx({"CSF": 0.25, "grey": 0.5, "white": 0.75})
    assert study.region_means(image, labels.clamp(max=2))["white"] is None  # a map without white matter
    real = ["CSF", "grey", "white"]
    assert study.intensity_order(means) == real
    assert study.intensity_order({"CSF": 0.6, "grey": 0.5, "white": 0.75}) == ["grey", "CSF", "white"]
    assert study.follows_order(means, real)
    assert not study.follows_order({"CSF": 0.6, "grey": 0.5, "white": 0.75}, real)
    assert not study.follows_order({"CSF": 0.5, "grey": 0.5, "white": 0.75}, real)  # a tie is no order
    assert not study.follows_order({"CSF": 0.25, "grey": 0.5, "white": None}, real)
    summary = study.tissue_summary([means, {"CSF": 0.6, "grey": 0.5, "white": 0.75},
                                    {"CSF": 0.25, "grey": 0.5, "white": None}], real)
    assert (summary["n"], summary["in_real_order"], summary["share_in_real_order"]) == (3, 1, 0.333)
    # Each region's mean over the samples that hold it: CSF (0.25 + 0.6 + 0.25) / 3, white (0.75 + 0.75) / 2.
    assert summary["mean_intensity"] == pytest.approx({"CSF": 0.3667, "grey": 0.5, "white": 0.75}, abs=1e-4)


def test_the_tissue_dice_reads_tissues_off_by_intensity_and_scores_them_against_the_map():
    study = study_module()
    real_means = {"CSF": 0.4, "grey": 0.6, "white": 0.9}
    labels = torch.tensor([0, 1, 1, 2, 2, 3, 3, 3]).float()
    image = torch.tensor([0.1, 0.35, 0.45, 0.55, 0.7, 0.8, 0.95, 1.0])  # each voxel nearest its own region's mean
    assert study.tissue_segmentation(image, 0.2, real_means).tolist() == [0, 1, 1, 2, 2, 3, 3, 3]
    assert study.tissue_dice(image, labels, 0.2, real_means) == 1.0
    # Grey and white swapped in place (the outline kept): the brain's Dice would stay 1, the tissue Dice drops.
    swapped = torch.tensor([0.1, 0.35, 0.45, 0.9, 0.9, 0.6, 0.6, 0.6])
    assert study.tissue_segmentation(swapped, 0.2, real_means).tolist() == [0, 1, 1, 3, 3, 2, 2, 2]
    assert study.tissue_dice(swapped, labels, 0.2, real_means) == pytest.approx(1 / 3)
    # Below the brain threshold is background, whatever the nearest mean.
    assert study.tissue_segmentation(torch.tensor([0.15]), 0.2, real_means).tolist() == [0]


def seed_results(spearman: tuple[float, float, float], dice: tuple[float, float, float], *, wins: tuple[int, int],
                 share: float, real_order: tuple[str, ...] = ("CSF", "grey", "white"),
                 tissue_dice: tuple[float, float] = (0.6, 0.5)) -> dict:
    """A seed's results as the study writes them, with only the figures the aggregate reads: Spearman at guidance
    1, 3 and the null condition; mean Dice of the ControlNet, the null condition and the LDM told brain_scale; the
    ControlNet's pairs won over the latter two, its share of samples in the real tissue order and the tissue Dice
    of the ControlNet and the LDM told brain_scale."""
    study = study_module()
    covariate = {label: {"spearman": value, "slope_ml_per_0.1": 100 * value}
                 for label, value in zip(("guidance 1", "guidance 3", "null condition"), spearman)}
    masks = {study.REAL: {"mean_dice": 0.98}, study.CONTROLNET: {"mean_dice": dice[0]},
             study.NULL: {"mean_dice": dice[1]}, study.told(3.0): {"mean_dice": dice[2]}}
    masks[study.CONTROLNET] |= {"wins_over_null_condition": wins[0], "wins_over_told_brain_scale": wins[1]}
    methods = {study.REAL: {"share_in_real_order": 1.0}, study.CONTROLNET: {"share_in_real_order": share},
               study.NULL: {"share_in_real_order": 0.25}, study.told(3.0): {"share_in_real_order": 0.5}}
    for method, value in zip((study.REAL, study.CONTROLNET, study.NULL, study.told(3.0)),
                             (0.8, tissue_dice[0], 0.4, tissue_dice[1])):
        methods[method]["mean_tissue_dice"] = value
    return {"covariate": covariate, "masks": masks, "tissue": {"real order": list(real_order), "methods": methods}}


def test_the_aggregate_across_training_seeds_states_what_holds_in_every_seed():
    study = study_module()
    per_seed = {
        "0": seed_results((0.83, 0.93, -0.19), (0.902, 0.818, 0.848), wins=(12, 9), share=0.75),
        # The seed 7: the ControlNet below the LDM told brain_scale; half its samples in order is no majority.
        "7": seed_results((0.84, 0.91, -0.18), (0.822, 0.732, 0.837), wins=(12, 4), share=0.5),
        "13": seed_results((0.80, 0.92, 0.05), (0.880, 0.800, 0.850), wins=(11, 8), share=1.0,
                           tissue_dice=(0.45, 0.5)),
    }
    summary = study.aggregate(per_seed, guidance=3.0)
    assert summary["seeds"] == ["0", "7", "13"]
    figure = summary["figures"]["Spearman, guidance 1"]
    # mean (0.83 + 0.84 + 0.80) / 3; sample std: squared deviations 0.0067^2 + 0.0167^2 + 0.0233^2 = 8.667e-4, / 2
    assert figure["mean"] == pytest.approx(0.8233) and figure["std"] == pytest.approx(0.0208)
    assert (figure["min"], figure["max"]) == (0.80, 0.84)
    assert figure["per_seed"] == {"0": 0.83, "7": 0.84, "13": 0.80}
    figures = summary["figures"]
    assert figures["Spearman, null condition"]["mean"] == pytest.approx(-0.1067)
    assert figures["mean Dice, ControlNet (mask)"]["mean"] == pytest.approx((0.902 + 0.822 + 0.880) / 3, abs=1e-4)
    assert figures["ControlNet beats null condition, pairs won"] == {
        "mean": pytest.approx(11.6667), "std": pytest.approx(0.5774), "min": 11, "max": 12,
        "per_seed": {"0": 12, "7": 12, "13": 11}}
    assert figures["tissue order share, ControlNet (mask)"]["min"] == 0.5
    claims = summary["claims"]
    assert {claim: verdict["holds_in_every_seed"] for claim, verdict in claims.items()} == {
        "ControlNet Dice > LDM told the true brain_scale": False,
        "ControlNet Dice > null condition": True,
        "Spearman at guidance 3 > at guidance 1": True,
        "tissue order CSF < grey < white reproduced": False,
        "ControlNet tissue Dice > LDM told the true brain_scale": False,
    }
    assert claims["ControlNet tissue Dice > LDM told the true brain_scale"]["per_seed"] == {
        "0": True, "7": True, "13": False}
    assert figures["tissue Dice, ControlNet (mask)"]["per_seed"] == {"0": 0.6, "7": 0.6, "13": 0.45}
    assert claims["ControlNet Dice > LDM told the true brain_scale"]["per_seed"] == {"0": True, "7": False, "13": True}
    assert claims["tissue order CSF < grey < white reproduced"]["per_seed"] == {"0": True, "7": False, "13": True}
    assert all(verdict["criterion"] for verdict in claims.values())

    table = study.markdown(summary)
    assert "| Spearman, guidance 1 | 0.8233 | 0.021 | 0.8 to 0.84 | 0.83, 0.84, 0.8 |" in table
    assert "| ControlNet Dice > LDM told the true brain_scale | **no** | yes, no, yes |" in table
    assert "| Spearman at guidance 3 > at guidance 1 | yes | yes, yes, yes |" in table

    # The tissue order only counts where the real images have it: a seed whose real order differs fails the claim.
    other = seed_results((0.8, 0.9, 0.0), (0.9, 0.8, 0.85), wins=(12, 12), share=1.0,
                         real_order=("grey", "CSF", "white"))
    assert not study.claims(other, guidance=3.0)["tissue order CSF < grey < white reproduced"]
    single = study.aggregate({"0": per_seed["0"]}, guidance=3.0)
    assert single["figures"]["Spearman, guidance 1"]["std"] is None and "| n/a |" in study.markdown(single)


def test_training_seeds_resume_finished_seeds_and_refuse_other_settings(tmp_path, monkeypatch, capsys):
    """A seed whose study.json exists is read, not run again, unless --rerun names it; a finished seed run with other
    settings stops the study. The training itself is replaced by synthetic results here."""
    study = study_module()
    workdir = tmp_path / "study"
    ran = []

    def fake_study(args, folder, overrides, *, panels, stages_from=None):
        seed = int(folder.name.removeprefix("seed-"))
        ran.append(seed)
        assert stages_from is None
        assert f"seed={seed}" == overrides[-1] and f"output.output_dir={folder}" == overrides[0]
        return seed_results((0.8, 0.9, 0.0), (0.9, 0.8, 0.85), wins=(12, 10), share=0.75) | {
            "settings": study.study_settings(args, overrides)}

    monkeypatch.setattr(study, "study_seed", fake_study)
    argv = ["--workdir", str(workdir), "--training-seeds", "0", "7"]
    assert study.main(argv) == 0 and ran == [0, 7]
    written = json.loads((workdir / "study.json").read_text())
    assert list(written["per_seed"]) == ["0", "7"] and written["settings"]["training_seeds"] == [0, 7]
    assert written["aggregate"]["claims"]["ControlNet Dice > LDM told the true brain_scale"]["holds_in_every_seed"]
    assert (workdir / "study.md").read_text().startswith("| figure | mean | std |")
    assert (workdir / "seed-7" / "study.json").is_file()

    ran.clear()
    (workdir / "seed-7" / "leftover").write_text("from an earlier attempt")
    assert study.main([*argv, "--rerun", "7"]) == 0 and ran == [7]  # seed 0 read from its results
    assert not (workdir / "seed-7" / "leftover").exists()  # a seed that runs starts from an empty folder
    assert "seed 0: results of an earlier run" in capsys.readouterr().out
    ran.clear()
    assert study.main([*argv, "--rerun"]) == 0 and ran == [0, 7]

    with pytest.raises(SystemExit, match="controlnet.training.max_steps=1000"):
        study.main([*argv, "--controlnet-steps", "1000"])
    for wrong in (["--training-seeds", "0", "--set", "seed=3"], ["--rerun"], ["--training-seeds", "0", "0"],
                  ["--training-seeds", "0", "--rerun", "7"]):
        with pytest.raises(SystemExit) as stopped:
            study.main(["--workdir", str(workdir), *wrong])
        assert stopped.value.code == 2


def test_stages_from_takes_an_earlier_studys_autoencoder_and_ldm_only_when_they_match(tmp_path, monkeypatch):
    """--stages-from hands each seed the earlier study's seed-S folder when only controlnet.* settings differ, and
    stops naming the setting otherwise (training replaced by synthetic results, as above)."""
    study = study_module()
    given = {}

    def fake_study(args, folder, overrides, *, panels, stages_from=None):
        given[folder.name] = stages_from
        return seed_results((0.8, 0.9, 0.0), (0.9, 0.8, 0.85), wins=(12, 10), share=0.75) | {
            "settings": study.study_settings(args, overrides)}

    monkeypatch.setattr(study, "study_seed", fake_study)
    earlier = tmp_path / "steps-2000"
    assert study.main(["--workdir", str(earlier), "--training-seeds", "0", "7"]) == 0
    assert given == {"seed-0": None, "seed-7": None}
    given.clear()
    ablation = ["--workdir", str(tmp_path / "steps-1000"), "--training-seeds", "0", "7", "--controlnet-steps", "1000",
                "--set", "controlnet.conditioning_scale=1", "--stages-from", str(earlier)]
    assert study.main(ablation) == 0
    assert given == {"seed-0": earlier / "seed-0", "seed-7": earlier / "seed-7"}

    with pytest.raises(SystemExit, match=r"other settings \(overrides: .*ldm.training.max_steps=900"):
        study.main([*ablation, "--workdir", str(tmp_path / "other"), "--ldm-steps", "900"])
    with pytest.raises(SystemExit, match="seed-13/study.json does not exist"):
        study.main([*ablation, "--workdir", str(tmp_path / "more"), "--training-seeds", "13"])
    with pytest.raises(SystemExit) as stopped:
        study.main(["--workdir", str(tmp_path / "single"), "--stages-from", str(earlier)])
    assert stopped.value.code == 2


def test_the_controlnets_recipe_levers_reach_the_studys_config():
    """Steps, conditioning embedding, conditioning scale and learning rate: each one flag or --set away."""
    from monai_diffusion.config import load_config

    study = study_module()
    args = study.build_parser().parse_args([
        "--controlnet-steps", "2000", "--set", "controlnet.conditioning_embedding_num_channels=[16,32,64]",
        "--set", "controlnet.conditioning_scale=2", "--set", "controlnet.training.lr=0.0002"])
    config = load_config(str(study.CONFIG), study.study_overrides(args, Path("runs"), seed=7))
    assert config.controlnet.training.max_steps == 2000 and config.controlnet.training.lr == 0.0002
    assert config.controlnet.conditioning_embedding_num_channels == [16, 32, 64]
    assert config.controlnet.conditioning_scale == 2.0 and config.seed == 7


@pytest.mark.slow
def test_the_covariate_guidance_and_label_maps_measurably_steer_the_samples(tmp_path):
    """The study of docs/conditioning.md, with its default settings (about 20 minutes on 2 CPU cores)."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--workdir", str(tmp_path / "study"),
         "--set", f"data.demo.cache_dir={tmp_path / 'demo'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=3600,
        env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    study = json.loads((tmp_path / "study" / "study.json").read_text())
    covariate, masks = study["covariate"], study["masks"]
    guided, plain, null = covariate["guidance 3"], covariate["guidance 1"], covariate["null condition"]
    # Larger brain_scale, larger brains; guidance follows it more closely; the null condition does not follow it.
    assert guided["spearman"] > plain["spearman"] > 0.5
    assert guided["slope_ml_per_0.1"] > plain["slope_ml_per_0.1"] > 2 * abs(null["slope_ml_per_0.1"])
    assert guided["mean_ml_highest_levels"] > guided["mean_ml_lowest_levels"] * 1.8
    # Held-out label maps: the ControlNet's samples overlap their maps more than the LDM's unconditioned ones.
    assert masks["ControlNet (mask)"]["mean_dice"] > masks["LDM, null condition"]["mean_dice"]
    assert masks["ControlNet (mask)"]["volume_spearman"] > 0.5


@pytest.mark.slow
def test_the_study_runs_each_training_seed_in_its_folder_resumes_and_aggregates(tmp_path):
    """--training-seeds with two seeds at a tiny size (2 training steps per stage, 2 sampling steps: a few minutes on
    2 CPU cores): each seed trains in its own folder and is measured, the aggregate names both, and a second call
    reads the finished seeds instead of training again. The default-size study above stays single-seed (two seeds
    would double its 20 minutes)."""
    command = [sys.executable, str(SCRIPT), "--workdir", str(tmp_path / "study"), "--training-seeds", "1", "2",
               "--ae-steps", "2", "--ldm-steps", "2", "--controlnet-steps", "2", "--levels", "3", "--seeds", "1",
               "--inference-steps", "2", "--set", f"data.demo.cache_dir={tmp_path / 'demo'}"]

    def run() -> subprocess.CompletedProcess:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                                env=os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
        return result

    run()
    study = json.loads((tmp_path / "study" / "study.json").read_text())
    assert list(study["per_seed"]) == ["1", "2"] and study["aggregate"]["seeds"] == ["1", "2"]
    for seed, results in study["per_seed"].items():
        folder = tmp_path / "study" / f"seed-{seed}"
        assert results["seed"] == int(seed) and json.loads((folder / "study.json").read_text()) == results
        assert {path.parent.parent.name.split("-")[0] for path in folder.glob("*/checkpoints/last.pt")} == {
            "autoencoder", "ldm", "controlnet"}
        assert len(results["held_out"]) == 6 and (folder / "panels" / "masks.png").is_file()
        tissue = results["tissue"]
        # The reference the tissue claim needs: the real T1 images have CSF < grey < white, every one of them.
        assert tissue["real order"] == ["CSF", "grey", "white"]
        assert tissue["methods"]["real held-out images"]["share_in_real_order"] == 1.0
        assert {method: summary["n"] for method, summary in tissue["methods"].items()} == {
            "real held-out images": 6, "ControlNet (mask)": 6, "LDM, null condition": 6,
            "LDM, true brain_scale, guidance 3": 6}
        assert results["masks"]["real held-out images"]["mean_dice"] > 0.95
    figures = study["aggregate"]["figures"]
    assert set(figures["mean Dice, ControlNet (mask)"]["per_seed"]) == {"1", "2"}
    assert all(isinstance(verdict["holds_in_every_seed"], bool) for verdict in study["aggregate"]["claims"].values())
    assert "| claim | holds in every seed | seeds 1, 2 |" in (tmp_path / "study" / "study.md").read_text()

    trained = {path: path.stat().st_mtime for path in (tmp_path / "study").glob("seed-*/*/checkpoints/last.pt")}
    again = run()
    assert again.stdout.count("results of an earlier run") == 2
    assert {path: path.stat().st_mtime for path in trained} == trained

    # A ControlNet ablation over the same autoencoders and LDMs: only train-controlnet runs, the others are copied.
    ablation = tmp_path / "ablation"
    command[command.index("--controlnet-steps") + 1] = "3"
    command[command.index("--workdir") + 1] = str(ablation)
    command += ["--stages-from", str(tmp_path / "study")]
    run()
    for seed in ("1", "2"):
        log = (ablation / f"seed-{seed}" / "log.txt").read_text()
        assert "train-controlnet" in log and "train-autoencoder" not in log and "train-ldm" not in log
        earlier = sorted(p.name for p in (tmp_path / "study" / f"seed-{seed}").glob("ldm-*"))
        assert sorted(p.name for p in (ablation / f"seed-{seed}").glob("ldm-*")) == earlier
        results = json.loads((ablation / f"seed-{seed}" / "study.json").read_text())
        assert results["stages_from"] == str(tmp_path / "study" / f"seed-{seed}")
