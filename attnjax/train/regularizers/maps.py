"""The attention maps a forward sowed, as differentiable jnp arrays, for the attention losses.

`attnjax.nn.MultiHeadAttention` sows its softmax weights and logits `[B, N, T, S]` into the
collection `attnjax.analysis.CAPTURE` when it is mutable (masked pairs: weight 0, logit -inf). Inside
a loss, `_, state = model.apply(variables, x, mutable=[CAPTURE])` and `sown_maps(state)` give every
layer's maps with gradients flowing to the parameters (`analysis.from_state` gives numpy copies).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from attnjax import catalog
from attnjax.nn.maps import CAPTURE
from attnjax.typing import Array, Float

__all__ = ["HeadRows", "Maps", "Scalar", "serves", "sown_maps", "visible"]

Maps = Float[Array, "B N T S"]      # one layer's sown weights or logits
HeadRows = Float[Array, "B N T"]    # one value per query row of each head
Scalar = Float[Array, ""]


def serves(*seeds: int, kind: str):
  """`catalog.serves` under the public path `attnjax.train.regularizers.<name>` (the default
  would name the `attnjax.train` package, which does not export these)."""
  return lambda obj: catalog.serves(*seeds, kind=kind,
                                    name=f"attnjax.train.regularizers.{obj.__qualname__}")(obj)


def sown_maps(state: Any) -> tuple[list[jnp.ndarray], list[jnp.ndarray]]:
  """`(weights, logits)`: per sown layer call (forward order) the `[B, N, T, S]` jnp arrays, from the
  mutable-collections dict of `apply(..., mutable=[CAPTURE])` or the `CAPTURE` collection itself.

  Raises:
    ValueError: nothing was sown (no MultiHeadAttention ran with the collection mutable).
  """
  tree = state.get(CAPTURE, state) if hasattr(state, "get") else state
  weights, logits = [], []

  def walk(node):
    if hasattr(node, "keys") and "weights" in node and "logits" in node:
      weights.extend(node["weights"])
      logits.extend(node["logits"])
      return
    for key in node.keys():
      walk(node[key])

  walk(tree)
  if not weights:
    raise ValueError("attention regularizer: nothing was sown in the collection "
                     f"{CAPTURE!r}: apply the model with mutable=[{CAPTURE!r}] and build it on "
                     "attnjax.nn.MultiHeadAttention")
  return weights, logits


def visible(logits: jnp.ndarray) -> jnp.ndarray:
  """Boolean `[B, N, T, S]`: the pairs the layer's masks let through (finite logit)."""
  return jnp.isfinite(logits)
