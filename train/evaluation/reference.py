"""FID and CLIP score for text-to-image models, from the user's local weights only (nothing is ever downloaded).

    fid(images, reference, weights)        Frechet Inception Distance (Heusel et al. 2017, arXiv 1706.08500)
    clip_score(images, prompts, model)     CLIP score (Hessel et al. 2021, arXiv 2104.08718)
    reference_images(source, n, size)      the real images FID compares with, from a local folder
    reference_metrics(images, prompts)     whichever of them have weights, with the erasure metrics (nudity rate:
                                           nudity.py; zero-shot CLIP concept accuracy: zero_shot.py), plus a
                                           sentence for each that has none

Images are what the samplers + VAE decode give: float [N, 3, H, W] in [-1, 1]; they are quantised to 8 bits
(`to_uint8`) as a saved PNG would be before either metric sees them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from train.evaluation.clip import clip_embedding, load_clip, pil_images
from train.evaluation.images import check_images, to_uint8
from train.evaluation.inception import WEIGHTS_NAME

FID_WEIGHTS_MISSING = f"FID: no Inception weights given (--fid-weights PATH to {WEIGHTS_NAME})"
FID_REFERENCE_MISSING = "FID: no reference images given (--fid-reference FOLDER of real images, captioned or not)"
CLIP_MISSING = ("CLIP score: no CLIP model given (--clip-model FOLDER holding a transformers CLIPModel and its "
                "CLIPProcessor, e.g. a local copy of openai/clip-vit-large-patch14)")
CONCEPTS_CLIP_MISSING = ("concept accuracy: no CLIP model to classify the images among --concepts (--clip-model FOLDER "
                         "holding a transformers CLIPModel and its CLIPProcessor)")


# ------------------------------------------------------------------------------------------------ FID

def fid(images: Tensor, reference: Tensor, weights: str | os.PathLike, batch_size: int = 50,
        device: str | torch.device | None = None) -> float:
    """Frechet Inception Distance between generated `images` and real `reference` images (Heusel et al. 2017,
    arXiv 1706.08500, Eq. 6: ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) over InceptionV3 pool3 features).

    images, reference: float [N, 3, H, W] / [M, 3, H', W'] in [-1, 1], N, M >= 2 (any sizes: the network resizes
    to 299 as the TF graph does). weights: the local FID Inception state dict (train.evaluation.inception). The
    statistics are accumulated and the distance computed by torchmetrics' FrechetInceptionDistance (float64),
    with the network given as its feature extractor. Lower is better; FID(x, x) = 0.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    from train.evaluation.inception import FIDInceptionV3

    check_images(images)
    check_images(reference, "reference images")
    if len(images) < 2 or len(reference) < 2:
        raise ValueError(f"FID needs at least 2 images on each side (a covariance), got {len(images)} generated and "
                         f"{len(reference)} reference images")
    device = torch.device(device) if device is not None else images.device
    net = FIDInceptionV3.from_file(weights)
    metric = FrechetInceptionDistance(feature=net, normalize=False).to(device)
    with torch.no_grad():
        for batch, real in ((reference, True), (images, False)):
            for chunk in batch.split(batch_size):
                metric.update(to_uint8(chunk).to(device), real=real)
        return float(metric.compute())


# ------------------------------------------------------------------------------------------------ CLIP score

def clip_score(images: Tensor, prompts: Sequence[str], model: str | os.PathLike, batch_size: int = 32,
               device: str | torch.device | None = None) -> float:
    """CLIP score of images and their prompts: the mean over pairs of 100 * max(cos(E_I, E_C), 0), E the CLIP image
    and text embeddings (Hessel et al. 2021, arXiv 2104.08718, Eq. 1, with the scale 100 of torchmetrics' CLIPScore
    instead of the paper's 2.5). Higher is better, in [0, 100].

    images: float [N, 3, H, W] in [-1, 1]; prompts: N strings (truncated to the text encoder's length);
    model: a local CLIPModel + CLIPProcessor folder (load_clip).

    Computed here rather than by torchmetrics' CLIPScore, which (1.9) fails with transformers 5 (its
    get_*_features return output objects, torchmetrics PR #3428), only accepts hub names or a loader callable, and
    clamps the MEAN cosine at 0 rather than each pair's; for real CLIP models every cosine is positive and the
    two agree.
    """
    check_images(images)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"CLIP score needs one prompt per image, got {len(prompts)} prompts for {len(images)} images")
    clip, processor = load_clip(model)
    device = torch.device(device) if device is not None else images.device
    clip.to(device)
    scores = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            part = slice(start, start + batch_size)
            inputs = processor(text=prompts[part], images=pil_images(images[part]), return_tensors="pt", padding=True,
                               truncation=True)
            e_i = clip_embedding(clip.get_image_features(pixel_values=inputs["pixel_values"].to(device)))
            e_c = clip_embedding(clip.get_text_features(input_ids=inputs["input_ids"].to(device),
                                                        attention_mask=inputs["attention_mask"].to(device)))
            scores.append(100 * F.cosine_similarity(e_i, e_c, dim=-1).clamp(min=0))  # Hessel et al. Eq. 1
    return float(torch.cat(scores).float().mean())


# ------------------------------------------------------------------------------------------------ reference images

