"""What `sample` and `evaluate` ask a model for, and the metrics of the answer, through one path for class labels
and prompts.

A RequestSet is the rows to sample: every class of a class-conditional model (or the classes given by id or name),
class prompts of the text digits model ("a handwritten {word}": one prompt per digit, labelled with the digit), concept
prompts (each of --concepts in a template, labelled with the concept), or a prompt set (a prompt file, whose rows
may bring their own seeds and guidance scales, prompts on the command line). Labelled rows get the feature-network
metrics of the model's own labelled data (FD, class accuracy, precision/recall; train.evaluation.labelled); any rows
get FID against local reference images (by default a class model's held-out images) and, with prompts, CLIP score and
the nudity rate, and with --concepts the zero-shot concept metrics, when the user has those weights locally
(train.evaluation.reference); what is missing is said, not downloaded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor


@dataclass
class RequestSet:
    """Rows to sample: `requests` (one per sample), their class `labels` [N] (or None) and `prompts` (or None).

    A prompt file's own settings, where every row has them: `noise_seeds` (seed, draw) per sample (its initial noise
    is the draw-th standard normal of a CPU generator seeded with seed: a prompt's copies take draws 0, 1, ... as
    ESD's generate-images.py draws a batch of latents per seed) and `guidance` (the guidance scale w per sample).
    `concepts`: names a zero-shot CLIP classifies the images among (train.evaluation.zero_shot), and for concept
    prompts `concept_labels` [N], the index of the concept each sample was prompted for."""

    name: str
    requests: list
    labels: Tensor | None = None
    prompts: list[str] | None = None
    noise_seeds: list[tuple[int, int]] | None = None
    guidance: list[float] | None = None
    concepts: list[str] | None = None
    concept_labels: Tensor | None = None


def prompt_rows(prompts: Sequence[str] | None, prompts_file: str | None, categories: Sequence[str] | None = None,
                max_prompts: int | None = None) -> list:
    """--prompt values, then the rows of --prompts FILE (data.prompts.read_prompt_rows: each prompt with the seed,
    guidance scale and I2P categories the file gives it) in --prompt-categories, the first --max-prompts of them."""
    from data.prompts import PromptRow, read_prompt_rows, select_prompt_rows

    if (categories or max_prompts is not None) and not prompts_file:
        raise ValueError("--prompt-categories and --max-prompts select rows of a prompt file: add --prompts FILE")
    out = [PromptRow(p) for p in prompts or []]
    if prompts_file:
        out += select_prompt_rows(read_prompt_rows(prompts_file), list(categories or []), max_prompts, prompts_file)
    return out


def request_sets(module, classes: Sequence = (), prompts: Sequence = (), class_prompts: str | None = None,
                 num_per_class: int = 1, num_per_prompt: int = 1, concepts: Sequence[str] | None = None,
                 concept_prompts: str | None = None, file_seeds: bool = True) -> list[RequestSet]:
    """The RequestSets of a command: the given classes (ids or names), the class prompts of a template, the concept
    prompts of a template (each of `concepts` written into it, num_per_class samples each, labelled with the
    concept), the prompts (strings or data.prompts.PromptRow: their seeds, unless file_seeds is False, and guidance
    scales ride along where every row has one); none given: every class of the model (a model whose requests
    cannot be listed, i.e. prompts, then needs some). Every request is checked by the model's conditioner before
    anything is sampled."""
    from data.prompts import PromptRow

    for flag, n in (("--num-per-class", num_per_class), ("--num-per-prompt", num_per_prompt)):
        if n <= 0:
            raise ValueError(f"{flag} must be positive, got {n}")
    names = None
    if concepts:
        from train.evaluation.zero_shot import concept_texts

        names = [str(c).strip() for c in concepts]
        concept_texts(names)  # two or more distinct names
    elif concept_prompts:
        raise ValueError("--concept-prompts TEMPLATE writes each concept into the template: give --concepts NAME ...")
    rows = [p if isinstance(p, PromptRow) else PromptRow(str(p)) for p in prompts]
    conditioner, sets = module.conditioner, []
    if not (classes or rows or class_prompts or concept_prompts):
        classes = conditioner.enumerate()
        if classes is None:
            raise ValueError("this model is prompted: give --prompt TEXT (repeatable), --prompts FILE, --class-prompts "
                             "TEMPLATE (the digits text model) or --concepts NAME ... --concept-prompts TEMPLATE")
    if classes:
        ids = conditioner.parse_all(classes)
        labels = [getattr(conditioner, "name", str)(c) for c in ids]
        sets.append(RequestSet(f"classes {', '.join(labels)}" if len(ids) < 11 else f"{len(ids)} classes",
                               [c for c in ids for _ in range(num_per_class)],
                               torch.tensor(ids).repeat_interleave(num_per_class), concepts=names))
    if class_prompts:
        from train.evaluation.digits_text import class_prompts as digit_prompts

        texts, labels = digit_prompts(class_prompts, num_per_class)
        conditioner.parse_all(texts[:1])
        sets.append(RequestSet(class_prompts, texts, labels, texts, concepts=names))
    if concept_prompts:
        from train.evaluation.zero_shot import concept_texts

        texts = [t for t in concept_texts(names, concept_prompts) for _ in range(num_per_class)]
        conditioner.parse_all(texts[:1])
        sets.append(RequestSet(concept_prompts, texts, None, texts, concepts=names,
                               concept_labels=torch.arange(len(names)).repeat_interleave(num_per_class)))
    if rows:
        conditioner.parse_all([r.prompt for r in rows])
        texts = [r.prompt for r in rows for _ in range(num_per_prompt)]
        seeds = [(r.seed, j) for r in rows for j in range(num_per_prompt)] \
            if file_seeds and all(r.seed is not None for r in rows) else None
        guidance = [r.guidance for r in rows for _ in range(num_per_prompt)] \
            if all(r.guidance is not None for r in rows) else None
        sets.append(RequestSet(f"{len(rows)} prompts x {num_per_prompt}", texts, None, texts, seeds, guidance, names))
    return sets


def joined(sets: Sequence[RequestSet], field: str) -> list | None:
    """The per-sample `field` (noise_seeds, guidance) of several sets in order, or None unless every set has it."""
    values = [getattr(rs, field) for rs in sets]
    return None if any(v is None for v in values) else [x for v in values for x in v]


def seed_draws(noise_seeds: Sequence[tuple[int, int]]) -> dict[int, int]:
    """How many draws each seed of noise_seeds [(seed, draw)] makes: its largest draw + 1."""
    count: dict[int, int] = {}
    for s, d in noise_seeds:
        count[s] = max(count.get(s, 0), d + 1)
    return count


def seeded_noise(shape: Sequence[int], noise_seeds: Sequence[tuple[int, int]],
                 draws: dict[int, int] | None = None) -> Tensor:
    """Initial noise [N, *shape]: sample i's is draw d_i of a CPU generator seeded with s_i, (s_i, d_i) =
    noise_seeds[i] (draws d of one seed are the rows of one torch.randn(n, *shape) from it, as diffusers pipelines
    and ESD's evaluation draw a batch of latents from a seeded generator; n: draws[s], default seed_draws(noise_seeds),
    the count of the whole set when noise_seeds is one batch of it)."""
    count = seed_draws(noise_seeds) if draws is None else draws
    bank = {s: torch.randn(count[s], *shape, generator=torch.Generator().manual_seed(s))
            for s in dict.fromkeys(s for s, _ in noise_seeds)}
    return torch.stack([bank[s][d] for s, d in noise_seeds])


def noise_draws(generator: torch.Generator, n: int, shape: Sequence[int], chunk: int) -> Iterator[Tensor]:
    """torch.randn(n, *shape, generator=generator) in order, `chunk` rows at a time. CPU normal_ turns one uniform
    per value into normals 16 at a time (Box-Muller), so for samples of a multiple of 16 values successive draws equal
    one draw; samples of other sizes (a few values) are drawn at once."""
    if math.prod(shape) % 16:
        yield from torch.randn(n, *shape, generator=generator).split(chunk)
        return
    for start in range(0, n, chunk):
        yield torch.randn(min(chunk, n - start), *shape, generator=generator)


def initial_noise(shape: Sequence[int], n: int, seed: int, noise_seeds: Sequence[tuple[int, int]] | None,
                  chunk: int) -> Iterator[Tensor]:
    """The initial noise [n, *shape] of a set `chunk` rows at a time, in order: noise_seeds' (seeded_noise), else the
    rows of one torch.randn(n, *shape) from a CPU generator seeded with `seed` (noise_draws)."""
    if noise_seeds is None:
        yield from noise_draws(torch.Generator().manual_seed(seed), n, shape, chunk)
        return
    draws = seed_draws(noise_seeds)
    for start in range(0, n, chunk):
        yield seeded_noise(shape, noise_seeds[start:start + chunk], draws)


def takes_guidance(module, values: Sequence[float], steps: int | None = None, sampler: str | None = None, guider=None,
                   guider_params: dict | None = None, eta: float = 0.0, negative: bool = False,
                   nasa_scale: float | None = None, negtome_scale: float | None = None) -> bool:
    """Whether the model's recipe samples at each of the guidance scales `values` (a generator distilled at its own
    w does not: a prompt file's guidance is then left aside)."""
    recipe = module.sampling_recipe(nasa_scale, negtome_scale)
    try:
        for w in dict.fromkeys(values):
            recipe.resolve(w, steps, sampler, guider, guider_params, eta, negative)
    except ValueError:
        return False
    return True


