"""The class-conditional UNet adapter (null class, label dropout, diffusers round trip) and EMA."""
from __future__ import annotations

import pytest
import torch

from models.adapters import NULL_LABEL, ClassConditionalUNet
from models.ema import EMA

TINY = dict(num_classes=10, sample_size=8, in_channels=1, block_out_channels=(16, 32),
            attention_levels=(False, True), layers_per_block=1, norm_num_groups=8)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return ClassConditionalUNet(**TINY).eval()


def test_output_shape_and_null_label_is_the_extra_class(net):
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0.0, 10.0, 500.0, 999.0])
    labels = torch.tensor([0, 3, NULL_LABEL, 9])
    y = net(x, t, labels)
    assert y.shape == x.shape
    direct = net.unet(x, t, class_labels=torch.tensor([0, 3, 10, 9])).sample
    torch.testing.assert_close(y, direct, rtol=0, atol=0)
    assert net.unet.config.num_class_embeds == 11


def test_null_cond_and_drop_cond():
    net = ClassConditionalUNet(**TINY)
    labels = torch.arange(10).repeat(100)
    assert (net.null_cond(labels) == NULL_LABEL).all()
    assert torch.equal(net.drop_cond(labels, 0.0), labels)
    dropped = net.drop_cond(labels, 0.25, torch.Generator().manual_seed(0))
    frac = (dropped == NULL_LABEL).float().mean().item()
    assert 0.2 < frac < 0.3
    kept = dropped != NULL_LABEL
    assert torch.equal(dropped[kept], labels[kept])


def test_from_unet_round_trip_through_diffusers(net, tmp_path):
    from diffusers import UNet2DModel

    net.unet.save_pretrained(tmp_path / "unet")
    again = ClassConditionalUNet.from_unet(UNet2DModel.from_pretrained(tmp_path / "unet")).eval()
    x, t, c = torch.randn(3, 1, 8, 8), torch.tensor([5.0, 50.0, 900.0]), torch.tensor([1, NULL_LABEL, 7])
    torch.testing.assert_close(again(x, t, c), net(x, t, c), rtol=0, atol=0)
    assert again.num_classes == 10


@pytest.mark.parametrize("bad, needle", [
    (dict(attention_levels=(False,)), "one entry per level"),
    (dict(norm_num_groups=5), "must divide"),
    (dict(num_classes=0), "num_classes"),
])
def test_bad_config_is_refused(bad, needle):
    with pytest.raises(ValueError, match=needle):
        ClassConditionalUNet(**{**TINY, **bad})


def test_ema_follows_the_documented_update():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    w0 = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # n = 0: d = min(0.9, 1/10) = 0.1
    torch.testing.assert_close(ema.module.weight, 0.1 * w0 + 0.9 * model.weight)
    for _ in range(100):
        ema.update(model)
    torch.testing.assert_close(ema.module.weight, model.weight, atol=1e-4, rtol=0)
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert int(ema.num_updates) == 101
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.0)


def test_pag_pass_equals_diffusers_identity_self_attention_processor(net):
    """perturb="pag" on the class UNet = diffusers' PAGIdentitySelfAttnProcessor2_0 (the processor of its PAG
    pipelines: a batch [original | perturbed], identity attention map on the second half) on the mid block."""
    from diffusers.models.attention_processor import PAGIdentitySelfAttnProcessor2_0

    torch.manual_seed(1)
    x, t, labels = torch.randn(3, 1, 8, 8), torch.tensor([5.0, 300.0, 900.0]), torch.tensor([1, NULL_LABEL, 7])
    with torch.no_grad():
        plain, perturbed = net(x, t, labels), net(x, t, labels, perturb="pag")
        reference = net.unet.mid_block.attentions[0]
        saved = reference.processor
        reference.processor = PAGIdentitySelfAttnProcessor2_0()
        try:
            both = net.unet(torch.cat([x, x]), t.repeat(2), class_labels=torch.tensor([1, 10, 7]).repeat(2)).sample
        finally:
            reference.processor = saved
    torch.testing.assert_close(perturbed, both[3:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, both[:3], rtol=1e-5, atol=1e-5)
    assert (perturbed - plain).abs().max() > 1e-3  # the perturbation changes the output
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, labels), plain, rtol=0, atol=0)  # processors restored


def test_pag_guider_on_the_class_unet_adds_the_perturbed_difference(net):
    from guidance.denoiser import Denoiser
    from guidance.guided import GuidedDenoiser
    from guidance.guiders import build_guider
    from guidance.schedules import VPCosine

    torch.manual_seed(2)
    den = Denoiser(net, VPCosine(), "v")
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([0.4, 0.7]), torch.tensor([2, 5])
    guided = GuidedDenoiser(den, build_guider("pag", pag_scale=2.0))
    with torch.no_grad():
        out = guided(x, t, labels, 3.0).x0
        c, u = den(x, t, labels).x0, den(x, t, net.null_cond(labels)).x0
        p = den(x, t, labels, perturb="pag").x0
    torch.testing.assert_close(out, u + 3.0 * (c - u) + 2.0 * (c - p), rtol=1e-5, atol=1e-5)
    assert (p - c).abs().max() > 1e-4
    assert guided.nfe == 3  # per sample: cond + uncond + the perturbed pass


def test_pag_bad_layers_and_perturbations_say_what_exists():
    net = ClassConditionalUNet(**TINY, pag_layers=["up_blocks.9"])
    x, t, labels = torch.randn(1, 1, 8, 8), torch.tensor([1.0]), torch.tensor([0])
    with pytest.raises(ValueError, match="mid_block.attentions.0"):
        net(x, t, labels, perturb="pag")
    with pytest.raises(NotImplementedError, match="'pag' perturbation only"):
        net(x, t, labels, perturb="seg")
