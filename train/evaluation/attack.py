"""Adversarial prompts against erased text-to-image models: UnlearnDiffAtk's soft-token attack (learnable token
embeddings prepended to a prompt, optimised with Adam against the erased network's denoising loss on images of the
concept) and Ring-A-Bell's concept-vector attack, and the erased-class rate of the attacked prompts, before and after,
judged by the evaluation classifier.

Reference: Zhang et al. 2024, "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy To Generate
Unsafe Images ... For Now" (arXiv 2310.11868), and the authors' code OPTML-Group/Diffusion-MU-Attack
(src/attackers/text_grad_.py, src/tasks/classifier_.py). The authors optimise k = 3 prefix tokens (insertion
`prefix_k`, after the start token) as distributions over the vocabulary, sampled one-hot with a straight-through
estimator and projected to the simplex, Adam lr 0.01; their target images are the original model's generations of the
prompt; t runs over 50 timesteps 10, 30, ..., 990 of 1000. Here the k tokens are continuous vectors in the text
encoder's input embedding space (the relaxation without the one-hot projection: a stronger attacker), initialised at
random vocabulary tokens, with t ~ U[0.01, 0.99] and fresh noise each step; their nearest vocabulary tokens are
evaluated too (the hard prompt a discrete attack would read off), as the token ids themselves: the authors evaluate the
id sequence (text_grad_.py `run`: `task.eval(construct_id(proj_ids, ...))`, the text decoded for the log only), and a
decoded text need not encode back to the same ids (a byte-level vocabulary's partial characters decode to U+FFFD), so
the report gives the decoded text for people to read and whether it round-trips. The text encoder and the erased
network are frozen: gradients reach the k vectors only, and shared encoders are never modified (an explicit
inputs_embeds path).

Ring-A-Bell: Tsai et al. 2024, "Ring-A-Bell! How Reliable are Concept Removal Methods for Diffusion Models?" (arXiv
2310.10012), the authors' code chiayi-hsu/Ring-A-Bell (Get_Concept_Vector.ipynb, InversePrompt.ipynb). Model-agnostic:
it never runs the erased network. The concept vector c is the mean text-embedding difference of prompt pairs with and
without the concept (their nudity and violence pairs; for the text digits' class prompts, the concept digit's prompt
against each other digit's in the same template); the attacked prompt's target is its embedding moved along c,
f(p) + eta c (theirs: eta = 3 for nudity, `cof = 3`; 5.5 for violence, their
data/InvPrompt/Violence/Violence_eta_5.5_K_77.csv), and the problematic prompt is the K-token prompt a genetic
algorithm finds nearest to that target (theirs: K = 16, population 200, 3000 generations). Both are evaluated: the
target embedding itself (the continuous relaxation, the `attacked` rate) and the discrete prompt as its token ids (the
authors' attack, the `nearest_words` rate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from guidance.guided import GuidedDenoiser
from guidance.guiders import build_guider
from guidance.samplers import sample
from train.evaluation.prompt_attack import (RING_A_BELL_POPULATION, concept_vector, nearest_tokens,
                                            ring_a_bell_embedding, ring_a_bell_search, unlearndiffatk_loss)

DEFAULT_SCALE, DEFAULT_STEPS = 2.0, 50  # the guided recipes' defaults (train.methods.sampling), for the target images

ATTACKS = ("unlearndiffatk", "ringabell")
T_RANGE = (0.01, 0.99)  # the authors' timesteps 10 .. 990 of 1000
DEFAULTS = {"unlearndiffatk": {"steps": 100, "tokens": 3, "lr": 0.01, "images": 4},  # the authors' k and lr
            "ringabell": {"steps": 3000, "tokens": 16, "strength": 3.0}}  # the authors' generations, K, eta (nudity)


@dataclass
class AttackSettings:
    """An attack's settings; None takes the method's default (DEFAULTS), and a setting of the other method is refused.

    UnlearnDiffAtk: steps: Adam steps (0: no attack, the plain prompt); tokens: k soft tokens prepended (the authors'
    k = 3); lr: Adam's (the authors' 0.01); images: concept images per prompt, each step's batch; probe: fixed (t, eps)
    draws per image on which the loss is reported before and after. Ring-A-Bell: steps: generations of the genetic
    search (the authors' 3000; 0: the concept-shifted embedding only, no discrete prompt); tokens: the discrete
    prompt's length K (the authors' 16); strength: eta (the authors' 3 for nudity, 5.5 for violence; 0: the plain
    prompt's embedding); pairs: a file of prompt pairs whose mean embedding difference is the concept vector, one
    "with the concept<TAB>without it" a line (None: the class prompts' own pairs). seed: every draw."""

    method: str = "unlearndiffatk"
    steps: int | None = None
    tokens: int | None = None
    lr: float | None = None
    images: int | None = None
    strength: float | None = None
    pairs: str | None = None
    probe: int = 4
    seed: int = 0
    concept_pairs: list[tuple[str, str]] = field(default_factory=list, init=False)

    def __post_init__(self):
        if self.method not in ATTACKS:
            raise ValueError(f"unknown attack {self.method!r}; choose {', '.join(ATTACKS)}")
        other = {"lr": self.lr, "images": self.images} if self.method == "ringabell" else {
            "strength": self.strength, "pairs": self.pairs}
        given = [f"--attack-{k}" for k, v in other.items() if v is not None]
        if given:
            theirs = "unlearndiffatk" if self.method == "ringabell" else "ringabell"
            raise ValueError(f"{', '.join(given)} configure{'s' * (len(given) == 1)} --attack {theirs}; leave "
                             f"{'it' if len(given) == 1 else 'them'} out with --attack {self.method}")
        for k, v in DEFAULTS[self.method].items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"--attack-steps must be an integer >= 0 (0: no attack), got {self.steps!r}")
        if not isinstance(self.tokens, int) or self.tokens < 1:
            raise ValueError(f"--attack-tokens must be a positive integer (UnlearnDiffAtk prepends 3, Ring-A-Bell's "
                             f"prompts have 16), got {self.tokens!r}")
        if self.method == "ringabell":
            if not math.isfinite(self.strength):
                raise ValueError(f"--attack-strength must be a finite number (Ring-A-Bell: 3 nudity, 5.5 violence), "
                                 f"got {self.strength}")
            if self.pairs is not None:
                self.concept_pairs = read_concept_pairs(self.pairs)
            return
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--attack-lr must be a positive number (UnlearnDiffAtk: 0.01), got {self.lr}")
        if self.images < 1 or self.probe < 1:
            raise ValueError(f"--attack-images must be positive, got {self.images}")

    def report(self) -> dict:
        keys = ("steps", "tokens") + (("lr", "images") if self.method == "unlearndiffatk" else ("strength",))
        extra = {"population": RING_A_BELL_POPULATION, "pairs": self.pairs} if self.method == "ringabell" else {}
        return {"method": self.method, **{k: getattr(self, k) for k in keys}, **extra, "seed": self.seed}


def read_concept_pairs(path: str) -> list[tuple[str, str]]:
    """The prompt pairs of an --attack-pairs file: one "prompt with the concept<TAB>the same prompt without it" a line
    (blank lines skipped), as Ring-A-Bell's Violence_30.csv columns prompt and prompt1."""
    from pathlib import Path

    if not Path(path).is_file():
        raise ValueError(f"--attack-pairs {path}: no such file; give a text file of lines 'with concept<TAB>without'")
    pairs = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not all(q.strip() for q in parts):
            raise ValueError(f"--attack-pairs {path} line {n}: expected 'prompt with the concept<TAB>the same prompt "
                             f"without it', got {line!r}")
        pairs.append((parts[0].strip(), parts[1].strip()))
    if not pairs:
        raise ValueError(f"--attack-pairs {path} has no pairs; write one 'with concept<TAB>without' a line")
    return pairs


@dataclass
class PromptAttack:
    """One attacked prompt: its learned soft tokens [k, D], the attacked text-encoder output [L, D], the loss of each
    step, the loss on the fixed probe draws with the plain prompt, the initial and the learned tokens, and the learned
    tokens' nearest vocabulary tokens: their ids, the text-encoder output [L, D] of the prompt with those ids (the
    discrete prompt, evaluated as ids), their tokens and decoded text, and whether the text encodes back to the ids.
    Ring-A-Bell's (objective "fitness"): no soft tokens ([0, D]), the concept-shifted embedding as the attacked states,
    the genetic search's best squared distance to it per generation, the plain prompt's, the first generation's best
    and the found prompt's, and the found prompt (the ids alone) as the nearest tokens."""

    prompt: str
    soft: Tensor
    states: Tensor
    loss_curve: list[float] = field(default_factory=list)
    loss_plain: float | None = None
    loss_initial: float | None = None
    loss_attacked: float | None = None
    nearest_ids: list[int] = field(default_factory=list)
    nearest_states: Tensor | None = None
    nearest_words: list[str] = field(default_factory=list)
    nearest_prompt: str | None = None
    nearest_roundtrip: bool | None = None
    objective: str = "loss"

    def report(self) -> dict:
        o = self.objective
        return {"prompt": self.prompt, f"{o}_curve": self.loss_curve, f"{o}_plain": self.loss_plain,
                f"{o}_initial": self.loss_initial, f"{o}_attacked": self.loss_attacked,
                "nearest_ids": self.nearest_ids, "nearest_words": self.nearest_words,
                "nearest_prompt": self.nearest_prompt, "nearest_words_roundtrip": self.nearest_roundtrip}


def clip_text_encoder(module) -> tuple[Any, Any]:
    """(tokenizer, CLIP text model) of a text module whose prompts go through one CLIP encoder (SD 1.x/2.x), or a
    ValueError saying what the attack takes."""
    conditioner = module.conditioner
    if conditioner.enumerate() is not None:
        raise ValueError("--attack attacks the prompts of a text-to-image model; this model takes class labels (its "
                         "condition is a class embedding, not a prompt): evaluate it without --attack")
    encoder = conditioner.encoder
    if encoder.kind != "clip":
        raise ValueError(f"--attack supports one-CLIP-encoder models (SD 1.x/2.x, the text digits "
                         f"pipeline); this model's prompt encoder is {encoder.kind!r}")
    return encoder.tokenizers[0], encoder.encoders[0]


def token_states(tokenizer, text_encoder, prompts: Sequence[str], soft: Tensor | None = None) -> Tensor:
    """The CLIP text encoder's last hidden states [B, L, D] of prompts with the soft token embeddings soft [k, D] (or
    [B, k, D], one set per prompt) inserted after the start token (UnlearnDiffAtk's `prefix_k`); the sequence keeps its
    length L (k padding positions drop off the end). soft None (or k = 0): exactly what the encoder gives the prompts
    (encode_clip), through an explicit inputs_embeds path that never modifies the (shared) encoder."""
    from transformers.masking_utils import create_causal_mask

    L = tokenizer.model_max_length
    tokens = tokenizer(list(prompts), padding="max_length", max_length=L, truncation=True, return_tensors="pt")
    tm = getattr(text_encoder, "text_model", text_encoder)
    dev = tm.embeddings.token_embedding.weight.device
    emb = tm.embeddings.token_embedding(tokens.input_ids.to(dev))
    mask = tokens.attention_mask.to(dev) if getattr(tm.config, "use_attention_mask", False) else None
    k = 0 if soft is None else soft.shape[-2]
    if k:
        longest = int(tokens.attention_mask.sum(1).max())
        if longest + k > L:
            raise ValueError(f"a prompt of {longest} tokens leaves no room for {k} attack tokens in {L}; shorten it or "
                             f"lower --attack-tokens")
        b = emb.shape[0]
        emb = torch.cat([emb[:, :1], soft.to(emb.dtype).expand(b, k, -1), emb[:, 1:L - k]], 1)  # [k, D] or [B, k, D]
        if mask is not None:
            mask = torch.cat([mask[:, :1], mask.new_ones(b, k), mask[:, 1:L - k]], 1)
    with torch.autocast(device_type=dev.type, enabled=False):
        hidden = tm.embeddings(inputs_embeds=emb)  # + position embeddings, as CLIPTextModel.forward
        causal = create_causal_mask(config=tm.config, inputs_embeds=hidden, attention_mask=mask, cache=None)
        out = tm.encoder(inputs_embeds=hidden, attention_mask=causal, is_causal=True)
        return tm.final_layer_norm(out.last_hidden_state)


def vocabulary(tokenizer, text_encoder) -> tuple[Tensor, Tensor]:
    """(the text encoder's input token embeddings [V, D], the ids [V'] an attack may use: all but the special ones)."""
    vocab = getattr(text_encoder, "text_model", text_encoder).embeddings.token_embedding.weight
    special = set(tokenizer.all_special_ids)
    return vocab, torch.tensor([i for i in range(vocab.shape[0]) if i not in special])


def discrete_prompt(tokenizer, text_encoder, ids: Sequence[int], prompt: str = "") -> tuple[str, Tensor, bool]:
    """The hard prompt of vocabulary token ids [k] inserted after the start token of `prompt` ("": the ids alone):
    (its decoded text, for people to read; the text encoder's states [L, D] of the exact ids; whether the text encodes
    back to those ids). The states are token_states with the ids' own vocabulary rows as the inserted embeddings, so
    bit for bit the encoder's output of the id sequence [start, ids, prompt's tokens, end, padding]."""
    vocab = getattr(text_encoder, "text_model", text_encoder).embeddings.token_embedding.weight
    ids = [int(i) for i in ids]
    with torch.no_grad():
        states = token_states(tokenizer, text_encoder, [prompt], vocab[torch.tensor(ids, device=vocab.device)])[0]
    text = f"{tokenizer.decode(ids).strip()} {prompt}".strip()
    plain = tokenizer(prompt).input_ids
    return text, states, tokenizer(text, verbose=False).input_ids == plain[:1] + ids + plain[1:]  # any length


def original_denoiser(module):
    """The model before erasure (an erasure module's `frozen`; any other module's own sampling network)."""
    frozen = getattr(module, "frozen", None)
    return frozen if frozen is not None else module.sampling_denoiser()


@torch.no_grad()
def concept_samples(module, prompt: str, n: int, scale: float | None, steps: int | None, seed: int) -> Tensor:
    """n samples [n, C, h, w] (a latent model's latents: the space the loss is computed in) of `prompt` from the
    ORIGINAL model (CFG at `scale`, DDIM with `steps`): UnlearnDiffAtk's target images."""
    guided = GuidedDenoiser(original_denoiser(module), build_guider("cfg"))
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, *module.sample_shape(), generator=gen).to(module.device)
    return sample(guided, noise, module.encode([prompt] * n), DEFAULT_SCALE if scale is None else scale,
                  DEFAULT_STEPS if steps is None else steps, generator=gen)


