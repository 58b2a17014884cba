"""Export: a diffusers folder that diffusers alone loads and samples identically; atomic, no silent overwrite."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from train.checkpoint import load_method
from train.cli import main

DIFFUSERS_ONLY = r"""
import sys, numpy as np, torch
from diffusers import DDIMScheduler, UNet2DModel
path, out, w, steps = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
unet = UNet2DModel.from_pretrained(path + "/unet").eval()
sched = DDIMScheduler.from_pretrained(path + "/scheduler")
labels = torch.arange(10)
null = torch.full_like(labels, unet.config.num_class_embeds - 1)
x = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
sched.set_timesteps(steps)
with torch.no_grad():
    for t in sched.timesteps:
        c, u = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample.chunk(2)
        x = sched.step(u + w * (c - u), t, x).prev_sample
assert "guidance" not in sys.modules and "train" not in sys.modules
np.save(out, x.numpy())
"""


def test_export_round_trip_through_diffusers_alone(tiny_teacher_ckpt, tmp_path, capsys):
    out = tmp_path / "export"
    main(["export", "--ckpt", str(tiny_teacher_ckpt), "--out", str(out)])
    assert {p.name for p in out.iterdir()} == {"unet", "scheduler", "guidedistill.json", "README.md"}
    meta = json.loads((out / "guidedistill.json").read_text())
    assert meta["method"] == "teacher" and meta["parameterization"] == "v" and meta["null_class_label"] == 10
    script = tmp_path / "sample.py"
    script.write_text(DIFFUSERS_ONLY)
    subprocess.run([sys.executable, str(script), str(out), str(tmp_path / "theirs.npy"), "2.5", "8"], check=True,
                   cwd=tmp_path)
    theirs = torch.from_numpy(np.load(tmp_path / "theirs.npy"))
    ours, _ = load_method(tiny_teacher_ckpt).generate(torch.arange(10), scale=2.5, steps=8, seed=0)
    # diffusers steps to t - T // steps, which is the "trailing" grid when steps divides T (here 8 of 1000)
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)


def test_export_refuses_to_overwrite_and_leaves_nothing_behind(tiny_teacher_ckpt, tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(SystemExit):
        main(["export", "--ckpt", str(tiny_teacher_ckpt), "--out", str(out)])
    assert "pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"
    main(["export", "--ckpt", str(tiny_teacher_ckpt), "--out", str(out), "--force"])
    assert not (out / "keep.txt").exists() and (out / "unet").is_dir()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_safetensors_export_loads_into_the_network(tiny_teacher_ckpt, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "teacher.safetensors"
    main(["export", "--ckpt", str(tiny_teacher_ckpt), "--out", str(out), "--format", "safetensors"])
    module = load_method(tiny_teacher_ckpt)
    state = load_file(out)
    for k, v in module.sampling_denoiser().net.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