def image_batches(module, requests: Sequence, scale: float | None = None, steps: int | None = None,
                  sampler: str | None = None, guider=None, seed: int = 0, negative: Any = None, eta: float = 0.0,
                  guider_params: dict | None = None, batch_size: int = 64, progress: bool = True,
                  nasa_scale: float | None = None, negtome_scale: float | None = None, encode=None,
                  noise_seeds: Sequence[tuple[int, int]] | None = None,
                  guidance: Sequence[float] | None = None) -> Iterator[tuple[Tensor, Tensor, float]]:
    """The samples of N requests batch by batch: (index [B] of the batch's samples among the requests, their images
    [B, C, H, W] in about [-1, 1] (a latent model's decoded by its VAE), network evaluations per sample), so that a set
    of any size is generated and judged in memory bounded by a batch. Arguments as generate_images.

    A batch is `batch_size` requests in order; with per-sample `guidance`, `batch_size` of the requests of one scale in
    order (each scale's yielded when full, their last ones at the end, so at most batch_size - 1 initial noises wait
    per scale). Initial noise: noise_seeds' (seeded_noise), else the rows of one torch.randn(N, ...) from `seed`, drawn
    batch by batch (initial_noise). The sampler's later draws come from a CPU generator seeded with `seed` (one per
    scale), after the N initial draws when those come from it: the draws of one MethodModule.generate call (per
    scale), whatever the batches. (Sampling and decoding run without gradients, MethodModule's own no_grad; a
    torch.no_grad decorator here would hold each yielded batch until the next one is made.)"""
    from tqdm.auto import tqdm

    requests = requests if isinstance(requests, Tensor) else list(requests)
    n, shape = len(requests), module.sample_shape()
    scales = [scale] * n if guidance is None else list(guidance)
    generators = {w: torch.Generator().manual_seed(seed) for w in dict.fromkeys(scales)}
    if guidance is None and noise_seeds is None:  # generate's own noise: its later draws follow the N initial ones
        for _ in noise_draws(generators[scale], n, shape, batch_size):
            pass
    kwargs = dict(progress=progress, eta=eta, guider_params=guider_params, nasa_scale=nasa_scale,
                  negtome_scale=negtome_scale, encode=encode)

    def run(w: float | None, rows: list[tuple[int, Tensor]]) -> tuple[Tensor, Tensor, float]:
        index = torch.tensor([i for i, _ in rows])
        batch = requests[index] if isinstance(requests, Tensor) else [requests[i] for i, _ in rows]
        neg = [negative[i] for i, _ in rows] if isinstance(negative, (list, tuple)) else negative
        x, nfe = module.generate(batch, w, steps, sampler, guider, seed, batch_size=len(rows), negative=neg,
                                 noise=torch.stack([z for _, z in rows]), generator=generators[w], **kwargs)
        return index, module.samples_to_images(x), nfe

    pending: dict = {w: [] for w in generators}
    with tqdm(total=n, desc="samples", unit="image", disable=None if progress else True) as bar:
        start = 0
        for noise in initial_noise(shape, n, seed, noise_seeds, batch_size):
            for i, z in enumerate(noise, start):
                pending[scales[i]].append((i, z.clone()))  # a copy: a waiting row keeps no other row alive
                if len(pending[scales[i]]) == batch_size:
                    rows, pending[scales[i]] = pending[scales[i]], []
                    bar.update(len(rows))
                    yield run(scales[i], rows)
            start += len(noise)
        for w, rows in pending.items():
            if rows:
                bar.update(len(rows))
                yield run(w, rows)


