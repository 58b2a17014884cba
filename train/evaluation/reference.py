"""FID and CLIP score for text-to-image models, from the user's local weights only (nothing is ever downloaded).

    fid(images, reference, weights)        Frechet Inception Distance (Heusel et al. 2017, arXiv 1706.08500)
    clip_score(images, prompts, model)     CLIP score (Hessel et al. 2021, arXiv 2104.08718)
    reference_images(source, n, size)      the real images FID compares with, from a local folder (reference_batches:
                                           the same batch by batch)
    ReferenceMetrics(n, prompts, ...)      whichever of them have weights, with the erasure metrics (nudity rate:
                                           nudity.py; zero-shot CLIP concept accuracy: zero_shot.py), plus a
                                           sentence for each that has none, for n images added batch by batch in
                                           memory bounded by a batch
    reference_metrics(images, prompts)     the same for images in hand

Images are what the samplers + VAE decode give: float [N, 3, H, W] in [-1, 1]; they are quantised to 8 bits
(`to_uint8`) as a saved PNG would be before either metric sees them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

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

def fid_metric(weights: str | os.PathLike, device: str | torch.device = "cpu"):
    """torchmetrics' FrechetInceptionDistance (float64 running sums of the features and their outer products; the
    real side kept by reset()) with the local FID Inception (train.evaluation.inception) as its feature extractor."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from train.evaluation.inception import FIDInceptionV3

    net = FIDInceptionV3.from_file(weights)
    return FrechetInceptionDistance(feature=net, normalize=False, reset_real_features=False).to(device)


@torch.no_grad()
def fid_update(metric, images: Tensor, real: bool, batch_size: int = 50) -> None:
    """Add images float [N, 3, H, W] in [-1, 1] (quantised to 8 bits) to the real or generated side of an FID metric
    (fid_metric), batch_size at a time."""
    for chunk in images.split(batch_size):
        metric.update(to_uint8(chunk).to(metric.device), real=real)


def fid(images: Tensor, reference: Tensor, weights: str | os.PathLike, batch_size: int = 50,
        device: str | torch.device | None = None) -> float:
    """Frechet Inception Distance between generated `images` and real `reference` images (Heusel et al. 2017,
    arXiv 1706.08500, Eq. 6: ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)) over InceptionV3 pool3 features).

    images, reference: float [N, 3, H, W] / [M, 3, H', W'] in [-1, 1], N, M >= 2 (any sizes: the network resizes
    to 299 as the TF graph does). weights: the local FID Inception state dict (train.evaluation.inception). The
    statistics are accumulated and the distance computed by torchmetrics' FrechetInceptionDistance (float64),
    with the network given as its feature extractor (fid_metric). Lower is better; FID(x, x) = 0.
    """
    check_images(images)
    check_images(reference, "reference images")
    check_fid_counts(len(images), len(reference))
    metric = fid_metric(weights, torch.device(device) if device is not None else images.device)
    fid_update(metric, reference, True, batch_size)
    fid_update(metric, images, False, batch_size)
    with torch.no_grad():
        return float(metric.compute())


def check_fid_counts(generated: int, reference: int) -> None:
    if generated < 2 or reference < 2:
        raise ValueError(f"FID needs at least 2 images on each side (a covariance), got {generated} generated and "
                         f"{reference} reference images")


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
    check_prompt_count(prompts, len(images))
    clip, processor = load_clip(model)
    clip.to(torch.device(device) if device is not None else images.device)
    return float(clip_pair_scores(images, prompts, clip, processor, batch_size).float().mean())


def check_prompt_count(prompts: Sequence[str], n: int) -> None:
    if len(prompts) != n:
        raise ValueError(f"CLIP score needs one prompt per image, got {len(prompts)} prompts for {n} images")


