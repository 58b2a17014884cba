"""Frozen networks left out of checkpoints: the networks a method reads from a path of its config (a teacher, the model
to erase, a stage-1 student) are rebuilt from that path whenever the method is, so a checkpoint stores a fingerprint
of each instead of its weights, and loading takes the weights from the rebuilt module once the fingerprint matches.

What a method declares (train.methods.base.MethodModule.register_frozen): the network object it read, the path it
read it from, and whether it did read it (a recorded config rebuilds it without the path when the path is gone or
unreadable). What is left out of that network is decided structurally, when it is registered: its buffers and its
parameters that do not require grad (adapters a method injects into it, a LoRA fake score's, require grad and stay).
It is left out under every name it has in the module's state dict (a network shared by two submodules has two), and
only while it holds what its source gave: a network whose weights a method replaces (progressive distillation's round
teacher after round 0) or a loaded checkpoint supplied is saved whole from then on, and so is one whose fingerprint at
saving is no longer the one taken at registration.

The fingerprint (`fingerprint`) is a sha256 over the left-out tensors in name order: each tensor's name, shape and
dtype and the bytes of a fixed strided sample of its values (SAMPLES evenly spaced entries of the flattened tensor,
first and last included; all of a smaller tensor). It tells apart another model, a retrained or fine-tuned one
(training moves every weight), another dtype or architecture; a change confined to entries between the sampled ones
goes unnoticed. It costs one gather of at most SAMPLES values per tensor: 0.1 s for 686 tensors of 860M values in all
(SD 1.5's UNet) on a CPU, at registration and at each checkpoint."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

FROZEN_KEY = "frozen"  # checkpoint[CHECKPOINT_KEY][FROZEN_KEY]: one record per left-out copy of a frozen network
SAMPLES = 4096  # values sampled per tensor by the fingerprint


class FrozenSourceError(ValueError):
    """A checkpoint left a frozen network out and its source no longer gives it; the message says what to do."""


def tensor_sample(t: Tensor, k: int = SAMPLES) -> bytes:
    """The raw bytes of k evenly spaced entries of t flattened (index i (n - 1) // (k - 1), i = 0 .. k - 1; all n
    entries when n <= k), read on t's device and copied to the CPU: the same bytes on every device."""
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n > k:
        flat = flat[(torch.arange(k, dtype=torch.int64) * (n - 1) // (k - 1)).to(flat.device)]
    return flat.cpu().contiguous().view(torch.uint8).numpy().tobytes()


def fingerprint(tensors: dict[str, Tensor]) -> str:
    """sha256 (hex) over the tensors in name order: name, shape, dtype and `tensor_sample` of each."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(tensor_sample(t))
    return h.hexdigest()


@dataclass
class FrozenNetwork:
    """A frozen network a method read from `source`; `unread` says why it does not hold what `source` gives (it was
    not read from there, or its weights were replaced since), None when it does. names: its state-dict entries left
    out of checkpoints (buffers and parameters without requires_grad, at registration); digest: their fingerprint
    then."""

    net: nn.Module
    source: str
    unread: str | None = None
    names: tuple[str, ...] = field(default=())
    digest: str = ""

    @classmethod
    def of(cls, net: nn.Module, source: str, unread: str | None = None) -> "FrozenNetwork":
        trained = {n for n, p in net.named_parameters(remove_duplicate=False) if p.requires_grad}
        names = tuple(n for n in net.state_dict(keep_vars=True) if n not in trained)
        return cls(net, str(source), unread, names, fingerprint(_tensors(net, names)))

    def unchanged(self) -> bool:
        """True while the network still holds what its source gave (the fingerprint taken at registration)."""
        return self.unread is None and fingerprint(_tensors(self.net, self.names)) == self.digest


def _tensors(net: nn.Module, names: tuple[str, ...]) -> dict[str, Tensor]:
    state = net.state_dict(keep_vars=True)
    return {n: state[n] for n in names}


def _paths(root: nn.Module, networks: list[FrozenNetwork]) -> dict[int, list[str]]:
    """id(network) -> every name it has under `root` (state-dict prefixes, without the trailing dot)."""
    wanted = {id(f.net) for f in networks}
    out: dict[int, list[str]] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        if id(module) in wanted and name:
            out.setdefault(id(module), []).append(name)
    return out


def leave_out_frozen(root: nn.Module, networks: list[FrozenNetwork], state_dict: dict) -> list[dict]:
    """Remove from `state_dict` (root's, as a checkpoint holds it) every copy of each network in `networks` that still
    holds what its source gave and whose entries are all there (a DeepSpeed engine saves its own); the records to
    store in the checkpoint, one per copy removed: {path, source, tensors, fingerprint}."""
    records = []
    paths = _paths(root, networks)
    for f in networks:
        if not f.names or not f.unchanged():
            continue
        for path in paths.get(id(f.net), []):
            keys = [f"{path}.{n}" for n in f.names]
            if all(k in state_dict for k in keys):
                for k in keys:
                    del state_dict[k]
                records.append({"path": path, "source": f.source, "tensors": len(keys), "fingerprint": f.digest})
    return records


def fill_frozen(root: nn.Module, networks: list[FrozenNetwork], records: list[dict], state_dict: dict) -> None:
    """Before `state_dict` (a checkpoint's, with `records` its left-out networks) is loaded into `root` (a module
    rebuilt from its config): put into it the entries each record says were left out, taken from root's own copy of
    that frozen network, after checking that the copy was read from its source and has the recorded fingerprint
    (otherwise a FrozenSourceError of one line naming the source and what to do); and mark the networks the
    checkpoint holds a copy of as no longer holding what their source gave (saved whole from then on)."""
    paths = _paths(root, networks)
    for f in networks:
        if any(f"{path}.{n}" in state_dict for path in paths.get(id(f.net), []) for n in f.names):
            f.unread = f.unread or "was replaced by the weights of a checkpoint"
    for record in records:
        path = record["path"]
        f = next((f for f in networks if path in paths.get(id(f.net), [])), None)
        if f is None:
            raise FrozenSourceError(f"the checkpoint left out the frozen network {path!r} (read from "
                                    f"{record.get('source')!r}) but the module its config builds has no frozen "
                                    f"network there; load it with the code version that wrote it")
        if all(f"{path}.{n}" in state_dict for n in f.names):
            continue  # the state dict holds this copy after all (e.g. a module's state_dict saved whole): it is used
        where = f"the frozen network {path!r} was left out of the checkpoint and is read from {f.source!r}"
        if f.unread is not None:
            raise FrozenSourceError(f"{where}, which {f.unread}; restore the original model at {f.source!r} (a copy "
                                    f"or a link)")
        if f.digest != record["fingerprint"]:
            raise FrozenSourceError(f"{where}, which no longer holds the model it was trained with (its weights' "
                                    f"fingerprint differs); restore the original model at {f.source!r}")
        state = f.net.state_dict()
        state_dict.update({f"{path}.{n}": state[n] for n in f.names})
