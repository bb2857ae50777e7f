"""TidalDecode: position-persistent sparse attention for decoding.

Across the layers of a decoder, the keys that receive the highest attention for the current token
overlap strongly. TidalDecode therefore selects token positions in only a few layers and reuses them:

  - layers before the first selection layer: full attention;
  - a token-selection layer: full attention for the decode query, and the `top_k` key positions of
    the highest scores `s_j = scale · q·k_j` (each query head its own, among its visible keys);
  - every later layer: softmax attention over the last selected positions only,
        o = Σ_{j ∈ I} softmax_{j ∈ I}(s_j) v_j
  - one re-selection layer mid-stack: full attention and a fresh top-k (the paper's cache
    correction of the drifting selection), reused by the layers after it.

As in the authors' reference (`llama_tidal_attention_forward` in `src/tidal_build/modify_llama.py` of
github.com/DerrickYLJ/TidalDecode: `torch.topk(attn_weights, k=token_budget)` per query head on the
pre-softmax scores in `sparse_layer_start` and `correction_layer`, the stored mask applied to every
other sparse layer), the selection is per query head, over the cache including the current token, on
the scaled logits (the same ranking as the weights). Positions index the KV cache, which every layer
keeps whole; only the attention reads fewer keys.

Functions (catalog row 119; not a q, k, v mechanism, since a layer's attention depends on another
layer's selection):

  tidal_select            `(indices, valid) [B, N, T, top_k]`: the top-k visible keys of each query
                          head (`core.sparse.token_top_k` on the contract-masked scores)
  tidal_sparse_attention  attention of each query head over its selected keys
                          (`core.sparse.gather_tokens`; a slot beyond the visible keys is invalid)
  tidal_layer_roles       each layer's role in a stack: "full", "select" or "sparse"

With `top_k` at least the number of visible keys the sparse layers are exactly full attention.

In the decoder: `model.tidal_decode = {"top_k": k, "selection_layer": 2, "reselection_layer": None}`
(`decode_settings` checks it) gives every single-token decode step of `DecoderLM` these roles; the
stack carries `(indices, valid)` from the last "select" layer to the "sparse" layers after it
(`attnjax.nn.blocks.Transformer`). Prefill (more than one new token) is full attention in every
layer, as in the authors' code (`q_len > 1`).

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `[B,T,N,h]`.
Paper: Yang, Zhang, Chen, Li, Jia, "TidalDecode: Fast and Accurate LLM Decoding with Position
Persistent Sparse Attention", arXiv:2410.05076.
"""

from __future__ import annotations

from typing import Optional

import jax

from attnjax import catalog
from attnjax.core import checks
from attnjax.core import dense
from attnjax.core import sparse
from attnjax.typing import Bool, Int, Key, Lengths, Output, Query, Value

__all__ = ["tidal_select", "tidal_sparse_attention", "tidal_layer_roles", "decode_settings", "ROLES"]

ROLES = ("full", "select", "sparse")
Indices = Int[jax.Array, "B N T k"]
Valid = Bool[jax.Array, "B N T k"]


@catalog.serves(119, kind="function", name="attnjax.ops.sparse.tidal_select")
def tidal_select(q: Query, k: Key, top_k: int, *, causal: bool = True, segment_ids=None,
                 q_offset=0, kv_lengths: Optional[Lengths] = None,
                 scale: Optional[float] = None) -> tuple[Indices, Valid]:
  """A token-selection layer's choice: the `top_k` key positions of the highest scores of each
  query head among the keys the call contract lets it see; `valid` is False for slots a row could
  not fill. Ties go to the lower position."""
  op = "tidal_select"
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
    raise ValueError(f"{op}: `top_k` must be an int >= 1, got {top_k!r}")
  checks.check_qkv(op, q, k, k)
  s, visible = dense.contract_scores(op, q, k, k, causal=causal, segment_ids=segment_ids,
                                     q_offset=q_offset, kv_lengths=kv_lengths, scale=scale)
  return sparse.token_top_k(s, top_k, visible=visible)


@catalog.serves(119, kind="function", name="attnjax.ops.sparse.tidal_sparse_attention")
def tidal_sparse_attention(q: Query, k: Key, v: Value, indices: Indices, valid: Valid, *,
                           scale: Optional[float] = None) -> Output:
  """A sparse layer: softmax attention of each query head over the key positions `indices`
  `[B, N, T, top_k]` (where `valid`) chosen by the last selection layer; the output in q's dtype."""
  op = "tidal_sparse_attention"
  B, T, S, N, _, _, _ = checks.check_qkv(op, q, k, v)
  checks.check_shape(op, "indices", indices, (B, N, T, None), "[B, N, T, top_k]")
  checks.check_shape(op, "valid", valid, indices.shape, "[B, N, T, top_k]")
  return sparse.gather_tokens(q, k, v, indices, valid, scale=scale)


@catalog.serves(119, kind="function", name="attnjax.ops.sparse.tidal_layer_roles")
def tidal_layer_roles(num_layers: int, *, selection_layer: int = 2,
                      reselection_layer: Optional[int] = None) -> tuple[str, ...]:
  """Each layer's role in a TidalDecode stack: "full" before `selection_layer`, "select" there and
  at `reselection_layer` (None: no re-selection), "sparse" elsewhere after the first selection. The
  paper's LLaMA-3-8B setting is full layers 0-1, selection at layer 2 and re-selection at layer 13."""
  op = "tidal_layer_roles"
  if not isinstance(num_layers, int) or num_layers < 1:
    raise ValueError(f"{op}: `num_layers` must be an int >= 1, got {num_layers!r}")
  if not isinstance(selection_layer, int) or not 0 <= selection_layer < num_layers:
    raise ValueError(f"{op}: `selection_layer` must be in [0, {num_layers}), got {selection_layer!r}")
  if reselection_layer is not None and not (isinstance(reselection_layer, int)
                                            and selection_layer < reselection_layer < num_layers):
    raise ValueError(f"{op}: `reselection_layer` must be in ({selection_layer}, {num_layers}), "
                     f"got {reselection_layer!r}")
  return tuple("full" if i < selection_layer
               else "select" if i in (selection_layer, reselection_layer) else "sparse"
               for i in range(num_layers))


def decode_settings(settings, num_layers: int) -> dict:
  """The checked `tidal_decode` settings of a `num_layers` stack: {"top_k": int >= 1,
  "selection_layer": int (2), "reselection_layer": int or None}, defaults filled in."""
  op = "tidal_decode"
  if not hasattr(settings, "keys"):
    raise ValueError(f"{op}: expected a dict with 'top_k' (and optionally 'selection_layer', "
                     f"'reselection_layer'), got {settings!r}")
  unknown = sorted(set(settings) - {"top_k", "selection_layer", "reselection_layer"})
  if unknown:
    raise ValueError(f"{op}: unknown keys {unknown}; expected 'top_k', 'selection_layer', "
                     "'reselection_layer'")
  top_k = settings.get("top_k")
  if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
    raise ValueError(f"{op}: 'top_k' must be an int >= 1, got {top_k!r}")
  out = {"top_k": top_k, "selection_layer": settings.get("selection_layer", 2),
         "reselection_layer": settings.get("reselection_layer")}
  try:
    tidal_layer_roles(num_layers, selection_layer=out["selection_layer"],
                      reselection_layer=out["reselection_layer"])
  except ValueError as e:
    raise ValueError(f"{op}: {e}") from None
  return out