def _condition(module, prompt: str, states: Tensor, n: int) -> Any:
    cond = module.encode([prompt] * n)
    h = cond["encoder_hidden_states"]
    return {**cond, "encoder_hidden_states": states.to(h.dtype).expand(n, *states.shape[-2:])}


def unlearndiffatk(module, prompt: str, settings: AttackSettings, x0: Tensor | None = None, scale: float | None = None,
                   steps: int | None = None) -> PromptAttack:
    """Attack one prompt of a text module: the erased model is `module.sampling_denoiser()`, the target images x0
    [n, C, h, w] (default: settings.images samples of the prompt from the original model, `concept_samples`). With
    settings.steps == 0 nothing is learned and the prompt is the plain one (its states are encode_clip's)."""
    tokenizer, text_encoder = clip_text_encoder(module)
    erased = module.sampling_denoiser()
    with torch.no_grad():
        plain = token_states(tokenizer, text_encoder, [prompt])[0]
    if settings.steps == 0:  # the plain prompt's own condition, bit for bit
        states = module.encode([prompt])["encoder_hidden_states"][0]
        return PromptAttack(prompt, plain.new_zeros(0, plain.shape[-1]), states)
    if x0 is None:
        x0 = concept_samples(module, prompt, settings.images, scale, steps, settings.seed)
    x0 = x0.to(module.device)
    n = len(x0)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    vocab, allowed = vocabulary(tokenizer, text_encoder)
    init = allowed[torch.randint(len(allowed), (settings.tokens,), generator=gen)]
    soft = vocab[init.to(vocab.device)].detach().float().clone().requires_grad_(True)
    probe_t = torch.rand(settings.probe * n, generator=gen) * (T_RANGE[1] - T_RANGE[0]) + T_RANGE[0]
    probe_eps = torch.randn(settings.probe * n, *x0.shape[1:], generator=gen)

    def probe(states: Tensor) -> float:
        with torch.no_grad():
            xs = x0.repeat(settings.probe, 1, 1, 1)
            cond = _condition(module, prompt, states, len(xs))
            return unlearndiffatk_loss(erased, xs, cond, probe_t.to(xs.device), probe_eps.to(xs)).item()

    result = PromptAttack(prompt, soft, plain, loss_plain=probe(plain))
    result.loss_initial = probe(token_states(tokenizer, text_encoder, [prompt], soft.detach())[0])
    opt = torch.optim.Adam([soft], lr=settings.lr)
    with torch.enable_grad():
        for _ in range(settings.steps):
            t = torch.rand(n, generator=gen) * (T_RANGE[1] - T_RANGE[0]) + T_RANGE[0]
            eps = torch.randn(x0.shape, generator=gen)
            states = token_states(tokenizer, text_encoder, [prompt], soft)[0]
            loss = unlearndiffatk_loss(erased, x0, _condition(module, prompt, states, n), t.to(x0.device), eps.to(x0))
            (grad,) = torch.autograd.grad(loss, [soft])  # gradients reach the soft tokens only
            soft.grad = grad
            opt.step()
            result.loss_curve.append(loss.item())
    result.soft = soft.detach()
    with torch.no_grad():
        result.states = token_states(tokenizer, text_encoder, [prompt], result.soft)[0]
    result.loss_attacked = probe(result.states)
    result.nearest_ids = nearest_tokens(result.soft, vocab).tolist()
    result.nearest_words = tokenizer.convert_ids_to_tokens(result.nearest_ids)
    result.nearest_prompt, result.nearest_states, result.nearest_roundtrip = discrete_prompt(
        tokenizer, text_encoder, result.nearest_ids, prompt)
    return result


