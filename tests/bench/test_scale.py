"""The scale bench (bench/scale.py): its memory arithmetic against what peft and the methods actually build, the
"does not fit" path under a tiny memory limit, and `--quick` end to end: every row and column of every table, finite
ratios, the ZeRO rows with their converted checkpoint equal to the gathered weights, the plot. No timing is asserted."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from bench.scale_nets import ROWS
from tests.conftest import ROOT

HEAD_COLUMNS = {"label", "trainable_m", "arith_gb", "arith_x", "peak_gb", "x_plain", "step_s", "step_x", "overhead",
                "peak_gb_ckpt", "x_plain_ckpt", "step_s_ckpt", "overhead_ckpt", "status"}


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "bench.scale", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def _table(data: dict, title_start: str) -> dict:
    return next(t for t in data["tables"] if t["title"].startswith(title_start))


def test_lora_and_esd_x_counts_are_what_peft_and_the_selection_build():
    """The arithmetic's L (LoRA parameters, counted from layer shapes) equals what models.fake_score injects, and X
    equals ESD-x's selection, on a real (tiny-width) SD 1.5 UNet."""
    from diffusers import UNet2DConditionModel

    from bench.scale_nets import unet_config
    from bench.scale_plan import counts
    from models.fake_score import DEFAULT_LORA_TARGETS, _inject_lora
    from models.param_select import select_parameters

    c = counts("sd15/8", 4)
    unet = UNet2DConditionModel(**unet_config(0.125, 8))
    assert c["P"] == sum(p.numel() for p in unet.parameters())
    names = select_parameters(unet, "esd-x")
    assert c["X"] == sum(p.numel() for n, p in unet.named_parameters() if n in set(names))
    lora = _inject_lora(unet, 4, 4.0, DEFAULT_LORA_TARGETS)
    assert c["L"] == sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)


def test_arithmetic_of_each_row_and_of_zero():
    from bench.scale_plan import arithmetic_mb, zero_arithmetic_mb

    c = {"P": 1000 * 2**20, "L": 64 * 2**20, "X": 10 * 2**20}
    assert arithmetic_mb("plain", c) == 16 * 1000
    assert arithmetic_mb("dmd_lora_bf16", c) / arithmetic_mb("plain", c) == pytest.approx(1.125 + 64 / 1000)
    assert arithmetic_mb("dmd_copy", c) / arithmetic_mb("plain", c) == 2.25
    assert arithmetic_mb("erasure", c) == 8 * 1000 + 12 * 10
    # ZeRO-2 on 2 processes: weights 4P + (master 4P + gradients 4P + moments 8P) / 2, the bf16 base 2P whole
    assert zero_arithmetic_mb(2, 2, {**c, "L": 0}) == 4 * 1000 + 8 * 1000 + 2 * 1000
    assert zero_arithmetic_mb(3, 2, {**c, "L": 0}) == (20 * 1000 + 2 * 1000) / 2
    assert zero_arithmetic_mb(2, 1, c) == 20 * 1064 + 2 * 1000  # one process: nothing partitioned, the master copy kept


def test_a_row_that_cannot_fit_is_reported_with_its_need_and_never_started(tmp_path):
    out = tmp_path / "out"
    proc = _run(["--nets", "tiny", "sd15/8", "--rows", "plain", "dmd_copy", "--no-zero", "--mem-limit-gb", "0.2",
                 "--out", str(out), "--models", str(tmp_path / "models")], timeout=300)
    data = json.loads((out / "scale.json").read_text())
    rows = data["records"]["rows"]
    assert {(r["net"], r["row"], r["ckpt"]) for r in rows if r["size"] != 64} == {
        (n, r, k) for n in ("tiny", "sd15/8") for r in ("plain", "dmd_copy") for k in (False, True)}
    assert all(r["status"].startswith("does not fit (needs about") and "peak_mb" not in r for r in rows)
    tiny = [r for r in rows if r["net"] == "tiny"]
    assert all(r["need_mb"] >= r["arith_mb"] and r["free_mb"] == pytest.approx(0.2 * 1024) for r in tiny)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").glob("*/unet"))  # nothing written
    head = _table(data, "Every method at sd15/8")
    assert HEAD_COLUMNS == set(head["columns"]) and len(head["rows"]) == 2
    assert all("does not fit" in r["status"] for r in head["rows"])
    assert "does not fit" in data["goals"][1]["measured"] and "predicted" not in proc.stderr  # no row started


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    out = root / "out"
    _run(["--quick", "--out", str(out), "--models", str(root / "models")], timeout=1500)
    return out, json.loads((out / "scale.json").read_text())


