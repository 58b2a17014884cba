"""GAN terms on noisy samples (DMD2, Yin et al. 2024, arXiv 2405.14867, sec. 4.3): non-saturating
logistic losses for the generator and the discriminator."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def generator_gan_loss(logits_fake: Tensor) -> Tensor:
    """Generator term softplus(-D(x_fake)) = -log sigmoid(D(x_fake)), per sample [B] (DMD2 Eq. 5, non-saturating).

    logits_fake: discriminator logits [B] on noised generator samples, with grad through the samples.
    """
    return F.softplus(-logits_fake.float())


def discriminator_loss(logits_fake: Tensor, logits_real: Tensor) -> Tensor:
    """Discriminator loss mean softplus(D(fake)) + mean softplus(-D(real)), a scalar (DMD2 Eq. 5).

    logits_fake: [B_f] on noised generator samples (detached from the generator);
    logits_real: [B_r] on noised real data. The minimiser's logit is log(p_real / q_fake) (Goodfellow
    et al. 2014, Prop. 1), which f-distill reads as the density ratio.
    """
    return F.softplus(logits_fake.float()).mean() + F.softplus(-logits_real.float()).mean()