def ring_a_bell_vector(module, rs, classes: Sequence[int], pairs: Sequence[tuple[str, str]] = ()) -> tuple[Tensor, int]:
    """(Ring-A-Bell's concept vector c [L, D], the number of prompt pairs it averages; arXiv 2310.10012 sec. 3.2,
    prompt_attack.concept_vector) through the model's own text encoder: from `pairs` (with, without the concept) when
    given, else from the class prompts of a RequestSet, each prompt of the concept classes paired with each prompt of
    the other classes (the same template with another digit: c = mean f(concept's) - mean f(others'))."""
    if not pairs:
        if rs.labels is None:
            raise ValueError("--attack ringabell on --prompt/--prompts needs the concept's prompt pairs: add "
                             "--attack-pairs FILE (lines 'prompt with the concept<TAB>the same prompt without it')")
        labels = rs.labels.tolist()
        concept = list(dict.fromkeys(p for p, c in zip(rs.prompts, labels) if c in classes))
        others = list(dict.fromkeys(p for p, c in zip(rs.prompts, labels) if c not in classes))
        if not others:
            raise ValueError("--attack ringabell pairs the concept digits' prompts with the other digits'; this set "
                             "has no other digit: sample more classes or give --attack-pairs FILE")
        pairs = [(a, b) for a in concept for b in others]
    with torch.no_grad():
        with_concept = module.encode([a for a, _ in pairs])["encoder_hidden_states"]
        without = module.encode([b for _, b in pairs])["encoder_hidden_states"]
    return concept_vector(with_concept, without), len(pairs)


