"""The method modules: one LightningModule per training method (teacher, guidance distillation, progressive,
one-step distribution matching, concept erasure)."""