@pytest.mark.slow
@pytest.mark.distributed
def test_quick_run_measures_every_row_with_and_without_checkpointing(quick):
    out, data = quick
    assert data["command"].startswith("python -m bench.scale --quick")
    m = data["machine"]
    assert m["cores"] and m["memory_gb"] > 0 and "load_average_1m" in m and (out / "scale.md").is_file()
    head = _table(data, "Every method at sd15/8")
    assert HEAD_COLUMNS == set(head["columns"])
    assert [r["row"] for r in head["rows"]] == list(ROWS)
    for r in head["rows"]:
        assert r["status"] == "ok", r
        for key in ("x_plain", "x_plain_ckpt", "step_x", "arith_x", "peak_gb", "step_s_ckpt"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["row"], key)
        overhead = [r["overhead"], r["overhead_ckpt"]]
        if r["row"] == "fdistill_gan":  # the aborted discriminator feature passes: marked, a lower bound
            assert all(str(o).endswith("*") for o in overhead)
        else:
            assert all(math.isfinite(o) and o > 0 for o in overhead)
    by_row = {r["row"]: r for r in head["rows"]}
    assert by_row["plain"]["x_plain"] == 1.0 and by_row["plain"]["arith_x"] == 1.0
    sweep = _table(data, "How memory and step time grow")
    assert len(sweep["rows"]) == 2 * len(ROWS) * 2  # two networks x every row x checkpointing off and on
    assert {"arith_x", "x_plain", "step_x", "overhead", "peak_mb", "step_s", "status"} <= set(sweep["columns"])


@pytest.mark.slow
@pytest.mark.distributed
def test_quick_run_trains_what_the_arithmetic_counts(quick):
    """Measured trainable parameters equal the arithmetic's P, L and X: the generator and its LoRA, two full copies
    for DMD2's setup, only the cross-attention for ESD-x."""
    _, data = quick
    rec = {(r["net"], r["row"]): r for r in data["records"]["rows"] if not r["ckpt"]}
    for net in ("tiny", "sd15/8"):
        p, lora, x = (rec[(net, "plain")][k] for k in ("P", "L", "X"))
        assert rec[(net, "plain")]["trainable_m"] * 1e6 == pytest.approx(p, abs=0.5)
        assert rec[(net, "dmd_lora_bf16")]["trainable_m"] * 1e6 == pytest.approx(p + lora, abs=0.5)
        assert rec[(net, "dmd_copy")]["trainable_m"] * 1e6 == pytest.approx(2 * p, abs=0.5)
        assert rec[(net, "erasure")]["trainable_m"] * 1e6 == pytest.approx(x, abs=0.5)


@pytest.mark.slow
@pytest.mark.distributed
def test_quick_run_zero_rows_and_converted_checkpoint(quick):
    out, data = quick
    zero = _table(data, "One-step DMD with the LoRA fake score under")
    assert [r["stage"] for r in zero["rows"]] == [2, 3]
    for r in zero["rows"]:
        assert r["status"] == "ok" and r["ckpt_equal"] is True and r["ckpt_max_diff"] == 0.0
        assert math.isfinite(r["x_single"]) and r["peak_mb"] > 0 and len(r["ranks"].split(" / ")) == 2
    assert {g["target"] for g in data["goals"]} == {"<= 1.3x", "reference", "<= 1.10x", "<= 0.6x"}
    png = out / "scale.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(png).size[0] > 800
    # --render rewrites the same tables from the stored records without running anything
    again = out.parent / "again"
    _run(["--render", str(out / "scale.json"), "--out", str(again)], timeout=120)
    assert (again / "scale.md").read_text() == (out / "scale.md").read_text()


def test_quick_settings_and_refusals():
    proc = subprocess.run([sys.executable, "-m", "bench.scale", "--size", "30"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "multiple of 8" in proc.stderr
    from bench.scale import QUICK, parse_args, resolve

    s = resolve(parse_args(["--quick", "--no-ckpt", "--threads", "1"]))
    assert s["ckpt"] == [False] and s["threads"] == 1 and s["nets"] == QUICK["nets"]