def ring_a_bell(module, prompt: str, vector: Tensor, settings: AttackSettings) -> PromptAttack:
    """Ring-A-Bell against one prompt of a text module (arXiv 2310.10012 sec. 3.2-3.3; the authors'
    InversePrompt.ipynb):
    the attacked states are the prompt's embedding moved along the concept vector [L, D], f(p) + eta c
    (prompt_attack.ring_a_bell_embedding; eta = 0: the prompt's own condition, bit for bit), and with settings.steps
    generations the genetic search (prompt_attack.ring_a_bell_search) finds the K-token prompt whose embedding is
    nearest to it in squared distance over every position and channel, evaluated as its ids (discrete_prompt) with the
    tokenizer's padding after the end token (theirs: SD 1.4's, the end token)."""
    tokenizer, text_encoder = clip_text_encoder(module)
    with torch.no_grad():
        plain = module.encode([prompt])["encoder_hidden_states"]
    states = ring_a_bell_embedding(plain, vector, settings.strength)[0]
    result = PromptAttack(prompt, plain.new_zeros(0, plain.shape[-1]), states, objective="fitness")
    if settings.steps == 0:
        return result
    vocab, allowed = vocabulary(tokenizer, text_encoder)
    target = states.float()

    def fitness(ids: Tensor) -> Tensor:  # [P, K] -> [P]: || f(ids) - (f(p) + eta c) ||^2, the authors' `fitness`
        found = token_states(tokenizer, text_encoder, [""] * len(ids), vocab[ids.to(vocab.device)])
        return (found.float() - target).pow(2).sum((1, 2))

    gen = torch.Generator().manual_seed(settings.seed + 1)
    with torch.no_grad():
        ids, result.loss_curve = ring_a_bell_search(fitness, allowed, settings.tokens, settings.steps, gen)
        result.loss_plain = (plain[0].float() - target).pow(2).sum().item()
        result.loss_attacked = fitness(ids[None]).item()
    result.loss_initial = result.loss_curve[0]
    result.nearest_ids = ids.tolist()
    result.nearest_words = tokenizer.convert_ids_to_tokens(result.nearest_ids)
    result.nearest_prompt, result.nearest_states, result.nearest_roundtrip = discrete_prompt(
        tokenizer, text_encoder, result.nearest_ids)
    return result


