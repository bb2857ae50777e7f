"""Linformer: softmax attention over sequence-projected keys and values (arXiv:2006.04768)."""

from __future__ import annotations


import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core.contract import lengths_or_full
from attnjax.core.contract import reject_causal_or_packing
from attnjax.ops.softmax import dot_product_attention
from attnjax.typing import Key, Output, Query, Value
from attnjax.registry import Mechanism, ParamSpec, example_arrays, register

_F32 = jnp.float32
_LINEAR = dict(family="linear", decode=False, packed=False)

__all__ = ["linformer_attention"]

LINFORMER_MAX_LENGTH = 512     # n in the paper: the longest sequence the projections cover
LINFORMER_PROJ_DIM = 128       # k in the paper (their experiments use k = 128 and 256 at n = 512)


# --------------------------------------------------------------------------------------------------
# Linformer


def linformer_attention(q: Query, k: Key, v: Value, *, proj_k, proj_v, causal=False,
                        segment_ids=None, q_offset=0, kv_lengths=None, scale=None,
                        implementation=None) -> Output:
  """Linformer: softmax attention over keys and values projected along the sequence to k rows.

      o = softmax(s · Q (E K)ᵀ) (F V),      E, F: [k, n] learned, sliced to the first S columns

  Cost O(T·k) time and memory for a fixed projection size k. `E K` mixes every key position, so
  the mechanism is non-causal and cannot separate packed sequences; keys past `kv_lengths` are
  padding and are zeroed before the projection (they contribute nothing). `q_offset` is unused (no
  causal mask).

  Paper: Wang et al., "Linformer: Self-Attention with Linear Complexity", arXiv:2006.04768.

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, h]`, K dividing N.
    proj_k: E, `[K, k, n]` (one per key/value head) or `[1, k, n]` (shared across heads, the
      paper's headwise sharing); n >= S is the maximum sequence length.
    proj_v: F, same shape as `proj_k` (the paper's key-value sharing is `proj_v = proj_k`).
    scale: defaults to `H ** -0.5`. implementation: passed to `dot_product_attention`.

  Returns:
    `[B, T, N, h]` in q's dtype.
  """
  op = "linformer_attention"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  reject_causal_or_packing(op, causal=causal, segment_ids=segment_ids,
                           why="E K mixes every key position")
  for name, p in (("proj_k", proj_k), ("proj_v", proj_v)):
    if jnp.ndim(p) != 3 or p.shape[0] not in (1, K) or p.shape[1:] != proj_k.shape[1:]:
      raise ValueError(f"{op}: `{name}` must have shape [K={K} or 1, k, n] (and match proj_k "
                       f"{jnp.shape(proj_k)}), got {jnp.shape(p)}")
  k_proj, max_len = proj_k.shape[1:]
  if S > max_len:
    raise ValueError(f"{op}: the key length S={S} exceeds the projections' maximum length "
                     f"n={max_len}; create proj_k / proj_v with at least {S} columns")
  valid = (jnp.arange(S) < lengths_or_full(op, kv_lengths, B, S)[:, None])[:, :, None, None]
  kf = jnp.where(valid, k.astype(_F32), 0.0)
  vf = jnp.where(valid, v.astype(_F32), 0.0)
  e = jnp.broadcast_to(proj_k[:, :, :S].astype(_F32), (K, k_proj, S))
  f = jnp.broadcast_to(proj_v[:, :, :S].astype(_F32), (K, k_proj, S))
  ek = jnp.einsum("kps,bskh->bpkh", e, kf)
  fv = jnp.einsum("kps,bskh->bpkh", f, vf)
  out = dot_product_attention(q.astype(_F32), ek, fv, scale=scale, implementation=implementation)
  return out.astype(q.dtype)


# Variance-preserving over the S summed positions (fan-in = the sequence axis).
_linformer_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=2,
                                                       out_axis=1, batch_axis=0)


_EXAMPLE_PROJ_DIM, _EXAMPLE_MAX_LENGTH = 8, 32   # example k and n (n covers the example lengths)


def _linformer_example(*, N=4, K=2, H=8, h=6):
  del N, H, h  # the projections act along the sequence only
  shape = (K, _EXAMPLE_PROJ_DIM, _EXAMPLE_MAX_LENGTH)
  return {**example_arrays(1, {"proj_k": (shape, 0.0, 0.2)}),
          **example_arrays(2, {"proj_v": (shape, 0.0, 0.2)})}


register(Mechanism(
    name="linformer_attention", fn=linformer_attention, seeds=(86,), **_LINEAR,
    paper="Linformer: Self-Attention with Linear Complexity", arxiv="2006.04768",
    # The sequence projection needs every key: non-causal only (self, and cross over S <= n keys).
    patterns=frozenset({"self", "cross"}), complexity="O(T·k + S·k)",
    params=(ParamSpec("proj_k", lambda N, K, H: (K, LINFORMER_PROJ_DIM, LINFORMER_MAX_LENGTH),
                      _linformer_init),
            ParamSpec("proj_v", lambda N, K, H: (K, LINFORMER_PROJ_DIM, LINFORMER_MAX_LENGTH),
                      _linformer_init)),
    example=_linformer_example))