def generate_images(module, requests: Sequence, scale: float | None = None, steps: int | None = None,
                    sampler: str | None = None, guider=None, seed: int = 0, negative: Any = None, eta: float = 0.0,
                    guider_params: dict | None = None, batch_size: int = 64,
                    progress: bool = True, nasa_scale: float | None = None,
                    negtome_scale: float | None = None, encode=None,
                    noise_seeds: Sequence[tuple[int, int]] | None = None,
                    guidance: Sequence[float] | None = None) -> tuple[Tensor, float]:
    """Images [N, C, H, W] in about [-1, 1] for N requests (a latent model's samples decoded by its VAE), and network
    evaluations per sample (nasa_scale, negtome_scale: NASA's negative cross-attention, NegToMe; encode: the requests'
    condition instead of the model's encoding, an attack's; as MethodModule.generate takes them): image_batches'
    batches in one tensor.

    noise_seeds: each sample's initial noise from its own (seed, draw) (seeded_noise) instead of draws from `seed`;
    guidance: each sample's guidance scale instead of `scale` (samples sharing a scale are generated together)."""
    images, evaluations = None, 0.0
    for index, x, nfe in image_batches(module, requests, scale, steps, sampler, guider, seed, negative, eta,
                                       guider_params, batch_size, progress, nasa_scale, negtome_scale, encode,
                                       noise_seeds, guidance):
        if images is None:
            images = x.new_empty(len(requests), *x.shape[1:])
        images[index] = x
        evaluations += nfe * len(index)
    return images, evaluations / len(requests)


