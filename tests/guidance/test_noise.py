"""The samplers' draws on another device than their generator's (guidance.noise), without a GPU.

torch refuses a CPU generator's draw on CUDA ("Expected a 'cuda' device type for generator"); on a CPU-only machine
nothing refuses it. `strict_generators` makes torch's draws refuse it everywhere, and the meta device stands for the
GPU: a sampler that draws with `device=x.device` fails here as it would on CUDA, one that draws on the generator's
device and moves the noise passes. Plus: the draw helper gives exactly what the draw it replaced gave on the CPU, and
a guider moves the networks it holds."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from guidance.denoiser import Denoiser
from guidance.guided import GuidedDenoiser
from guidance.guiders import ClassifierGuidance, build_guider
from guidance.guiders.gfcg import GFCG
from guidance.noise import standard_normal
from guidance.parameterization import Prediction
from guidance.samplers import ddim_step, sample
from guidance.schedules import VPCosine

META = torch.device("meta")  # stands for a GPU: tensors live there, CPU generators cannot draw there


@pytest.fixture
def strict_generators(monkeypatch):
    """torch.randn / rand / randint / randn_like / rand_like / normal refuse a generator whose device is not the one the
    draw is made on, as CUDA does for a CPU generator."""
    def strict(draw):
        def checked(*args, generator=None, **kwargs):
            if generator is not None:
                like = next((a for a in args if isinstance(a, torch.Tensor)), None) if draw.__name__.endswith("_like") \
                    else None
                where = torch.device(kwargs.get("device") or (like.device if like is not None else "cpu"))
                if where != generator.device:
                    raise RuntimeError(f"Expected a '{where.type}' device type for generator but found "
                                       f"'{generator.device.type}'")
            return draw(*args, generator=generator, **kwargs)
        return checked

    for name in ("randn", "rand", "randint", "randn_like", "rand_like", "normal"):
        monkeypatch.setattr(torch, name, strict(getattr(torch, name)))


def test_strict_generators_refuse_a_cpu_generator_drawing_elsewhere(strict_generators):
    """The check can fail: the draw the samplers used to make is refused."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(2, 3, device=META)
    with pytest.raises(RuntimeError, match="device type for generator"):
        torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
    assert standard_normal(x.shape, g, x.device, x.dtype).device == META


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_standard_normal_is_the_generators_draw_on_the_cpu(dtype):
    shape = (3, 1, 4, 4)
    want = torch.randn(shape, generator=torch.Generator().manual_seed(5), device="cpu", dtype=dtype)
    got = standard_normal(shape, torch.Generator().manual_seed(5), "cpu", dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    torch.manual_seed(7)
    want = torch.randn(shape, dtype=dtype)
    torch.manual_seed(7)
    assert torch.equal(standard_normal(shape, None, "cpu", dtype), want)  # no generator: the device's global one


class Halve(nn.Module):
    def forward(self, x, t, cond):
        return 0.5 * x


def test_ancestral_ddim_draws_on_the_generators_device(strict_generators):
    x = torch.zeros(2, 1, 4, 4, device=META)
    a = torch.full((2, 1, 1, 1), 0.8, device=META)
    pred = Prediction.from_x0(torch.zeros_like(x), x, a, (1 - a**2).sqrt())
    out = ddim_step(pred, x, torch.full((2,), 0.3, device=META), VPCosine(), eta=1.0,
                    generator=torch.Generator().manual_seed(0))
    assert out.device == META and out.shape == x.shape


def test_a_guided_sampling_loop_with_eta_runs_on_another_device(strict_generators):
    guided = GuidedDenoiser(Denoiser(Halve(), VPCosine(), "eps"), build_guider("cfg"))
    guided.denoiser.net.null_cond = lambda c: c
    noise = torch.zeros(2, 1, 4, 4, device=META)
    cond = torch.zeros(2, dtype=torch.long, device=META)
    x = sample(guided, noise, cond, 2.0, steps=3, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert x.device == META and x.shape == noise.shape


class Logits(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(16, 3)

    def forward(self, x, *time_and_labels):
        return self.head(x.flatten(1))


@pytest.mark.parametrize("bound", [False, True])
def test_a_guider_moves_the_networks_it_holds(bound):
    """Classifier guidance's classifier (a module, or a bound method of one), GFCG's inside a wrapper."""
    for wrap in (lambda c: ClassifierGuidance(c), lambda c: build_guider("rescale", inner=GFCG(c))):
        net = Logits()
        guider = wrap(net.forward if bound else net)
        assert guider.to(META) is guider
        assert all(p.device == META for p in net.parameters())
    assert build_guider("cfg").to(META).describe() == build_guider("cfg").describe()  # nothing to move
