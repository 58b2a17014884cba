"""Training: one LightningModule per method, the CLI (`python -m train`), callbacks, evaluation, export."""