def set_data(module, rs: RequestSet):
    """The labelled data whose feature network judges a RequestSet: the model's own (train.evaluation.labelled.data_of)
    for class requests, the digits for the text digits' class prompts, None for prompts (no labels)."""
    from train.evaluation.labelled import data_of, labelled_data

    if rs.labels is None:
        return None
    return labelled_data(None) if rs.prompts is not None else data_of(module)


def check_set(module, rs: RequestSet):
    """set_data, with the model's image shape checked against its feature network before anything is sampled."""
    from train.evaluation.labelled import check_generates

    data = set_data(module, rs)
    if data is not None and rs.prompts is None:
        check_generates(module, data)
    return data


def evaluate_set(module, rs: RequestSet, scales: Sequence[float | None] = (None,), steps: int | None = None,
                 sampler: str | None = None, guider: str | None = None, guider_params: dict | None = None,
                 seed: int = 0, negative: Any = None, eta: float = 0.0, fid_weights: str | None = None,
                 fid_reference: str | None = None, clip_model: str | None = None, *, nudenet: str | None = None,
                 nudity_threshold: float | None = None, nudity_classes: Sequence[str] | None = None,
                 concept_template: str | None = None, batch_size: int = 64,
                 save_images=None) -> tuple[list[dict], list[str]]:
    """(rows, missing): one metrics row per scale (None: the prompt file's own guidance scales where the set has them
    and the model takes them, else the recipe's own) for the samples of `rs`, and a sentence for each reference metric
    that could not be computed for lack of local weights or reference images.

    Labelled rows get the feature-network metrics of their data (check_set: shapes checked first); FID with
    fid_weights compares with fid_reference, or without one with the data's held-out images (class requests); the
    nudity rate (nudenet, nudity_threshold, nudity_classes: train.evaluation.nudity) and the zero-shot concept
    metrics (the set's concepts, concept_template: train.evaluation.zero_shot; the erased concepts are the module's
    concept_names) come from train.evaluation.reference.ReferenceMetrics.

    Any number of samples in memory bounded by a batch: they are generated `batch_size` at a time (image_batches) and
    each batch goes to every metric (LabelledMetrics, ReferenceMetrics keep a few numbers per image and FID's running
    sums) and, with save_images (a claimed train.evaluation.saved_images.ImageFolder), to a PNG per image in a
    subfolder per scale, before the next batch is sampled. The metrics' torch networks (feature network, Inception,
    CLIP) run on the module's device (train.runtime.devices.place_for_sampling puts it where --device says)."""
    from train.evaluation.digits_text import erased_digits
    from train.evaluation.evaluate import LabelledMetrics, sampling_columns
    from train.evaluation.reference import ReferenceMetrics

    data = check_set(module, rs)
    if fid_weights is not None and fid_reference is None and data is not None and rs.prompts is None:
        held_out = data.split_tensors("validation")[0]
        fid_reference = held_out.expand(-1, 3, -1, -1) if held_out.shape[1] == 1 else held_out
    per_prompt = rs.guidance is not None and takes_guidance(module, rs.guidance, steps, sampler, guider, guider_params,
                                                            eta, negative is not None)
    judges = {k: v for k, v in (("nudity_threshold", nudity_threshold), ("nudity_classes", nudity_classes),
                                ("concept_template", concept_template)) if v is not None}
    erased = list(module.concept_names()) if hasattr(module, "concept_names") else []
    n, rows, missing = len(rs.requests), [], []
    wants_reference = rs.labels is None or rs.concepts is not None or \
        any(v is not None for v in (fid_weights, fid_reference, clip_model, nudenet))
    reference = ReferenceMetrics(n, rs.prompts, fid_weights, fid_reference, clip_model, nudenet=nudenet,
                                 concepts=rs.concepts, concept_labels=rs.concept_labels, erased=erased,
                                 device=module.device, **judges) if wants_reference else None
    for w in scales:
        guidance = rs.guidance if w is None and per_prompt else None
        columns = sampling_columns(module, w, steps, sampler, guider, guider_params)
        judged = [LabelledMetrics(n, rs.labels, data=data, erased=erased_digits(module), device=module.device)] \
            if rs.labels is not None else []
        judged += [reference] if reference is not None else []
        if save_images is not None:
            judged.append(save_images.part(saved_name(rs, guidance, columns["w"]),
                                           saved_records(rs, guidance, columns["w"], seed)))
        evaluations = 0.0
        for index, images, nfe in image_batches(module, rs.requests, w, steps, sampler, guider, seed, negative, eta,
                                                guider_params, batch_size, noise_seeds=rs.noise_seeds,
                                                guidance=guidance):
            for judge in judged:
                judge.update(index, images)
            evaluations += nfe * len(index)
            del images  # the batch's images go before the next batch is sampled
        nfe = evaluations / n
        row = {"requests": rs.name, **columns, "eta": eta, "nfe_per_sample": nfe}
        if guidance is not None:
            row["w"] = f"per prompt ({min(guidance):g} to {max(guidance):g})"
        if rs.noise_seeds is not None:
            row["seed"] = "per prompt"
        if rs.labels is not None:
            row.update(judged[0].compute(nfe))
        if reference is not None:
            m = reference.compute()
            reference.reset()
            missing = list(m.pop("missing", []))
            row.update(m)
        rows.append(row)
    return rows, missing


