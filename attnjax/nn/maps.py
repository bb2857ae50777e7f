"""The attention maps of `attnjax.nn.MultiHeadAttention`, kept out of its file: the collection the
layer sows its weights and logits into (`CAPTURE`), and inference-time edits of those weights
(`edit_weights`) with the dense step that applies them. Functions that take the layer (`self`) run
inside its `__call__`.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp

from attnjax.core import contract
from attnjax.core import flex
from attnjax.nn import cache_steps

__all__ = ["CAPTURE", "WeightsEdit", "active_edit", "attention_weights", "edit_weights",
           "edited_step"]

# The collection the layer sows the softmax weights and logits `[B, N, T, S]` of its queries and keys
# into (float32; masked pairs: weight 0, logit -inf) when the collection is mutable, so any model's
# one forward captures every layer: `model.apply(variables, x, mutable=[CAPTURE])`
# (attnjax.analysis.capture). Decode steps over a cache capture over the cache.
CAPTURE = "attention_maps"
# `fn(weights [B, N, T, S] float32, path) -> weights`: an edit of the post-softmax maps (`edit_weights`).
WeightsEdit = Callable[[jax.Array, str], jax.Array]
_EDIT: contextvars.ContextVar[Optional[WeightsEdit]] = contextvars.ContextVar("attention_edit",
                                                                              default=None)


@contextlib.contextmanager
def edit_weights(fn: WeightsEdit) -> Iterator[None]:
  """Inference-time interventions on attention maps: inside the `with`, every softmax
  `MultiHeadAttention` of a full (non-decode) forward computes its weights
  w = softmax(q·k·scale + masks) `[B, N, T, S]` densely and outputs `fn(w, path) · V`, where `path`
  is the layer's module path ("layers_2/attention"); `fn` may return `w` unchanged for layers it
  leaves alone. The captured maps ("attention_maps") are the edited ones.

  The edit is read when the model is traced: call `apply`, or a `jax.jit` made for it, inside the
  `with` (a function jitted earlier keeps what it traced). Nested uses replace the outer edit.
  """
  token = _EDIT.set(fn)
  try:
    yield
  finally:
    _EDIT.reset(token)


def active_edit() -> Optional[WeightsEdit]:
  """The edit of the innermost `edit_weights`, or None outside one."""
  return _EDIT.get()


def attention_weights(query, key, mask_kw: dict, scale: Optional[float]):
  """Dense softmax weights and logits `[B, N, T, S]` (float32) under the layer's masks
  (`mask_kw`: the operator contract's mask keywords)."""
  B, T = query.shape[:2]
  mask = contract.contract_mask(B=B, T=T, S=key.shape[1], op="MultiHeadAttention", **mask_kw)
  return flex.attention_weights(query, key, mask_mod=mask, scale=scale)


def edited_step(self, mech, query, key, value, mask_kw: dict):
  """`(fn(w) · V, (fn(w), logits))` for the active `edit_weights` fn, at layer `self`."""
  if mech.name != "softmax" or self.mechanism_kwargs:
    raise ValueError(f"MultiHeadAttention: `edit_weights` edits softmax attention maps; this "
                     f"layer runs {mech.name!r} with {dict(self.mechanism_kwargs or {})}")
  weights, logits = attention_weights(query, key, mask_kw, self.scale)
  path = "/".join(self.scope.path)
  new = _EDIT.get()(weights, path)
  if new.shape != weights.shape:
    raise ValueError(f"edit_weights: the edit must return weights of shape {weights.shape} "
                     f"[B, N, T, S] (layer {path}), got {new.shape}")
  return cache_steps.weights_times_values(new, value), (new.astype(jnp.float32), logits)
