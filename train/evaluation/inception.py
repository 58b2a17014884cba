"""The FID Inception network: InceptionV3 as in the TensorFlow graph FID was defined with (pool3 features), built here
so that its weights load from the user's local file with torch.load(weights_only=True) or safetensors.

FID (Heusel et al. 2017, arXiv 1706.08500, sec. "Frechet Inception Distance") is defined on the 2048 pool3
activations of the 2015-12-05 TensorFlow Inception graph. Its PyTorch conversions (pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth`, torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`) are state
dicts of the module below: InceptionV3 (Szegedy et al. 2016, arXiv 1512.00567, Fig. 5-7 and Table 1) with the
graph's quirks that make its features differ from torchvision's Inception3: average pools that ignore the zero
padding (`count_include_pad=False`), a MAX pool in the last block's pool branch, BatchNorm eps 1e-3, 1008 logits,
and the input resized to 299x299 with TensorFlow 1.x bilinear resampling (no half-pixel offset) from 8-bit pixels
scaled as (x - 128) / 128. The layer names equal those files' keys.

torch-fidelity (which torchmetrics' default FID extractor subclasses) unpickles that file with weights_only=False
and needs torchvision; this module needs neither, and its output equals torch-fidelity's FeatureExtractorInceptionV3
'2048' features for the same weights.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_HELP = (f"the FID Inception weights ({WEIGHTS_NAME} from pytorch-fid, or torch-fidelity's "
                f"weights-inception-2015-12-05-6726825d.pth: the same state dict); pass it with --fid-weights PATH "
                f"(config field fid_weights); nothing is downloaded")
INPUT_SIZE = 299


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, the TF graph's) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: Tensor) -> Tensor:
    """TF's 3x3 stride-1 SAME average pool: the padded zeros are not counted."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Szegedy et al. 2016, Fig. 5): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv2d(cin, 48, 1), BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = BasicConv2d(64, 96, 3, padding=1), BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
    """35 -> 17 grid reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = BasicConv2d(64, 96, 3, padding=1), BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


def _row(cin: int, cout: int) -> BasicConv2d:  # a 1x7 convolution
    return BasicConv2d(cin, cout, (1, 7), padding=(0, 3))


def _col(cin: int, cout: int) -> BasicConv2d:  # a 7x1 convolution
    return BasicConv2d(cin, cout, (7, 1), padding=(3, 0))


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Fig. 6): 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1."""

    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = BasicConv2d(cin, c, 1), _row(c, c), _col(c, 192)
        self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3 = BasicConv2d(cin, c, 1), _col(c, c), _row(c, c)
        self.branch7x7dbl_4, self.branch7x7dbl_5 = _col(c, c), _row(c, 192)
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    """17 -> 8 grid reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv2d(cin, 192, 1), BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = BasicConv2d(cin, 192, 1), _row(192, 192)
        self.branch7x7x3_3, self.branch7x7x3_4 = _col(192, 192), BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b7 = x
        for i in range(1, 5):
            b7 = getattr(self, f"branch7x7x3_{i}")(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with expanded filter banks (Fig. 7): 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.
    max_pool: the FID graph's last block (Mixed_7c) pools with MAX where Mixed_7b averages."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1, self.branch3x3dbl_2 = BasicConv2d(cin, 448, 1), BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pool)], 1)


def resize_bilinear_tf1(x: Tensor, size: int) -> Tensor:
    """[B, C, H, W] float -> [B, C, size, size]: TensorFlow 1.x resize_bilinear(align_corners=False), the resize of
    the FID graph: output pixel i samples the input at i * (in / out) (no half-pixel offset; torch's bilinear with
    align_corners=False samples at (i + 1/2) in/out - 1/2), the upper neighbour clamped at the border."""
    def grid(n_in: int):
        pos = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n_in / size, dtype=torch.float32)
        lo = pos.long()
        return lo, (lo + 1).clamp_max(n_in - 1), (pos - lo.float()).to(x.dtype)

    (y0, y1, dy), (x0, x1, dx) = grid(x.shape[-2]), grid(x.shape[-1])
    top, bottom = x[..., y0, :], x[..., y1, :]
    row_top = top[..., x0] + (top[..., x1] - top[..., x0]) * dx
    row_bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * dx
    return row_top + (row_bottom - row_top) * dy[:, None]


class FIDInceptionV3(nn.Module):
    """uint8 images [B, 3, H, W] (0..255, RGB, any size) -> pool3 features [B, 2048] float32.

    Weights: `from_file(path)`; a freshly built module is randomly initialised (tests only). Always in eval mode
    (BatchNorm uses the stored statistics), never trained. `num_features` tells torchmetrics the feature size.
    """

    num_features = 2048

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the graph's logits (unused by FID; kept so the weight files load strictly)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> "FIDInceptionV3":
        return super().train(False)  # a fixed feature extractor: BatchNorm always uses the stored statistics

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "FIDInceptionV3":
        """The network with the weights of `path` (.pth/.pt: torch.load(weights_only=True); .safetensors)."""
        net = cls()
        state = load_inception_state(path)
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        mine = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
        missing, unexpected = sorted(mine - state.keys()), sorted(state.keys() - mine)
        if missing or unexpected:
            raise ValueError(f"{path} is not the FID Inception state dict ({len(missing)} weights missing, e.g. "
                             f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}); it must be "
                             f"{WEIGHTS_HELP.split('; ')[0]}")
        bad = [k for k, v in net.state_dict().items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
        if bad:
            raise ValueError(f"{path}: {len(bad)} weights have other shapes than the FID Inception's (e.g. {bad[0]}); "
                             f"it must be {WEIGHTS_HELP.split('; ')[0]}")
        net.load_state_dict(state, strict=False)  # only the num_batches_tracked counters may be absent
        return net

    def forward(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"FIDInceptionV3 takes uint8 RGB images [B, 3, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}; convert with train.evaluation.reference.to_uint8")
        x = images.float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = resize_bilinear_tf1(x, INPUT_SIZE)
        x = (x - 128) / 128  # the graph's input scaling of 8-bit pixels
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # pool3: [B, 2048]


def load_inception_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict in `path` (torch.load(weights_only=True), or safetensors for *.safetensors); one clear error
    naming the file that is needed when it is missing or cannot be read."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"FID Inception weights {str(path)!r} do not exist; FID needs {WEIGHTS_HELP}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or a pickle that needs more than tensors
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(f"FID Inception weights {str(path)!r} cannot be read ({reason}); FID needs {WEIGHTS_HELP}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} does not hold a state dict of tensors; FID needs {WEIGHTS_HELP}")
    return state
