"""OneStepDistillation's discriminator: a head on bottleneck features whose logits give f-distill's density ratio
(Xu et al. 2025, arXiv 2502.15681) and DMD2's GAN terms (Yin et al. 2024, arXiv 2405.14867, Eq. 5)."""
from __future__ import annotations

from typing import Any

from torch import Tensor

from guidance.denoiser import Denoiser
from losses.gan import discriminator_loss, generator_gan_loss
from models.discriminator import (DiscriminatorHead, default_feature_layer, discriminator_logits, feature_channels,
                                  probe_condition)


class DiscriminatorTerms:
    """Mixin of train.methods.onestep.OneStepDistillation (it provides disc_args, objective, divergence, fake_score,
    generator, _uniform_t, gan_keep and MethodModule's noise_like and sample_shape).

    The head is built when discriminator.gan_weight > 0 or the divergence is not reverse_kl; it reads the fake score's
    features (discriminator.features fake: its loss then also trains the fake score, DMD2) or the frozen teacher's.
    """

    def _init_discriminator(self, net) -> None:
        """The head on the tapped layer of `net` (the teacher's network; default layer
        models.discriminator.default_feature_layer), or none, and the times at which it sees noised samples."""
        self.disc_t_range = tuple(self.disc_args.t_range or self.objective.t_range)
        self.uses_discriminator = self.gan_weight > 0 or self.divergence != "reverse_kl"
        self.disc_head = None
        self.discriminator_layer = self.disc_args.layer or default_feature_layer(net)
        if self.uses_discriminator:
            features = self._disc_features()
            ch = feature_channels(features, self.discriminator_layer, self.sample_shape(), probe_condition(features.net))
            self.disc_head = DiscriminatorHead(ch, self.disc_args.hidden, time_conditioned=True)

    @property
    def gan_weight(self) -> float:
        """The weight of the generator's GAN term (discriminator.gan_weight)."""
        return self.disc_args.gan_weight

    def _disc_features(self) -> Denoiser:
        return self.fake_score if self.disc_args.features == "fake" else self.fake_score.teacher

    def _disc_logits(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """The head's logits [B] at (x_t [B, C, H, W], t [B]) for condition `cond` (models.discriminator)."""
        return discriminator_logits(self.disc_head, self._disc_features(), self.discriminator_layer, x_t, t, cond)

    def _discriminator_loss(self, x_fake: Tensor, x_real: Tensor, labels: Any) -> Tensor:
        """The discriminator's loss (losses.gan.discriminator_loss, DMD2 Eq. 5) on generator samples x_fake
        [B, C, H, W] and real samples x_real [B', C, H, W] (x0), each noised at times from discriminator.t_range."""
        sched = self.fake_score.schedule
        t_f = self._uniform_t(x_fake.shape[0], self.disc_t_range, x_fake.device)
        t_r = self._uniform_t(x_real.shape[0], self.disc_t_range, x_real.device)
        logits_f = self._disc_logits(sched.add_noise(x_fake, self.noise_like(x_fake), t_f), t_f, labels)
        logits_r = self._disc_logits(sched.add_noise(x_real, self.noise_like(x_real), t_r), t_r, labels)
        return discriminator_loss(logits_f, logits_r)

    def _generator_gan_loss(self, x: Tensor, labels: Any, requests: Any = None) -> Tensor:
        """The generator's weighted GAN term (losses.gan.generator_gan_loss, DMD2 Eq. 5) on its samples x
        [B, C, H, W] (x0, with gradient) noised at times drawn from discriminator.t_range; forgotten requests get
        weight 0 (gan_keep)."""
        t_g = self._uniform_t(x.shape[0], self.disc_t_range, x.device)
        logits = self._disc_logits(self.generator.schedule.add_noise(x, self.noise_like(x), t_g), t_g, labels)
        return self.gan_weight * (generator_gan_loss(logits) * self.gan_keep(labels, requests)).mean()


def check_real_data(datamodule) -> None:
    """The discriminator (GAN term, f-divergences other than reverse KL) needs real samples for its real branch; a
    data module of requests only (`has_images = False`: data.prompts.PromptDataModule, data.digits.DigitsDataModule
    with images: false) has none."""
    if getattr(datamodule, "has_images", True) is False:
        raise ValueError(f"the GAN term and f-divergences other than reverse_kl train a discriminator on real images "
                         f"or latents, but {type(datamodule).__name__} gives requests only (prompts or labels); use "
                         f"data with images (e.g. data.captions.CaptionedImageDataModule, or images: true), or set "
                         f"discriminator.gan_weight: 0 and objective.divergence: reverse_kl")
