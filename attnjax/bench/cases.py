"""The attention calls a benchmark compares: attnjax paths and their peers, on one mask and shape.

Each provider returns a function `(q, k, v) -> out` in `[B, T, N, H]` layout, or raises
`NotImplementedError` with the reason it cannot run the case (reported as skipped).

Masks: "none", "causal", "window" (causal, the query sees the last `window` keys), "documents" (causal
within packed documents of `doc_len` tokens).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import flex
from attnjax.core import masks

MASKS = ("none", "causal", "window", "documents")


@dataclasses.dataclass(frozen=True)
class Case:
  mask: str
  T: int
  B: int = 1
  N: int = 8
  H: int = 64
  window: int = 256
  doc_len: int = 512
  dtype: str = "float32"

  def segment_ids(self) -> np.ndarray:
    return np.broadcast_to(np.arange(self.T) // self.doc_len, (self.B, self.T)).astype(np.int32)

  def dense_mask(self) -> np.ndarray:
    """`[1, 1, T, T]` boolean mask (True keeps) for peers that take one."""
    i, j = np.arange(self.T)[:, None], np.arange(self.T)[None, :]
    keep = {"none": np.ones((self.T, self.T), bool), "causal": i >= j,
            "window": (i >= j) & (i - j < self.window),
            "documents": (i >= j) & (i // self.doc_len == j // self.doc_len)}[self.mask]
    return keep[None, None]


def attnjax_mask_mod(case: Case):
  if case.mask == "none":
    return None
  if case.mask == "causal":
    return masks.causal()
  if case.mask == "window":
    return masks.sliding_window(case.window - 1, 0)
  if case.mask == "documents":
    return masks.and_masks(masks.causal(), masks.document(jnp.asarray(case.segment_ids())))
  raise ValueError(f"unknown mask {case.mask!r}; choose from {MASKS}")


def attnjax_fn(implementation: str):
  def build(case: Case):
    mask_mod = attnjax_mask_mod(case)
    return lambda q, k, v: flex.flex_attention(q, k, v, mask_mod=mask_mod,
                                               implementation=implementation)
  return build


def jax_nn_fn(case: Case):
  """`jax.nn.dot_product_attention` (XLA implementation) with its own mask arguments."""
  if case.mask == "none":
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v)
  if case.mask == "causal":
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)
  if case.mask == "window":
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                        local_window_size=(case.window - 1, 0))
  mask = jnp.asarray(case.dense_mask())
  return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask)


PROVIDERS = {
    "attnjax_xla": attnjax_fn("xla"),
    "attnjax_reference": attnjax_fn("reference"),
    "jax_nn": jax_nn_fn,
}
