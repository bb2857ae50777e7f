"""LSG attention: Local blocks + Sparse tokens + Global tokens, under one softmax.

The first G positions are global tokens (LSG prepends G learned embeddings to the sequence): they
attend to every key and every query attends to them. The other L' = T - G positions are cut into
blocks of `bs` tokens (block(p) = ⌊(p - G) / bs⌋); a query of block b sees

    local   every key of blocks b-1, b, b+1                                  (3·bs keys)
    sparse  2·sbs tokens of a compressed copy of the sequence (bs/sf tokens per block), those of the
            sbs·sf positions just left of the local window and just right of it:
            compressed indices [(b-1)·w - sbs, (b-1)·w) ∪ [(b+2)·w, (b+2)·w + sbs),  w = bs/sf
    global  the G global keys

with one softmax over the union (scores `scale · q·k`). The compressed sequence (`sparsity_type`):
  norm          (the default) in each chunk of min(bs, sbs) keys, the chunk/sf keys (and their
                values) of largest ‖k‖ (a selection without gradient, as in the code's no_grad)
  pooling       the mean of each run of sf keys and of their values
  stride        every sf-th token, starting at (head mod sf): heads see different tokens
  block_stride  in each block, bs/sf consecutive tokens starting at head·bs/sf (mod bs)
(the code's fifth type, lsh, hashes with fresh random projections at every call: no deterministic
form). `sparse_block_size=0` drops the sparse part (local + global only).

Implementation: two `flex_attention` passes over disjoint key sets merged exactly by
`merge_attention_states`: (1) the original keys under the contract's masks and the local/global
mask_mod; (2) the compressed keys `[B, L'/sf, K, ·]` with the sparse-range mask_mod (each pass
tiles its blocks on the `xla` path). Cost O(T·(3·bs + 2·sbs + G)), linear in T.

Interpretations: the global tokens are the sequence's first G positions (a model prepends its G
learned global embeddings before the projections, as LSG's encoder does); a body whose length bs
does not divide is padded with masked slots (LSG pads the input to a multiple of bs); padded key
slots (`kv_lengths`) are left out of the compressed tokens (pooled over the real ones; never chosen
by norm while a real key is left; a compressed token with no real key is masked), as LSG's masks do;
the sparse ranges are the code's `reshape_to_sparse_block` arithmetic for even bs/sf (every released
configuration), used for all bs/sf. With GQA, the per-head selections (norm, stride) are per
key/value head. Encoder attention: non-causal self-attention over one whole sequence (the
compressed tokens mix each block's positions), no packing, no cache.

Shapes: `q [B,T,N,H]`, `k [B,T,K,H]`, `v [B,T,K,h]` → `[B,T,N,h]`.
Paper: Condevaux and Harispe, "LSG Attention: Extrapolation of pretrained Transformers to long
sequences", arXiv:2210.15497 (authors' code: ccdv-ai/convert_checkpoint_to_lsg).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import checks
from attnjax.core import flex
from attnjax.core.contract import flex_with_contract, reject_causal_or_packing, valid_slots
from attnjax.core.merge import merge_attention_states
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, Value

__all__ = ["SPARSITY_TYPES", "lsg_attention"]

_OP = "lsg_attention"
SPARSITY_TYPES = ("norm", "pooling", "stride", "block_stride")


def _check_int(name, value, low):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{_OP}: `{name}` must be an int >= {low}, got {value!r}")
  return int(value)


def _compressed(k, v, real, *, sparsity_type, bs, sbs, sf):
  """The compressed keys, values `[B, M, K, ·]` and their mask `[B, M, K]` (M = Lp / sf) of the body
  `k [B, Lp, K, H]`, `v [B, Lp, K, h]` with real slots `real [B, Lp]`."""
  B, Lp, K, _ = k.shape
  M = Lp // sf
  real_heads = jnp.broadcast_to(real[:, :, None], (B, Lp, K))
  if sparsity_type == "pooling":
    runs = lambda x: x.reshape((B, M, sf) + x.shape[2:])
    count = jnp.sum(runs(real_heads), axis=2)                                   # [B, M, K]
    mean = lambda x: (jnp.sum(jnp.where(runs(real_heads)[..., None], runs(x).astype(jnp.float32), 0.0),
                              axis=2) / jnp.maximum(count, 1)[..., None]).astype(x.dtype)
    return mean(k), mean(v), count > 0
  if sparsity_type == "norm":
    chunk = min(bs, sbs)
    norms = jax.lax.stop_gradient(jnp.linalg.norm(k.astype(jnp.float32), axis=-1))  # [B, Lp, K]
    norms = jnp.where(real_heads, norms, -1.0)           # padded slots: below every real norm
    by_chunk = norms.reshape(B, Lp // chunk, chunk, K).transpose(0, 1, 3, 2)    # [B, C, K, chunk]
    _, top = jax.lax.top_k(by_chunk, chunk // sf)                               # [B, C, K, chunk/sf]
    start = (jnp.arange(Lp // chunk) * chunk)[None, :, None, None]
    idx = (top + start).transpose(0, 1, 3, 2).reshape(B, M, K)
  elif sparsity_type == "stride":
    idx = jnp.arange(M)[:, None] * sf + (jnp.arange(K) % sf)[None, :]          # [M, K]
    idx = jnp.broadcast_to(idx, (B, M, K))
  else:  # block_stride
    w = bs // sf
    within = (jnp.arange(w)[:, None] + jnp.arange(K)[None, :] * w) % bs         # [w, K]
    idx = (jnp.arange(Lp // bs)[:, None, None] * bs + within[None]).reshape(M, K)
    idx = jnp.broadcast_to(idx, (B, M, K))
  take = lambda x: jnp.take_along_axis(x, idx[..., None], axis=1)
  return take(k), take(v), jnp.take_along_axis(real_heads, idx, axis=1)


def lsg_attention(q: Query, k: Key, v: Value, *, causal: bool = False, segment_ids=None,
                  q_offset=0, kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                  implementation: Optional[str] = None, block_size: int = 128,
                  sparse_block_size: int = 128, sparsity_factor: int = 2,
                  sparsity_type: str = "norm", num_global_tokens: int = 1) -> Output:
  """LSG attention: local blocks, sparse compressed tokens and global tokens (module docstring).

  Args:
    q, k, v: `[B,T,N,H]`, `[B,T,K,H]`, `[B,T,K,h]` (self-attention over one sequence).
    block_size: bs, the local block (a query sees its block and the two neighbours).
    sparse_block_size: sbs, compressed tokens on each side of the local window (0: none).
    sparsity_factor: sf, positions per compressed token (divides bs and min(bs, sbs) for "norm").
    sparsity_type: one of `SPARSITY_TYPES` ("norm", the code's default).
    num_global_tokens: G, the leading positions that are global tokens.
    Other keywords: the common contract (non-causal, unpacked, `q_offset` 0).
  """
  B, T, S, N, K, _, _ = checks.check_qkv(_OP, q, k, v)
  reject_causal_or_packing(_OP, causal=causal, segment_ids=segment_ids,
                           why="encoder attention whose compressed tokens mix a block's positions")
  if T != S or not checks.is_static_zero(q_offset):
    raise ValueError(f"{_OP}: self-attention over one whole sequence only (T == S, q_offset 0); "
                     f"got T={T}, S={S}")
  bs = _check_int("block_size", block_size, 1)
  sbs = _check_int("sparse_block_size", sparse_block_size, 0)
  sf = _check_int("sparsity_factor", sparsity_factor, 1)
  G = _check_int("num_global_tokens", num_global_tokens, 0)
  if sparsity_type not in SPARSITY_TYPES:
    raise ValueError(f"{_OP}: `sparsity_type` must be one of {SPARSITY_TYPES}, got {sparsity_type!r}")
  if bs % sf or (sparsity_type == "norm" and sbs and min(bs, sbs) % sf):
    raise ValueError(f"{_OP}: `sparsity_factor` {sf} must divide `block_size` {bs} (and "
                     f"min(block_size, sparse_block_size) for sparsity_type 'norm')")
  if G >= T:
    raise ValueError(f"{_OP}: `num_global_tokens` {G} must be below the sequence length {T}")

  block = lambda p: (p - G) // bs                 # block of a body position (p >= G)

  def local_or_global(b, n, q_idx, kv_idx):
    del b, n
    near = jnp.abs(block(q_idx) - block(kv_idx)) <= 1
    return (q_idx < G) | (kv_idx < G) | near

  out_main, lse_main = flex_with_contract(
      _OP, q, k, v, causal=False, segment_ids=None, q_offset=0, kv_lengths=kv_lengths, scale=scale,
      implementation=implementation, mask_mod=local_or_global, return_residuals=True)
  if sbs == 0:
    return out_main

  nb = -(-(T - G) // bs)
  pad = nb * bs - (T - G)
  body = lambda x: jnp.pad(x[:, G:], ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
  real = body(valid_slots(B, T, kv_lengths))
  k_c, v_c, real_c = _compressed(body(k), body(v), real, sparsity_type=sparsity_type, bs=bs,
                                 sbs=sbs, sf=sf)
  w, group = bs // sf, N // K

  def sparse_range(b, n, q_idx, m):
    qb = block(q_idx)
    left = (m >= (qb - 1) * w - sbs) & (m < (qb - 1) * w)
    right = (m >= (qb + 2) * w) & (m < (qb + 2) * w + sbs)
    return (q_idx >= G) & (left | right) & real_c[b, m, n // group]

  out_sparse, lse_sparse = flex.flex_attention(q, k_c, v_c, mask_mod=sparse_range, scale=scale,
                                               implementation=implementation,
                                               return_residuals=True)
  out, _ = merge_attention_states([out_main, out_sparse], [lse_main, lse_sparse])
  return out.astype(q.dtype)


register(Mechanism(
    name="lsg_attention", fn=lsg_attention, family="local-window", seeds=(45,),
    paper="LSG Attention: Extrapolation of pretrained Transformers to long sequences",
    arxiv="2210.15497",
    # Encoder attention over one whole sequence (see the module docstring).
    patterns=frozenset({"self"}), decode=False, packed=False, complexity="O(T·(bs + sbs + G))",
    defaults=dict(block_size=128, sparse_block_size=128, sparsity_factor=2, sparsity_type="norm",
                  num_global_tokens=1),
    example=dict(block_size=4, sparse_block_size=2, sparsity_factor=2, num_global_tokens=1)))
