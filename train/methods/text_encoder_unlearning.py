"""Few-shot text-encoder unlearning (Fuchi & Takagi 2024, arXiv 2405.07288): only a copy of the CLIP text encoder of a
frozen text-to-image model is fine-tuned, by gradient ascent on the denoising loss of a few images of the concept under
its prompts (losses.text_encoder_unlearning), and exported as the pipeline folder with the edited text_encoder/."""
from __future__ import annotations

import copy
import os

import torch
from torch import Tensor

from guidance.denoiser import Denoiser
from guidance.parameterization import raw_target
from guidance.schedules import _bcast
from losses.text_encoder_unlearning import ascent_loss, embedding_preservation, toward_loss
from models.edited_text_encoder import EditedTextNetwork, select_text_encoder_parameters
from train.methods.base import MethodModule
from train.methods.erasure_concepts import ErasureConcepts, load_prompt_model, resolve_concepts

OBJECTIVES = ("ascent", "toward")


class TextEncoderUnlearning(MethodModule):
    """The student is the frozen model (its UNet and VAE are never trained) conditioned through `student.net.
    text_encoder`, a trainable copy of its CLIP text encoder: the process's shared prompt encoder, which the frozen
    model and every other network of the process read, is never changed. Each step draws batch_size of the concept's
    few images x0 (each with a prompt drawn from its concept's prompts, as the authors' code draws a template per
    image), t and eps, and trains on:

    objective "ascent" (the paper's): minus the denoising loss of the frozen UNet under the edited encoder's prompt;
    objective "toward" (this project's): the edited prompt's output regresses the frozen model's output under the
    concept's alternative (`targets`; default the empty prompt) at the same x_t;
    plus anchor_weight x the anchors' embedding drift from the frozen encoder's (0 in the reference setting).

    model:           a diffusers pipeline folder of SD 1.x/2.x (one CLIP text encoder), or a text teacher checkpoint.
    concepts:        what to erase, as for ConceptErasure (data.concepts: a spec path or mapping, or a list of
                     prompts); each prompt of a concept conditions its images.
    targets, anchors: each concept's alternative (objective "toward") and the preserved prompts, as ConceptErasure's.
    images:          a folder of the concept's images: with captions (metadata.jsonl or .txt files, data.captions),
                     the images whose caption is one of a concept's prompts; without, every image, of the single
                     concept. null: the authors' zero-shot variant (`is_zero_shot`): `shots` fixed U[0, 1) latents.
    shots:           how many images per concept (the first, in file order); the paper's few-shot setting uses 4.
    image_size:      pixels the images are resized to (default: the latent size times the VAE's scale factor).
    text_encoder_params: which parameters train (models.edited_text_encoder.TEXT_ENCODER_PARAMS); the authors' code
                     trains "mlp-final-attn".
    batch_size, lr, betas, eps, weight_decay: Adam, the authors' defaults (2, 1e-5, (0.9, 0.98), 1e-6, 1e-8); their
                     README trains 4 epochs over 4 images (8 steps of 2).
    val_scale, val_steps, val_samples: sampling for validation/erased-rate as ConceptErasure's.
    model_config:    the model's config, filled in automatically.
    """

    method_name = "text_encoder_unlearning"

    def __init__(self, model: str, concepts: str | dict | list, targets: list | None = None,
                 anchors: list | None = None, images: str | None = None, shots: int = 4,
                 image_size: int | None = None, objective: str = "ascent",
                 text_encoder_params: str = "mlp-final-attn", anchor_weight: float = 0.0, batch_size: int = 2,
                 lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6,
                 weight_decay: float = 1e-8, val_scale: float = 2.0, val_steps: int = 20, val_samples: int = 0,
                 model_config: dict | None = None, nonfinite: str = "skip", max_skips: int = 10):
        super().__init__(nonfinite, max_skips)
        self.save_hyperparameters()
        _check(objective, shots, batch_size, lr, anchor_weight, images, image_size)
        frozen, config, unread = load_prompt_model(model, model_config, "SD 1.x/2.x",
                                                   "text-encoder unlearning edits how prompts are encoded")
        self.hparams["model_config"] = config
        self.frozen = frozen
        self.register_frozen(frozen.net, model, unread)  # left out of checkpoints (MethodModule.register_frozen)
        conditioner = frozen.net.conditioner
        self.spec: ErasureConcepts = resolve_concepts(concepts, targets, anchors, conditioner)
        if anchor_weight > 0 and not self.spec.anchors:
            raise ValueError("anchor_weight > 0 preserves the anchors' embeddings: give anchors (prompts), or set "
                             "anchor_weight: 0")
        if getattr(conditioner, "encoder", None) is None or conditioner.encoder.kind != "clip":
            kind = getattr(getattr(conditioner, "encoder", None), "kind", None)
            raise ValueError(f"text-encoder unlearning edits the one CLIP text encoder of SD 1.x/2.x pipelines; this "
                             f"model's prompt encoder is {kind!r} (for SDXL/SD3/Flux use "
                             f"train.methods.erasure.ConceptErasure or train.methods.uce.ClosedFormErasure)")
        encoder = copy.deepcopy(conditioner.encoder.encoders[0])  # the shared encoder itself is never trained
        self.trainable_names = select_text_encoder_parameters(encoder, text_encoder_params)
        self.student = Denoiser(EditedTextNetwork(frozen.net, encoder), frozen.schedule, frozen.parameterization,
                                frozen.sigma_data)
        self.trainable = [p for p in encoder.parameters() if p.requires_grad]
        self.objective, self.anchor_weight, self.batch_size = objective, anchor_weight, batch_size
        self.images, self.shots, self.image_size = images, shots, image_size
        self.lr, self.betas, self.adam_eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.val_scale, self.val_steps, self.val_samples = val_scale, val_steps, val_samples
        self._x0: tuple[Tensor, Tensor] | None = None  # (the few samples [N, C, H, W], their concept index [N])

    # --- what is erased ----------------------------------------------------------------------------
    def erased_requests(self) -> list:
        return [r for r, _ in self.spec.erased]

    def concept_names(self) -> list[str]:
        return list(self.spec.names)

    def sampling_denoiser(self) -> Denoiser:
        return self.student

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.student.net.text_encoder

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen.eval()
        self.text_encoder.eval()  # CLIP's dropout stays off, as at sampling (the encoder is trained in eval mode)
        return self

    # --- the few samples -----------------------------------------------------------------------------
    def few_samples(self) -> tuple[Tensor, Tensor]:
        """(x0 [N, C, H, W] on the module's device, concept index [N] long): `shots` images per concept encoded by the
        model's VAE, or the zero-shot U[0, 1) latents (seeded, the same every run). Built once."""
        if self._x0 is None:
            self._x0 = self._load_images() if self.images is not None else self._uniform_latents()
        x0, concept = self._x0
        return x0.to(self.device), concept.to(self.device)

    def _uniform_latents(self) -> tuple[Tensor, Tensor]:
        n = self.shots * len(self.spec.names)
        g = torch.Generator().manual_seed(0)
        return torch.rand(n, *self.sample_shape(), generator=g), torch.arange(n) % len(self.spec.names)

    def _load_images(self) -> tuple[Tensor, Tensor]:
        from data.captions import caption_folder_dataset
        from data.images import _image_files, image_to_tensor

        folder = os.path.expanduser(self.images)
        if not os.path.isdir(folder):
            raise ValueError(f"images={self.images!r} is not a folder; give a folder of the concept's images (with "
                             f"captions naming its prompts when there are several concepts), or null (zero-shot)")
        files = _image_files(folder)
        captioned = os.path.isfile(os.path.join(folder, "metadata.jsonl")) or any(
            os.path.isfile(os.path.splitext(f)[0] + ".txt") for f in files)
        picked: list[tuple[object, int]] = []
        if captioned:
            rows = caption_folder_dataset(folder)
            index = {r: i for r, i in self.spec.erased}
            counts = [0] * len(self.spec.names)
            for k, caption in enumerate(rows["text"]):
                i = index.get(caption)
                if i is not None and counts[i] < self.shots:
                    picked.append((rows[k]["image"], i))
                    counts[i] += 1
            empty = [n for n, c in zip(self.spec.names, counts) if c == 0]
            if empty:
                raise ValueError(f"{self.images} has no image captioned with a prompt of concept(s) {empty}; caption "
                                 f"the concept's images with one of its prompts {self.erased_requests()}")
        else:
            if len(self.spec.names) > 1:
                raise ValueError(f"{self.images} has no captions, so its images cannot be told apart between the "
                                 f"{len(self.spec.names)} concepts; caption each image with a concept prompt")
            from PIL import Image

            picked = [(Image.open(f), 0) for f in files[:self.shots]]
            if not picked:
                raise ValueError(f"{self.images} holds no images")
        size = self.image_size or self.sample_shape()[-1] * int(getattr(self.frozen.net, "vae_scale_factor", 1))
        pixels = torch.stack([image_to_tensor(img, size, 3) for img, _ in picked])
        x0 = self.images_to_samples(pixels).float()
        return x0, torch.tensor([i for _, i in picked])

    # --- the loss ------------------------------------------------------------------------------------
    def losses(self, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """{"unlearn": mean ascent or toward loss, "preserve": mean anchor embedding drift (anchor_weight > 0)}."""
        x0_all, concept_all = self.few_samples()
        n, dev = self.batch_size, self.device
        pick = self.per_sample(lambda m: torch.randint(0, len(x0_all), (m,), generator=generator), n).to(dev)
        u = self.per_sample(lambda m: torch.rand(m, generator=generator), n)
        x0, concepts = x0_all[pick], concept_all[pick].tolist()
        prompts = [self.spec.requests[c][min(int(v * len(self.spec.requests[c])), len(self.spec.requests[c]) - 1)]
                   for c, v in zip(concepts, u.tolist())]
        sched = self.frozen.schedule
        t = self.per_sample(lambda m: sched.sample_t(m, generator=generator), n).to(dev, x0.dtype)
        noise = self.per_sample(lambda m: torch.randn(m, *x0.shape[1:], generator=generator), n).to(x0)
        a, s = sched.alpha_sigma(_bcast(t, x0))
        x_t = a * x0 + s * noise
        cond = self.student.net.conditioner.encode_trainable(prompts)
        pred = self.frozen.raw(x_t, t, cond)  # the frozen UNet, conditioned through the edited encoder
        if self.objective == "ascent":  # Fuchi & Takagi 2024 (authors' train.py: loss = -mse(pred, target))
            target = raw_target(self.frozen.parameterization, x0, noise, a, s, self.frozen.sigma_data)
            out = {"unlearn": ascent_loss(pred, target).mean()}
        else:
            alts = [self.spec.alternatives[c] if self.spec.alternatives[c] is not None
                    else self.conditioner.null_request for c in concepts]
            with torch.no_grad():
                anchor = self.frozen.raw(x_t, t, self.frozen.net.conditioner.encode(alts, dev))
            out = {"unlearn": toward_loss(pred, anchor).mean()}
        if self.anchor_weight > 0:
            anchors = list(self.spec.anchors)
            edited = self.student.net.conditioner.encode_trainable(anchors)["encoder_hidden_states"]
            frozen = self.frozen.net.conditioner.encode(anchors, dev)["encoder_hidden_states"]
            out["preserve"] = embedding_preservation(edited, frozen).mean()
        return out

    def training_step(self, batch, batch_idx):
        terms = self.losses()
        loss = terms["unlearn"] + self.anchor_weight * terms.get("preserve", 0.0)
        for k, v in terms.items():
            self.log(f"train/{k}", v)
        self.log("train/loss", loss, prog_bar=True)
        self.record_terms(terms)
        return loss

    def validation_step(self, batch, batch_idx):
        gen = torch.Generator().manual_seed(1000 + batch_idx)
        with torch.no_grad():
            for k, v in self.losses(gen).items():
                self.log(f"val/{k}", v)

    def trainable_networks(self):
        return {"student.net": self.student.net}

    def configure_optimizers(self):
        # Adam with the authors' defaults (few-shot-erasing train.py: Adam, betas (0.9, 0.98), eps 1e-6, wd 1e-8)
        return torch.optim.Adam(self.trainable, lr=self.lr, betas=self.betas, eps=self.adam_eps,
                                weight_decay=self.weight_decay)


def _check(objective, shots, batch_size, lr, anchor_weight, images, image_size) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be ascent (Fuchi & Takagi 2024) or toward (the alternative's output), "
                         f"got {objective!r}")
    if not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be a positive number of images per concept, got {shots!r}")
    if batch_size < 1 or lr <= 0 or anchor_weight < 0:
        raise ValueError(f"batch_size must be >= 1, lr > 0 and anchor_weight >= 0, got {batch_size}, {lr}, "
                         f"{anchor_weight}")
    if image_size is not None and images is None:
        raise ValueError("image_size resizes the `images` folder; without images (zero-shot) set image_size: null")