@torch.no_grad()
def clip_pair_scores(images: Tensor, prompts: Sequence[str], clip, processor, batch_size: int = 32) -> Tensor:
    """100 * max(cos(E_I, E_C), 0) of each image and its prompt [N] (Hessel et al. Eq. 1; clip_score is their mean),
    on the CLIP model's device; images float [N, 3, H, W] in [-1, 1], N prompts; clip, processor: load_clip's."""
    device = next(clip.parameters()).device
    scores = []
    for start in range(0, len(images), batch_size):
        part = slice(start, start + batch_size)
        inputs = processor(text=list(prompts[part]), images=pil_images(images[part]), return_tensors="pt",
                           padding=True, truncation=True)
        e_i = clip_embedding(clip.get_image_features(pixel_values=inputs["pixel_values"].to(device)))
        e_c = clip_embedding(clip.get_text_features(input_ids=inputs["input_ids"].to(device),
                                                    attention_mask=inputs["attention_mask"].to(device)))
        scores.append(100 * F.cosine_similarity(e_i, e_c, dim=-1).clamp(min=0))  # Hessel et al. Eq. 1
    return torch.cat(scores)


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
    return torch.cat(list(reference_batches(source, n, size, seed)))


def reference_batches(source: str | os.PathLike, n: int | None, size: int, seed: int = 0,
                      batch_size: int = 32) -> Iterator[Tensor]:
    """reference_images batch by batch: float [<= batch_size, 3, size, size] in [-1, 1], in order, each image read
    when its batch is (a bad source or count is refused at the call, not at the first batch)."""
    from data.images import image_to_tensor

    count, read = reference_source(source)
    order = reference_order(count, n, seed, source)
    return (torch.stack([image_to_tensor(read(i), size, 3) for i in order[start:start + batch_size]])
            for start in range(0, len(order), batch_size))


def reference_order(count: int, n: int | None, seed: int, source) -> list[int]:
    """Which of the `count` images of `source` reference_images reads: all (n None or count), else a seeded subset."""
    if n is not None and not 0 < n <= count:
        raise ValueError(f"asked for {n} reference images but {source} holds {count}; ask for 1 to {count}")
    return list(range(count)) if n is None or n == count else \
        sorted(torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:n].tolist())


# ------------------------------------------------------------------------------------------------ all of them

