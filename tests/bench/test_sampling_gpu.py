"""bench/sampling_gpu.py, the GPU check of `sample` / `evaluate` --device and --dtype, run on the CPU (--device cpu,
without FID) so that the prepared script is known to run before a GPU session spends its minutes on it: every row is
written, a row over its limit makes it exit 1 and is marked, the others pass."""
from __future__ import annotations

import json

import pytest

from bench import sampling_gpu


def test_the_gpu_check_runs_on_the_cpu_and_fails_a_row_over_its_limit(tiny_teacher_ckpt, tmp_path, monkeypatch):
    from models.tiny_pipelines import save_tiny_pipeline

    folder = save_tiny_pipeline(tmp_path / "sd15", "sd15")
    monkeypatch.setitem(sampling_gpu.LIMITS, "bfloat16", 0.0)  # bfloat16 differs from float32: these rows fail
    with pytest.raises(SystemExit) as e:
        sampling_gpu.main(["--device", "cpu", "--teacher", str(tiny_teacher_ckpt), "--pipeline", str(folder), "--no-fid",
                           "--out", str(tmp_path / "results"), "--work", str(tmp_path / "work")])
    assert e.value.code == 1
    rows = json.loads((tmp_path / "results" / "sampling_gpu.json").read_text())["records"]
    by = {(r["model"], r["command"], r["device"], r["dtype"], r["measure"]): r for r in rows}
    for model in ("class", "text"):
        assert not by[(model, "sample", "cpu", "bfloat16", "max |x - x_cpu| / max |x_cpu|")]["ok"]
        assert by[(model, "sample", "cpu", "float32", "max |x - x_cpu| / max |x_cpu|")]["value"] == 0.0
        assert by[(model, "sample", "(default)", "float32", "max |x - x_cpu| / max |x_cpu|")]["value"] == 0.0
    assert [r for r in rows if not r["ok"]] == [r for r in rows if r["command"] == "sample" and r["dtype"] == "bfloat16"]
    assert {r["measure"] for r in rows if r["command"] == "placement"} >= {
        "module parameters and buffers", "diffusion networks in bfloat16", "prompt encoder (float32)", "VAE (float32)",
        "feature network copy"}
