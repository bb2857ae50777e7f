"""Re-ttention: very sparse attention reshaped by softmax statistics cached from an earlier step.

In a diffusion transformer the attention inputs change little between denoising steps. At a step t
where full attention is computed, Re-ttention caches for each query row i (each head) the share of
the softmax normalizer that the sparse mask M keeps, and the part of the output the sparse
attention misses:

    ρ_i = Σ_{j ∈ M_i} e^{s_ij} / Σ_j e^{s_ij}                      (normalizer ratio, in [0, 1])
    r_i = o^full_i - ρ_i · o^sparse_i                              (cached residual)

and at the following sparse steps t' it rescales the sparse softmax by the cached ratio and adds the
cached residual:

    o_i(t') = ρ_i(t) · Σ_{j ∈ M_i} softmax_M(s(t'))_ij v_j(t') + r_i(t)

The identity behind it: ρ_i · softmax_M(s)_ij = softmax(s)_ij for every kept j, i.e. the rescaled
sparse weights are exactly the full-attention weights on the mask, and r_i = Σ_{j ∉ M_i}
softmax(s)_ij v_j is the full attention over the dropped keys. With statistics of the same step the
output is therefore exactly full attention (on every row with a visible key); at a later step the
error is the drift of ρ and r between the two steps only.

As in the authors' processors (`module/pixart_processor.py`, `Cog_processor.py` of
github.com/cccrrrccc/Re-ttention: `get_attention_scores_and_ratio` caches `masked_denominator /
denominator`; `get_attention_scores_with_denominator_ratio` divides the sparse denominator by it;
`cached_residual = full - window_with_ratio`) the statistics come from a full step and the residual
is taken against the ratio-rescaled sparse output. The authors' code also adds 0.04 to the cached
ratio after each sparse step; that schedule is the caller's to apply (pass `ratio + 0.04 · steps`).
The residual here is in the attention output (before the output projection, which is linear: the
same as the authors' post-projection residual up to the projection).

The sparse pattern is any flex `mask_mod` (the paper uses local windows over the video / image
tokens); the call contract's masks (causal, packed documents, lengths) apply to both passes. A row
whose sparse mask keeps no key has ρ = 0 and its output is the cached residual; a row with no visible
key at all gives zeros. Not a q, k, v-only mechanism (it needs the previous step's statistics), so
these are functions (catalog row 160).

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]`; `ratio [B,T,N]`, `residual [B,T,N,h]` float32.
Paper: Chen, Mills, Jiang, Gao, Niu, "Re-ttention: Ultra Sparse Visual Generation via Attention
Statistical Reshape", arXiv:2505.22918.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax import catalog
from attnjax.core import checks
from attnjax.core import contract
from attnjax.typing import Float, Key, Lengths, MaskMod, Output, Query, Value

__all__ = ["rettention_statistics", "rettention_attention"]

Ratio = Float[jax.Array, "B T N"]
Residual = Float[jax.Array, "B T N h"]


def _pass(op, q, k, v, *, mask_mod, causal, segment_ids, q_offset, kv_lengths, scale,
          implementation):
  """Softmax attention under the contract (and `mask_mod`): `(out float32, lse [B,T,N] float32)`."""
  out, lse = contract.flex_with_contract(op, q, k, v, causal=causal, segment_ids=segment_ids,
                                         q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                                         implementation=implementation, mask_mod=mask_mod,
                                         return_residuals=True)
  return out.astype(jnp.float32), lse


@catalog.serves(160, kind="function", name="attnjax.ops.sparse.rettention_statistics")
def rettention_statistics(q: Query, k: Key, v: Value, *, mask_mod: MaskMod, causal: bool = False,
                          segment_ids=None, q_offset=0, kv_lengths: Optional[Lengths] = None,
                          scale: Optional[float] = None, implementation: Optional[str] = None
                          ) -> tuple[Ratio, Residual]:
  """`(ratio, residual)` at a full-attention step (see the module docstring): the share of each
  row's softmax normalizer kept by `mask_mod`, `exp(lse_sparse - lse_full)`, and
  `o_full - ratio · o_sparse`, both float32."""
  op = "rettention_statistics"
  checks.check_qkv(op, q, k, v)
  common = dict(causal=causal, segment_ids=segment_ids, q_offset=q_offset, kv_lengths=kv_lengths,
                scale=scale, implementation=implementation)
  o_full, lse_full = _pass(op, q, k, v, mask_mod=None, **common)
  o_sparse, lse_sparse = _pass(op, q, k, v, mask_mod=mask_mod, **common)
  # An empty row has lse = -inf: its ratio is 0, with no -inf reaching a subtraction (whose
  # gradient would be NaN).
  ok = jnp.isfinite(lse_sparse) & jnp.isfinite(lse_full)
  log_ratio = jnp.where(ok, lse_sparse, 0.0) - jnp.where(ok, lse_full, 0.0)
  ratio = jnp.where(ok, jnp.exp(log_ratio), 0.0)
  residual = o_full - ratio[..., None] * o_sparse
  return ratio, residual


@catalog.serves(160, kind="function", name="attnjax.ops.sparse.rettention_attention")
def rettention_attention(q: Query, k: Key, v: Value, *, ratio: Ratio, residual: Residual,
                         mask_mod: MaskMod, causal: bool = False, segment_ids=None, q_offset=0,
                         kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                         implementation: Optional[str] = None) -> Output:
  """Re-ttention at a sparse step: `ratio · o_sparse + residual` with the statistics `ratio [B,T,N]`
  and `residual [B,T,N,h]` cached at an earlier full step (`rettention_statistics`); the output in
  q's dtype."""
  op = "rettention_attention"
  B, T, _, N, _, _, h = checks.check_qkv(op, q, k, v)
  checks.check_shape(op, "ratio", ratio, (B, T, N), "[B, T, N]")
  checks.check_shape(op, "residual", residual, (B, T, N, h), "[B, T, N, h]")
  o_sparse, _ = _pass(op, q, k, v, mask_mod=mask_mod, causal=causal, segment_ids=segment_ids,
                      q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                      implementation=implementation)
  out = jnp.asarray(ratio, jnp.float32)[..., None] * o_sparse + jnp.asarray(residual, jnp.float32)
  return out.astype(q.dtype)
