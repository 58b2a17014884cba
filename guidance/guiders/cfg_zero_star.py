"""CFG-Zero* (Fan et al. 2025): CFG with an optimised scale on the unconditional flow velocity and
zero velocity for the first steps."""
from __future__ import annotations

import torch

from guidance.guiders.base import Branch, GuideContext, Guider, flat_dot
from guidance.parameterization import Prediction


class CFGZeroStar(Guider):
    """CFG-Zero*: v = s* v_u + w (v_c - s* v_u) with s* = <v_c, v_u> / ||v_u||^2, and v = 0 at first.

    s* is per sample; v = 0 for the first `zero_init_steps` calls of a trajectory.

    zero_init_steps: K >= 0 steps with zero velocity (the paper zeroes the first ~4% of the steps).
                     Those calls evaluate no network at all (`branches` returns []).
    optimized_scale: use s* (True) or s* = 1 (plain CFG).
    space:           the paper's is flow (v = eps - x0 for rectified flow); s* and the zero output are
                     not affine, so other spaces give other results.
    State: {"step": int} counts calls; without a state (teacher targets) there is no zero-init.
    Tensors [B, C, H, W]; inner products over all non-batch dims. Branches: cond, uncond (batched).
    """

    name = "cfg_zero_star"
    stateful = True

    def __init__(self, zero_init_steps: int = 1, optimized_scale: bool = True, space: str = "flow"):
        super().__init__(space)
        if not isinstance(zero_init_steps, int) or zero_init_steps < 0:
            raise ValueError(f"cfg_zero_star: zero_init_steps must be an integer >= 0 (0 disables zero-init), "
                             f"got {zero_init_steps!r}")
        self.zero_init_steps, self.optimized_scale = zero_init_steps, optimized_scale

    def init_state(self, batch_size: int) -> dict:
        return {"step": 0}

    def _zeroing(self, state) -> bool:
        return state is not None and state["step"] < self.zero_init_steps

    def branches(self, state=None):
        if self._zeroing(state):
            return []
        return [Branch("cond", "cond"), Branch("uncond", "uncond")]

    def combine(self, preds: dict[str, Prediction], ctx: GuideContext):
        state = None if ctx.state is None else {"step": ctx.state["step"] + 1}
        if self._zeroing(ctx.state):
            like = ctx.point()
            # Fan et al. 2025, arXiv 2503.18886, sec. 4.2 (zero-init): v = 0 for the first K steps
            return self.build(torch.zeros_like(like.x_t), like), state
        y_c, y_u = self.read(preds, "cond"), self.read(preds, "uncond")
        s = 1.0
        if self.optimized_scale:
            # ibid., sec. 4.1 (optimised scale): s* = v_c^T v_u / ||v_u||^2
            s = flat_dot(y_c, y_u) / flat_dot(y_u, y_u).clamp_min(torch.finfo(y_u.dtype).tiny)
        # ibid., Algorithm 1: v = s* v_u + w (v_c - s* v_u)
        out = s * y_u + ctx.scale(y_c) * (y_c - s * y_u)
        return self.build(out, preds["cond"]), state
