"""Callbacks: validation samples (grid PNG, W&B image, FD and accuracy on the run's own labelled data, a W&B metrics
table) at fixed seeds."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch




def table_columns(class_names: list[str]) -> list[str]:
    """The columns of `val/metrics_table`: the metrics, then one class accuracy per class (`accuracy_<name>`)."""
    return ["step", "w", "steps", "nfe", "fd", "accuracy", "precision", "recall", "erased_rate",
            *(f"accuracy_{c}" for c in class_names)]


TABLE_COLUMNS = table_columns([str(c) for c in range(10)])  # the digits' table


class SampleMetrics(L.Callback):
    """At the end of each validation: sample `num_per_class` images per class at fixed seeds with the
    module's validation scale and steps, save a grid PNG (and log it to W&B), and log `val/fd`,
    `val/accuracy`, `val/precision`, `val/recall`, `val/nfe` from the feature network of the run's labelled data
    (the data module's, or for a run without labelled images the data its teacher's checkpoint records: train.
    evaluation.labelled; trained once and cached). W&B also gets `val/metrics_table`: one row per validation so far
    (step, w, sampler steps, NFE, the metrics, the erased classes' rate for an erasure module, per-class accuracy).
    An erasure module (train.methods.erasure) with `val_samples` > 0 also gets `val/erased_rate`: the fraction of its
    `val_samples` samples per erased class that the feature network still assigns to that class
    (train.evaluation.erasure.erased_rate). At fit start the feature network is made ready and the model's image
    shape checked against it, so a mismatch is one line before training, not a crash at the first validation.

    num_per_class: samples per class for the metrics (the grid shows the first 8 of each class).
    metrics:       set False to keep the grids only (no feature network is trained).
    class_prompts: text models trained on the captioned digits (train.digits_pipeline): the prompt template of a
                   class, e.g. "a handwritten {word}"; samples are generated from these prompts, decoded by the
                   model's VAE and judged by the digits' metrics.
    erased_classes: the classes an erasure removes, for the erased rates (default: the erasure module's erased
                   classes, train.evaluation.digits_text.erased_digits).
    prompts:       other text models: the grid shows `num_per_class` samples of each of the data module's
                   validation prompts (`val_prompts`), decoded; no metrics.
    """

    def __init__(self, num_per_class: int = 20, metrics: bool = True, seed: int = 0, class_prompts: str | None = None,
                 erased_classes: list[int] | None = None):
        super().__init__()
        self.num_per_class, self.metrics, self.seed, self.class_prompts = num_per_class, metrics, seed, class_prompts
        self.erased_classes = erased_classes
        self.table_rows: list[list] = []
        self.data = None  # the LabelledData the samples are judged against (set at fit start)

    def _labelled_data(self, trainer: L.Trainer, pl_module):
        """The digits for class prompts; the fit's data module when it gives labelled images; else what the module
        records (its teacher's data: train.evaluation.labelled.data_of)."""
        from data.reference import datamodule_reference
        from train.evaluation.labelled import data_of, labelled_data

        if self.class_prompts is not None:
            return labelled_data(None)
        reference = datamodule_reference(trainer.datamodule) if trainer.datamodule is not None else None
        return labelled_data(reference, trainer.datamodule) if reference is not None else data_of(pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if not self.metrics or not hasattr(pl_module, "generate") or (
                self.class_prompts is None and pl_module.conditioner.enumerate() is None):
            return
        from train.evaluation.classifier import load_feature_network
        from train.evaluation.labelled import check_generates

        try:
            self.data = self._labelled_data(trainer, pl_module)
            if self.class_prompts is None:
                check_generates(pl_module, self.data)
        except ValueError as e:
            raise ValueError(f"SampleMetrics: {e} (or set the callback's metrics: false to keep only sample grids)") \
                from None
        load_feature_network(self.data)  # train or load the cached feature network once, before the first validation

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking or not hasattr(pl_module, "generate"):
            return
        if self.class_prompts is not None:
            from train.evaluation.digits_text import generate_digits

            images, labels, nfe = generate_digits(pl_module, self.class_prompts, self.num_per_class, seed=self.seed,
                                                  **pl_module.val_sampling())
            num_classes = 10
        elif pl_module.conditioner.enumerate() is None:  # prompts, no class prompts: a grid of the validation prompts
            prompts = getattr(trainer.datamodule, "val_prompts", None)
            if prompts:
                self._prompt_grid(trainer, pl_module, list(prompts))
            return
        else:
            classes = pl_module.conditioner.enumerate()
            num_classes = len(classes)
            labels = torch.tensor(classes).repeat_interleave(self.num_per_class)
            images, nfe = pl_module.generate(labels, seed=self.seed, **pl_module.val_sampling())
        if trainer.is_global_zero:
            self._save_grid(trainer, images.view(num_classes, self.num_per_class, *images.shape[1:])[:, :8].flatten(0, 1))
        if self.metrics:
            from train.evaluation import evaluate_samples

            self.data = self.data or self._labelled_data(trainer, pl_module)
            m = evaluate_samples(images, labels, nfe_per_sample=nfe, data=self.data, device=pl_module.device)
            for key in ("fd", "accuracy", "precision", "recall", "nfe_per_sample"):
                pl_module.log(f"val/{key.replace('_per_sample', '')}", float(m[key]), sync_dist=True)
            if trainer.is_global_zero:
                self._log_table(trainer, pl_module, m)
            self._log_erased_rate(pl_module)

    def _erased(self, pl_module) -> list[int]:
        if self.erased_classes is not None:
            return list(self.erased_classes)
        from train.evaluation.digits_text import erased_digits

        return erased_digits(pl_module)

    def _log_erased_rate(self, pl_module) -> None:
        """`val/erased_rate` of an erasure module: `val_samples` samples per erased class at its validation scale and
        steps (class ids, or the class prompts of `class_prompts`)."""
        erased, n = self._erased(pl_module), int(getattr(pl_module, "val_samples", 0) or 0)
        if not hasattr(pl_module, "erased_requests") or not erased or n <= 0:
            return
        from train.evaluation.erasure import erased_rate

        rate = erased_rate(pl_module, erased, n, template=self.class_prompts, seed=self.seed, data=self.data,
                           **pl_module.val_sampling())
        pl_module.log("val/erased_rate", rate, sync_dist=True)

    def _log_table(self, trainer: L.Trainer, pl_module, m: dict) -> None:
        """Add this validation's row to `val/metrics_table` and log the whole table to W&B."""
        erased = self._erased(pl_module)
        names = self.data.class_names if self.data is not None else [str(c) for c in range(10)]
        per_class = list(m["per_class_accuracy"]) + [None] * (len(names) - len(m["per_class_accuracy"]))
        erased_rate = (sum(per_class[c] for c in erased) / len(erased)) if erased else None
        self.table_rows.append([trainer.global_step, float(pl_module.val_scale), int(pl_module.val_steps),
                                m["nfe_per_sample"], m["fd"], m["accuracy"], m["precision"], m["recall"],
                                erased_rate, *per_class[:len(names)]])
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_table("val/metrics_table", columns=table_columns(names),
                                 data=[list(r) for r in self.table_rows], step=trainer.global_step)

    def _prompt_grid(self, trainer: L.Trainer, pl_module, prompts: list[str]) -> None:
        """A grid of `num_per_class` decoded samples per validation prompt (one row each), captioned in W&B."""
        rows = [p for p in prompts for _ in range(self.num_per_class)]
        samples, _ = pl_module.generate(rows, seed=self.seed, **pl_module.val_sampling())
        if trainer.is_global_zero:
            self._save_grid(trainer, pl_module.samples_to_images(samples), nrow=self.num_per_class,
                            caption=" | ".join(prompts))

    def _save_grid(self, trainer: L.Trainer, images: torch.Tensor, nrow: int = 8, caption: str | None = None) -> None:
        from train.evaluation.images import grid_array, save_grid

        root = Path(trainer.log_dir or trainer.default_root_dir)
        save_grid(images, root / "samples" / f"step{trainer.global_step:07d}.png", nrow=nrow)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                captions = {"caption": [caption]} if caption else {}
                logger.log_image("val/samples", [grid_array(images, nrow=nrow)], step=trainer.global_step, **captions)