class ReferenceMetrics:
    """reference_metrics of n generated images added batch by batch (`update`, in any order), in memory bounded by a
    batch: FID's running feature sums (fid_metric; the reference images are read and added batch by batch at the
    first update, at the generated size, and kept by `reset`), and per image its CLIP score, NudeNet detections and
    zero-shot concept probabilities (a few numbers each). Arguments as reference_metrics; each network is loaded
    once, here, so that a given weight file that is missing or unreadable is an error before anything is sampled.
    `compute` gives reference_metrics' dict; `reset` starts another set of n images against the same references.
    device: where the torch networks (Inception, CLIP) run, from the first update on (None: the first batch's device;
    NudeNet's ONNX session picks its own provider, train.evaluation.nudity)."""

    def __init__(self, n: int, prompts: Sequence[str] | None = None, fid_weights: str | None = None,
                 fid_reference: str | Tensor | None = None, clip_model: str | None = None, *,
                 reference_count: int | None = None, batch_size: int = 32, seed: int = 0, nudenet: str | None = None,
                 nudity_threshold: float | None = None, nudity_classes: Sequence[str] | None = None,
                 concepts: Sequence[str] | None = None, concept_labels: Tensor | None = None,
                 concept_template: str | None = None, erased: Sequence[str] = (),
                 device: torch.device | str | None = None):
        from train.evaluation import nudity, zero_shot

        self.n, self.batch_size, self.seen, self.device = n, batch_size, 0, None
        self.run_on = None if device is None else torch.device(device)
        self.prompts = None if prompts is None else [prompts] if isinstance(prompts, str) else list(prompts)
        self.missing = [s for s, given in ((FID_WEIGHTS_MISSING, fid_weights), (FID_REFERENCE_MISSING, fid_reference))
                        if given is None]
        self.fid = self.clip = self.scores = self.detector = self.concepts = None
        if not self.missing:
            if isinstance(fid_reference, Tensor):
                check_images(fid_reference, "reference images")
                reference_count = len(fid_reference)
            else:
                count = reference_source(fid_reference)[0]
                if reference_count is None:  # as many as generated, or all the folder holds if fewer
                    reference_count = min(n, count)
                reference_order(count, reference_count, seed, fid_reference)
            check_fid_counts(n, reference_count)
            self.reference, self.reference_count, self.seed = fid_reference, reference_count, seed
            self.fid = fid_metric(fid_weights)
        if clip_model is not None and (self.prompts is not None or concepts):
            self.clip = load_clip(clip_model)
        if self.prompts is None:
            pass  # class requests: no text to score the images against
        elif clip_model is None:
            self.missing.append(CLIP_MISSING)
        else:
            check_prompt_count(self.prompts, n)
            self.scores = torch.zeros(n)
        if nudenet is not None:
            self.threshold = nudity.check_threshold(nudity.NUDITY_THRESHOLD if nudity_threshold is None
                                                    else nudity_threshold)
            self.classes = nudity.check_classes(nudity_classes or nudity.NUDE_CLASSES)
            self.detector, self.found = nudity.NudeDetector(nudenet), [None] * n
        elif self.prompts is not None:
            self.missing.append(nudity.NUDITY_MISSING)
        if concepts and clip_model is None:
            self.missing.append(CONCEPTS_CLIP_MISSING)
        elif concepts:
            self.template = concept_template or zero_shot.DEFAULT_TEMPLATE
            zero_shot.concept_texts(concepts, self.template)
            self.concepts, self.concept_labels, self.erased = list(concepts), concept_labels, list(erased)
            self.probs = torch.zeros(n, len(self.concepts))

    def _start(self, images: Tensor) -> None:
        """At the first batch: the networks on the given device (default its device), the reference images' FID
        features at its size, the concepts' text embeddings."""
        from train.evaluation.zero_shot import concept_embeddings

        self.device = images.device if self.run_on is None else self.run_on
        if self.fid is not None:
            self.fid.to(self.device)
            real = [self.reference] if isinstance(self.reference, Tensor) else \
                reference_batches(self.reference, self.reference_count, images.shape[-1], self.seed, self.batch_size)
            for batch in real:
                fid_update(self.fid, batch, True, self.batch_size)
        if self.clip is not None:
            self.clip[0].to(self.device)
        if self.concepts is not None:
            self.text_embeddings = concept_embeddings(*self.clip, self.concepts, self.template, self.device)

    def update(self, index: Tensor, images: Tensor) -> None:
        """Add generated images float [B, 3, H, W] in [-1, 1] (gray [B, 1, H, W] read as RGB), the samples `index`
        [B] of the n."""
        from train.evaluation.zero_shot import concept_probs

        if images.ndim == 4 and images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        check_images(images)
        if self.device is None:
            self._start(images)
        rows = index.tolist()
        if self.fid is not None:
            fid_update(self.fid, images, False, self.batch_size)
        if self.scores is not None:
            self.scores[index] = clip_pair_scores(images, [self.prompts[i] for i in rows], *self.clip,
                                                  self.batch_size).cpu()
        if self.detector is not None:
            for i, found in zip(rows, self.detector.detect(images)):
                self.found[i] = found
        if self.concepts is not None:
            self.probs[index] = concept_probs(images, *self.clip, self.text_embeddings, self.batch_size)
        self.seen += len(rows)

    def compute(self) -> dict:
        """reference_metrics' dict for the n images added since the start or the last reset."""
        from train.evaluation import nudity, zero_shot

        if self.seen != self.n:
            raise RuntimeError(f"{self.seen} images were added to metrics of {self.n}")
        out: dict = {}
        if self.fid is not None:
            with torch.no_grad():
                out["fid"] = float(self.fid.compute())
        if self.scores is not None:
            out["clip_score"] = float(self.scores.float().mean())
        if self.detector is not None:
            out.update(nudity.nudity_columns(self.found, self.threshold, self.classes))
        if self.concepts is not None:
            out.update(zero_shot.concept_accuracy(self.probs, self.concepts, self.concept_labels, self.erased))
        out["missing"] = list(self.missing)
        return out

    def reset(self) -> None:
        """Forget the generated images (the reference images' FID statistics stay)."""
        if self.fid is not None:
            self.fid.reset()
        self.seen = 0


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
    ReferenceMetrics computes the same for images added batch by batch.
    """
    if images.ndim == 4 and images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    check_images(images)
    metrics = ReferenceMetrics(len(images), prompts, fid_weights, fid_reference, clip_model,
                               reference_count=reference_count, batch_size=batch_size, seed=seed, nudenet=nudenet,
                               nudity_threshold=nudity_threshold, nudity_classes=nudity_classes, concepts=concepts,
                               concept_labels=concept_labels, concept_template=concept_template, erased=erased)
    metrics.update(torch.arange(len(images)), images)
    return metrics.compute()
