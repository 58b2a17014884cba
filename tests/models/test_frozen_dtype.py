"""Frozen weights in bfloat16 (models/frozen_dtype.py) under a fake score: the frozen network computes what the same
network cast to bfloat16 by hand computes, trainable weights (LoRA, a full copy) stay float32 and get float32
gradients, gradients reach float32 inputs, text condition dicts are cast, bad names are refused."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from guidance.denoiser import Denoiser
from losses.dmd import fake_score_loss
from models.discriminator import DiscriminatorHead, discriminator_logits, feature_channels
from models.fake_score import FakeScore
from models.frozen_dtype import frozen_dtype_of, run_frozen_in
from tests.models.test_fake_score import batch, randomise_lora, tiny_teacher

BF16 = torch.bfloat16


def test_lora_base_in_bfloat16_is_the_network_cast_by_hand_and_lora_stays_float32():
    teacher = tiny_teacher()
    reference = copy.deepcopy(teacher.net)
    fake = FakeScore(teacher, "lora", rank=4, frozen_dtype=BF16)
    dtypes = {n: p.dtype for n, p in fake.net.named_parameters()}
    assert all((d == torch.float32) == ("lora_" in n) for n, d in dtypes.items())
    x, t, c = batch()
    with torch.no_grad():
        hand = Denoiser(_Cast(copy.deepcopy(reference).to(BF16)), teacher.schedule, "v")(x, t, c).x0
        ours = fake.teacher(x, t, c).x0
        full = Denoiser(reference, teacher.schedule, "v")(x, t, c).x0
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, hand, rtol=0, atol=0)
    assert (ours - full).abs().max() < 0.05 * full.abs().max()  # bfloat16 rounding, not a different network
    assert torch.equal(fake(x, t, c).x0, ours)  # LoRA B = 0: the fake score starts as the (bfloat16) teacher


class _Cast(torch.nn.Module):
    """The reference: a network cast whole to bfloat16 by hand, its input cast on the way in, output to float32."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, c, **kwargs):
        return self.net(x.to(BF16), t, c, **kwargs).float()

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.net, name)


def test_lora_gradients_are_float32_and_reach_a_float32_input():
    fake = FakeScore(tiny_teacher(), "lora", rank=4, frozen_dtype=BF16)
    randomise_lora(fake)
    x, t, c = batch()
    loss = fake_score_loss(fake, x, c, t, torch.randn_like(x)).mean()
    loss.backward()
    grads = [p.grad for n, p in fake.net.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for n, p in fake.net.named_parameters() if "lora_" not in n)
    xg = x.clone().requires_grad_(True)  # the generator's GAN term: through the frozen network to its sample
    fake.teacher(xg, t, c).x0.square().mean().backward()
    assert xg.grad is not None and xg.grad.dtype == torch.float32 and xg.grad.abs().sum() > 0


def test_copy_mode_keeps_the_copy_in_float32_and_the_teacher_in_bfloat16():
    teacher = tiny_teacher()
    reference = copy.deepcopy(teacher.net)
    fake = FakeScore(teacher, "copy", frozen_dtype=BF16)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in fake.net.parameters())
    assert all(p.dtype == BF16 and not p.requires_grad for p in fake.teacher.net.parameters())
    x, t, c = batch()
    with torch.no_grad():
        assert torch.equal(fake(x, t, c).x0, Denoiser(reference, teacher.schedule, "v")(x, t, c).x0)
        assert fake.teacher(x, t, c).x0.dtype == torch.float32


def test_discriminator_reads_bfloat16_features_in_float32():
    fake = FakeScore(tiny_teacher(), "lora", rank=4, frozen_dtype=BF16)
    x, t, c = batch()
    ch = feature_channels(fake.teacher, "unet.mid_block", (1, 8, 8), c[:1])
    head = DiscriminatorHead(ch, 16)
    xg = x.clone().requires_grad_(True)
    logits = discriminator_logits(head, fake.teacher, "unet.mid_block", xg, t, c)
    assert logits.dtype == torch.float32 and logits.shape == (4,)
    logits.sum().backward()
    assert xg.grad.abs().sum() > 0 and all(p.grad is not None for p in head.parameters())


def test_text_condition_dicts_are_cast(tiny_sd_folder):
    from models.text_unet import TextConditionalUNet

    net = TextConditionalUNet(str(tiny_sd_folder("sd15"))).requires_grad_(False).eval()
    reference = copy.deepcopy(net)
    run_frozen_in(net, BF16)
    assert all(p.dtype == BF16 for p in net.parameters())
    x, cond = torch.randn(2, net.unet.config.in_channels, 8, 8), _cond(reference, 2)
    t = torch.tensor([10.0, 700.0])
    with torch.no_grad():
        out = net(x, t, cond)
        hand = reference.to(BF16)(x.to(BF16), t, {k: v.to(BF16) for k, v in cond.items()}).float()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, hand, rtol=0, atol=0)


def _cond(net, b: int) -> dict:
    null = net.conditioner.null_batch(1)
    g = torch.Generator().manual_seed(3)
    return {k: torch.randn(b, *v.shape[1:], generator=g) for k, v in null.items()}


def test_float32_is_a_no_op_and_bad_names_say_what_to_use():
    net = tiny_teacher().net
    assert run_frozen_in(net, torch.float32) is net and not net._forward_pre_hooks
    with pytest.raises(ValueError, match="bfloat16"):
        frozen_dtype_of("bf16")
    run_frozen_in(net, BF16)
    with pytest.raises(ValueError, match="already"):
        run_frozen_in(net, BF16)


def test_a_half_precision_frozen_network_on_a_cpu_says_once_what_it_costs(monkeypatch):
    import models.frozen_dtype as frozen

    monkeypatch.setattr(frozen, "_WARNED_CPU", set())
    net = run_frozen_in(tiny_teacher().net, BF16)
    x, t, c = batch()
    with pytest.warns(UserWarning, match="on a CPU use frozen_dtype: float32"):
        net(x, t, c)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net(x, t, c)  # once per process
