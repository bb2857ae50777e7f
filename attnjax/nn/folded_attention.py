"""Optimised, Efficient and Super attention: multi-head attention with folded projections (Linen).

Standard multi-head attention of width D = N·H computes, per head n (X_n = X[:, nH:(n+1)H], the
n-th slice of the features),

    standard:   O = Σ_n softmax(X W_Q^n (M W_K^n)ᵀ / sqrt(H)) M W_V^n W_O^n      4D² weights
    optimised:  O = Σ_n softmax(X W_Q^n (M W_K^n)ᵀ / sqrt(H)) M_n W_O^n          3D²
    efficient:  O = Σ_n softmax(X W_Q^n M_nᵀ / sqrt(H)) M_n W_O^n                2D²
    super:      O = Σ_n softmax(X W_Q^n M_nᵀ / sqrt(H)) (W_A M)_n W_O^n          2D² + ℓ²

(M = X for self-attention, the key/value input for cross-attention.) Optimised attention drops the
value projection: W_V^n W_O^n is one linear map that W_O^n can learn alone (exactly, for one head);
each head reads its own slice of the input as values. Efficient attention also drops the key
projection: the logits x W_Q^n W_K^nᵀ m only ever use the product W_Q^n W_K^nᵀ, which one learned
W_Q^n (against the key slice m_n) stands for. Super attention adds an alignment matrix W_A [ℓ, ℓ]
that mixes the value tokens (rows) before attention, so it needs a fixed length S = ℓ; the same W_A
serves every head. With biases each removed projection takes its bias with it, so the counts stay
exactly 3/4 and 1/2 of standard attention's 4(D² + D) as well.

Interpretations (the definitions follow the paper's equations as implemented in the public
reference code github.com/NMesaC/pay-better-attention, `AttentionLayer._forward_optimised/efficient/
super`): the head slices are contiguous blocks of H features; W_A has no bias and is shared by the
heads; Super attention is bidirectional (W_A mixes every position, so causal masking and packed
documents are rejected) and zeroes padded slots (`kv_lengths`) before mixing. The weights are any
registered mechanism without learned arrays (default "softmax"), as in `MultiHeadAttention`.

Shapes: `inputs_q [B, T, D]`, `inputs_kv [B, S, D_kv]` (D_kv = D for efficient and super) →
`[B, T, F]` (F = `out_features` or D). Parameters: 'query' `[D, N, H_k]` (H_k = D_kv / N for
efficient / super, H for optimised), 'key' `[D_kv, N, H]` (optimised only), 'alignment' `[ℓ, ℓ]`
(super only), 'out' `[N, D_kv / N, F]`.
Paper: Hosseini and Hosseini, "You Need to Pay Better Attention: Rethinking the Mathematics of
Attention Mechanism", arXiv:2403.01643.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import catalog
from attnjax import registry
from attnjax.nn import layer_parts
from attnjax.core.contract import zero_padded

__all__ = ["FoldedProjectionAttention", "VARIANTS"]

Initializer = Callable[..., Any]
VARIANTS = ("optimised", "efficient", "super")


@catalog.serves(123, kind="layer")
class FoldedProjectionAttention(nn.Module):
  """Hosseini and Hosseini's Optimised / Efficient / Super attention (module docstring).

  Attributes:
    num_heads: N (must divide the input widths).
    variant: "optimised" (no value projection), "efficient" (no key or value projection) or
      "super" (efficient plus the token-alignment matrix W_A).
    max_length: ℓ, the fixed key/value length of "super" (its W_A is ℓ × ℓ).
    mechanism: registry name (or record) of the attention weights, without learned arrays.
    mechanism_kwargs: the mechanism's keyword arguments.
    out_features: F (None: the query input's width).
    causal: causal attention (not for "super").
    use_bias: biases on the query, key and output projections.
    dtype, param_dtype, precision: as in `MultiHeadAttention`.
    kernel_init, bias_init: initializers of the projections.
    alignment_init: initializer of W_A (default: the identity, so "super" starts as "efficient").
    scale: the mechanism's logit scale (None: its default, H^-1/2).
    implementation: the mechanism's `implementation=`.
  """
  num_heads: int
  variant: str = "optimised"
  max_length: Optional[int] = None
  mechanism: Union[str, registry.Mechanism] = "softmax"
  mechanism_kwargs: Optional[Mapping[str, Any]] = None
  out_features: Optional[int] = None
  causal: bool = False
  use_bias: bool = True
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Initializer = nn.linear.default_kernel_init
  bias_init: Initializer = nn.initializers.zeros_init()
  alignment_init: Initializer = lambda key, shape, dtype=jnp.float32: jnp.eye(shape[0], dtype=dtype)
  scale: Optional[float] = None
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv: Optional[jax.Array] = None, *,
               segment_ids=None, kv_lengths=None) -> jax.Array:
    """`inputs_q [B, T, D]`, `inputs_kv [B, S, D_kv]` (None: self-attention) → `[B, T, F]`;
    `segment_ids` and `kv_lengths` as in `MultiHeadAttention`."""
    name = "FoldedProjectionAttention"
    if self.variant not in VARIANTS:
      raise ValueError(f"{name}: `variant` must be one of {VARIANTS}, got {self.variant!r}")
    cross = inputs_kv is not None
    mech = layer_parts.plain_mechanism(name, self.mechanism, causal=self.causal, cross=cross)
    kv = inputs_kv if cross else inputs_q
    if jnp.ndim(inputs_q) != 3 or jnp.ndim(kv) != 3 or kv.shape[0] != inputs_q.shape[0]:
      raise ValueError(f"{name}: inputs must have shapes [B, T, D] and [B, S, D_kv], got "
                       f"{jnp.shape(inputs_q)} and {jnp.shape(kv)}")
    N = self.num_heads
    D, D_kv, S = inputs_q.shape[-1], kv.shape[-1], kv.shape[1]
    if N <= 0 or D % N or D_kv % N:
      raise ValueError(f"{name}: `num_heads` ({N}) must divide the input widths ({D}, {D_kv})")
    folded_keys = self.variant != "optimised"
    if folded_keys and D != D_kv:
      raise ValueError(f"{name}: the {self.variant} variant compares queries with raw key slices, "
                       f"so the key/value width ({D_kv}) must equal the query width ({D})")
    dense = functools.partial(nn.DenseGeneral, axis=-1, dtype=self.dtype,
                              param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                              bias_init=self.bias_init, use_bias=self.use_bias,
                              precision=self.precision)
    heads = lambda x: x.reshape(x.shape[:2] + (N, x.shape[-1] // N))      # contiguous slices
    dtype = self.dtype or jnp.result_type(inputs_q, self.param_dtype)

    query = dense(features=(N, D_kv // N if folded_keys else D // N), name="query")(inputs_q)
    key = heads(kv).astype(dtype) if folded_keys else dense(features=(N, D // N), name="key")(kv)
    values = kv
    if self.variant == "super":
      if self.causal or segment_ids is not None:
        raise ValueError(f"{name}: super attention mixes every value position through W_A; "
                         "causal masking and packed documents are not defined for it")
      if S != self.max_length:
        raise ValueError(f"{name}: super attention's W_A is [ℓ, ℓ] with ℓ = max_length "
                         f"({self.max_length}); the key/value length must equal it, got S = {S}")
      w_a = self.param("alignment", self.alignment_init, (S, S), self.param_dtype)
      # Padded slots are zeroed first: W_A would otherwise carry them into visible values.
      values = jnp.einsum("ij,bjd->bid", w_a.astype(jnp.float32), zero_padded(kv, kv_lengths),
                          precision=self.precision)
    value = heads(values).astype(dtype)

    kwargs = layer_parts.mechanism_kwargs(self, segment_ids=segment_ids, kv_lengths=kv_lengths)
    out = mech(query, key.astype(query.dtype), value.astype(query.dtype), causal=self.causal,
               cross=cross, **kwargs)
    return nn.DenseGeneral(features=self.out_features or D, axis=(-2, -1), dtype=self.dtype,
                           param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                           bias_init=self.bias_init, use_bias=self.use_bias,
                           precision=self.precision, name="out")(out)
