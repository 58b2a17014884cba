"""Speed: per method, the time of one training step over the bare network passes that step needs; per
guider, sampling time per step over its bare forwards; batched vs sequential CFG branches.

The bare passes of a method are read off a real training step: forward hooks on every network of the
module (the outermost `ConditionalNetwork`s: the teacher, student, generator, fake score; a LoRA fake
score's adapters-off calls are the teacher's) record each call's inputs, grad mode, which weights
required grad, LoRA adapter state and whether a gradient flowed back through its output. Replaying
those calls one by one (forward, and backward with a unit output gradient where the step had one) is the
cost of the networks alone; everything else in a step is overhead: targets and losses, guidance
arithmetic, the optimizer and EMA updates, Lightning's loop, logging. Each timed step is followed by a
timed replay in the same process, so load shifts both alike; the ratio is taken per pair and reported
as median, min and max over the repeats. Step time runs from `on_train_batch_start` to
`on_train_batch_end` (data loading of the in-memory digits is not in it).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from bench.report import Table, spread

SPEED_METHODS = ("teacher", "guidance_distillation", "dmd_lora", "erasure")


def _map(obj: Any, fn) -> Any:
    """Apply fn to every tensor in nested lists/tuples/dicts."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(v, fn) for v in obj)
    return obj


@dataclass
class NetworkCall:
    """One recorded call of a network during a training step, replayable on its own."""

    name: str
    module: nn.Module
    args: tuple
    kwargs: dict
    grad: bool                   # grad mode of the call
    params_grad: list[bool]      # requires_grad of the network's weights at the call
    lora_off: list[bool]         # peft layers' `_disable_adapters` at the call
    batch: int
    backward: bool = False       # a gradient flowed back through the output
    complete: bool = False       # the forward returned (a discriminator's feature tap aborts it)
    out_shape: tuple = field(default_factory=tuple)

    def replay(self) -> None:
        """Forward with the recorded inputs and state; backward with a unit output gradient if the step had one."""
        from models.fake_score import lora_layers

        params, layers = list(self.module.parameters()), lora_layers(self.module)
        saved_p, saved_l = [p.requires_grad for p in params], [m._disable_adapters for m in layers]
        for p, flag in zip(params, self.params_grad):
            p.requires_grad_(flag)
        for m, flag in zip(layers, self.lora_off):
            m._disable_adapters = flag
        try:
            args = _map(self.args, lambda t: t.clone().requires_grad_(True) if t.requires_grad else t)
            with torch.set_grad_enabled(self.grad):
                out = self.module(*args, **self.kwargs)
                if self.backward:
                    out.backward(torch.ones_like(out))
        finally:
            for p, flag in zip(params, saved_p):
                p.requires_grad_(flag)
                p.grad = None
            for m, flag in zip(layers, saved_l):
                m._disable_adapters = flag

    def describe(self) -> str:
        return f"{'fwd+bwd' if self.backward else 'fwd'} x{self.batch}" + ("" if self.complete else " (aborted)")

    @property
    def label(self) -> str:
        """The network's attribute path; a LoRA network called with its adapters off is the frozen teacher."""
        return f"{self.name} (adapters off)" if self.lora_off and all(self.lora_off) else self.name


def networks(module: nn.Module) -> dict[nn.Module, str]:
    """The outermost ConditionalNetworks of a method module -> their attribute path (EMA copies excluded)."""
    from models.adapters import ConditionalNetwork

    found: dict[nn.Module, str] = {}
    for name, m in module.named_modules():
        if isinstance(m, ConditionalNetwork) and m not in found and ".ema" not in f".{name}" and not name.startswith("ema"):
            if not any(name.startswith(f"{outer}.") for outer in found.values()):
                found[m] = name
    return found


