"""The benchmark harness runs and reports sane fields (a tiny size: never a timed test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monai_diffusion.config import ConfigError
from monai_diffusion.memory import benchmark, probe
from monai_diffusion.memory.benchmark import Case, markdown_table, setting, suite, write_report
from monai_diffusion.memory.probe import CpuPeak, Options


def test_tiny_suite_runs_each_case_in_its_own_process_and_writes_the_report(tmp_path):
    report, records_file = tmp_path / "benchmarks.md", tmp_path / "tiny.json"
    report.write_text("# Benchmarks\n\nHand-written text that must survive.\n")
    code = benchmark.main(
        ["--suite", "tiny", "--only", "MONAI", "--only", "ours [4,2] ckpt", "--only", "LDM [4,2] cached",
         "--steps", "1", "--warmup", "1", "--output", str(report), "--json", str(records_file)]
    )
    assert code == 0
    data = json.loads(records_file.read_text())
    assert data["environment"]["torch"] and data["environment"]["date"]
    records = {r["case"]["label"]: r for r in data["results"]}
    assert set(records) == {"MONAI [2,2]", "ours [4,2] ckpt", "LDM [4,2] cached latents"}
    for record in records.values():
        assert "error" not in record, record
        assert record["step_s"] > 0 and record["voxels_per_s"] > 0 and record["params"] > 0
        assert record["peak_total_mb"] >= record["peak_mb"]
        assert record["state_mb"] > record["gradients_mb"] > 0
        assert record["device"].startswith("CPU")
    assert records["MONAI [2,2]"]["latent_shape"] == [8, 8, 8]
    assert records["ours [4,2] ckpt"]["latent_shape"] == [4, 4, 4]
    # A factor-4 downsampling convolution has a 5-wide kernel: a few more parameters than MONAI's 3-wide one.
    assert records["ours [4,2] ckpt"]["params"] > records["MONAI [2,2]"]["params"]

    text = report.read_text()
    assert "Hand-written text that must survive." in text
    assert "<!-- benchmark:tiny:start -->" in text and "<!-- benchmark:tiny:end -->" in text
    assert "| ours [4,2] ckpt | ours | ae | 32x32x32 x1 | [4,2] | ours |" in text
    assert "torch " in text and "CPU" in text


def _record(label: str, **measured) -> dict:
    case = Case(label, ["data.voxel_size=[16,16,16]", "autoencoder.training.adv_weight=0"])
    return {"case": case.to_dict(), "setting": setting(case, "cpu")} | measured


def test_report_section_is_replaced_not_duplicated(tmp_path):
    output = tmp_path / "b.md"
    record = _record("x", peak_mb=1.0, peak_total_mb=2.0, step_s=0.5, voxels_per_s=1024.0, params=10,
                     latent_shape=[2, 2, 2], device="CPU: test")
    write_report([record], output, "s", "first", command="cmd")
    write_report([record, record], output, "s", "second", command="cmd")
    write_report([record], output, "other", "third", command="cmd")
    text = output.read_text()
    assert text.count("<!-- benchmark:s:start -->") == 1 and "### second" in text and "### first" not in text
    assert "### third" in text
    assert "| x | ours | ae | 16x16x16 x1 | [2,2] | none | fp32 |" in text


def test_failed_cases_are_reported_not_raised():
    record = _record("broken", error="killed (out of memory?)")
    assert "**failed**" in markdown_table([record])


def test_case_validation():
    with pytest.raises(ValueError, match="only downsamples by 2"):
        Case("x", ["autoencoder.downsample_factors=[4,2]"], Options(network="monai"))
    with pytest.raises(ValueError):
        Options(stage="nope")
    with pytest.raises(ConfigError):
        Case("x", ["data.voxel_size=[30,32,32]", "autoencoder.downsample_factors=[4,2]"])
    case = Case("x", ["autoencoder.downsample_factors=[[4,4,2],2]"])
    assert case.config().autoencoder.downsample_factors == [[4, 4, 2], 2]


def test_suites_cover_the_issue_settings():
    cpu = suite("cpu")
    configs = [(c, c.config()) for c in cpu]
    assert all(cfg.data.voxel_size == [128, 128, 64] and cfg.autoencoder.num_channels == [16, 32, 64]
               and cfg.autoencoder.training.batch_size == 1 for _, cfg in configs)
    kinds = {(s["model"], s["factors"], s["checkpoint"], s["step"]) for s in (setting(c, "cpu") for c in cpu)}
    assert ("monai", "[2,2]", "none", "ae") in kinds and ("ours", "[2,2]", "none", "ae") in kinds
    assert ("ours", "[4,2]", "ours", "ae") in kinds and ("ours", "[4,2]", "whole", "ae") in kinds
    assert {"adv", "ldm_cache", "ldm_fly"} <= {setting(c, "cpu")["step"] for c in cpu}
    gpu = suite("gpu")
    assert all(c.config().data.voxel_size == [256, 256, 64] and setting(c, "cuda")["precision"].startswith("fp16")
               for c in gpu)
    assert suite("tiny", size=(64, 64, 32))[0].config().data.voxel_size == [64, 64, 32]


def test_cpu_peak_sees_a_transient_allocation():
    import torch

    with CpuPeak() as peak:
        before = probe.rss_mb()
        block = torch.ones(64, 2**20 // 4 * 4)  # 64 MiB, touched
        del block
    assert peak.peak_mb - before > 50


def test_loader_suite_reads_every_volume_of_each_case_and_reports_it(tmp_path):
    report, records_file = tmp_path / "benchmarks.md", tmp_path / "loader.json"
    code = benchmark.main(["--suite", "loader", "--size", "64", "64", "32", "--volumes", "2", "--workers", "0", "1",
                           "--output", str(report), "--json", str(records_file), "--loader-dir", str(tmp_path / "vols")])
    assert code == 0
    records = json.loads(records_file.read_text())["results"]
    assert [(r["case"]["cache"], r["workers"]) for r in records] == [("none", 0), ("none", 1), ("preprocessed", 0),
                                                                     ("preprocessed", 1)]
    for record in records:
        assert "error" not in record, record
        assert record["volumes"] == 2 and record["shape"] == [64, 64, 32]
        assert record["volumes_per_s"] > 0 and record["cpu_s_per_volume"] > 0 and record["device"].startswith("CPU")
    assert all(r["build_s"] >= 0 for r in records if r["cache"] == "preprocessed")
    assert len(list((tmp_path / "vols" / "64x64x32").glob("*.nii.gz"))) == 2  # written once, kept
    text = report.read_text()
    assert "<!-- benchmark:loader:start -->" in text and "| 64x64x32 preprocessed | 64x64x32 | preprocessed | 1 | 2 |" in text
    assert "CPU s/volume" in text


def test_loader_suite_covers_both_sizes_both_paths_and_patches():
    cases = benchmark.loader_suite([0, 2])
    assert {c.size for c in cases} == {(256, 256, 64), (512, 512, 128)} and {c.workers for c in cases} == {0, 2}
    assert {c.cache for c in cases} == {"none", "preprocessed"}
    patched = [c for c in cases if "patches" in c.label]
    assert patched and all(c.size == (512, 512, 128) for c in patched)
    config = patched[0].config(Path("/data"))
    assert config.autoencoder.training.patch_size == [128, 128, 128] and config.data.spacing == [1.0, 1.0, 2.0]


def test_gpu_frontier_suites_measure_the_targets_of_speed_and_scale():
    """What benchmarks/gpu_suite.sh frontier runs: valid configs, the issue's sizes, offload and compile where named."""
    frontier, whole, compiled = suite("gpu-frontier"), suite("gpu-whole"), suite("gpu-compile")
    for case in frontier + whole + compiled:
        config, shown = case.config(), setting(case, "cuda")
        assert case.options.device == "cuda" and shown["precision"].startswith("fp16")
        assert config.autoencoder.training.offload_activations == ("offload" in case.label)
        assert config.device.compile == ("compiled" in case.label)
    assert {tuple(c.config().data.voxel_size) for c in whole} == {(512, 512, 256), (512, 512, 512)}
    assert {setting(c, "cuda")["factors"] for c in frontier if "ours" in c.label} >= {"[4,2]", "[8,2]"}
    assert {c.options.network for c in compiled if "compiled" in c.label} == {"ours", "monai"}
    script = (Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_suite.sh").read_text()
    assert all(f"--suite \"$name\"" in script and f" {name} " in script
               for name in ("gpu-frontier", "gpu-whole", "gpu-compile"))
