"""Guider cost on CPU: network evaluations per sample and step, and sampling time per step relative to
the bare network passes each guider needs. `python -m bench.guidance [--steps 10 --repeats 5]`.

Two networks: the exact Gaussian-mixture "net" of tests/guidance/gmm.py (cheap, so guider overhead
shows) and a small class-conditional diffusers UNet2DModel (random weights; cost is what matters).
Relative time = (time per sampling step) / (NFE per step x time of one bare network forward on the
same batch); below 1 when branches share a batched forward, above 1 for guider overhead (classifier
backward passes, projections, sequential branches). PAG's perturbed pass on the UNet replaces the mid block's
self-attention map by the identity (models.pag_attention); the exact Gaussian-mixture net answers its perturbed
pass with a widened mixture (tests/guidance/gmm.py).
Autoguidance's weak network is the main one at half width, so its ratio counts a cheaper second pass.
`python -m bench` runs this as part of its speed table. One torch thread by default: on a shared 2-core
machine more threads oversubscribe and timings scatter by 10x.
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
from torch import nn

from guidance.denoiser import Denoiser
from guidance.guided import GuidedDenoiser
from guidance.guiders import build_guider
from guidance.samplers import sample
from guidance.schedules import RectifiedFlow
from models.pag_attention import perturbed_self_attention

NUM_CLASSES = 10


class UNetNet(nn.Module):
    """diffusers UNet2DModel as net(x, net_time, labels) -> flow velocity; label -1 is the null class."""

    def __init__(self, channels=(32, 64), size: int = 16):
        super().__init__()
        from diffusers import UNet2DModel

        self.unet = UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=channels,
                                layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                num_class_embeds=NUM_CLASSES + 1, attention_head_dim=8)

    def forward(self, x, net_time, cond, perturb=None):
        labels = torch.where(cond < 0, torch.full_like(cond, NUM_CLASSES), cond)
        with perturbed_self_attention(self.unet, ["mid"]) if perturb else nullcontext():
            return self.unet(x, net_time, class_labels=labels).sample

    def null_cond(self, cond):
        return torch.full_like(cond, -1)


class TinyClassifier(nn.Module):
    """Conv classifier: (x) or (x_t, t, labels) -> logits [B, NUM_CLASSES]; time is ignored."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(16, NUM_CLASSES))

    def forward(self, x, t=None, labels=None):
        return self.body(x)


