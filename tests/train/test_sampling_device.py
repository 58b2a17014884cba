"""`sample` and `evaluate` --device and --dtype (train.runtime.devices), on the CPU: the flags parse; a device this
machine lacks, or float16 on the CPU, is one line before anything loads; --device cpu samples exactly what the module
sampled where load_method leaves it (the code path before the flags); --dtype bfloat16 puts the diffusion networks
alone in bfloat16 and stays close to float32 on a class and a text model; the feature network follows the module's
device. bench/sampling_gpu.sh checks the same on CUDA."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from tests.conftest import cli_error
from train.cli import build_parser, main
from train.runtime.devices import diffusion_networks, place_for_sampling, sampling_device, sampling_dtype

META = torch.device("meta")


@pytest.fixture
def no_gpu(monkeypatch):
    """This machine as one without CUDA, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_the_flags_parse():
    parser = build_parser()
    for command in ("sample", "evaluate"):
        args = parser.parse_args([command, "--ckpt", "c.ckpt", "--out", "o"])
        assert (args.device, args.dtype) == (None, "float32")
        args = parser.parse_args([command, "--ckpt", "c.ckpt", "--out", "o", "--device", "cuda:1", "--dtype", "bfloat16"])
        assert (args.device, args.dtype) == ("cuda:1", "bfloat16")
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--ckpt", "c.ckpt", "--out", "o", "--dtype", "half"])


def test_a_device_this_machine_lacks_is_one_line_before_anything_loads(no_gpu, capsys, tmp_path):
    base = ["--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "out")]  # never read: the flags first
    for command in ("sample", "evaluate"):
        for device in ("cuda", "cuda:0"):
            err = cli_error(capsys, [command, *base, "--device", device])
            assert f"--device {device} is not available" in err and err.endswith("this machine has: cpu")
        assert "must be cpu, cuda or cuda:N, got 'gpu'" in cli_error(capsys, [command, *base, "--device", "gpu"])
        assert "MPS has no kernels for" in cli_error(capsys, [command, *base, "--device", "mps"])
        assert "float16 is for GPUs" in cli_error(capsys, [command, *base, "--dtype", "float16"])
    assert not (tmp_path / "out").exists()


def test_the_default_device_and_cuda_indices(monkeypatch, no_gpu):
    assert sampling_device(None) == torch.device("cpu") and sampling_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert sampling_device(None) == torch.device("cuda") and sampling_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="torch sees 1 CUDA device"):
        sampling_device("cuda:1")
    assert sampling_dtype("float16", torch.device("cuda")) == torch.float16
    assert sampling_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def _sample(tmp_path, name, ckpt, *flags) -> np.ndarray:
    main(["sample", "--ckpt", str(ckpt), "--out", str(tmp_path / name), *flags])
    return np.load(tmp_path / name / "samples.npz")["images"]


def _unplaced(ckpt, requests, **kwargs) -> torch.Tensor:
    """What `sample` computed before --device: the module where load_method leaves it, generate_images as cmd_sample
    calls it."""
    from train.evaluation.requests import generate_images
    from train.runtime.checkpoint import load_method

    return generate_images(load_method(ckpt), requests, progress=False, **kwargs)[0]


def test_device_cpu_samples_what_the_unplaced_module_sampled(tiny_teacher_ckpt, tmp_path):
    flags = ["--steps", "3", "--num-per-class", "1", "--eta", "1"]  # eta: the sampler's own draws too
    placed = _sample(tmp_path, "cpu", tiny_teacher_ckpt, *flags, "--device", "cpu")
    before = _unplaced(tiny_teacher_ckpt, list(range(10)), steps=3, eta=1.0)
    assert np.array_equal(placed, before.numpy())
    if not torch.cuda.is_available():
        assert np.array_equal(_sample(tmp_path, "default", tiny_teacher_ckpt, *flags), placed)


def test_bfloat16_casts_the_class_networks_alone_and_stays_close(tiny_teacher_ckpt, tmp_path):
    from train.runtime.checkpoint import load_method

    module = place_for_sampling(load_method(tiny_teacher_ckpt), "cpu", torch.bfloat16)
    nets = diffusion_networks(module)
    assert len(nets) == 2  # the teacher's network and its EMA copy
    assert all(p.dtype == torch.bfloat16 for net in nets for p in net.parameters())
    flags = ["--steps", "3", "--num-per-class", "1", "--eta", "1"]
    half = _sample(tmp_path, "bf16", tiny_teacher_ckpt, *flags, "--dtype", "bfloat16")
    full = _sample(tmp_path, "fp32", tiny_teacher_ckpt, *flags)
    assert half.dtype == np.float32 and np.array_equal(half, module.generate(list(range(10)), steps=3, eta=1.0)[0])
    assert not np.array_equal(half, full) and np.abs(half - full).max() < 0.05 * np.abs(full).max()


