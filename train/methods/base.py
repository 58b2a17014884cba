"""What every method module shares: checkpoint metadata, the sampling view, validation samples, the NaN/inf
policy and the per-batch random state that makes resumed runs exact."""
from __future__ import annotations

import os

from typing import Any, Callable, Sequence

import lightning as L
import torch
from torch import Tensor, nn

from guidance.denoiser import Denoiser
from guidance.guided import GuidedDenoiser
from guidance.guiders import Guider
from models.conditioning import Conditioner
from models.vae import shared_vae
from train.runtime.nonfinite import NonFiniteGuard, nonfinite_gradient, nonfinite_terms
from train.methods.sampling import DEFAULT_STEPS, GuidedSampling, Recipe
from train.runtime.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_KEY, is_rebuildable, plain_config
from train.runtime.frozen import FROZEN_KEY, FrozenNetwork, fill_frozen, leave_out_frozen
from train.methods.data_record import record_data
from train.runtime.resume import StepSeed
__all__ = ["DEFAULT_STEPS", "MethodModule"]


class MethodModule(L.LightningModule):
    """Base class of the method modules.

    Subclasses call `super().__init__(nonfinite, max_skips)` and `self.save_hyperparameters()` first thing in
    `__init__` and implement `sampling_denoiser()` (the network a user samples from after training) and
    `training_step`. `val_scale` / `val_steps` / `val_samples` control the samples drawn at each validation for
    the sample grid and the validation metrics (`val/fd`, `val/accuracy`).

    Training, for every method:
    - randomness: a StepSeed callback (train.runtime.resume) seeds each training batch from (seed, batch index, rank),
      so that a resumed run repeats an uninterrupted one exactly;
    - NaN/inf: `nonfinite_guard` (train.runtime.nonfinite) applies the `nonfinite` policy ("skip" the update or
      "stop") to the loss terms and the gradient of each update. With automatic optimization this happens
      here, just before the optimizer step: the terms are those passed to `record_terms` in training_step
      (default: the returned loss, as "loss"); a skipped update leaves weights, optimizer moments and EMA
      unchanged, though the step counter and learning-rate schedule move on. Manual optimization calls the
      guard itself (train.methods.onestep). Work that follows an applied update (EMA) goes in `on_update`.

    Checkpoints: a frozen network the method reads from a path of its config (`register_frozen`) is left out of the
    checkpoints it writes, with a fingerprint; loading (train.runtime.checkpoint.load_method, a resumed fit) takes it
    from the rebuilt module after checking the fingerprint (train.runtime.frozen). `self_contained_checkpoints` True
    (`python -m train fit --self_contained_checkpoints true`) keeps them in, for checkpoints that load where those
    paths are gone.
    """

    method_name = "method"
    val_scale: float = 2.0
    val_steps: int = 20
    val_samples: int = 200
    data_reference: dict | None = None  # the data module it was fitted on (set at fit, saved in checkpoints)
    self_contained_checkpoints: bool = False  # True: checkpoints also hold the frozen networks read from paths

    def __init__(self, nonfinite: str = "skip", max_skips: int = 10):
        super().__init__()
        self.frozen_networks: list[FrozenNetwork] = []  # register_frozen
        self.nonfinite_guard = NonFiniteGuard(nonfinite, max_skips)
        self._step_terms: dict[str, Tensor] = {}
        self.update_skipped = False

    def configure_callbacks(self) -> list[L.Callback]:
        return [StepSeed()]

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.trainer.datamodule is not None:
            self.check_data(self.trainer.datamodule)
            self.data_reference = record_data(self, self.trainer.datamodule)  # which data set the model belongs to

    def check_data(self, datamodule: L.LightningDataModule) -> None:
        """Refuse, saying what to change, a data module whose images (`channels`, `image_size`) or classes
        (`num_classes`) the network cannot take; data modules without these attributes are not checked."""
        size, channels = getattr(datamodule, "image_size", None), getattr(datamodule, "channels", None)
        net = self.sampling_denoiser().net
        if size is not None and channels is not None:
            c, h, w = self.sample_shape()
            if (channels, size, size) != (c, h, w):
                raise ValueError(f"the data gives {channels}-channel {size}x{size} images but the network takes "
                                 f"{c}-channel {h}x{w} ones; set the data's image_size: {h} and channels: {c}, or "
                                 f"train a network with sample_size: {size} and in_channels: {channels}")
        classes, known = getattr(datamodule, "num_classes", None), getattr(net, "num_classes", None)
        if classes is not None and known is not None and classes > known:
            raise ValueError(f"the data has {classes} classes but the network knows {known}; train a network with "
                             f"num_classes: {classes}, or keep only {known} classes in the data")

    # --- NaN/inf policy (automatic optimization) --------------------------------------------------
    def record_terms(self, terms: dict[str, Tensor]) -> None:
        """Name this training step's loss terms for the NaN/inf check (call from training_step)."""
        self._step_terms = dict(terms)

    def on_before_backward(self, loss: Tensor) -> None:
        if self.automatic_optimization and not self._step_terms:
            self._step_terms = {"loss": loss}

    def on_before_optimizer_step(self, optimizer) -> None:
        if not self.automatic_optimization:
            return
        terms, self._step_terms = self._step_terms, {}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        bad = nonfinite_terms(terms)
        if not bad and getattr(self.trainer.precision_plugin, "scaler", None) is None:  # a GradScaler handles inf itself
            bad = nonfinite_gradient(params, terms)
        self.update_skipped = bool(bad)
        if bad:
            for p in params:
                p.grad = None  # the optimizer leaves parameters without a gradient (and their moments) alone
            self.nonfinite_guard.handle(int(self.global_step), "training", bad)
        self.nonfinite_guard.count("training", not bad)
        self.log("train/skipped_updates", float(len(self.nonfinite_guard.skipped)))

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        if not self.update_skipped:
            self.on_update()

    def on_update(self) -> None:
        """Called after each applied optimizer update (automatic optimization), e.g. to update an EMA, so that
        checkpoints written by callbacks at this step include it."""

    # --- what the DeepSpeed strategy wraps (train.runtime.strategy) -----------------------------------------
    def trainable_networks(self) -> dict[str, nn.Module]:
        """Attribute path -> network, one per optimizer returned by `configure_optimizers` and in the same
        order; `train.runtime.strategy.MultiEngineDeepSpeed` gives each its own DeepSpeed engine. Networks not named
        here (teacher, EMA) are frozen replicas."""
        raise NotImplementedError(f"{type(self).__name__} does not name its trainable networks, so it cannot run "
                                  f"under the multi-engine DeepSpeed strategy")

    def gradient_clip(self, name: str) -> float | None:
        """Max gradient norm of trainable network `name` (None: the trainer's gradient_clip_val)."""
        return None

    @property
    def strategy_clips(self) -> bool:
        """True under the multi-engine DeepSpeed strategy, whose engines reduce, check and clip gradients."""
        return self._trainer is not None and hasattr(self.trainer.strategy, "engine_backward")

    # --- training randomness, the same on 1 or N processes ----------------------------------------------
    def per_sample(self, draw: Callable[[int], Tensor], n: int) -> Tensor:
        """Random values for this process's n samples: `draw(N)` for the whole global batch of N = n x world
        size samples, of which this process keeps rows rank, rank + W, rank + 2W, ... (the samples the
        distributed data sharding gives it: data.resumable.ResumableSampler).

        Every process draws the same global tensor (train.runtime.resume.StepSeed seeds a batch identically on every
        rank), so a run on W processes computes, sample for sample, what one process computes on the global
        batch: training draws made through here make multi-process runs match single-process ones."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return draw(n)
        return draw(n * world)[self.global_rank::world]

    def global_batch(self, v: Tensor) -> Tensor:
        """Per-sample values [B, ...] of every process, in global-batch order (the order per_sample slices);
        v itself on one process. For batch statistics that must not depend on the number of processes."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return v
        gathered = self.all_gather(v.detach())  # [W, B, ...]: process r's sample j is global sample j W + r
        return gathered.transpose(0, 1).reshape(-1, *v.shape[1:])

    def noise_like(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Standard normal noise shaped like the batch x [B, ...] (per_sample)."""
        return self.per_sample(lambda n: torch.randn(n, *x.shape[1:], generator=generator, dtype=x.dtype,
                                                     device=generator.device if generator else x.device), x.shape[0]).to(x.device)

    def uniform(self, n: int, device, generator: torch.Generator | None = None) -> Tensor:
        """U[0, 1) values [n], one per sample (per_sample)."""
        return self.per_sample(lambda m: torch.rand(m, generator=generator, device=generator.device if generator else device),
                               n).to(device)

    # --- conditions and samples ---------------------------------------------------------------------
    @property
    def conditioner(self) -> Conditioner:
        """What requests (class ids or names, prompts) become for the network (models.conditioning)."""
        return self.sampling_denoiser().net.conditioner

    def encode(self, requests: Sequence | Tensor, device=None) -> Any:
        """The network's condition for requests [B] (a batch's labels or prompts), on this module's device."""
        return self.conditioner.encode(requests, self.device if device is None else device)

    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample (a latent model's latents), from the network's config."""
        return self.sampling_denoiser().net.sample_shape()

    @property
    def vae_folder(self) -> str | None:
        """The folder whose vae/ turns samples into images (latent models), or None (samples are images)."""
        return self.sampling_denoiser().net.vae_folder

    @torch.no_grad()
    def images_to_samples(self, images: Tensor, batch_size: int = 16) -> Tensor:
        """Images [N, 3, H, W] in [-1, 1] -> what the network generates (a latent model's latents [N, C, h, w])."""
        if self.vae_folder is None:
            return images
        vae = shared_vae(self.vae_folder)
        dev = next(vae.parameters()).device
        return torch.cat([vae.encode(images[i:i + batch_size].to(dev)).cpu() for i in range(0, len(images), batch_size)])

    @torch.no_grad()
    def samples_to_images(self, samples: Tensor, batch_size: int = 16) -> Tensor:
        """Samples [N, C, h, w] -> images [N, C', H, W] in about [-1, 1] (decoded by a latent model's VAE)."""
        if self.vae_folder is None:
            return samples
        vae = shared_vae(self.vae_folder)
        dev = next(vae.parameters()).device
        return torch.cat([vae.decode(samples[i:i + batch_size].to(dev)).cpu() for i in range(0, len(samples), batch_size)])

    # --- sampling -----------------------------------------------------------------------------
    def sampling_denoiser(self) -> Denoiser:
        raise NotImplementedError

    def recipe(self) -> Recipe:
        """How this method's model samples (train.methods.sampling); a guided sampler by default."""
        return GuidedSampling(self.sampling_denoiser)

    def sampling_recipe(self, nasa_scale: float | None = None, negtome_scale: float | None = None) -> Recipe:
        """`recipe()`, run with NASA's negative cross-attention at scale nasa_scale and/or NegToMe's self-attention at
        negtome_scale when given (train.methods.negative_attention: w-input students and generators; else a
        ValueError)."""
        recipe = self.recipe()
        if nasa_scale is None and negtome_scale is None:
            return recipe
        from train.methods.negative_attention import nasa_recipe, negtome_recipe

        net = self.sampling_denoiser().net
        if negtome_scale is not None:
            recipe = negtome_recipe(recipe, net, negtome_scale)
        return recipe if nasa_scale is None else nasa_recipe(recipe, net, nasa_scale)

    def val_sampling(self) -> dict:
        """generate() settings of validation samples (the module's val_scale and val_steps)."""
        return {"scale": self.val_scale, "steps": self.val_steps}

    def guided(self, guider: Guider | str = "cfg", **guider_params) -> GuidedDenoiser:
        """The trained model wrapped by a guider (a w-input student: the student itself), for
        `guidance.samplers.sample`."""
        return self.recipe().guided(self.recipe().resolve(guider=guider, guider_params=guider_params))

    @torch.no_grad()
    def generate(self, requests: Sequence | Tensor, scale: float | None = None, steps: int | None = None,
                 sampler: str | None = None, guider: Guider | str | None = None, seed: int = 0, batch_size: int = 500,
                 progress: bool = False, negative: Any = None, eta: float = 0.0,
                 guider_params: dict | None = None, nasa_scale: float | None = None,
                 negtome_scale: float | None = None, encode: Callable[[Sequence], Any] | None = None,
                 noise: Tensor | None = None, generator: torch.Generator | None = None) -> tuple[Tensor, float]:
        """Samples [N, C, H, W] for N requests (class ids or names [N], or prompts; a latent model's latents, which
        `samples_to_images` decodes) and network evaluations per sample.

        scale, steps, sampler, guider, guider_params ({name: value}), eta (DDIM's): as the method's recipe takes them
        (None: its defaults); one it cannot honour is a ValueError. negative: the negative condition of CFG-like guiders (a request, or
        one per sample: a negative prompt, or a class) instead of the null condition. nasa_scale: honour `negative` in
        the cross-attention layers instead (NASA, `sampling_recipe`), for models with no unconditional branch.
        negtome_scale: push each batch's samples away from its first one (NegToMe, `sampling_recipe`).
        encode: requests -> condition used instead of `self.encode` for the requests (not the negatives): an attack's
        prompt embeddings (train.evaluation.attack); the noise and batches are the same.
        Noise comes from a CPU generator seeded with `seed`, so samples are identical across devices; `noise`
        [N, *sample_shape()] gives the initial noise instead (a prompt file's own seeds; `seed` still seeds the
        sampler's later draws). generator: the CPU generator of those later draws instead of one seeded with `seed`
        (a caller that generates one set batch by batch passes the same one to each call: the draws then continue
        as one call's would)."""
        recipe = self.sampling_recipe(nasa_scale, negtome_scale)
        negs = None
        if negative is not None:
            negs = [negative] * len(requests) if isinstance(negative, (str, int)) else list(negative)
            if len(negs) != len(requests):
                raise ValueError(f"give one negative condition, or one per request ({len(requests)}), not {len(negs)}")
        settings = recipe.resolve(scale, steps, sampler, guider, guider_params, eta, negs is not None)
        gen = torch.Generator().manual_seed(seed) if generator is None else generator
        if noise is None:
            noise = torch.randn(len(requests), *self.sample_shape(), generator=gen)
        elif tuple(noise.shape) != (len(requests), *self.sample_shape()):
            raise ValueError(f"noise must be [N, *sample_shape()] = {[len(requests), *self.sample_shape()]}, got "
                             f"{list(noise.shape)}")
        out, evaluations = [], 0.0
        for i in range(0, len(requests), batch_size):
            part = slice(i, i + batch_size)
            cond = self.encode(requests[part]) if encode is None else encode(requests[part])
            neg = None if negs is None else self.encode(negs[part])
            x, nfe = recipe.run(noise[part].to(self.device), cond, neg, settings, gen, progress)
            out.append(x.cpu())
            evaluations += nfe * len(x)
        return torch.cat(out), evaluations / len(requests)

    # --- checkpoints ----------------------------------------------------------------------------
    def register_frozen(self, net: nn.Module, source: str, unread: str | None = None) -> None:
        """Declare `net`, a network of this module that training never changes, as read from the path `source` of
        the config, which rebuilds it whenever the module is built from its config; unread: why it was not read
        from there (rebuilt from a recorded config instead), None when it was. Call once `net` is final (adapters
        injected, dtype set): its buffers and parameters without requires_grad are then left out of checkpoints
        (train.runtime.frozen)."""
        self.frozen_networks.append(FrozenNetwork.of(net, source, unread))

    def frozen_replaced(self, net: nn.Module, why: str) -> None:
        """Declare that the registered frozen network `net` no longer holds what its source gave (`why`, e.g. "is
        round 1's teacher"): checkpoints save it whole from then on."""
        for f in self.frozen_networks:
            if f.net is net:
                f.unread = why

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        hp = dict(self.hparams)
        rebuildable = is_rebuildable(hp)
        checkpoint["hyper_parameters"] = plain_config(hp) if rebuildable else {}
        checkpoint.pop("hparams_name", None)
        checkpoint[CHECKPOINT_KEY] = {
            "format": CHECKPOINT_FORMAT,
            "method": self.method_name,
            "config": plain_config(hp) if rebuildable else None,
            "data": self.data_reference,  # the labelled data it was trained on (train.methods.data_record)
            "cwd": os.getcwd(),  # where the config's relative paths were read from (load_method resolves them there)
        }
        if rebuildable and not self.self_contained_checkpoints:  # only a module its config rebuilds reads its sources
            frozen = leave_out_frozen(self, self.frozen_networks, checkpoint["state_dict"])
            if frozen:
                checkpoint[CHECKPOINT_KEY][FROZEN_KEY] = frozen

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A resumed fit: the frozen networks the checkpoint left out come from this module (rebuilt from the config,
        so read from their sources), once their fingerprints match; those it holds are loaded from it, and saved
        whole from then on (train.runtime.frozen.fill_frozen)."""
        records = checkpoint.get(CHECKPOINT_KEY, {}).get(FROZEN_KEY) or []
        fill_frozen(self, self.frozen_networks, records, checkpoint["state_dict"])
