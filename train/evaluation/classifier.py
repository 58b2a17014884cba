"""The evaluation feature network: a small CNN trained once, deterministically, on the labelled data set a model was
trained on (the embedded digits are one instance), cached by a hash of its recipe and of the data."""
from __future__ import annotations

import copy
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
DIGITS_RECIPE = RECIPE  # the digits instance's recipe: unchanged, so the digits tables keep their numbers

IMAGE_RECIPE_VERSION = 1


def image_recipe(channels: int, image_size: int, num_classes: int) -> dict:
    """The recipe of any other labelled image data set (C x S x S images, K classes): the digits' network and
    optimiser, an image's edge pixels (not -1) as the shift's fill, at least `min_steps` and at most `max_steps`
    updates (epochs of a tiny set are too few, of a large one too many for a CPU)."""
    return {"version": f"image-{IMAGE_RECIPE_VERSION}",
            "arch": {"widths": [32, 64, 64], "feature_dim": FEATURE_DIM, "num_classes": num_classes,
                     "channels": channels, "image_size": image_size},
            "seed": 0, "threads": 1, "epochs": 30, "min_steps": 300, "max_steps": 3000, "batch_size": 64,
            "lr": 3e-3, "weight_decay": 1e-4, "label_smoothing": 0.05,
            "shift": max(1, image_size // 8), "fill": "edge", "noise_std_max": 0.2, "contrast": [0.8, 1.0]}


def recipe_for(data) -> dict:
    """The recipe of a LabelledData (train.evaluation.labelled): the digits' own, or image_recipe."""
    return DIGITS_RECIPE if data.is_digits else image_recipe(*data.shape[:2], data.num_classes)


class FeatureNetwork(nn.Module):
    """Small CNN on C x S x S images with K classes. Input x: [B, C, S, S] in [-1, 1] (the data's pixel space).

    features(x) -> [B, feature_dim]: penultimate pre-activations, the space of FD and precision/recall.
    forward(x)  -> [B, K] logits.
    Two 2x2 max-pools take S to S // 4; sides above 4 are then average-pooled to 4x4 (the digits' 8x8 gives 2x2,
    so their network is exactly the original digits classifier).
    After loading, `data_digest`, `data_name` and `heldout_accuracy` say what it was trained on and how well it
    classifies that data's held-out images (None for a network built here).
    """

    def __init__(self, widths: tuple[int, ...] | list[int] = (32, 64, 64), feature_dim: int = FEATURE_DIM,
                 num_classes: int = NUM_CLASSES, channels: int = 1, image_size: int = 8):
        super().__init__()
        w1, w2, w3 = widths
        side = image_size // 4
        pool = [nn.AdaptiveAvgPool2d(4)] if side > 4 else []
        self.image_shape = (channels, image_size, image_size)
        self.body = nn.Sequential(
            nn.Conv2d(channels, w1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w1, w2, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                    # S -> S // 2 (digits: 8x8 -> 4x4)
            nn.Conv2d(w2, w3, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                    # -> S // 4 (digits: 2x2)
            *pool,
            nn.Flatten(),
            nn.Linear(w3 * min(side, 4) ** 2, feature_dim),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, num_classes))
        self.data_digest: str | None = None
        self.data_name: str | None = None
        self.heldout_accuracy: float | None = None

    def features(self, x: Tensor) -> Tensor:
        """x: [B, C, S, S] in [-1, 1] -> penultimate features [B, feature_dim], taken before the ReLU
        (post-ReLU features map blank images near real outliers, which fools k-NN precision)."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, S, S] in [-1, 1] -> class logits [B, K] (= head(features(x)))."""
        return self.head(self.body(x))


DigitsClassifier = FeatureNetwork  # the digits instance: FeatureNetwork(**RECIPE["arch"]) = 1x8x8, 10 classes


def recipe_hash(recipe: dict = RECIPE) -> str:
    """Short stable hash of a training recipe (names the cache file)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """`$GUIDEDISTILL_CACHE`, else `~/.cache/guidedistill`."""
    return Path(os.environ.get("GUIDEDISTILL_CACHE") or Path.home() / ".cache" / "guidedistill")


def digits_digest() -> str:
    """The digits' data digest (train.evaluation.labelled.LabelledData.digest)."""
    from train.evaluation.labelled import labelled_data

    return labelled_data(None).digest


def cache_path(cache_dir: str | os.PathLike | None = None, recipe: dict = RECIPE, data_digest: str | None = None) -> Path:
    """Where the weights trained by `recipe` on the data of `data_digest` (default: the digits') live:
    <cache_dir>/feature_net-<recipe hash>-<data digest[:16]>.safetensors."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"feature_net-{recipe_hash(recipe)}-{(data_digest or digits_digest())[:16]}.safetensors"


def _augment(x: Tensor, recipe: dict, gen: torch.Generator) -> Tensor:
    """Random shift (fill -1, or the edge pixels with fill: edge), ink contrast and Gaussian noise;
    x: [B, C, S, S] in [-1, 1] -> same shape."""
    b, _, h, w = x.shape
    s = recipe["shift"]
    padded = F.pad(x, (s, s, s, s), mode="replicate") if recipe.get("fill") == "edge" else \
        F.pad(x, (s, s, s, s), value=-1.0)
    dy = torch.randint(0, 2 * s + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * s + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]                  # [B, h, 1]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]                  # [B, 1, w]
    x = padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)  # [B, h, w, C] -> [B, C, h, w]
    x = x.contiguous()
    lo, hi = recipe["contrast"]
    scale = lo + (hi - lo) * torch.rand(b, 1, 1, 1, generator=gen)
    x = (x + 1.0) * scale - 1.0
    std = recipe["noise_std_max"] * torch.rand(b, 1, 1, 1, generator=gen)
    return x + std * torch.randn(x.shape, generator=gen)


@torch.no_grad()
def classifier_accuracy(model: FeatureNetwork, images: Tensor, labels: Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of `model` on images [N, C, S, S] in [-1, 1] with labels [N]."""
    hits = sum((model(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum().item()
               for i in range(0, len(images), batch_size))
    return hits / len(images)


def train_digits_classifier(recipe: dict = RECIPE) -> FeatureNetwork:
    """The digits instance: train_feature_network on the digits 'train' split."""
    from data.digits import digits_tensors

    return train_feature_network(*digits_tensors("train"), recipe)


def train_feature_network(images: Tensor, labels: Tensor, recipe: dict) -> FeatureNetwork:
    """Train (with grad enabled even when called under no_grad/inference_mode, e.g. from a validation hook)."""
    with torch.inference_mode(False), torch.enable_grad():
        return _train_feature_network(images, labels, recipe)


def _train_feature_network(images: Tensor, labels: Tensor, recipe: dict) -> FeatureNetwork:
    """Train a FeatureNetwork(**recipe["arch"]) on images [N, C, S, S] in [-1, 1] with labels [N], deterministically
    (same recipe, data, machine and torch build -> bit-identical weights). Returns the model in eval mode. A few
    seconds on CPU for the digits.

    Randomness comes only from private generators seeded by the recipe (the global RNG is left as it was),
    the data order is a seeded permutation per epoch, and deterministic algorithms are enforced while training.
    Updates: `epochs` passes of N // batch_size batches (the digits), or with min_steps / max_steps that count
    clamped to [min_steps, max_steps] (the last pass cut short).
    """
    if len(images) < 2:
        raise ValueError(f"the evaluation feature network needs at least 2 training images, got {len(images)}")
    gen = torch.Generator().manual_seed(recipe["seed"])
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(recipe["threads"])  # fixed, so the weights do not depend on the machine's core count
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe["seed"])
            model = FeatureNetwork(**recipe["arch"])
        opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
        batch = min(recipe["batch_size"], len(images))
        steps_per_epoch = len(images) // batch
        total = recipe["epochs"] * steps_per_epoch
        total = min(max(total, recipe.get("min_steps", total)), recipe.get("max_steps", total))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=total)
        model.train()
        for epoch in range(-(-total // steps_per_epoch)):
            order = torch.randperm(len(images), generator=gen)
            for i in range(min(steps_per_epoch, total - epoch * steps_per_epoch)):
                idx = order[i * batch:(i + 1) * batch]
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


def _freeze(model: FeatureNetwork) -> FeatureNetwork:
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


def save_classifier(model: FeatureNetwork, path: str | os.PathLike, recipe: dict = RECIPE) -> None:
    """Write `model` as safetensors atomically (temp file in the same folder + os.replace), with the recipe, a
    digest of the weights and what it was trained on (model.data_digest, data_name, heldout_accuracy) in the
    metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"recipe": json.dumps(recipe, sort_keys=True), "sha256": _state_digest(state),
            "data": json.dumps({"digest": model.data_digest, "name": model.data_name,
                                "heldout_accuracy": model.heldout_accuracy})}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_classifier(path: str | os.PathLike, recipe: dict = RECIPE, data_digest: str | None = None) -> FeatureNetwork:
    """Load weights written by `save_classifier` (safetensors only, nothing is unpickled).

    Raises ValueError when the file is unreadable, was trained by another recipe or (data_digest given) on another
    data set, or its weights do not match the digest stored with them.
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
    trained_on = json.loads(meta.get("data") or "{}")
    if data_digest is not None and trained_on.get("digest") != data_digest:
        raise ValueError(f"{path} was trained on another data set ({trained_on.get('name')})")
    model = FeatureNetwork(**recipe["arch"])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit FeatureNetwork: {e}") from e
    model.data_digest, model.data_name = trained_on.get("digest"), trained_on.get("name")
    model.heldout_accuracy = trained_on.get("heldout_accuracy")
    return _freeze(model)


_MEMO: dict[Path, FeatureNetwork] = {}


def load_feature_network(data, cache_dir: str | os.PathLike | None = None) -> FeatureNetwork:
    """The evaluation feature network of a labelled data set (train.evaluation.labelled.LabelledData), in eval mode
    with frozen parameters (on CPU), its `heldout_accuracy` on the data's 'validation' split recorded.

    Loaded from `<cache_dir or $GUIDEDISTILL_CACHE or ~/.cache/guidedistill>/feature_net-<recipe hash>-<data
    digest>.safetensors`; trained on the data's 'train' split (recipe_for(data); seconds for the digits) and cached
    when that file is missing, and retrained with a warning when it is corrupt. Repeated calls in one process return
    the same (shared) instance: do not train or move it; copy it first (`copy.deepcopy`) if you must.
    """
    recipe = recipe_for(data)
    path = cache_path(cache_dir, recipe, data.digest).resolve()
    if path in _MEMO:
        return _MEMO[path]
    model = None
    if path.exists():
        try:
            model = load_classifier(path, recipe, data.digest)
        except ValueError as e:
            warnings.warn(f"{e}; retraining the evaluation classifier", RuntimeWarning, stacklevel=2)
    if model is None:
        log.info("training the evaluation feature network on %s (cached at %s)", data.name, path)
        if data.is_digits:
            model = _freeze(train_digits_classifier(recipe))
        else:
            model = _freeze(train_feature_network(*data.split_tensors("train"), recipe))
        model.data_digest, model.data_name = data.digest, data.name
        model.heldout_accuracy = classifier_accuracy(model, *data.split_tensors("validation"))
        save_classifier(model, path, recipe)
    _MEMO[path] = model
    return model


_ON_DEVICE: dict[tuple[int, str], tuple[FeatureNetwork, FeatureNetwork]] = {}  # (network id, device) -> (it, its copy)


def feature_network_on(model: FeatureNetwork, device: torch.device | str | None) -> FeatureNetwork:
    """`model` on `device` (None: where it is): itself when it is there, else a frozen copy there, made once per network
    and device, so that the metrics of samples generated on a GPU run there while load_feature_network's shared
    instance stays where it is (the copy keeps its data_digest, data_name and heldout_accuracy)."""
    if device is None:
        return model
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if next(model.parameters()).device == device:
        return model
    key = (id(model), str(device))
    if key not in _ON_DEVICE or _ON_DEVICE[key][0] is not model:
        _ON_DEVICE[key] = (model, _freeze(copy.deepcopy(model).to(device)))
    return _ON_DEVICE[key][1]


def load_digits_classifier(cache_dir: str | os.PathLike | None = None) -> FeatureNetwork:
    """The digits instance of load_feature_network (the embedded digits, their unchanged recipe RECIPE)."""
    from train.evaluation.labelled import labelled_data

    return load_feature_network(labelled_data(None), cache_dir)


def check_trained_on(model: FeatureNetwork, data) -> None:
    """Refuse a feature network trained on another data set than `data` (one line naming both)."""
    if model.data_digest is not None and model.data_digest != data.digest:
        raise ValueError(f"the evaluation feature network was trained on {model.data_name}, not on {data.name} (the "
                         f"data these samples are judged against); use load_feature_network(data) for that data")