def networks(size: int):
    """{name: (main net, weak net, image shape)}."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.guidance.gmm import GaussianMixture, GMMNet

    shape = (3, size, size)
    gmm = GaussianMixture.random(num_classes=NUM_CLASSES, per_class=2, shape=shape, dtype=torch.float32)
    sched = RectifiedFlow()
    return {
        "gmm (exact)": (GMMNet(gmm, sched, "flow"), GMMNet(gmm.widened(1.3), sched, "flow"), shape),
        "unet2d (32,64)": (UNetNet((32, 64), size), UNetNet((16, 32), size), shape),
    }


def configs(shape):
    """(row label, guider, GuidedDenoiser kwargs incl. whether it needs the weak network)."""
    target = torch.zeros(shape)
    clf = TinyClassifier().eval()
    loss = lambda x0: 0.5 * ((x0 - target) ** 2).flatten(1).sum(1)  # noqa: E731
    rows = [
        ("conditional", build_guider("conditional"), {}),
        ("cfg", build_guider("cfg"), {}),
        ("cfg, sequential branches", build_guider("cfg"), {"batch_branches": False}),
        ("rescale(cfg)", build_guider("rescale", phi=0.7), {}),
        ("perp_neg (2 negatives)", build_guider("perp_neg", neg_weights=[1.0, 0.5]), {}),
        ("cfg_pp", build_guider("cfg_pp", lam=0.6), {}),
        ("apg", build_guider("apg"), {}),
        ("interval(cfg)", build_guider("interval", sigma_lo=0.3, sigma_hi=5.0), {}),
        ("adaptive (gamma 0.99)", build_guider("adaptive", gamma=0.99), {}),
        ("autoguidance", build_guider("autoguidance"), {"weak": True}),
        ("cfg_zero_star (K=1)", build_guider("cfg_zero_star", zero_init_steps=1), {}),
        ("classifier", build_guider("classifier", classifier=clf), {}),
        ("gfcg", build_guider("gfcg", classifier=clf), {}),
        ("flowchef(conditional)", build_guider("flowchef", loss=loss, step_size=0.1), {}),
        ("pag", build_guider("pag", pag_scale=2.0), {}),
    ]
    return rows


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.no_grad()
def measure(label, net, weak, shape, steps: int = 8, repeats: int = 5, batch: int = 8) -> dict:
    """Guider timings for one network: {"network", "batch", "steps", "repeats", "bare_ms", "rows"}, each row
    {"guider", "nfe", "step_ms": [per repeat], "rel": [per repeat]}. Repeats run round-robin over the guiders,
    and every timed sampling run is paired with a bare-forward timing taken just before it, so load from
    other processes shifts both alike."""
    sched = RectifiedFlow()
    den, weak_den = Denoiser(net.eval(), sched, "flow"), Denoiser(weak.eval(), sched, "flow")
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(batch, *shape, generator=g)
    labels = torch.arange(batch) % NUM_CLASSES
    negs = [(labels + 1) % NUM_CLASSES, (labels + 2) % NUM_CLASSES]
    nt = sched.net_time(torch.full((batch,), 0.5))
    bare_pass = lambda: net(noise, nt, labels)  # noqa: E731
    bare_pass()  # warm-up
    runs = []
    for name, guider, kw in configs(shape):
        guided = GuidedDenoiser(den, guider, weak=weak_den if kw.get("weak") else None,
                                batch_branches=kw.get("batch_branches", True))
        neg = negs if guider.name == "perp_neg" else None
        run = (lambda gd=guided, n=neg: sample(gd, noise, labels, w=3.0, steps=steps, sampler="ddim", neg_cond=n))
        run()  # warm-up
        guided.reset_nfe()
        runs.append({"guider": name, "guided": guided, "run": run, "step_ms": [], "rel": [], "nfe": []})
    for _ in range(repeats):
        for r in runs:
            bare = min(timed(bare_pass) for _ in range(3))
            step = timed(r["run"]) / steps
            nfe = r["guided"].nfe / steps  # per sample and step
            r["guided"].reset_nfe()
            r["step_ms"].append(1e3 * step)
            r["nfe"].append(nfe)
            r["rel"].append(step / (nfe * bare))
    bare_ms = 1e3 * min(timed(bare_pass) for _ in range(5))
    rows = [{"guider": r["guider"], "nfe": statistics.mean(r["nfe"]), "step_ms": r["step_ms"], "rel": r["rel"]}
            for r in runs]
    return {"network": label, "batch": batch, "steps": steps, "repeats": repeats, "bare_ms": bare_ms, "rows": rows}


def markdown(result: dict) -> str:
    """One Markdown table for one `measure` result."""
    lines = [f"### {result['network']}: batch {result['batch']}, {result['steps']} DDIM steps, "
             f"{result['repeats']} repeats, bare forward {result['bare_ms']:.2f} ms", "",
             "| guider | NFE / sample / step | ms / step (median) | rel. to bare passes: median | min | max |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        rel = r["rel"]
        lines.append(f"| {r['guider']} | {r['nfe']:.2f} | {statistics.median(r['step_ms']):.2f} | "
                     f"{statistics.median(rel):.2f} | {min(rel):.2f} | {max(rel):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="sampling steps per run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per guider (median, min, max)")
    p.add_argument("--batch", type=int, default=8, help="samples per batch")
    p.add_argument("--size", type=int, default=16, help="image side (3 x size x size)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 by default: on a shared 2-core machine more threads oversubscribe)")
    p.add_argument("--dry-run", action="store_true", help="print the configuration and exit")
    args = p.parse_args(argv)
    if args.dry_run:
        print(vars(args))
        return
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    for label, (net, weak, shape) in networks(args.size).items():
        print(markdown(measure(label, net, weak, shape, args.steps, args.repeats, args.batch)))
        print()


if __name__ == "__main__":
    main()
