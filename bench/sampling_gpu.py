"""`bench/sampling_gpu.sh` (`python -m bench.sampling_gpu`): `sample` and `evaluate` with --device cuda and --dtype
bfloat16 / float16 on tiny models, checked against the CPU in float32, prepared for a session with a GPU (about a
minute, the tiny models included; bench/scale_gpu.sh runs it first).

    bench/sampling_gpu.sh                      # -> bench/results/sampling_gpu.{md,json}; exit 1 when a check fails
    python -m bench.sampling_gpu --device cpu --teacher T.ckpt --pipeline SD15 --no-fid   # the same on the CPU (tests)

Models: the tiny digits teacher (tests/configs/tiny_teacher.yaml, fitted here on the CPU) and a tiny SD 1.5 folder
(models.tiny_pipelines, random weights), or --teacher / --pipeline. Each is sampled with DDIM eta = 1 (the sampler's
own draws from a CPU generator: the draw that failed on CUDA before guidance.noise) on the CPU in float32, then on
--device in float32, bfloat16 and float16 (GPU only) and with no --device (the default: cuda when there is one);
each row's max |difference| over max |CPU sample| must stay under its limit (float32: 1e-2, TF32 convolutions; half
precision: 5e-2). `evaluate` runs on the CPU and on --device (float32, bfloat16), with FID from random Inception
weights unless --no-fid: its FD must agree within 2 % (float32) and 10 % (half precision), FID (random weights: the
metric's device path, not a meaningful value) must be finite. Last, one module is placed on --device in bfloat16 and
every network, the prompt encoder, the VAE and the feature network's copy are checked to be there.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

TINY_TEACHER = Path(__file__).resolve().parents[1] / "tests" / "configs" / "tiny_teacher.yaml"
LIMITS = {"float32": 1e-2, "bfloat16": 5e-2, "float16": 5e-2}
METRIC_LIMITS = {"float32": 0.02, "bfloat16": 0.10, "float16": 0.10}
SAMPLE = {"class": ["--num-per-class", "2"], "text": ["--prompt", "a cat", "--prompt", "the dog", "--num-per-prompt", "2"]}


def build_models(root: Path, teacher: str | None, pipeline: str | None) -> dict[str, Path]:
    """The class checkpoint and the text folder (built under `root` when not given)."""
    from train.cli import main

    if teacher is None:
        run = root / "teacher"
        if not (run / "checkpoints" / "last.ckpt").is_file():
            main(["fit", "--config", str(TINY_TEACHER), "--trainer.default_root_dir", str(run)])
        teacher = run / "checkpoints" / "last.ckpt"
    if pipeline is None:
        from models.tiny_pipelines import save_tiny_pipeline

        pipeline = root / "sd15"
        if not (pipeline / "model_index.json").is_file():
            save_tiny_pipeline(pipeline, "sd15")
    return {"class": Path(teacher), "text": Path(pipeline)}


def fid_files(root: Path) -> tuple[Path, Path]:
    """Random FID Inception weights (He-initialised: the metric's code path on the device, not real FID values) and
    8 reference images."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from train.evaluation.inception import FIDInceptionV3

    weights, images = root / "inception_random.safetensors", root / "fid_reference"
    if not weights.is_file():
        torch.manual_seed(0)
        net = FIDInceptionV3()
        for m in net.modules():  # torch's default init makes every image's features the same; He's keeps them apart
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        save_file(net.state_dict(), str(weights))
    if not images.is_dir():
        images.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
    return weights, images


def timed(argv: list[str]) -> float:
    from train.cli import main

    start = time.perf_counter()
    main(argv)
    return time.perf_counter() - start


def sample_rows(models: dict[str, Path], out: Path, device: str) -> list[dict]:
    import numpy as np

    rows = []
    for kind, ckpt in models.items():
        base = ["sample", "--ckpt", str(ckpt), "--steps", "4", "--eta", "1", *SAMPLE[kind]]
        runs = [("cpu", "float32")] + [(device, d) for d in ("float32", "bfloat16", "float16")
                                       if not (d == "float16" and device == "cpu")] + [(None, "float32")]
        ref = None
        for dev, dtype in runs:
            folder = out / f"{kind}-{dev or 'default'}-{dtype}"
            seconds = timed(base + ["--out", str(folder), "--dtype", dtype] + ([] if dev is None else ["--device", dev]))
            images = np.load(folder / "samples.npz")["images"]
            if ref is None:
                ref, scale = images, float(np.abs(images).max())
                continue
            diff = float(np.abs(images - ref).max()) / scale
            rows.append({"model": kind, "command": "sample", "device": dev or "(default)", "dtype": dtype,
                         "measure": "max |x - x_cpu| / max |x_cpu|", "value": diff, "limit": LIMITS[dtype],
                         "ok": bool(np.isfinite(diff) and diff < LIMITS[dtype]), "seconds": seconds})
    return rows


def evaluate_rows(models: dict[str, Path], out: Path, device: str, fid: tuple[Path, Path] | None) -> list[dict]:
    rows = []
    for kind, ckpt in models.items():
        flags = ["--steps", "4", "--scales", "2", "--batch-size", "16"]
        flags += ["--num-per-class", "3"] if kind == "class" else ["--prompt", "a cat", "--prompt", "the dog",
                                                                   "--num-per-prompt", "3"]
        if fid is not None:
            flags += ["--fid-weights", str(fid[0]), "--fid-reference", str(fid[1])]
        measures = ["fd", "fid"] if kind == "class" else ["fid"]
        ref = None
        for dev, dtype in (("cpu", "float32"), (device, "float32"), (device, "bfloat16")):
            path = out / f"{kind}-eval-{dev}-{dtype}.json"
            seconds = timed(["evaluate", "--ckpt", str(ckpt), "--out", str(path), "--device", dev, "--dtype", dtype,
                             *flags])
            got = json.loads(path.read_text())["rows"][0]
            if ref is None:
                ref = got
                continue
            compared = [m for m in measures if ref.get(m) is not None]
            if not compared:  # nothing to compare without FID: that it ran
                rows.append({"model": kind, "command": "evaluate", "device": dev, "dtype": dtype, "measure": "ran",
                             "value": None, "limit": None, "ok": True, "seconds": seconds})
            for m in compared:  # FD is checked; FID from random weights only has to be finite (its value is shown)
                rel = abs(got[m] - ref[m]) / max(abs(ref[m]), 1e-12)
                limit = METRIC_LIMITS[dtype] if m == "fd" else None
                ok = math.isfinite(got[m]) and (limit is None or rel < limit)
                rows.append({"model": kind, "command": "evaluate", "device": dev, "dtype": dtype,
                             "measure": f"|{m} - {m}_cpu| / {m}_cpu ({m}_cpu {ref[m]:.4g}, here {got[m]:.4g})",
                             "value": rel, "limit": limit, "ok": bool(ok), "seconds": seconds})
    return rows


def placement_rows(models: dict[str, Path], device: str) -> list[dict]:
    """Where a module placed on `device` in bfloat16 keeps everything sampling uses."""
    import torch

    from models.vae import shared_vae
    from train.evaluation.classifier import feature_network_on, load_feature_network
    from train.evaluation.labelled import labelled_data
    from train.runtime.checkpoint import load_method
    from train.runtime.devices import diffusion_networks, place_for_sampling, sampling_device

    want = sampling_device(device)
    same = lambda t: t.device.type == want.type and (want.index is None or t.device.index == want.index)  # noqa: E731
    rows = []
    for kind, ckpt in models.items():
        module = place_for_sampling(load_method(ckpt), want, torch.bfloat16)
        checks = {"module parameters and buffers": all(same(t) for t in [*module.parameters(), *module.buffers()]),
                  "diffusion networks in bfloat16": all(p.dtype == torch.bfloat16 for n in diffusion_networks(module)
                                                        for p in n.parameters())}
        if kind == "text":
            checks["prompt encoder (float32)"] = all(same(p) and p.dtype == torch.float32
                                                     for p in module.conditioner.encoder.parameters())
            checks["VAE (float32)"] = all(same(p) and p.dtype == torch.float32
                                          for p in shared_vae(module.vae_folder).parameters())
        else:
            net = feature_network_on(load_feature_network(labelled_data(None)), module.device)
            checks["feature network copy"] = all(same(p) for p in net.parameters())
        rows += [{"model": kind, "command": "placement", "device": device, "dtype": "bfloat16", "measure": what,
                  "value": None, "limit": None, "ok": ok, "seconds": None} for what, ok in checks.items()]
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.sampling_gpu", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="the device checked against the CPU (default cuda)")
    p.add_argument("--out", default="bench/results", help="folder of sampling_gpu.{md,json}")
    p.add_argument("--work", default="runs/bench-sampling-gpu", help="where the tiny models and samples are written")
    p.add_argument("--teacher", default=None, help="a class checkpoint instead of fitting the tiny digits teacher")
    p.add_argument("--pipeline", default=None, help="a text pipeline folder instead of the tiny SD 1.5 one")
    p.add_argument("--no-fid", action="store_true", help="evaluate without FID (Inception at 299 px is slow on a CPU)")
    args = p.parse_args(argv)
    os.environ.setdefault("GUIDEDISTILL_CACHE", str(Path(args.work) / "cache"))  # the feature network, trained once
    import torch

    from bench import report
    from bench.report import Table
    from train.runtime.devices import sampling_device

    sampling_device(args.device)  # a device this machine lacks: one line now
    work, t0 = Path(args.work), time.time()
    work.mkdir(parents=True, exist_ok=True)
    models = build_models(work, args.teacher, args.pipeline)
    rows = sample_rows(models, work / "samples", args.device)
    rows += evaluate_rows(models, work / "metrics", args.device, None if args.no_fid else fid_files(work))
    rows += placement_rows(models, args.device)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    table = Table(f"sample / evaluate on {args.device}{f' ({gpu})' if gpu else ''} against the CPU in float32",
                  [("model", "model"), ("command", "command"), ("device", "--device"), ("dtype", "--dtype"),
                   ("measure", "measure"), ("value", "value"), ("limit", "limit"), ("ok", "ok"),
                   ("seconds", "wall (s)")], rows,
                  ["sample: DDIM eta = 1, 4 steps (the class model: 2 per class; the text model: 2 per prompt)",
                   "evaluate: 4 steps at w = 2 (3 per class / per prompt)" + ("" if args.no_fid else
                                                                               "; FID from random Inception weights")])
    meta = {"command": "bench/sampling_gpu.sh " + shlex.join(sys.argv[1:] if argv is None else argv),
            "machine": {**report.machine(), "gpu": gpu}, "seconds": round(time.time() - t0), "records": rows}
    print(report.write_part(Path(args.out), "sampling_gpu", [table], meta), flush=True)
    failed = [r for r in rows if not r["ok"]]
    if failed:
        for r in failed:
            print(f"FAILED: {r['model']} {r['command']} --device {r['device']} --dtype {r['dtype']}: {r['measure']} "
                  f"{r['value']} (limit {r['limit']})", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
