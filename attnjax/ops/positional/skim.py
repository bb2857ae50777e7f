"""Skim-Attention: attention probabilities from the document layout alone, applied to text values.

    L   = LayerNorm(E_x[x0] + E_y[y0] + E_x[x1] + E_y[y1] + E_h[y1 - y0] + E_w[x1 - x0])   [B, T, D_L]
    A   = softmax(L W_Q (L W_K)ᵀ / √d)                  [B, N, T, T], computed once per document
    X^(l+1) = Layer_l(X^l, A):  o_i = Σ_j A_ij V^l_j,  V^l = X^l W_V^l     (every text layer reuses A)

A token's layout is its bounding box `(x0, y0, x1, y1)` on the page (integers in `[0, M)`; LayoutLM
normalizes pages to 0..1000 and the authors' tables have M = 1024 rows). The x and y tables are
shared by the two corners; height and width have their own. Because A reads no text, the text
encoder is a Transformer whose attention maps are given rather than computed: the weights are
identical in every layer and for any text on the same layout, and (with no 1-D positions) they do
not depend on the reading order the tokenizer produced, only on where the words sit on the page.

SkimmingMask (the paper's Section 3.3) keeps, for each query, the `top_k` keys of A and uses them as
the attention mask of another model (BERT, LayoutLM): `skimming_mask` builds that boolean mask, and
`masks.from_array(mask)` makes it a `mask_mod` for `flex_attention` or any registered mechanism's
`flex_attention` call. As in the authors' code, the top-k is taken over the keys the padding leaves
visible.

Functions (the Flax layers of `attnjax.nn.skim` create the weights and call them):
  layout_embedding        bbox `[B, T, 4]` and tables `[M, D_L]` → the sum above (before LayerNorm)
  skim_attention_weights  layout queries `[B, T, N, H]`, keys `[B, S, K, H]` → A `[B, N, T, S]`
  apply_skim_weights      A and text values `[B, S, K, h]` → `[B, T, N, h]`
  skimming_mask           A → bool `[B, N, T, S]`, the top-k keys of each row

Paper: Nguyen, Scialom, Staiano and Piwowarski, "Skim-Attention: Learning to Focus via Document
Layout", Findings of EMNLP 2021, arXiv:2109.01078 (code: github.com/recitalAI/skim-attention, whose
`SkimAttention`, `Skimformer2DPositionEmbeddings` and `SkimmingMaskModel` fix the details above).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import catalog
from attnjax.core import checks
from attnjax.core import dense
from attnjax.typing import Array, Bool, Float, Int, Key, Lengths, Output, Query, Value

__all__ = ["layout_embedding", "skim_attention_weights", "apply_skim_weights", "skimming_mask",
           "MAX_COORDINATE"]

# Rows of the authors' 2-D position tables (`max_2d_position_embeddings`): coordinates 0..1023.
MAX_COORDINATE = 1024

Boxes = Int[Array, "B T 4"]
Table = Float[Array, "M D"]
Layout = Float[Array, "B T D"]
Weights = Float[Array, "B N T S"]
Visible = Bool[Array, "B N T S"]


def layout_embedding(bbox: Boxes, x_table: Table, y_table: Table, h_table: Table,
                     w_table: Table) -> Layout:
  """`E_x[x0] + E_y[y0] + E_x[x1] + E_y[y1] + E_h[y1 - y0] + E_w[x1 - x0]` (float32 `[B, T, D]`).

  `bbox [B, T, 4]` holds integer boxes `(x0, y0, x1, y1)` with `x0 <= x1`, `y0 <= y1`, all in
  `[0, M)` for tables of M rows. Concrete boxes out of range are an error (as in the authors'
  code); under `jit` they cannot be checked and are clipped to the table.
  """
  op = "layout_embedding"
  if jnp.ndim(bbox) != 3 or jnp.shape(bbox)[-1] != 4:
    raise ValueError(f"{op}: `bbox` must have shape [B, T, 4] (x0, y0, x1, y1), got {jnp.shape(bbox)}")
  if not jnp.issubdtype(jnp.asarray(bbox).dtype, jnp.integer):
    raise ValueError(f"{op}: `bbox` must hold integer coordinates, got {jnp.asarray(bbox).dtype}")
  shapes = {jnp.shape(t) for t in (x_table, y_table, h_table, w_table)}
  if len(shapes) != 1 or len(next(iter(shapes))) != 2:
    raise ValueError(f"{op}: the four tables must share one shape [M, D], got "
                     f"{[jnp.shape(t) for t in (x_table, y_table, h_table, w_table)]}")
  M = x_table.shape[0]
  x0, y0, x1, y1 = (bbox[..., i] for i in range(4))
  sizes = (y1 - y0, x1 - x0)
  if not isinstance(bbox, jax.core.Tracer):
    # On the host: jnp reductions inside an enclosing jit would be traced even for concrete boxes.
    boxes = np.asarray(bbox)
    low = min(boxes.min(), (boxes[..., 3] - boxes[..., 1]).min(), (boxes[..., 2] - boxes[..., 0]).min())
    if low < 0 or boxes.max() >= M:
      raise ValueError(f"{op}: `bbox` coordinates must lie in [0, {M}) with x0 <= x1 and y0 <= y1 "
                       f"(tables of {M} rows)")

  def rows(table, index):
    return jnp.take(table.astype(jnp.float32), index, axis=0, mode="clip")

  return (rows(x_table, x0) + rows(y_table, y0) + rows(x_table, x1) + rows(y_table, y1)
          + rows(h_table, sizes[0]) + rows(w_table, sizes[1]))


@catalog.serves(67, kind="attention weights", name="attnjax.ops.positional.skim_attention_weights")
def skim_attention_weights(layout_q: Query, layout_k: Key, *, causal: bool = False,
                           segment_ids=None, q_offset=0, kv_lengths: Optional[Lengths] = None,
                           scale: Optional[float] = None) -> Weights:
  """Skim-Attention's probabilities `softmax(Q_L K_Lᵀ · scale)` (float32 `[B, N, T, S]`).

  `layout_q [B, T, N, H]` and `layout_k [B, S, K, H]` are projections of the layout embeddings only
  (query head n reads key head n // (N/K)); `scale` defaults to `H ** -0.5`. Masking follows the call
  contract (`causal`, `segment_ids`, `q_offset`, `kv_lengths`); hidden keys get weight 0 and a row
  with no visible key is all zeros.
  """
  op = "skim_attention_weights"
  s, visible = dense.contract_scores(op, layout_q, layout_k, layout_k, causal=causal,
                                     segment_ids=segment_ids, q_offset=q_offset,
                                     kv_lengths=kv_lengths, scale=scale)
  lse = dense.masked_logsumexp(s, visible)
  return jnp.where(visible, jnp.exp(jnp.where(visible, s - lse, 0.0)), 0.0)


def apply_skim_weights(weights: Weights, v: Value) -> Output:
  """`o[b, i, n] = Σ_j A[b, n, i, j] v[b, j, n // G]`: Skim-Attention's weights applied to text
  values `v [B, S, K, h]` (K divides N) → `[B, T, N, h]` in `v`'s dtype."""
  op = "apply_skim_weights"
  if jnp.ndim(weights) != 4:
    raise ValueError(f"{op}: `weights` must have shape [B, N, T, S], got {jnp.shape(weights)}")
  B, N, _, S = weights.shape
  if jnp.ndim(v) != 4 or v.shape[:2] != (B, S) or N % v.shape[2]:
    raise ValueError(f"{op}: `v` must have shape [B, S, K, h] = [{B}, {S}, K, h] with K dividing "
                     f"N = {N}, got {jnp.shape(v)}")
  return dense.weighted_values(weights, v).astype(v.dtype)


@catalog.serves(67, kind="attention mask", name="attnjax.ops.positional.skimming_mask")
def skimming_mask(weights: Weights, top_k: int, *, visible: Optional[Visible] = None) -> Visible:
  """SkimmingMask: True at the `top_k` largest weights of each row of `weights [B, N, T, S]`.

  `visible` (bool, broadcastable to the weights; default: every key) restricts the choice to keys
  the other model may see and is and-ed into the result, so a row with fewer visible keys keeps
  them all and no more. Ties go to the lower key index. Not differentiable (a mask).
  """
  op = "skimming_mask"
  if jnp.ndim(weights) != 4:
    raise ValueError(f"{op}: `weights` must have shape [B, N, T, S], got {jnp.shape(weights)}")
  S = weights.shape[-1]
  if not isinstance(top_k, int) or not 1 <= top_k:
    raise ValueError(f"{op}: `top_k` must be a positive int, got {top_k!r}")
  top_k = min(top_k, S)
  if visible is None:
    visible = jnp.ones(weights.shape, bool)
  checks.check_broadcastable(op, "visible", visible, weights.shape, "[B, N, T, S]")
  visible = jnp.broadcast_to(visible, weights.shape)
  # Hidden keys rank below every visible one (weights are >= 0), so they are picked only when a row
  # has fewer than top_k visible keys, and the final and-ing drops them.
  ranked = jnp.where(visible, jax.lax.stop_gradient(weights).astype(jnp.float32), -1.0)
  _, index = jax.lax.top_k(ranked, top_k)
  chosen = jnp.any(index[..., :, None] == jnp.arange(S), axis=-2)
  return chosen & visible
