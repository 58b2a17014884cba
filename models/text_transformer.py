"""Text-conditioned flow-matching transformers behind net(x, t, cond): diffusers' SD3Transformer2DModel
(Stable Diffusion 3 / 3.5, MMDiT) with the empty-prompt embedding as the null condition."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from models.text_network import TextConditionalNetwork

SD3_KEYS = ("encoder_hidden_states", "pooled_projections")


class SD3Transformer(TextConditionalNetwork):
    """`SD3Transformer2DModel` on latents with an SD3 text condition (models.text_encoders, kind "sd3"):

        cond = {"encoder_hidden_states": [B, 77 + L_t5, D_joint], "pooled_projections": [B, P]}

    x: [B, C, h, w] latents; t: [B] network time = 1000 sigma (the schedule is guidance.schedules.RectifiedFlow
    with the model's shift, time_scale 1000, as the pipeline passes its timesteps). Returns the velocity
    u = eps - x0 (parameterization "flow"; Esser et al. 2024, arXiv 2403.03206, Eq. 2-3 with alpha = 1 - t).

    pretrained:          a local pipeline folder in diffusers layout (transformer/, text_encoder*/, tokenizer*/,
                         vae/, scheduler/); the null embedding ("" through the same encoders, SD3 has no
                         zeroed negative) is computed once from it. Nothing is downloaded.
    use_t5, max_sequence_length: must match the prompt encoder the conditions come from (the null prompt
                         is encoded with the same T5 setting and token count).
    dtype:               the transformer's weights ("float32", "float16", "bfloat16").
    """

    def __init__(self, pretrained: str, subfolder: str = "transformer", dtype: str = "float32", use_t5: bool = True,
                 max_sequence_length: int = 256):
        super().__init__()
        from diffusers import SD3Transformer2DModel

        from models.pretrained import check_pipeline_folder, torch_dtype
        from models.text_encoders import PromptEncoder

        root = check_pipeline_folder(pretrained, subfolder)
        net = SD3Transformer2DModel.from_pretrained(root, subfolder=subfolder, local_files_only=True,
                                                    torch_dtype=torch_dtype(dtype)).train()
        null = PromptEncoder.from_pretrained(str(root), kind="sd3", max_sequence_length=max_sequence_length,
                                             use_t5=use_t5).null(1)
        self._setup(net, null, str(pretrained))

    @classmethod
    def from_transformer(cls, transformer, null_cond: dict[str, Tensor]) -> "SD3Transformer":
        """Wrap an existing SD3Transformer2DModel; null_cond: `PromptEncoder.null(1)` of an "sd3" encoder."""
        obj = cls.__new__(cls)
        TextConditionalNetwork.__init__(obj)
        obj._setup(transformer, null_cond, None)
        return obj

    def _setup(self, transformer, null_cond: dict[str, Tensor], pretrained: str | None) -> None:
        self.transformer = transformer
        self.pretrained = pretrained
        self._set_null(null_cond, SD3_KEYS, transformer.dtype)
        d = null_cond["encoder_hidden_states"].shape[-1]
        if d != transformer.config.joint_attention_dim:
            raise ValueError(f"text embeddings have D={d} but the transformer's joint_attention_dim is "
                             f"{transformer.config.joint_attention_dim}; the text encoders and transformer differ")

    @property
    def unet(self):
        """The diffusers network (named like the UNet adapters' so w-embedding hooks and checkpointing find it)."""
        return self.transformer

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor], perturb: str | None = None) -> Tensor:
        if perturb is not None:
            raise NotImplementedError(f"SD3Transformer does not implement the {perturb!r} perturbation")
        dtype = self.transformer.dtype
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        return self.transformer(hidden_states=x.to(dtype), timestep=t, encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                                pooled_projections=cond["pooled_projections"].to(dtype)).sample

    def describe(self) -> dict[str, Any]:
        return {"kind": "text", "diffusers_class": "SD3Transformer2DModel", "pretrained": self.pretrained,
                "condition_keys": list(self._null_keys), "config": dict(self.transformer.config)}
