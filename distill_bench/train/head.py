"""The LM head applied to chosen positions only: SFT's and KD's trainers and the teacher's logit cache need the
full-vocab distribution at loss-bearing positions, not at every prompt and padding position.

The lowest layer of the train package (with ``collate``): imports nothing from distill_bench, torch only through
the model it is handed.
"""
from __future__ import annotations

import types


def head_is_plain(model) -> bool:
    """True when logits == lm_head(last hidden state), so the head can be applied to chosen positions only."""
    cfg = model.config
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        if getattr(cfg, attr, None) not in (None, 1, 1.0):
            return False
    return model.get_output_embeddings() is not None and hasattr(model, "base_model") \
        and model.base_model is not model


def add_positions_head(model) -> bool:
    """Let ``model(..., kd_rows=r, kd_cols=c)`` return the LM-head logits of hidden positions (r, c) only, [n, V].

    The plain forward projects every position (prompt and padding too) through the head and keeps [B, L, V] logits
    and their gradient alive. Patched on the instance like TRL's fused LM head (whose forward stays reachable without
    the keywords), so a compiled or DDP-wrapped model still runs it. Returns False (model untouched) where logits are
    not plain head(hidden).
    """
    if not head_is_plain(model):
        return False
    inner = model.forward

    def forward(self, *args, kd_rows=None, kd_cols=None, **kwargs):
        if kd_rows is None:
            return inner(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        return self.get_output_embeddings()(hidden[kd_rows, kd_cols])

    model.forward = types.MethodType(forward, model)
    return True