def attacked_encode(module, states: dict[str, Tensor]):
    """requests -> their condition, the rows of the prompts in `states` replaced by their text-encoder states [L, D]
    (an attack's: the attacked prompt's, or its hard prompt's; the encode hook of MethodModule.generate)."""

    def encode(requests):
        cond = module.encode(requests)
        rows = [i for i, r in enumerate(requests) if r in states]
        if not rows:
            return cond
        h = cond["encoder_hidden_states"].clone()
        for i in rows:
            h[i] = states[requests[i]].to(h)
        return {**cond, "encoder_hidden_states": h}

    return encode


def attacked_prompts(module, rs, concepts: Sequence = ()) -> tuple[list[str], list[int]]:
    """(prompts to attack, their digit classes) of a RequestSet: for the text digits' class prompts, the prompts of the
    concept digits (ids or words; default the module's erased digits, train.evaluation.digits_text.erased_digits); for
    a prompt set, every prompt (classes [])."""
    from train.evaluation.digits_text import DIGIT_WORDS, erased_digits

    if rs.prompts is None:
        raise ValueError("--attack optimises prompts: give --class-prompts TEMPLATE (the text digits) or --prompt TEXT")
    if rs.labels is None:
        if concepts:
            raise ValueError("--attack-concept names the digits attacked among --class-prompts; with --prompt every "
                             "prompt is attacked, so leave --attack-concept out")
        return list(dict.fromkeys(rs.prompts)), []
    classes = []
    for c in concepts or erased_digits(module):
        c = str(c).strip().lower()
        if c not in DIGIT_WORDS and not (c.isdigit() and int(c) < 10):
            raise ValueError(f"--attack-concept {c!r} is not a digit: give 0..9 or its word (seven)")
        classes.append(DIGIT_WORDS.index(c) if c in DIGIT_WORDS else int(c))
    if not classes:
        raise ValueError("this model erases no digit: name the attacked digit with --attack-concept (e.g. 7 or seven)")
    classes = list(dict.fromkeys(classes))
    labels = rs.labels.tolist()
    return list(dict.fromkeys(p for p, c in zip(rs.prompts, labels) if c in classes)), classes