def saved_name(rs: RequestSet, guidance: Sequence[float] | None, w: float | None) -> str:
    """The --save-images subfolder of a set's images at one scale: its kind and w (classes-w3, prompts-w-per-prompt)."""
    kind = "classes" if rs.prompts is None else "class-prompts" if rs.labels is not None else \
        "concept-prompts" if rs.concept_labels is not None else "prompts"
    return f"{kind}-w-per-prompt" if guidance is not None else kind if w is None else f"{kind}-w{w:g}"


def saved_records(rs: RequestSet, guidance: Sequence[float] | None, w: float | None, seed: int) -> list[dict]:
    """What the --save-images manifest says of each sample of a set: its index, request, label (class or concept),
    guidance scale and initial noise (seed, draw: row `draw` of torch.randn(n, ...) from a CPU generator seeded with
    `seed`; the sampler's own later draws, with eta > 0, follow)."""
    seeds = rs.noise_seeds or [(seed, i) for i in range(len(rs.requests))]
    labels = rs.labels.tolist() if rs.labels is not None else \
        [rs.concepts[c] for c in rs.concept_labels.tolist()] if rs.concept_labels is not None else None
    return [{"requests": rs.name, "index": i, "request": str(r), "label": "" if labels is None else labels[i],
             "w": w if guidance is None else guidance[i], "seed": s, "draw": d}
            for i, (r, (s, d)) in enumerate(zip(rs.requests, seeds))]


def evaluate_checkpoint(module, scales: Sequence[float | None] = (None,), steps: int | None = None,
                        sampler: str | None = None, guider: str | None = None, seed: int = 0, num_per_class: int = 100,
                        guider_params: dict | None = None) -> list[dict]:
    """Metrics rows (one per scale) of every class of a class-conditional model."""
    rs = request_sets(module, num_per_class=num_per_class)[0]
    return evaluate_set(module, rs, scales, steps, sampler, guider, guider_params, seed)[0]


def evaluate_class_prompts(module, template: str, scales: Sequence[float | None] = (None,), steps: int | None = None,
                           sampler: str | None = None, guider: str | None = None, seed: int = 0,
                           num_per_class: int = 100, guider_params: dict | None = None,
                           negative: Any = None) -> list[dict]:
    """Metrics rows (one per scale) of the digits text model prompted class by class with `template`."""
    rs = request_sets(module, class_prompts=template, num_per_class=num_per_class)[0]
    return evaluate_set(module, rs, scales, steps, sampler, guider, guider_params, seed, negative)[0]
