"""Parameter selection: ESD-x / ESD-u / all pick exactly the intended parameters, rank-1 LoRA adapters are the only
trainable ones and switching them off gives the frozen model back, SalUn masks keep exactly the top-k%."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models.adapters import ClassConditionalUNet
from models.param_select import (SaliencyMask, adapters_disabled, add_lora, conditioning_parameter_names,
                                 lora_state_dict, lora_target_modules, merge_lora, saliency_masks, select_parameters,
                                 set_adapters)

torch.set_num_threads(1)


def tiny_unet():
    torch.manual_seed(0)
    return ClassConditionalUNet(num_classes=10, block_out_channels=(16, 32), attention_levels=(False, True),
                                layers_per_block=1, norm_num_groups=8)


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 1, 8, 8, generator=g), torch.tensor([10.0, 250.0, 600.0, 990.0]), torch.tensor([0, 3, -1, 9])


def test_esd_x_trains_the_class_embedding_only():
    net = tiny_unet()
    assert select_parameters(net, "esd-x") == ["unet.class_embedding.weight"]
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["unet.class_embedding.weight"]
    assert net.unet.class_embedding.weight.shape == (11, 64)  # 10 classes + the null row


def test_esd_u_trains_everything_but_the_class_embedding_and_all_trains_everything():
    net = tiny_unet()
    names = [n for n, _ in net.named_parameters()]
    assert select_parameters(net, "esd-u") == [n for n in names if n != "unet.class_embedding.weight"]
    assert not net.unet.class_embedding.weight.requires_grad
    assert select_parameters(net, "all") == names
    assert select_parameters(net, "esd-x") == ["unet.class_embedding.weight"]  # selections can be re-applied


def test_cross_attention_is_the_conditioning_of_text_unets_and_unknown_networks_are_refused():
    class TextBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn1, self.attn2, self.ff = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    block = nn.Sequential(TextBlock(), TextBlock())
    assert conditioning_parameter_names(block) == ["0.attn2.weight", "0.attn2.bias", "1.attn2.weight", "1.attn2.bias"]
    assert select_parameters(block, "esd-u") == [n for n, _ in block.named_parameters() if ".attn2." not in n]
    with pytest.raises(ValueError, match="neither a class embedding"):
        select_parameters(nn.Linear(2, 2), "esd-x")
    with pytest.raises(ValueError, match="unknown parameter selection"):
        select_parameters(tiny_unet(), "esd-z")


def test_rank_one_lora_adapters_are_the_only_trainable_parameters_and_off_equals_the_frozen_model():
    net = tiny_unet()
    frozen = copy.deepcopy(net).eval()
    targets = lora_target_modules(net)
    assert "conv_in" in targets and "down_blocks.1.attentions.0.to_q" in targets and "conv_out" in targets
    trainable = add_lora(net, rank=1)
    assert trainable == [n for n, p in net.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(targets) and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(min(p.shape[:2]) == 1 for n, p in net.named_parameters() if ".lora_A." in n or ".lora_B." in n)
    x, t, c = inputs()
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, c), frozen(x, t, c), rtol=0, atol=0)  # B = 0 at init
        for n, p in net.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.1)
        assert not torch.allclose(net(x, t, c), frozen(x, t, c), atol=1e-4)
        with adapters_disabled(net):
            torch.testing.assert_close(net(x, t, c), frozen(x, t, c), rtol=0, atol=0)
        assert not torch.allclose(net(x, t, c), frozen(x, t, c), atol=1e-4)  # back on after the context
        set_adapters(net, False)
        torch.testing.assert_close(net(x, t, c), frozen(x, t, c), rtol=0, atol=0)
    set_adapters(net, True)
    merged = merge_lora(net)  # a plain network again, computing what the adapters computed
    assert not [n for n, _ in merged.named_parameters() if "lora_" in n]
    assert list(merged.state_dict()) == list(frozen.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(x, t, c), net(x, t, c), rtol=1e-4, atol=1e-5)
    sd = lora_state_dict(net)
    assert len(sd) == 2 * len(targets) and all("lora_" in k for k in sd)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        set_adapters(frozen, True)


@pytest.mark.parametrize("top_k", [0.01, 0.1, 0.37, 1.0])
def test_saliency_masks_keep_exactly_the_top_k_fraction_by_absolute_gradient(top_k):
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(7, 5, generator=g), torch.randn(13, generator=g) * 3, torch.randn(2, 3, 4, generator=g) * 0.1]
    masks = saliency_masks(grads, top_k)
    assert [m.shape for m in masks] == [gr.shape for gr in grads] and all(m.dtype == torch.bool for m in masks)
    flat_g = torch.cat([gr.abs().flatten() for gr in grads])
    flat_m = torch.cat([m.flatten() for m in masks])
    assert int(flat_m.sum()) == round(top_k * flat_g.numel())
    if top_k < 1:
        assert flat_g[flat_m].min() > flat_g[~flat_m].max()  # one global threshold across tensors
    with pytest.raises(ValueError, match="fraction"):
        saliency_masks(grads, 0.0)


def test_saliency_mask_hooks_zero_the_gradients_of_unselected_weights():
    lin = nn.Linear(6, 4)
    params = list(lin.parameters())
    sal = SaliencyMask(params)
    grads = [torch.arange(24.0).reshape(4, 6), torch.tensor([100.0, -0.5, 0.1, 50.0])]
    sal.fit(grads, 0.25)  # 7 of 28 entries: 100, 50 (bias) and 23..19 (weight)
    assert bool(sal.fitted) and sal.fraction() == pytest.approx(7 / 28)
    assert sal.mask_1.tolist() == [True, False, False, True]
    sal.attach()
    x = torch.randn(3, 6)
    lin(x).pow(2).sum().backward()
    raw_w = (2 * lin(x).detach()).T @ x
    torch.testing.assert_close(lin.weight.grad, raw_w * sal.mask_0)
    assert (lin.weight.grad[~sal.mask_0] == 0).all() and (lin.weight.grad[sal.mask_0] != 0).all()
    sal.detach()
    lin.zero_grad()
    lin(x).pow(2).sum().backward()
    assert (lin.weight.grad != 0).all()
    other = SaliencyMask(params)
    other.load_state_dict(sal.state_dict())  # masks are buffers: checkpoints keep them
    assert torch.equal(other.mask_0, sal.mask_0) and bool(other.fitted)