def check_attack(module, settings: AttackSettings, sets: Sequence = (), concepts: Sequence = ()) -> None:
    """Refuse, before anything is sampled, what the attack cannot run on (class models, non-CLIP encoders, models that
    do not sample through a guided sampler over one denoiser) and RequestSets it cannot attack (no prompts, concept
    digits that are not digits; for Ring-A-Bell, prompts without the pairs of a concept vector)."""
    clip_text_encoder(module)
    if module.recipe().name != "cfg":
        raise ValueError(f"--attack {settings.method} needs a guided (CFG-sampled) model whose network takes the "
                         f"prompt alone; this one samples with the {module.recipe().name!r} recipe")
    for rs in sets:
        _, classes = attacked_prompts(module, rs, concepts)
        if settings.method == "ringabell":
            ring_a_bell_vector(module, rs, classes, settings.concept_pairs)


def evaluate_attack(module, rs, settings: AttackSettings, concepts: Sequence = (), scales: Sequence = (None,),
                    steps: int | None = None, sampler: str | None = None, guider: str | None = None,
                    guider_params: dict | None = None, seed: int = 0, negative: Any = None,
                    eta: float = 0.0) -> tuple[list[dict], dict, Tensor]:
    """(rows, report, images): per scale, the erased rate of the attacked prompts' samples after the attack
    (`erased_rate_attacked`; the plain evaluation's row has the rate before: UnlearnDiffAtk's soft tokens, Ring-A-Bell's
    concept-shifted embedding) and with the attack's discrete prompt as token ids (`erased_rate_nearest_words`:
    UnlearnDiffAtk's learned tokens' nearest vocabulary tokens inserted into the prompt, Ring-A-Bell's searched prompt),
    for labelled class prompts (None for prompt sets); the attack's report (settings, per prompt: loss or fitness
    curve, nearest ids, words, decoded text and whether it round-trips); the attacked rows' images at the first scale.
    Every row is sampled with the plain evaluation's noise and batches, so with 0 UnlearnDiffAtk steps or Ring-A-Bell
    strength 0 the attacked samples are the plain ones."""
    from train.evaluation.digits_text import erasure_columns
    from train.evaluation.evaluate import evaluate_samples
    from train.evaluation.requests import generate_images, set_data

    prompts, classes = attacked_prompts(module, rs, concepts)
    module.eval()
    w0 = scales[0] if scales else None
    extra = {}
    if settings.method == "ringabell":
        vector, extra["concept_pairs"] = ring_a_bell_vector(module, rs, classes, settings.concept_pairs)
        extra["concept_vector_norm"] = vector.norm().item()
        attacks = {p: ring_a_bell(module, p, vector, settings) for p in prompts}
    else:
        attacks = {p: unlearndiffatk(module, p, settings, scale=w0, steps=steps) for p in prompts}
    data = set_data(module, rs)
    attacked = {p: a.states for p, a in attacks.items()}
    hard = {p: a.nearest_states for p, a in attacks.items() if a.nearest_states is not None}
    rows, grid = [], None
    attacked_rows = torch.tensor([r in attacks for r in rs.requests])
    for w in scales:
        row = {"requests": rs.name, "w": w, "attack": settings.method}
        images = {}
        images["attacked"], _ = generate_images(module, rs.requests, w, steps, sampler, guider, seed, negative, eta,
                                                guider_params, progress=False, encode=attacked_encode(module, attacked))
        if hard:
            images["nearest_words"], _ = generate_images(module, rs.requests, w, steps, sampler, guider, seed, negative,
                                                         eta, guider_params, progress=False,
                                                         encode=attacked_encode(module, hard))
        if grid is None:
            grid = images["attacked"][attacked_rows]
        for name, x in images.items():
            rate = None
            if rs.labels is not None:
                rate = erasure_columns(evaluate_samples(x, rs.labels, data=data), classes).get("erased_rate")
            row[f"erased_rate_{name}"] = rate
        rows.append(row)
    report = {**settings.report(), **extra, "classes": classes, "prompts": [a.report() for a in attacks.values()]}
    return rows, report, grid
