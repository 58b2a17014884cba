"""A text-to-digits model known by construction, for the attack contrast test (tests/train/test_attack_contrast.py):
the exact denoiser of a prompt-weighted mixture of the ten mean training digits, whose weights one cross-attention
head (attn2.to_k, attn2.to_v: the layers UCE edits) reads off the prompt's digit token."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from guidance.schedules import VPCosine
from models.adapters import ConditionalNetwork
from models.conditioning import TextConditioner

DIGIT_WEIGHT = 30.0  # the digit tokens' rows in the value fit weigh this much more than the other tokens'
RIDGE = 1e-2  # ridge of both fits: the text states of a LayerNorm lie in a hyperplane, plain least squares blows up
TOKEN_SCALE = 30.0  # the toy text encoder's token embeddings, times the random CLIP initialisation's


def mean_digits() -> Tensor:
    """The mean image [10, 1, 8, 8] in [-1, 1] of each class of the training digits (data.digits)."""
    from data.digits import _digits_arrays

    images, labels, is_val = _digits_arrays()
    x, y = torch.from_numpy(images[~is_val].copy()), torch.from_numpy(labels[~is_val].copy())
    return torch.stack([x[y == c].mean(0) for c in range(10)])


def ridge(x: Tensor, y: Tensor) -> Tensor:
    """argmin_w ||x w - y||^2 + RIDGE ||w||^2: [F, K] for x [N, F], y [N, K] (float64)."""
    return torch.linalg.solve(x.T @ x + RIDGE * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)


class DigitMixtureNet(ConditionalNetwork):
    """x0 network (parameterization "x0" under VPCosine(num_steps)) of the data distribution sum_k pi_k delta(P_k)
    over the mean training digits P_k [10, 1, 8, 8], pi = softmax(l(prompt)): its output is the exact posterior mean

        x0_hat(x_t, t, h) = sum_k softmax_k( l_k(h) - || x_t - alpha(t) P_k ||^2 / (2 sigma(t)^2) ) P_k,

    with the log-weights l(h) [10] read from the prompt's text states h [L, D] by one cross-attention head with one
    query: l(h) = sum_i a_i to_v(h_i), a = softmax_i(to_k(h_i)). Both projections are ridge fits to the states of the
    ten prompts `template` (one per digit) and "": to_k scores the digit's token (the prompt's last word) 1 and every
    other token 0, times `sharpness`; to_v maps the digit's token to `strength` e_digit and every other token to 0.
    So "the number 7" draws sevens (pi_7 = e^s / (e^s + 9)), "" any digit, and UCE (train.methods.uce), which edits
    exactly these two projections at the last word, erases a digit by construction.
    x: [B, 1, 8, 8]; t: [B] network time (0..num_steps - 1); cond["encoder_hidden_states"]: [B, L, D]."""

    def __init__(self, pretrained: str, template: str = "the number {digit}", strength: float = 6.0,
                 sharpness: float = 20.0, num_steps: int = 1000):
        super().__init__()
        from train.evaluation.digits_text import caption

        self.pretrained = str(pretrained)
        self.conditioner = TextConditioner(["encoder_hidden_states"], self.pretrained)
        self.schedule = VPCosine(num_steps)
        self.register_buffer("templates", mean_digits())
        encoder = self.conditioner.encoder
        prompts = [caption(template, d) for d in range(10)] + [""]
        h = encoder.encode(prompts)["encoder_hidden_states"].double()  # [11, L, D]
        tok = encoder.tokenizers[0]
        last = tok(prompts, padding="max_length", max_length=h.shape[1], return_tensors="pt").attention_mask.sum(1) - 2
        digit = torch.zeros(h.shape[:2], dtype=torch.bool)
        digit[torch.arange(10), last[:10]] = True
        states = torch.cat([h.reshape(-1, h.shape[-1]), h.new_ones(digit.numel(), 1)], 1)  # + a bias column
        key = ridge(states, digit.reshape(-1, 1).double())[:-1].T  # the bias cancels in the softmax
        target = h.new_zeros(*h.shape[:2], 10)
        target[torch.arange(10), last[:10], torch.arange(10)] = strength
        weight = 1.0 + (DIGIT_WEIGHT - 1.0) * digit.reshape(-1, 1).double()
        value = ridge(weight * h.reshape(-1, h.shape[-1]), weight * target.reshape(-1, 10)).T
        self.attn2 = nn.Module()
        self.attn2.to_k = nn.Linear(h.shape[-1], 1, bias=False)
        self.attn2.to_v = nn.Linear(h.shape[-1], 10, bias=False)
        with torch.no_grad():
            self.attn2.to_k.weight.copy_(sharpness * key)
            self.attn2.to_v.weight.copy_(value)

    def sample_shape(self) -> tuple[int, int, int]:
        return (1, 8, 8)

    def log_weights(self, h: Tensor) -> Tensor:
        """l(h) [B, 10] of text states h [B, L, D]."""
        attention = self.attn2.to_k(h).softmax(1)  # [B, L, 1]
        return (attention * self.attn2.to_v(h)).sum(1)

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        a, s = self.schedule.alpha_sigma((t / self.schedule.time_scale).reshape(-1, 1).double())
        p = self.templates.flatten(1).double()  # [10, 64]
        distance = (x.flatten(1).double()[:, None] - a[..., None] * p).square().sum(-1)  # [B, 10]
        logits = self.log_weights(cond["encoder_hidden_states"].to(x.dtype)).double() - distance / (2 * s**2)
        return (logits.softmax(1) @ p).reshape(x.shape).to(x.dtype)


def token_identity_pipeline(folder: Path) -> Path:
    """The text digits pipeline folder (train.digits_pipeline; its VAE barely trained: DigitMixtureNet generates
    pixels) with the text encoder's token embeddings times TOKEN_SCALE, so that a token's state is mostly the token
    itself, as a trained CLIP's word states are (the random encoder's states of "the number 0" .. "9" at the digit
    nearly coincide, cosine 0.91 on average; here 0.16)."""
    from transformers import CLIPTextModel

    from train.digits_pipeline import build_digits_pipeline

    build_digits_pipeline(folder, vae_steps=1, progress=False)
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", local_files_only=True)
    with torch.no_grad():
        getattr(encoder, "text_model", encoder).embeddings.token_embedding.weight.mul_(TOKEN_SCALE)
    encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    return folder


def write_teacher(folder: Path, path: Path) -> Path:
    """A teacher checkpoint (train.methods.teacher.TeacherPretraining, rebuilt by load_method from its config) of
    DigitMixtureNet over the pipeline `folder`: the unerased model, as `fit` would have written it."""
    from train.runtime.config import instantiate

    teacher = instantiate({"class_path": "train.methods.teacher.TeacherPretraining", "init_args": {
        "net": {"class_path": f"{__name__}.DigitMixtureNet", "init_args": {"pretrained": str(folder)}},
        "schedule": {"class_path": "guidance.schedules.VPCosine", "init_args": {"num_steps": 1000}},
        "parameterization": "x0", "ema_decay": 0.0, "val_samples": 0}})
    checkpoint = {"state_dict": teacher.state_dict()}
    teacher.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path
