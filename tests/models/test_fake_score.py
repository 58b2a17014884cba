"""Tests of models/fake_score.py (LoRA and copy fake scores) and models/discriminator.py (feature tap, head)."""
from __future__ import annotations

import copy

import pytest
import torch

from guidance.denoiser import Denoiser
from guidance.schedules import VPCosine
from models.adapters import ClassConditionalUNet
from models.discriminator import DiscriminatorHead, FeatureTap, discriminator_logits, feature_channels
from models.fake_score import FakeScore, lora_layers

torch.set_num_threads(1)


def tiny_teacher(seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    net = ClassConditionalUNet(num_classes=10, sample_size=8, block_out_channels=(16, 32),
                               attention_levels=(False, True), layers_per_block=1, norm_num_groups=8)
    return Denoiser(net, VPCosine(), "v").requires_grad_(False).eval()


def batch(n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.rand(n, generator=g), torch.tensor([0, 3, -1, 9][:n])


def randomise_lora(fake: FakeScore) -> None:
    with torch.no_grad():
        for name, p in fake.net.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)


def test_lora_fake_score_starts_equal_to_the_teacher_and_adapters_off_is_the_teacher_exactly():
    teacher = tiny_teacher()
    reference = copy.deepcopy(teacher.net)  # the teacher before LoRA went in
    fake = FakeScore(teacher, "lora", rank=4)
    x, t, c = batch()
    want = Denoiser(reference, teacher.schedule, "v")(x, t, c).x0
    with torch.no_grad():
        assert torch.equal(fake(x, t, c).x0, want)  # B = 0 at init
        randomise_lora(fake)
        on = fake(x, t, c).x0
        assert not torch.allclose(on, want, atol=1e-3)
        assert torch.equal(fake.teacher(x, t, c).x0, want)  # the teacher view: adapters off, bit-exact
        with fake.adapters(False):
            assert torch.equal(fake(x, t, c).x0, want)
        assert torch.equal(fake(x, t, c).x0, on)  # state restored after the block


def test_toggling_adapters_leaves_requires_grad_and_nesting_alone():
    fake = FakeScore(tiny_teacher(), "lora", rank=2)
    before = {n: p.requires_grad for n, p in fake.net.named_parameters()}
    assert any(before.values()) and not all(before.values())
    assert all(("lora_" in n) == rg for n, rg in before.items())
    layers = lora_layers(fake.net)
    assert len(layers) > 10
    with fake.adapters(False):
        assert all(m.disable_adapters for m in layers)
        with fake.adapters(True):
            assert not any(m.disable_adapters for m in layers)
        assert all(m.disable_adapters for m in layers)
    assert not any(m.disable_adapters for m in layers)
    assert {n: p.requires_grad for n, p in fake.net.named_parameters()} == before


def test_lora_trains_only_adapters_and_shares_the_teacher_weights_once():
    teacher = tiny_teacher()
    n_base = sum(p.numel() for p in teacher.net.parameters())
    fake = FakeScore(teacher, "lora", rank=4)
    trainable = fake.trainable_parameters()
    assert 0 < sum(p.numel() for p in trainable) < 0.5 * n_base
    keys = list(fake.state_dict())
    assert not any(k.startswith("teacher.") for k in keys)  # the teacher view registers no weights
    assert sum(p.numel() for p in fake.parameters()) == n_base + sum(p.numel() for p in trainable)
    # a gradient step on the fake score changes the fake score, never the teacher
    x, t, c = batch()
    want = fake.teacher(x, t, c).x0.detach()
    opt = torch.optim.SGD(trainable, lr=0.1)
    fake(x, t, c).x0.pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        assert torch.equal(fake.teacher(x, t, c).x0, want)
        assert not torch.allclose(fake(x, t, c).x0, want)


def test_copy_fake_score_is_independent_and_the_teacher_stays_frozen():
    teacher = tiny_teacher()
    fake = FakeScore(teacher, "copy")
    assert fake.net is not teacher.net and fake.teacher is teacher
    assert all(p.requires_grad for p in fake.net.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    x, t, c = batch()
    with torch.no_grad():
        assert torch.equal(fake(x, t, c).x0, teacher(x, t, c).x0)
        next(fake.net.parameters()).add_(1.0)
        assert not torch.equal(fake(x, t, c).x0, teacher(x, t, c).x0)
    fake.train()
    assert fake.net.training and not teacher.training and not teacher.net.training


def test_lora_fake_score_keeps_the_shared_network_in_eval_mode():
    fake = FakeScore(tiny_teacher(), "lora", rank=2)
    fake.train()
    assert not fake.net.training


def test_bad_mode_and_missing_targets_are_rejected():
    with pytest.raises(ValueError, match="lora, copy"):
        FakeScore(tiny_teacher(), "full")
    with pytest.raises(ValueError, match="lora_targets"):
        FakeScore(tiny_teacher(), "lora", target_modules=["no_such_layer"])


# ---------------------------------------------------------------------------------- discriminator

def test_feature_tap_captures_the_mid_block_and_stops_the_forward():
    teacher = tiny_teacher()
    x, t, c = batch()
    out_calls = []
    handle = teacher.net.unet.conv_out.register_forward_hook(lambda *a: out_calls.append(1))
    with FeatureTap(teacher.net, "unet.mid_block") as tap:
        feats = tap.run(teacher.raw, x, t, c)
    assert feats.shape == (4, 32, 4, 4)
    assert out_calls == []  # the decoder never ran
    assert not teacher.net.unet.mid_block._forward_hooks  # hook removed
    teacher.raw(x, t, c)
    assert out_calls == [1]
    handle.remove()
    with pytest.raises(ValueError, match="unet.mid_block"):
        FeatureTap(teacher.net, "unet.nothing")


def test_discriminator_logits_per_sample_with_gradients_to_inputs_and_head():
    fake = FakeScore(tiny_teacher(), "lora", rank=2)
    ch = feature_channels(fake.teacher, "unet.mid_block", (1, 8, 8), torch.zeros(1, dtype=torch.long))
    assert ch == 32
    head = DiscriminatorHead(ch, hidden=16, time_conditioned=True)
    x, t, c = batch()
    x.requires_grad_(True)
    for features_from in (fake, fake.teacher):
        logits = discriminator_logits(head, features_from, "unet.mid_block", x, t, c)
        assert logits.shape == (4,)
        gx, gw = torch.autograd.grad(logits.sum(), [x, head.out.weight])
        assert gx.abs().sum() > 0 and gw.abs().sum() > 0
    # time conditioning: the same features at another t give another logit
    with FeatureTap(fake.teacher.net, "unet.mid_block") as tap:
        feats = tap.run(fake.teacher.raw, x, t, c)
    assert not torch.allclose(head(feats, t), head(feats, 1 - t))
    assert torch.allclose(DiscriminatorHead(ch, 16, time_conditioned=False)(feats).shape[0] * torch.ones(1), torch.tensor([4.0]))