def test_bfloat16_casts_the_text_unet_alone_and_stays_close(t2i_workspace):
    """A tiny SD 1.5 folder: the UNet in bfloat16; text encoder, VAE, latents and the sampler's math in float32."""
    from models.vae import shared_vae
    from train.runtime.checkpoint import load_method

    folder = t2i_workspace.model("sd15")
    full = place_for_sampling(load_method(folder), "cpu")
    half = place_for_sampling(load_method(folder), "cpu", torch.bfloat16)
    (net,) = diffusion_networks(half)
    assert all(p.dtype == torch.bfloat16 for p in net.unet.parameters())
    assert all(p.dtype == torch.float32 for p in half.conditioner.encoder.parameters())
    assert all(p.dtype == torch.float32 for p in shared_vae(half.vae_folder).parameters())
    assert all(p.dtype == torch.float32 for net in diffusion_networks(full) for p in net.parameters())
    prompts = ["a cat", "the dog"]
    a, _ = full.generate(prompts, steps=3, eta=1.0)
    b, _ = half.generate(prompts, steps=3, eta=1.0)
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    images = half.samples_to_images(b)
    assert images.dtype == torch.float32 and (images - full.samples_to_images(a)).abs().max() < 0.1


def test_a_w_input_students_scale_embedding_stays_float32():
    """A guidance-distilled student (models.w_embedding): its UNet in bfloat16, the embedding of w in float32 (w = 7.3
    is not a bfloat16 number, and w_scale 1000 would turn its rounding into other phases), the result close."""
    from models.w_embedding import WConditionedNetwork
    from models.frozen_dtype import run_frozen_in
    from tests.models.test_w_embedding import inputs, tiny_unet

    student = WConditionedNetwork(tiny_unet())
    for p in student.w_embedding.parameters():
        torch.nn.init.normal_(p, std=0.1)  # a trained embedding: not the zero it starts at
    full = copy.deepcopy(student)
    (net,) = diffusion_networks(torch.nn.ModuleList([student]))
    assert net is student.base
    run_frozen_in(student.requires_grad_(False).base, torch.bfloat16, warn_cpu=False)
    assert all(p.dtype == torch.float32 for p in student.w_embedding.parameters())
    x, t, labels = inputs()
    cond = {"cond": labels, "w": torch.full((len(labels),), 7.3)}
    with torch.no_grad():
        a, b = full(x, t, cond), student(x, t, cond)
    assert b.dtype == torch.float32 and (a - b).abs().max() < 0.05 * a.abs().max()


def test_evaluate_in_bfloat16_runs_and_is_close(tiny_teacher_ckpt, tmp_path, classifier):
    flags = ["--steps", "3", "--num-per-class", "3", "--scales", "2"]
    rows = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / f"{dtype}.json"
        main(["evaluate", "--ckpt", str(tiny_teacher_ckpt), "--out", str(out), "--device", "cpu", "--dtype", dtype,
              *flags])
        rows[dtype] = json.loads(out.read_text())["rows"][0]
    assert abs(rows["bfloat16"]["fd"] - rows["float32"]["fd"]) < 0.1 * rows["float32"]["fd"]


def test_the_feature_network_runs_on_the_modules_device(classifier, monkeypatch):
    """A copy per device (load_feature_network's shared instance stays put), and the validation callback asks for
    the module's device."""
    from train.evaluation import callbacks
    from train.evaluation.classifier import feature_network_on

    assert feature_network_on(classifier, None) is classifier and feature_network_on(classifier, "cpu") is classifier
    copy = feature_network_on(classifier, META)
    assert feature_network_on(classifier, META) is copy and copy.data_digest == classifier.data_digest
    assert all(p.device == META for p in copy.parameters())
    assert all(p.device.type == "cpu" for p in classifier.parameters())

    seen = {}

    def evaluate_samples(images, labels, **kwargs):
        seen.update(kwargs)
        return {"fd": 1.0, "accuracy": 1.0, "precision": 1.0, "recall": 1.0, "nfe_per_sample": 2.0,
                "per_class_accuracy": [1.0] * 10}

    class Module:
        device = META
        conditioner = type("C", (), {"enumerate": staticmethod(lambda: list(range(10)))})()
        val_scale, val_steps = 2.0, 2

        def generate(self, labels, **kwargs):
            return torch.zeros(len(labels), 1, 8, 8), 2.0

        def val_sampling(self):
            return {}

        def log(self, *args, **kwargs):
            pass

    trainer = type("T", (), {"sanity_checking": False, "is_global_zero": False, "loggers": []})()
    monkeypatch.setattr("train.evaluation.evaluate_samples", evaluate_samples)
    cb = callbacks.SampleMetrics(num_per_class=1)
    cb.data = object()
    cb.on_validation_epoch_end(trainer, Module())
    assert seen["device"] == META