class PassRecorder:
    """Records the calls of a module's networks (see the module docstring) between start() and stop()."""

    def __init__(self, module: nn.Module):
        self.nets = networks(module)
        self.calls: list[NetworkCall] = []
        self._depth, self._open, self._handles = 0, [], []

    def start(self) -> None:
        for net, name in self.nets.items():
            self._handles.append(net.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self._handles.append(net.register_forward_hook(self._post, with_kwargs=True, always_call=True))

    def stop(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pre(self, name: str):
        def hook(module, args, kwargs):
            from models.fake_score import lora_layers

            self._depth += 1
            if self._depth > 1:  # a network called inside another (a w-student's base): part of the outer call
                self._open.append(None)
                return
            keep = lambda t: t.detach().clone().requires_grad_(t.requires_grad)  # noqa: E731
            x = args[0] if args else next(iter(kwargs.values()))
            call = NetworkCall(name, module, _map(args, keep), _map(kwargs, keep), torch.is_grad_enabled(),
                               [p.requires_grad for p in module.parameters()],
                               [m._disable_adapters for m in lora_layers(module)], int(x.shape[0]))
            self.calls.append(call)
            self._open.append(call)
        return hook

    def _post(self, module, args, kwargs, output):
        self._depth -= 1
        call = self._open.pop()
        if call is None:
            return
        call.complete = isinstance(output, Tensor)
        if call.complete:
            call.out_shape = tuple(output.shape)
            if output.requires_grad:
                def flowed(grad, call=call):
                    call.backward = True
                output.register_hook(flowed)


class StepVsBare(L.Callback):
    """Times `repeats` training steps after `warmup` ones; after each timed step, times the replay of the bare
    network passes recorded during the last warm-up step."""

    def __init__(self, warmup: int, repeats: int):
        self.warmup, self.repeats = warmup, repeats
        self.step_s: list[float] = []
        self.bare_s: list[float] = []
        self.recorder: PassRecorder | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        from bench.methods import prebuild_banks

        prebuild_banks(pl_module)
        self.recorder = PassRecorder(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup - 1:
            self.recorder.start()
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        dt = time.perf_counter() - self.t0
        if batch_idx == self.warmup - 1:
            self.recorder.stop()
            self.replay()  # warm the replay path too
        if batch_idx >= self.warmup:
            self.step_s.append(dt)
            t0 = time.perf_counter()
            self.replay()
            self.bare_s.append(time.perf_counter() - t0)

    def replay(self) -> None:
        for call in self.recorder.calls:
            call.replay()


def time_method(method: str, net: str, warmup: int, repeats: int) -> dict:
    """One method's row: step and bare-pass times per repeat, their ratios, and the recorded passes."""
    from bench.methods import METHODS, build

    module, data = build(method, net)
    timer = StepVsBare(warmup, repeats)
    trainer = L.Trainer(max_steps=warmup + repeats, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(module, data)
    calls = timer.recorder.calls
    passes: dict[str, list[str]] = {}
    for c in calls:
        passes.setdefault(c.label, []).append(c.describe())
    ratio = [s / b for s, b in zip(timer.step_s, timer.bare_s)]
    return {"method": METHODS[method][0], "key": method, "net": net,
            "passes": "; ".join(f"{n}: {', '.join(p)}" for n, p in passes.items()),
            "step_ms": 1e3 * statistics.median(timer.step_s), "bare_ms": 1e3 * statistics.median(timer.bare_s),
            "ratio": statistics.median(ratio), "ratio_min": min(ratio), "ratio_max": max(ratio),
            "repeats": spread(ratio)["n"], "step_s": timer.step_s, "bare_s": timer.bare_s,
            "partial_calls": sum(not c.complete for c in calls)}


@torch.no_grad()
def cfg_batching(net_name: str, batches: list[int], steps: int, repeats: int) -> list[dict]:
    """CFG sampling with the two branches in one batched forward vs two sequential forwards, per batch size,
    and the batched forward again with oneDNN (mkldnn) convolutions off; each repeat times the three back to
    back. Random digits-size UNet, VP cosine schedule, v-prediction.

    Why the third: on CPU, PyTorch convolves a batch of one with its native kernel but a batch of two or
    more with oneDNN, whose per-call cost on 8x8 maps is about twice the native one; batching the two CFG
    branches of a single sample therefore also switches kernels and gains little, unless oneDNN is off."""
    from bench.methods import net_config
    from guidance.denoiser import Denoiser
    from guidance.guided import GuidedDenoiser
    from guidance.guiders import build_guider
    from guidance.samplers import sample
    from guidance.schedules import VPCosine
    from models.adapters import ClassConditionalUNet

    torch.manual_seed(0)
    net = ClassConditionalUNet(**net_config(net_name)["init_args"]).eval()
    den = Denoiser(net, VPCosine(), "v")
    rows = []
    for b in batches:
        noise, labels = torch.randn(b, 1, 8, 8), torch.arange(b) % 10
        batched, sequential = (GuidedDenoiser(den, build_guider("cfg"), batch_branches=k) for k in (True, False))

        def go(g, onednn: bool = True):
            with torch.backends.mkldnn.flags(enabled=onednn):
                sample(g, noise, labels, 2.0, steps, "ddim")

        runs = {"batched": lambda: go(batched), "sequential": lambda: go(sequential),
                "batched_native": lambda: go(batched, onednn=False)}
        for run in runs.values():
            run()  # warm-up
        times = {k: [] for k in runs}
        for _ in range(repeats):
            for k, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[k].append(1e3 * (time.perf_counter() - t0) / steps)
        speedup = [s / t for s, t in zip(times["sequential"], times["batched"])]
        native = [s / t for s, t in zip(times["sequential"], times["batched_native"])]
        rows.append({"batch": b, "batched_ms": statistics.median(times["batched"]),
                     "sequential_ms": statistics.median(times["sequential"]), "speedup": statistics.median(speedup),
                     "speedup_min": min(speedup), "speedup_max": max(speedup),
                     "native_ms": statistics.median(times["batched_native"]), "native_speedup": statistics.median(native),
                     "native_min": min(native), "native_max": max(native)})
    return rows


def run(net: str, warmup: int, repeats: int, guider_steps: int, guider_repeats: int, cfg_batches: list[int],
        log=print) -> tuple[list[Table], list[dict]]:
    """The speed tables and the goals they answer."""
    from bench import guidance

    rows = []
    for method in SPEED_METHODS:
        log(f"[bench] speed: {method} on the {net} network")
        rows.append(time_method(method, net, warmup, repeats))
    methods = Table(f"Training step vs bare network passes ({net} network, {repeats} timed steps after {warmup} "
                    f"warm-up, median [min, max] of per-step ratios)",
                    [("method", "method"), ("passes", "network passes in one step (batch)"), ("step_ms", "step (ms)"),
                     ("bare_ms", "bare passes (ms)"), ("ratio", "step / bare"), ("ratio_min", "min"),
                     ("ratio_max", "max")], rows,
                    ["bare passes: the step's network calls replayed alone (forward, and backward where a gradient "
                     "flowed); the rest of the step is targets, losses, optimizer, EMA and Lightning overhead",
                     "DMD runs 4 fake-score updates + 1 generator update per step (configs/digits/dmd.yaml without "
                     "the GAN term, whose aborted feature forward the replay cannot reproduce)"])
    tables = [methods]
    log("[bench] speed: guiders")
    guider_rows = []
    for label, (g_net, weak, shape) in guidance.networks(16).items():
        res = guidance.measure(label, g_net, weak, shape, guider_steps, guider_repeats, 8)
        for r in res["rows"]:
            rel = spread(r["rel"])
            guider_rows.append({"network": label, "guider": r["guider"], "nfe": r["nfe"],
                                "step_ms": statistics.median(r["step_ms"]), "ratio": rel["median"],
                                "ratio_min": rel["min"], "ratio_max": rel["max"], "bare_ms": res["bare_ms"]})
    tables.append(Table(f"Sampling time per step over bare forwards, per guider (batch 8, {guider_steps} DDIM steps, "
                        f"{guider_repeats} repeats; `python -m bench.guidance`)",
                        [("network", "network"), ("guider", "guider"), ("nfe", "NFE / sample / step"),
                         ("step_ms", "ms / step"), ("ratio", "step / (NFE x bare)"), ("ratio_min", "min"),
                         ("ratio_max", "max")], guider_rows,
                        ["below 1: branches share one batched forward; above 1: guider work beyond the forwards",
                         "gmm: the exact Gaussian-mixture network of tests/guidance/gmm.py (guider overhead shows); "
                         "unet2d: a random 3x16x16 class-conditional UNet2DModel"]))
    log("[bench] speed: batched vs sequential CFG")
    cfg_rows = cfg_batching(net, cfg_batches, guider_steps, guider_repeats)
    tables.append(Table(f"CFG with batched vs sequential branches ({net} network, {guider_steps} DDIM steps, "
                        f"{guider_repeats} repeats)",
                        [("batch", "batch"), ("sequential_ms", "sequential (ms / step)"),
                         ("batched_ms", "batched (ms / step)"), ("speedup", "speed-up"), ("speedup_min", "min"),
                         ("speedup_max", "max"), ("native_ms", "batched, oneDNN off (ms / step)"),
                         ("native_speedup", "speed-up"), ("native_min", "min"), ("native_max", "max")], cfg_rows,
                        ["speed-up: sequential time over batched time, per repeat (median, min, max)",
                         "oneDNN off: `torch.backends.mkldnn.flags(enabled=False)` around sampling; PyTorch runs a "
                         "batch of one through its native convolution and larger batches through oneDNN, which "
                         "costs about twice as much per call on these 8x8 maps (torch.profiler), so batching a "
                         "single sample's two branches also switches to the slower kernel"]))
    worst = max(rows, key=lambda r: r["ratio"])
    small = cfg_rows[0]
    goals = [{"goal": "training-step overhead over bare passes (worst method)", "target": "<= 1.10x",
              "measured": f"{worst['ratio']:.2f}x ({worst['key']}; others: "
                          + ", ".join(f"{r['key']} {r['ratio']:.2f}x" for r in rows if r is not worst) + ")",
              "met": worst["ratio"] <= 1.10},
             {"goal": f"batched CFG vs sequential branches at batch {small['batch']}", "target": ">= 1.3x faster",
              "measured": f"{small['speedup']:.2f}x [{small['speedup_min']:.2f}, {small['speedup_max']:.2f}]; "
                          f"with oneDNN off {small['native_speedup']:.2f}x; at batch "
                          + ", ".join(f"{r['batch']}: {r['speedup']:.2f}x" for r in cfg_rows[1:]),
              "met": small["speedup"] >= 1.3}]
    return tables, goals
