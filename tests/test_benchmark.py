"""The benchmark harness runs and reports sane fields (a tiny size: never a timed test)."""

from __future__ import annotations

import json

import pytest

from monai_diffusion import benchmark
from monai_diffusion.benchmark import Case, CpuPeak, markdown_table, suite, write_report


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


def test_report_section_is_replaced_not_duplicated(tmp_path):
    output = tmp_path / "b.md"
    record = {
        "case": Case("x", size=(8, 8, 8)).__dict__,
        "peak_mb": 1.0, "peak_total_mb": 2.0, "step_s": 0.5, "voxels_per_s": 1024.0, "params": 10,
        "latent_shape": [2, 2, 2], "device": "CPU: test",
    }
    write_report([record], output, "s", "first", "cmd")
    write_report([record, record], output, "s", "second", "cmd")
    write_report([record], output, "other", "third", "cmd")
    text = output.read_text()
    assert text.count("<!-- benchmark:s:start -->") == 1 and "### second" in text and "### first" not in text
    assert "### third" in text


def test_failed_cases_are_reported_not_raised():
    record = {"case": Case("broken").__dict__, "error": "killed (out of memory?)"}
    assert "**failed**" in markdown_table([record])


def test_case_validation():
    with pytest.raises(ValueError, match="only downsamples by 2"):
        Case("x", model="monai", factors=[4, 2])
    with pytest.raises(ValueError):
        Case("x", step="nope")
    assert Case.from_json(Case("x", factors=[[4, 4, 2], 2]).to_json()).factors == [[4, 4, 2], 2]


def test_suites_cover_the_issue_settings():
    cpu = suite("cpu")
    assert all(c.size == (128, 128, 64) and c.channels == (16, 32, 64) and c.batch == 1 for c in cpu)
    kinds = {(c.model, c.factors_text, c.checkpoint, c.step) for c in cpu}
    assert ("monai", "[2,2]", "none", "ae") in kinds and ("ours", "[2,2]", "none", "ae") in kinds
    assert ("ours", "[4,2]", "ours", "ae") in kinds and ("ours", "[4,2]", "whole", "ae") in kinds
    assert {"adv", "ldm_cache", "ldm_fly"} <= {c.step for c in cpu}
    gpu = suite("gpu")
    assert all(c.size == (256, 256, 64) and c.precision == "fp16" for c in gpu)
    assert suite("tiny", size=(64, 64, 32))[0].size == (64, 64, 32)


def test_cpu_peak_sees_a_transient_allocation():
    import torch

    with CpuPeak() as probe:
        before = benchmark.rss_mb()
        block = torch.ones(64, 2**20 // 4 * 4)  # 64 MiB, touched
        del block
    assert probe.peak_mb - before > 50
