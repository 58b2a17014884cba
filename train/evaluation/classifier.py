"""The evaluation classifier: a small CNN trained once, deterministically, on the embedded digits and cached."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

NUM_CLASSES = 10
FEATURE_DIM = 64

# Everything that decides the trained weights. Its hash names the cache file, so changing any entry
# (or RECIPE_VERSION when the code below changes) retrains instead of loading stale weights.
RECIPE_VERSION = 1
RECIPE: dict = {
    "version": RECIPE_VERSION,
    "arch": {"widths": [32, 64, 64], "feature_dim": FEATURE_DIM},
    "seed": 0,
    "threads": 1,               # CPU threads while training (float sums depend on it); the net is tiny
    "epochs": 30,
    "batch_size": 64,
    "lr": 3e-3,                 # peak of a one-cycle schedule (AdamW)
    "weight_decay": 1e-4,
    "label_smoothing": 0.05,
    "shift": 1,                 # random translation by up to this many pixels (background fill)
    "noise_std_max": 0.2,       # additive Gaussian noise with std ~ U(0, noise_std_max) per image
    "contrast": [0.8, 1.0],     # random ink scaling of (x + 1), keeps the background at -1
}


class DigitsClassifier(nn.Module):
    """Small CNN on 8x8 digits. Input x: [B, 1, 8, 8] in [-1, 1] (the data's pixel space).

    features(x) -> [B, feature_dim]: penultimate pre-activations, the space of FD and precision/recall.
    forward(x)  -> [B, 10] logits.
    """

    def __init__(self, widths: tuple[int, ...] | list[int] = (32, 64, 64), feature_dim: int = FEATURE_DIM,
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        w1, w2, w3 = widths
        self.body = nn.Sequential(
            nn.Conv2d(1, w1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w1, w2, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                    # 8x8 -> 4x4
            nn.Conv2d(w2, w3, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                    # 4x4 -> 2x2
            nn.Flatten(),
            nn.Linear(w3 * 4, feature_dim),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, num_classes))

    def features(self, x: Tensor) -> Tensor:
        """x: [B, 1, 8, 8] in [-1, 1] -> penultimate features [B, feature_dim], taken before the ReLU
        (post-ReLU features map blank images near real outliers, which fools k-NN precision)."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, 1, 8, 8] in [-1, 1] -> class logits [B, 10] (= head(features(x)))."""
        return self.head(self.body(x))


def recipe_hash(recipe: dict = RECIPE) -> str:
    """Short stable hash of a training recipe (names the cache file)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """`$GUIDEDISTILL_CACHE`, else `~/.cache/guidedistill`."""
    return Path(os.environ.get("GUIDEDISTILL_CACHE") or Path.home() / ".cache" / "guidedistill")


def cache_path(cache_dir: str | os.PathLike | None = None, recipe: dict = RECIPE) -> Path:
    """Where the weights trained by `recipe` live: <cache_dir>/digits_classifier-<recipe hash>.safetensors."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"digits_classifier-{recipe_hash(recipe)}.safetensors"


def _augment(x: Tensor, recipe: dict, gen: torch.Generator) -> Tensor:
    """Random shift (fill -1), ink contrast and Gaussian noise; x: [B, 1, 8, 8] in [-1, 1] -> same shape."""
    b, _, h, w = x.shape
    s = recipe["shift"]
    padded = F.pad(x, (s, s, s, s), value=-1.0)
    dy = torch.randint(0, 2 * s + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * s + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]                  # [B, h, 1]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]                  # [B, 1, w]
    x = padded[torch.arange(b)[:, None, None], 0, rows, cols][:, None]  # [B, 1, h, w]
    lo, hi = recipe["contrast"]
    scale = lo + (hi - lo) * torch.rand(b, 1, 1, 1, generator=gen)
    x = (x + 1.0) * scale - 1.0
    std = recipe["noise_std_max"] * torch.rand(b, 1, 1, 1, generator=gen)
    return x + std * torch.randn(x.shape, generator=gen)


@torch.no_grad()
def classifier_accuracy(model: DigitsClassifier, images: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy of `model` on images [N, 1, 8, 8] in [-1, 1] with labels [N]."""
    return (model(images).argmax(1) == labels).double().mean().item()


def train_digits_classifier(recipe: dict = RECIPE) -> DigitsClassifier:
    """Train (with grad enabled even when called under no_grad/inference_mode, e.g. from a validation hook).
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _train_digits_classifier(recipe)


def _train_digits_classifier(recipe: dict) -> DigitsClassifier:
    """Train a DigitsClassifier on the digits 'train' split, deterministically (same recipe, same
    machine and torch build -> bit-identical weights). Returns the model in eval mode. A few seconds on CPU.

    Randomness comes only from private generators seeded by the recipe (the global RNG is left as it was),
    the data order is a seeded permutation, and deterministic algorithms are enforced while training.
    """
    from data.digits import digits_tensors

    images, labels = digits_tensors("train")
    gen = torch.Generator().manual_seed(recipe["seed"])
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(recipe["threads"])  # fixed, so the weights do not depend on the machine's core count
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe["seed"])
            model = DigitsClassifier(**recipe["arch"])
        opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
        steps_per_epoch = len(images) // recipe["batch_size"]
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"],
                                                    total_steps=recipe["epochs"] * steps_per_epoch)
        model.train()
        for _ in range(recipe["epochs"]):
            order = torch.randperm(len(images), generator=gen)
            for i in range(steps_per_epoch):
                idx = order[i * recipe["batch_size"]:(i + 1) * recipe["batch_size"]]
                x = _augment(images[idx], recipe, gen)
                loss = F.cross_entropy(model(x), labels[idx], label_smoothing=recipe["label_smoothing"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    finally:
        torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
        torch.set_num_threads(prev_threads)
    return _freeze(model)


def _freeze(model: DigitsClassifier) -> DigitsClassifier:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _state_digest(state: dict[str, Tensor]) -> str:
    """sha256 over the tensors' names, shapes and bytes (stored in the file's metadata, checked on load)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_classifier(model: DigitsClassifier, path: str | os.PathLike, recipe: dict = RECIPE) -> None:
    """Write `model` as safetensors atomically (temp file in the same folder + os.replace), with the
    recipe and a digest of the weights in the metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"recipe": json.dumps(recipe, sort_keys=True), "sha256": _state_digest(state)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_classifier(path: str | os.PathLike, recipe: dict = RECIPE) -> DigitsClassifier:
    """Load weights written by `save_classifier` (safetensors only, nothing is unpickled).

    Raises ValueError when the file is unreadable, was trained by another recipe, or its weights do
    not match the digest stored with them.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise ValueError(f"cannot read classifier weights {path}: {e}") from e
    if meta.get("recipe") != json.dumps(recipe, sort_keys=True):
        raise ValueError(f"{path} was trained with a different recipe")
    if meta.get("sha256") != _state_digest(state):
        raise ValueError(f"{path}: weights do not match their stored digest (corrupt file)")
    model = DigitsClassifier(**recipe["arch"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit DigitsClassifier: {e}") from e
    return _freeze(model)


_MEMO: dict[Path, DigitsClassifier] = {}


def load_digits_classifier(cache_dir: str | os.PathLike | None = None) -> DigitsClassifier:
    """The project's evaluation classifier, in eval mode with frozen parameters (on CPU).

    Loaded from `<cache_dir or $GUIDEDISTILL_CACHE or ~/.cache/guidedistill>/digits_classifier-<recipe
    hash>.safetensors`; trained (a few seconds) and cached when that file is missing, and retrained with a
    warning when it is corrupt. Repeated calls in one process return the same (shared) instance:
    do not train or move it; copy it first (`copy.deepcopy`) if you must.
    """
    path = cache_path(cache_dir).resolve()
    if path in _MEMO:
        return _MEMO[path]
    model = None
    if path.exists():
        try:
            model = load_classifier(path)
        except ValueError as e:
            warnings.warn(f"{e}; retraining the evaluation classifier", RuntimeWarning, stacklevel=2)
    if model is None:
        log.info("training the evaluation classifier (cached at %s)", path)
        model = _freeze(train_digits_classifier(RECIPE))
        save_classifier(model, path)
    _MEMO[path] = model
    return model
