"""A discriminator head on intermediate features of a diffusion network (the fake score or the frozen
teacher), read through a forward hook: one logit per noisy sample, optionally time-conditioned.

Where the features come from, per network (`default_feature_layer`):
- UNets (class-conditional UNet2DModel, text UNet2DConditionModel of SD 1.x/2.x/SDXL): the output of
  `unet.mid_block`, the bottleneck [B, C, h, w] (DMD2, arXiv 2405.14867, sec. 4.3);
- SD3 / Flux transformers: the image tokens' hidden states after the last transformer block (joint blocks for
  SD3, single blocks for Flux), read as the INPUT of `transformer.norm_out` ([B, N, D]: both networks hand only
  the image stream to their final norm), laid back on the token grid [B, D, h/p, w/p] (`feature_map`).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from guidance.denoiser import Denoiser


class _Stop(Exception):
    """Raised by the hook once the features are captured, so the rest of the network is not run."""


INPUT_SUFFIX = ":input"


def default_feature_layer(net: nn.Module) -> str:
    """The tapped layer of `net` (see the module docstring): "unet.mid_block" for UNets,
    "transformer.norm_out:input" for the SD3 / Flux transformer adapters."""
    return net.feature_layer  # the adapter's own (ConditionalNetwork.feature_layer); an AdaptersOff view passes it on


class FeatureTap:
    """Context manager that records the output (or the input) of `net.get_submodule(layer)` during a forward.

    net:   the network (an `AdaptersOff` view is unwrapped to its base network).
    layer: dotted submodule path, e.g. "unet.mid_block" (diffusers UNet2DModel's bottleneck); ending in
           ":input" ("transformer.norm_out:input") records the layer's first input instead of its output.
    stop:  abort the forward right after the layer (right before it for ":input"; the rest is not
           needed); the forward call must then be made through `tap.run(fn, *args)`.
    After the block, `features` holds the tapped tensor ([B, C, h, w] or tokens [B, N, D]) with its
    autograd graph; a tuple output gives its first element.
    """

    def __init__(self, net: nn.Module, layer: str, stop: bool = True):
        base = getattr(net, "_base", net)
        self.take_input = layer.endswith(INPUT_SUFFIX)
        path = layer[:-len(INPUT_SUFFIX)] if self.take_input else layer
        try:
            self.module = base.get_submodule(path)
        except AttributeError:
            raise ValueError(f"discriminator layer {layer!r} does not exist in {type(base).__name__}; give a dotted "
                             f"submodule path such as {default_feature_layer(base)!r} (':input' taps its input)") from None
        self.stop, self.features, self._handle = stop, None, None

    def _hook(self, module, inputs, output):
        self.features = output[0] if isinstance(output, tuple) else output
        if self.stop:
            raise _Stop

    def _pre_hook(self, module, args, kwargs):
        self.features = args[0] if args else next(iter(kwargs.values()))
        if self.stop:
            raise _Stop

    def __enter__(self) -> "FeatureTap":
        if self.take_input:
            self._handle = self.module.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        else:
            self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def run(self, fn, *args, **kwargs) -> Tensor:
        """Call fn(*args, **kwargs) (a network forward) and return the captured features."""
        try:
            fn(*args, **kwargs)
        except _Stop:
            pass
        if self.features is None:
            raise RuntimeError("the discriminator's feature layer was not called during the forward")
        return self.features


def feature_map(features: Tensor, size: tuple[int, int]) -> Tensor:
    """Tapped features as a map [B, C, h, w]: a map is returned as it is; tokens [B, N, D] of a patchified
    image of `size` (H, W) latent pixels (N = (H/p)(W/p) patches of p x p, raster order, as SD3's PatchEmbed
    and Flux's 2x2 packing lay them out) become [B, D, H/p, W/p]."""
    if features.ndim == 4:
        return features
    b, n, d = features.shape
    h, w = size
    p = math.isqrt(h * w // n)
    if p * p * n != h * w or h % p or w % p:
        raise ValueError(f"{n} feature tokens do not tile a {h}x{w} latent in square patches; tap a layer whose "
                         f"tokens are the image patches (e.g. 'transformer.norm_out:input')")
    return features.reshape(b, h // p, w // p, d).permute(0, 3, 1, 2)


def probe_condition(net: nn.Module) -> Any:
    """A one-sample condition for a probe forward of `net`: its conditioner's null condition (the null class, or the
    null text with a guidance-distilled Flux network's guidance input)."""
    return net.conditioner.null_batch(1)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of t [B] in [0, 1] (scaled to 0..1000), [B, dim] (Vaswani et al. 2017, sec. 3.5)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class DiscriminatorHead(nn.Module):
    """Features [B, C, h, w] (and t [B]) -> one logit per sample [B].

    GroupNorm-SiLU-Conv3x3 to `hidden` channels, plus (time_conditioned) a learned projection of the
    sinusoidal t-embedding added per channel, SiLU, global average pool, Linear -> logit (DMD2,
    arXiv 2405.14867, sec. 4.3: a small classification branch on the fake score's bottleneck).

    in_channels: feature channels of the tapped layer; hidden: head width; num_groups: GroupNorm groups
    (reduced to a divisor of in_channels when needed).
    """

    def __init__(self, in_channels: int, hidden: int = 64, time_conditioned: bool = True, num_groups: int = 8):
        super().__init__()
        groups = math.gcd(in_channels, num_groups) or 1
        self.norm = nn.GroupNorm(groups, in_channels)
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.time_proj = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)) if time_conditioned else None
        self.out = nn.Linear(hidden, 1)
        self.hidden = hidden

    def forward(self, features: Tensor, t: Tensor | None = None) -> Tensor:
        # contiguous: a frozen network's channels_last features (no grad) crash GroupNorm's backward on CPU
        # (torch 2.13: segmentation fault), the case of discriminator.features: teacher
        h = self.conv(nn.functional.silu(self.norm(features.float().contiguous())))
        if self.time_proj is not None:
            h = h + self.time_proj(timestep_embedding(t, self.hidden))[:, :, None, None]
        return self.out(nn.functional.silu(h).mean(dim=(2, 3))).squeeze(1)


def discriminator_logits(head: DiscriminatorHead, features_from: Denoiser, layer: str, x_t: Tensor, t: Tensor,
                         cond: Any) -> Tensor:
    """Logits [B] for noisy samples x_t [B, C, H, W] at times t [B] with condition `cond` (labels [B] or a text
    condition dict): the features of `layer` of the network in `features_from` (run only up to that layer, tokens
    laid on their grid by `feature_map`), through `head`. Gradients flow to x_t and to whichever of the feature
    network's weights require grad."""
    with FeatureTap(features_from.net, layer) as tap:
        feats = tap.run(features_from.raw, x_t, t, cond)
    return head(feature_map(feats, x_t.shape[-2:]), t)


@torch.no_grad()
def feature_channels(features_from: Denoiser, layer: str, sample_shape: tuple[int, ...], cond: Any) -> int:
    """Channels of `layer`'s feature map, found with one probe forward on a single zero sample of sample_shape
    (C, H, W) and condition `cond` ([1]-batch; `probe_condition` gives one)."""
    p = next(getattr(features_from.net, "_base", features_from.net).parameters())
    x = torch.zeros(1, *sample_shape, device=p.device, dtype=p.dtype)
    with FeatureTap(features_from.net, layer) as tap:
        feats = tap.run(features_from.raw, x, torch.full((1,), 0.5, device=p.device), cond)
    return int(feature_map(feats, x.shape[-2:]).shape[1])
