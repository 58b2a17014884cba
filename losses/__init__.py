"""Pure loss functions: denoising, distillation, distribution matching, GAN, erasure (no optimizers, no Trainer)."""
