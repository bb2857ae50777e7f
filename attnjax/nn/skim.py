"""Skimformer: a text encoder whose attention maps come from the document layout alone (Skim-Attention).

    L = LayerNorm(layout_embedding(bbox))            [B, T, D_L]   (optionally contextualized)
    A = softmax(L W_Q (L W_K)ᵀ / √d)                 [B, N, T, T]  computed once
    layer l:  h = LayerNorm(X + (A · X W_V) W_O),    X' = LayerNorm(h + MLP(h))     (post-norm, BERT)

Formulas and the authors' conventions are in `attnjax.ops.positional.skim`. The layers:

  LayoutEmbedding    bbox `[B, T, 4]` → L: the x / y / height / width tables, summed, LayerNorm
  SkimAttention      L → A `[B, N, T, T]` (query and key projections of the layout only)
  SkimformerLayer    (X, A) → X': a BERT layer whose attention weights are given
  SkimformerEncoder  (text embeddings, bbox) → (hidden states, A): the whole two-stage model; the
                     caller embeds the tokens (word + token-type embeddings, no 1-D positions, as the
                     authors' `SkimformerTextEmbeddings`) and puts a head on the hidden states

`layout_layers > 0` contextualizes L with a small bidirectional Transformer before A (the authors'
`contextualize_2d_positions`, a BERT encoder; here this library's pre-norm `Transformer` with
softmax attention). Padding: `kv_lengths [B]` hides keys at or past each row's length, as the
authors' attention mask does.

Paper: Nguyen et al., "Skim-Attention: Learning to Focus via Document Layout", arXiv:2109.01078.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import catalog
from attnjax.nn.blocks import MLP, Transformer, TransformerConfig
from attnjax.ops.positional import skim

__all__ = ["LayoutEmbedding", "SkimAttention", "SkimformerLayer", "SkimformerEncoder"]


class LayoutEmbedding(nn.Module):
  """`bbox [B, T, 4]` (integer boxes x0, y0, x1, y1 in `[0, num_coordinates)`) → `[B, T, features]`.

  Attributes:
    features: D_L, the layout width.
    num_coordinates: rows of each table (the authors' 1024, for LayoutLM's 0..1000 coordinates).
  """
  features: int
  num_coordinates: int = skim.MAX_COORDINATE
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, bbox: jax.Array) -> jax.Array:
    init = nn.initializers.normal(0.02)  # BERT's embedding init, as the authors'
    tables = [self.param(name, init, (self.num_coordinates, self.features), self.param_dtype)
              for name in ("x_table", "y_table", "h_table", "w_table")]
    return nn.LayerNorm(name="norm")(skim.layout_embedding(bbox, *tables))


class SkimAttention(nn.Module):
  """Layout `[B, T, D_L]` → Skim-Attention weights `[B, N, T, T]` (rows sum to 1 over visible keys).

  Attributes:
    num_heads: N.
    head_dim: the width of the layout queries and keys per head (the authors'
      `skim_attention_head_size`).
  """
  num_heads: int
  head_dim: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, layout: jax.Array, *, kv_lengths: Optional[jax.Array] = None) -> jax.Array:
    if jnp.ndim(layout) != 3:
      raise ValueError(f"SkimAttention: `layout` must have shape [B, T, D_L], got {jnp.shape(layout)}")

    def project(name):
      return nn.DenseGeneral((self.num_heads, self.head_dim), param_dtype=self.param_dtype,
                             name=name)(layout)

    return skim.skim_attention_weights(project("query"), project("key"), kv_lengths=kv_lengths)


class SkimformerLayer(nn.Module):
  """One text layer on given attention weights: `(x [B, T, D], weights [B, N, T, T]) → [B, T, D]`.

  Attributes:
    head_dim: value width per head (None: D // N, N read from the weights).
    mlp_dim: the feed-forward width (None: 4 D).
  """
  head_dim: Optional[int] = None
  mlp_dim: Optional[int] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, weights: jax.Array) -> jax.Array:
    if jnp.ndim(x) != 3 or jnp.ndim(weights) != 4 or weights.shape[0] != x.shape[0] \
        or weights.shape[2:] != (x.shape[1], x.shape[1]):
      raise ValueError("SkimformerLayer: `x` must have shape [B, T, D] and `weights` [B, N, T, T] "
                       f"with the same B and T, got {jnp.shape(x)} and {jnp.shape(weights)}")
    D, N = x.shape[-1], weights.shape[1]
    head_dim = self.head_dim or D // N
    v = nn.DenseGeneral((N, head_dim), dtype=self.dtype, param_dtype=self.param_dtype,
                        name="value")(x)
    heads = skim.apply_skim_weights(weights, v)
    out = nn.DenseGeneral(D, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                          name="out")(heads)
    h = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="attention_norm")(x + out)
    mlp = MLP(self.mlp_dim or 4 * D, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")
    return nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="mlp_norm")(h + mlp(h))


@catalog.serves(67, kind="layer")
class SkimformerEncoder(nn.Module):
  """Skimformer: Skim-Attention computed once from the layout, reused by every text layer.

  `__call__(x [B, T, D], bbox [B, T, 4], kv_lengths=None) → (hidden [B, T, D], weights [B, N, T, T])`.

  Attributes:
    num_layers: text layers.
    num_heads: N (must divide D when `head_dim` is None).
    head_dim: value width per head (None: D // N); `skim_head_dim` the layout query / key width per
      head (None: the same).
    mlp_dim: feed-forward width (None: 4 D).
    layout_features: D_L (None: D).
    layout_layers: Transformer layers that contextualize the layout embeddings (0: none).
    num_coordinates: rows of the layout tables.
  """
  num_layers: int = 2
  num_heads: int = 4
  head_dim: Optional[int] = None
  skim_head_dim: Optional[int] = None
  mlp_dim: Optional[int] = None
  layout_features: Optional[int] = None
  layout_layers: int = 0
  num_coordinates: int = skim.MAX_COORDINATE
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, bbox: jax.Array, *,
               kv_lengths: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    if jnp.ndim(x) != 3:
      raise ValueError(f"SkimformerEncoder: `x` must have shape [B, T, D], got {jnp.shape(x)}")
    B, T, D = x.shape
    if jnp.shape(bbox) != (B, T, 4):
      raise ValueError(f"SkimformerEncoder: `bbox` must have shape [B, T, 4] = [{B}, {T}, 4], got "
                       f"{jnp.shape(bbox)}")
    if self.head_dim is None and D % self.num_heads:
      raise ValueError(f"SkimformerEncoder: num_heads = {self.num_heads} must divide D = {D} "
                       "(or set head_dim)")
    head_dim = self.head_dim or D // self.num_heads
    layout_width = self.layout_features or D
    layout = LayoutEmbedding(layout_width, self.num_coordinates, param_dtype=self.param_dtype,
                             name="layout_embedding")(bbox)
    if self.layout_layers:
      config = TransformerConfig(width=layout_width, num_heads=self.num_heads,
                                 mechanisms=("softmax",) * self.layout_layers,
                                 mechanism_kwargs=({},) * self.layout_layers,
                                 mlp_dim=4 * layout_width, norm="layernorm", causal=False,
                                 param_dtype=self.param_dtype)
      # Padding as segments (real tokens 1, pads 0): real tokens never see pads, and pad rows see
      # one another, so nothing is empty.
      segments = None if kv_lengths is None else \
          (jnp.arange(T)[None, :] < jnp.asarray(kv_lengths)[:, None]).astype(jnp.int32)
      layout = Transformer(config, name="layout_encoder")(layout, segment_ids=segments)
    weights = SkimAttention(self.num_heads, self.skim_head_dim or head_dim,
                            param_dtype=self.param_dtype, name="skim_attention")(
                                layout, kv_lengths=kv_lengths)
    for i in range(self.num_layers):
      x = SkimformerLayer(head_dim, self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                          name=f"layer_{i}")(x, weights.astype(self.dtype))
    return x, weights
