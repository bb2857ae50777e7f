"""Attention maps of any project model, captured in its one forward pass.

Every `attnjax.nn.MultiHeadAttention` sows the softmax weights and logits of its queries and keys,
`[B, N, T, S]` float32 under the call's masks (causal, documents, key lengths; masked pairs get
weight 0 and logit -inf), into the collection `CAPTURE` when that collection is mutable. So

    maps = capture(model, variables, tokens)            # any Flax model built on the layer
    maps.weights    # [L, B, N, T, S], the layers in the order the forward called them
    maps.logits     # [L, B, N, T, S]
    maps.paths      # ("block_0/attention", ...)

needs no second code path and no flag in the model. For a mechanism other than softmax the maps are
what softmax attention over the same queries and keys would weigh (the layer's q·k, not the
mechanism's own weighting, which many mechanisms never form).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from attnjax.nn.maps import CAPTURE

__all__ = ["CAPTURE", "Captured", "capture", "from_state"]


@dataclasses.dataclass(frozen=True)
class Captured:
  """Per attention layer (forward order): its module path, weights and logits `[B, N, T, S]`."""
  paths: tuple[str, ...]
  layer_weights: tuple[np.ndarray, ...]
  layer_logits: tuple[np.ndarray, ...]

  def _stack(self, arrays):
    if len({a.shape for a in arrays}) != 1:
      raise ValueError(f"capture: the layers' maps differ in shape ({[a.shape for a in arrays]}); "
                       "read `layer_weights` per layer")
    return np.stack(arrays)

  @property
  def weights(self) -> np.ndarray:
    """`[L, B, N, T, S]` post-softmax weights (rows sum to 1 over the visible keys)."""
    return self._stack(self.layer_weights)

  @property
  def logits(self) -> np.ndarray:
    """`[L, B, N, T, S]` scaled scores, -inf where masked."""
    return self._stack(self.layer_logits)


def from_state(state: Any) -> Captured:
  """The maps in a mutable-collections dict returned by `apply(..., mutable=[CAPTURE, ...])` (or the
  `CAPTURE` collection itself), walked in insertion order: the order the layers ran."""
  tree = state.get(CAPTURE, state) if hasattr(state, "get") else state
  paths, weights, logits = [], [], []

  def walk(node, prefix):
    if hasattr(node, "keys") and "weights" in node and "logits" in node:
      for w, lg in zip(node["weights"], node["logits"], strict=True):   # sown once per call
        paths.append(prefix)
        weights.append(np.asarray(w, np.float32))
        logits.append(np.asarray(lg, np.float32))
      return
    for key in node.keys():
      walk(node[key], f"{prefix}/{key}" if prefix else str(key))

  walk(tree, "")
  if not paths:
    raise ValueError("capture: nothing was sown: the model has no attnjax.nn.MultiHeadAttention "
                     "layer that ran a full forward")
  return Captured(tuple(paths), tuple(weights), tuple(logits))


def capture(model, variables, *args, **kwargs) -> Captured:
  """Runs `model.apply(variables, *args, **kwargs)` with the capture collection mutable and returns
  every attention layer's maps (module docstring). Jit the model's own apply if called often:
  `from_state(jax.jit(lambda v, x: model.apply(v, x, mutable=[CAPTURE])[1])(variables, x))`."""
  mutable = kwargs.pop("mutable", [])
  mutable = [mutable] if isinstance(mutable, str) else list(mutable)
  _, state = model.apply(variables, *args, mutable=[*mutable, CAPTURE], **kwargs)
  return from_state(state)
