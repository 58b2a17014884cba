"""Data: LightningDataModules over Hugging Face `datasets` (the embedded digits default, labelled images)."""
