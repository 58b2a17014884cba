"""Conditioners: what a request for a sample (a class id or name, a prompt) becomes in the network's condition.

A condition is whatever a network takes beside x_t and t: class ids [B] for class-conditional networks, a dict of
text embeddings for text-conditioned ones (models.text_encoders). Everything outside the network adapters works
with requests and asks the network's conditioner (`net.conditioner`) to

    encode(requests)      requests (a sequence, or a LongTensor of class ids) -> the batched condition;
    null(cond)            the null (unconditional) condition of the same batch;
    drop(cond, p, u)      classifier-free training: the null condition where u < p (Ho & Salimans 2022,
                          arXiv 2207.12598, Algorithm 1), u [B] uniform draws given by the caller;
    key(request)          a stable string naming the request (trajectory banks, per-concept bookkeeping);
    parse(request)        the request in canonical form, or a ValueError saying what this model takes.

The null request (`null_request`: class -1, the empty prompt "") encodes to the null condition, so a request list
may mix real and null entries. Class labels and prompts are the two implementations; no caller branches on which.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import Tensor

NULL_LABEL = -1


class Conditioner:
    """Base of the conditioners (see the module docstring)."""

    kind: str = ""            # "class" or "text": for messages and model cards, never branched on
    null_request: Any = None  # the request whose condition is the null condition

    def parse(self, request: Any) -> Any:
        raise NotImplementedError

    def key(self, request: Any) -> str:
        raise NotImplementedError

    def encode(self, requests: Sequence | Tensor, device: torch.device | str | None = None) -> Any:
        raise NotImplementedError

    def null(self, cond: Any) -> Any:
        raise NotImplementedError

    def drop(self, cond: Any, p: float, generator: torch.Generator | None = None, u: Tensor | None = None) -> Any:
        raise NotImplementedError

    def enumerate(self) -> list | None:
        """Every request the model knows (each class), or None when they cannot be listed (prompts)."""
        return None

    def parse_all(self, requests: Sequence | Tensor) -> list:
        """`parse` of each request (a LongTensor of class ids counts as a sequence)."""
        items = requests.tolist() if isinstance(requests, Tensor) else list(requests)
        return [self.parse(r) for r in items]

    def null_batch(self, n: int, device: torch.device | str | None = None) -> Any:
        """The null condition for n samples (e.g. a probe forward)."""
        return self.encode([self.null_request] * n, device)

    def to(self, device: torch.device | str) -> "Conditioner":
        """Move what encodes requests (a text model's prompt encoders) to `device`; class ids need nothing. Returns
        self."""
        return self

    def describe(self) -> dict:
        return {"kind": self.kind}


class ClassConditioner(Conditioner):
    """Class labels: requests are class ids 0..num_classes-1 (or their names, when `names` are given), -1 the null
    class; the condition is a LongTensor [B] of ids.

    num_classes: the classes the network knows.
    names:       one name per class (e.g. the data's sorted subfolder names); a request may name its class.
    """

    kind = "class"
    null_request = NULL_LABEL

    def __init__(self, num_classes: int, names: Sequence[str] | None = None):
        if names is not None and len(names) != num_classes:
            raise ValueError(f"class_names has {len(names)} entries but the network has {num_classes} classes; give one "
                             f"name per class, in class-id order")
        self.num_classes, self.names = int(num_classes), (list(map(str, names)) if names is not None else None)

    def parse(self, request: Any) -> int:
        if isinstance(request, Tensor) and request.numel() == 1:
            request = request.item()
        if isinstance(request, str):
            if self.names is not None and request in self.names:
                return self.names.index(request)
            if request.lstrip("-").isdigit():
                request = int(request)
        if isinstance(request, bool) or not isinstance(request, int) and not hasattr(request, "__index__"):
            raise ValueError(f"{request!r} is not a class of this class-conditional model; give class ids "
                             f"0..{self.num_classes - 1}{self._names_hint()} (prompts need a text-to-image model)")
        c = int(request)
        if not -1 <= c < self.num_classes:
            raise ValueError(f"class {c} is out of range: this model has classes 0..{self.num_classes - 1} "
                             f"(-1 is the null class){self._names_hint()}")
        return c

    def _names_hint(self) -> str:
        return f" or names ({', '.join(self.names)})" if self.names else ""

    def key(self, request: Any) -> str:
        return str(self.parse(request))

    def name(self, request: Any) -> str:
        c = self.parse(request)
        return self.names[c] if self.names is not None and c >= 0 else str(c)

    def encode(self, requests: Sequence | Tensor, device=None) -> Tensor:
        if isinstance(requests, Tensor) and not requests.is_floating_point():
            ids = requests.long()
            if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= self.num_classes):
                bad = ids[(ids < -1) | (ids >= self.num_classes)][0].item()
                self.parse(bad)  # raises with the message
            return ids if device is None else ids.to(device)
        return torch.tensor(self.parse_all(requests), dtype=torch.long, device=device)

    def null(self, cond: Tensor) -> Tensor:
        return torch.full_like(cond, NULL_LABEL)

    def drop(self, cond: Tensor, p: float, generator=None, u: Tensor | None = None) -> Tensor:
        if p <= 0:
            return cond
        u = torch.rand(cond.shape, generator=generator, device=cond.device) if u is None else u.to(cond.device)
        return torch.where(u < p, torch.full_like(cond, NULL_LABEL), cond)

    def enumerate(self) -> list[int]:
        return list(range(self.num_classes))

    def describe(self) -> dict:
        return {"kind": self.kind, "num_classes": self.num_classes, "class_names": self.names}


# One prompt encoder per (folder, settings) and process: the network adapters, the methods and evaluation of a run
# share it, so a T5-XXL is loaded once however many networks (teacher, generator, fake score, EMA) refer to it.
_ENCODERS: dict[tuple, Any] = {}


def shared_prompt_encoder(pretrained: str, **settings) -> Any:
    """The process's models.text_encoders.PromptEncoder of a pipeline folder with these from_pretrained settings."""
    key = (os.path.abspath(os.path.expanduser(pretrained)), tuple(sorted(settings.items())))
    if key not in _ENCODERS:
        from models.text_encoders import PromptEncoder

        _ENCODERS[key] = PromptEncoder.from_pretrained(key[0], **settings)
    return _ENCODERS[key]


class TextConditioner(Conditioner):
    """Prompts: requests are strings, "" the null prompt; the condition is the text condition dict of the model's
    prompt encoder (models.text_encoders.PromptEncoder: encoder_hidden_states, and text_embeds or
    pooled_projections), plus cond["guidance"] [B] for a guidance-distilled network (FLUX.1-dev).

    pretrained:        the pipeline folder whose tokenizers and text encoders encode prompts; loaded lazily, once
                       per process and settings (shared_prompt_encoder), and frozen.
    encoder_settings:  PromptEncoder.from_pretrained settings (kind, max_sequence_length, use_t5, dtype).
    null_embedding:    the null text condition with batch size 1 (default: the encoder's `null(1)`: the embedding of
                       "" or, for SDXL, zeros). Given alone (no `pretrained`), the conditioner nulls and drops
                       conditions but cannot encode prompts.
    keys:              the entries of a condition that come from the prompt (the null condition replaces them;
                       others, such as SDXL's time_ids or Flux's guidance, are kept).
    embedded_guidance: the guidance INPUT given with every prompt to a guidance-distilled network (None: none).
    width:             the embedding width the network takes (checked against the encoder's when first used).
    """

    kind = "text"
    null_request = ""

    def __init__(self, keys: Sequence[str], pretrained: str | None = None, encoder_settings: dict | None = None,
                 null_embedding: dict[str, Tensor] | None = None, embedded_guidance: float | None = None,
                 width: int | None = None):
        if pretrained is None and null_embedding is None:
            raise ValueError("a TextConditioner needs the pipeline folder whose text encoders it uses, or a null embedding")
        self.text_keys = list(keys)
        self.pretrained, self.encoder_settings = pretrained, dict(encoder_settings or {})
        self.embedded_guidance, self.width = embedded_guidance, width
        self._null = None
        if null_embedding is not None:
            self._set_null(null_embedding)
        self._null_on: dict[tuple, dict[str, Tensor]] = {}

    def __deepcopy__(self, memo) -> "TextConditioner":
        return self  # shared by every copy of a network (generator, EMA, fake score): it holds no weights of theirs

    @property
    def encoder(self):
        if self.pretrained is None:
            raise ValueError("this text network was built from a network and a null embedding, without its pipeline "
                             "folder, so it cannot encode prompts; load it with `pretrained:`")
        return shared_prompt_encoder(self.pretrained, **self.encoder_settings)

    def _set_null(self, null: dict[str, Tensor]) -> None:
        missing = [k for k in self.text_keys if k not in null]
        if missing:
            raise ValueError(f"the null condition lacks {missing}; this network needs {self.text_keys} (build it with the "
                             f"prompt encoder of the same model family, `PromptEncoder.null(1)`)")
        null = {k: null[k] for k in self.text_keys}
        bad = [k for k, v in null.items() if v.shape[0] != 1]
        if bad:
            raise ValueError(f"the null embedding must have batch size 1; {bad} do not")
        if self.width is not None and null["encoder_hidden_states"].shape[-1] != self.width:
            raise ValueError(f"text embeddings have D={null['encoder_hidden_states'].shape[-1]} but the network takes "
                             f"{self.width}; the text encoder and the network come from different models")
        self._null = {k: v.detach().cpu() for k, v in null.items()}

    @property
    def null_embedding(self) -> dict[str, Tensor]:
        if self._null is None:
            self._set_null(self.encoder.null(1))
        return self._null

    def parse(self, request: Any) -> str:
        if not isinstance(request, str):
            raise ValueError(f"{request!r} is not a prompt; this is a text-to-image model: give prompts (strings), not "
                             f"class ids")
        return request

    def key(self, request: Any) -> str:
        return self.parse(request)

    def to(self, device: torch.device | str) -> "TextConditioner":
        """The prompt encoder (shared by the process: models.text_encoders.PromptEncoder) on `device`, loaded now; a
        conditioner without its pipeline folder (a null embedding alone) has none to move."""
        if self.pretrained is not None:
            self.encoder.to(device)
        return self

    def encode(self, requests: Sequence | Tensor, device=None) -> dict[str, Tensor]:
        prompts = self.parse_all(requests)
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        real = [p for p in prompts if p != ""]
        null = self._null_rows(len(prompts), device)
        if real:
            enc = self.encoder
            if device is not None and enc.device != torch.device(device):
                enc.to(device)
            emb = {k: v for k, v in enc.encode(real).items() if k in self.text_keys}
            if len(real) == len(prompts):
                cond = {k: v.to(null[k].dtype) for k, v in emb.items()}
            else:
                keep = torch.tensor([p != "" for p in prompts], device=null[self.text_keys[0]].device)
                cond = {k: v.clone() for k, v in null.items()}
                for k in cond:
                    cond[k][keep] = emb[k].to(cond[k])
        else:
            cond = null
        if device is not None:
            cond = {k: v.to(device) for k, v in cond.items()}
        if self.embedded_guidance is not None:
            ref = cond[self.text_keys[0]]
            cond["guidance"] = torch.full((len(prompts),), float(self.embedded_guidance), device=ref.device)
        return cond

    def _null_rows(self, n: int, device=None, dtype=None) -> dict[str, Tensor]:
        key = (str(device), dtype)
        if key not in self._null_on:
            self._null_on[key] = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in self.null_embedding.items()}
        return {k: v.expand(n, *v.shape[1:]) for k, v in self._null_on[key].items()}

    def null(self, cond: dict[str, Tensor]) -> dict[str, Tensor]:
        """The condition with its text entries replaced by the null text (batch size and other entries kept)."""
        keys = self.text_keys
        ref = cond[keys[0]]
        rows = self._null_rows(ref.shape[0], ref.device, ref.dtype)
        return {**cond, **rows}

    def drop(self, cond: dict[str, Tensor], p: float, generator=None, u: Tensor | None = None) -> dict[str, Tensor]:
        """Replace the text of the samples where u < p by the null text (Ho & Salimans 2022, Algorithm 1)."""
        if p <= 0:
            return cond
        ref = cond[self.text_keys[0]]
        if u is None:
            u = torch.rand(ref.shape[0], generator=generator, device=generator.device if generator else ref.device)
        drop = (u < p).to(ref.device)
        null = self.null(cond)
        out = dict(cond)
        for k in self.text_keys:
            out[k] = torch.where(drop.reshape(-1, *([1] * (cond[k].ndim - 1))), null[k], cond[k])
        return out

    def describe(self) -> dict:
        return {"kind": self.kind, "pretrained": self.pretrained, "condition_keys": self.text_keys
                + (["guidance"] if self.embedded_guidance is not None else []), **self.encoder_settings}