def reference_source(source: str | os.PathLike):
    """(number of images, read(i) -> PIL image) of a LOCAL reference folder (see reference_images)."""
    from PIL import Image

    from data.captions import caption_folder_dataset
    from data.images import _image_files, load_source

    root = Path(source).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"FID reference folder {str(source)!r} does not exist; pass --fid-reference FOLDER "
                                f"(config field fid_reference): a local folder of real images")
    if any((root / f).is_file() for f in ("dataset_dict.json", "state.json")) or any(root.rglob("*.parquet")):
        data = load_source(str(root))
        if hasattr(data, "keys"):  # a DatasetDict
            data = data["train"] if "train" in data else next(iter(data.values()))
        column = next((c for c, f in data.features.items() if type(f).__name__ == "Image"), None)
        if column is None:
            raise ValueError(f"dataset {root} has no image column (columns: {data.column_names}); give a folder of images")
        return len(data), lambda i: data[int(i)][column]
    if (root / "metadata.jsonl").is_file():
        data = caption_folder_dataset(str(root))
        return len(data), lambda i: data[int(i)]["image"]
    files = _image_files(str(root))
    if not files:
        raise ValueError(f"FID reference folder {root} holds no images; pass --fid-reference a folder of real images")
    def read(i):
        with Image.open(files[int(i)]) as image:  # closed once its pixels are read
            image.load()
            return image.copy()

    return len(files), read


def reference_images(source: str | os.PathLike, n: int | None, size: int, seed: int = 0) -> Tensor:
    """The real images FID compares with: float [n, 3, size, size] in [-1, 1] (shorter side resized, center crop:
    data.images.image_to_tensor).

    source: a LOCAL folder: images at any depth (flat, class subfolders, or a captioned folder with .txt files:
            data.images' file listing), a captioned folder with metadata.jsonl (data.captions.caption_folder_dataset:
            the images it lists), or a datasets save_to_disk / parquet folder (data.images.load_source; its "train"
            split, else its first).
    n:      how many; None: all. Fewer than the source holds: a seeded random subset (`seed`), in source order.
    """
    from data.images import image_to_tensor

    count, read = reference_source(source)
    if n is not None and not 0 < n <= count:
        raise ValueError(f"asked for {n} reference images but {source} holds {count}; ask for 1 to {count}")
    order = range(count) if n is None or n == count else \
        sorted(torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:n].tolist())
    return torch.stack([image_to_tensor(read(i), size, 3) for i in order])


# ------------------------------------------------------------------------------------------------ all of them

def reference_metrics(images: Tensor, prompts: Sequence[str] | None = None, fid_weights: str | None = None,
                      fid_reference: str | Tensor | None = None, clip_model: str | None = None, *,
                      reference_count: int | None = None, batch_size: int = 32, seed: int = 0,
                      nudenet: str | None = None, nudity_threshold: float | None = None,
                      nudity_classes: Sequence[str] | None = None, concepts: Sequence[str] | None = None,
                      concept_labels: Tensor | None = None, concept_template: str | None = None,
                      erased: Sequence[str] = ()) -> dict:
    """The reference metrics that have weights, for generated `images` (float [N, 3, H, W] in [-1, 1]; gray
    [N, 1, H, W] is read as RGB) and the `prompts` they were generated from (None: class requests).

    Returns {"fid": float (with fid_weights and fid_reference), "clip_score": float (with clip_model and prompts),
    the nudity columns of train.evaluation.nudity.nudity_rate (with nudenet: its ONNX file; nudity_threshold and
    nudity_classes default to PUND's 0.6 and 5 explicit classes), the concept columns of
    train.evaluation.zero_shot.concept_accuracy (with concepts and clip_model: the images classified among the
    concepts in concept_template, default "a photo of {}"; concept_labels [N] and the `erased` concept names give
    the accuracies), "missing": [one plain sentence per metric left out, naming the flag that enables it]}.
    fid_reference: a local folder (reference_images at the generated size; reference_count images, default as
    many as were generated or all the folder holds if fewer) or a float tensor of real images in [-1, 1].
    A path that is given but missing or unreadable is an error (FileNotFoundError / ValueError), not "missing".
    """
    from train.evaluation import nudity, zero_shot

    if images.ndim == 4 and images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    check_images(images)
    out: dict = {}
    missing = [s for s, given in ((FID_WEIGHTS_MISSING, fid_weights), (FID_REFERENCE_MISSING, fid_reference))
               if given is None]
    if not missing:
        reference = fid_reference
        if not isinstance(reference, Tensor):
            if reference_count is None:  # as many as generated, or all the folder holds if fewer
                reference_count = min(len(images), reference_source(fid_reference)[0])
            reference = reference_images(fid_reference, reference_count, images.shape[-1], seed)
        out["fid"] = fid(images, reference, fid_weights, batch_size)
    if prompts is None:
        pass  # class requests: no text to score the images against
    elif clip_model is None:
        missing.append(CLIP_MISSING)
    else:
        out["clip_score"] = clip_score(images, prompts, clip_model, batch_size)
    if nudenet is not None:
        out.update(nudity.nudity_rate(images, nudenet, nudity.NUDITY_THRESHOLD if nudity_threshold is None
                                      else nudity_threshold, nudity_classes or nudity.NUDE_CLASSES))
    elif prompts is not None:
        missing.append(nudity.NUDITY_MISSING)
    if concepts and clip_model is None:
        missing.append(CONCEPTS_CLIP_MISSING)
    elif concepts:
        probs = zero_shot.zero_shot_probs(images, concepts, clip_model, concept_template or zero_shot.DEFAULT_TEMPLATE,
                                          batch_size)
        out.update(zero_shot.concept_accuracy(probs, concepts, concept_labels, erased))
    out["missing"] = missing
    return out
