"""Slim attention: cache only the keys; the values are a linear map of them.

In multi-head attention the keys and values of a token come from one input row x:
`K = x W_K`, `V = x W_V` (`W_K: [D, K·H]`, `W_V: [D, K·h]`, the heads concatenated). When W_K is
square (D = K·H, which holds for MHA, where every head has its own key head) and invertible,

    x = K W_K⁻¹     so     V = K (W_K⁻¹ W_V) = K · W_KV,        W_KV = W_K⁻¹ W_V  [K·H, K·h]

and attention needs only the key cache: half the KV cache of MHA, with no approximation. The map
mixes all key heads into each value head (W_KV is dense). The operator takes W_KV as a learned array
`kv_map` (a layer trained with it, or one converted from a trained MHA with `slim_kv_map`) and reads
only q and k: v is taken for its shape and never read.

Two orders of one product (the paper's prefill and generation forms; equal in exact arithmetic):

    unfolded:  V = K · W_KV,  then  o_n = softmax(scale · q_n Kᵀ) V_{g(n)}            (T ~ S)
    folded:    u_n = softmax(scale · q_n Kᵀ) K_all,  then  o_n = u_n · W_KV[:, g(n)]  (T << S)

(g(n) = n // (N/K) the key/value head of query head n, `K_all [S, K·H]` the concatenated key
heads): for one decode token the folded order multiplies a `[1, K·H]` row by W_KV instead of the
whole `[S, K·H]` cache.

`slim_kv_map(w_k, w_v)` builds W_KV from a trained layer's key and value kernels (`[D, K, H]`,
`[D, K, h]`, as `attnjax.nn.MultiHeadAttention` names them 'key' and 'value'), solving
`W_K W_KV = W_V` in float64; it raises when W_K is not square or is singular. Projection biases
are not part of the map: with biases `V = K W_KV + (b_V - b_K W_KV)`, a constant row that softmax
attention passes to the output unchanged, so it belongs in the output projection's bias.

RoPE: V = K · W_KV holds for the keys as projected. `attnjax.nn.MultiHeadAttention` with `rope_base`
rotates k before the mechanism sees it, so there the values would come from rotated keys and the
layer is no longer the MHA it was converted from; use slim attention in layers without RoPE on the
keys (the paper's RoPE models keep the keys un-rotated in the cache and rotate them for the scores,
a cache layout this layer does not have).

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` (shape only), `kv_map [K·H, K·h]` →
`[B,T,N,h]`. The state kept per sequence for decoding is the key cache, `T·K·H` numbers.
Paper: Graef and Wasielewski, "Slim attention: cut your context memory in half without loss of
accuracy -- K-cache is all you need for MHA", arXiv:2503.05840.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import checks
from attnjax.core.contract import flex_with_contract
from attnjax.registry import Mechanism, ParamSpec, register
from attnjax.typing import Array, Float, Key, Lengths, Output, Query, Value

__all__ = ["slim_attention", "slim_kv_map", "SLIM_PARAMS"]

KVMap = Float[Array, "K*H K*h"]
_HIGHEST = jax.lax.Precision.HIGHEST
# Relative to the largest singular value: below this W_K is treated as singular (a float64 solve
# would return a map dominated by rounding of the trained weights).
_SINGULAR_RCOND = 1e-10


def slim_attention(q: Query, k: Key, v: Value, *, kv_map: KVMap, causal: bool = False,
                   segment_ids=None, q_offset=0, kv_lengths: Optional[Lengths] = None,
                   scale: Optional[float] = None, implementation: Optional[str] = None,
                   fold_values: bool = False) -> Output:
  """Slim attention: softmax attention with the values recovered from the keys, `V = K · kv_map`.

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, h]`, read for its shape only.
    kv_map: `[K·H, K·h]`, W_K⁻¹ W_V acting on the concatenated key heads of a token.
    causal, segment_ids, q_offset, kv_lengths, scale, implementation: the common contract
      (`attnjax.registry`).
    fold_values: apply `kv_map` after the attention (to the attention-weighted concatenated keys,
      the paper's form for generation) instead of before it; the same result.

  Returns:
    `[B, T, N, h]` in q's dtype.
  """
  op = "slim_attention"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  checks.check_shape(op, "kv_map", kv_map, (K * H, K * h), "[K·H, K·h]")
  contract = dict(causal=causal, segment_ids=segment_ids, q_offset=q_offset,
                  kv_lengths=kv_lengths, scale=scale, implementation=implementation)
  kv_map = kv_map.astype(jnp.float32)
  keys = k.reshape(B, S, K * H).astype(jnp.float32)
  if not fold_values:
    values = jnp.einsum("bsc,cd->bsd", keys, kv_map, precision=_HIGHEST).reshape(B, S, K, h)
    return flex_with_contract(op, q, k, values.astype(k.dtype), **contract)
  # Every key/value head carries all K·H key features, so query head n averages the whole key row
  # with its own weights; its value head's columns of the map come after.
  keys_all = jnp.broadcast_to(keys[:, :, None, :], (B, S, K, K * H)).astype(k.dtype)
  mixed = flex_with_contract(op, q, k, keys_all, **contract).astype(jnp.float32)
  G = N // K
  out = jnp.einsum("btkgc,ckh->btkgh", mixed.reshape(B, T, K, G, K * H),
                   kv_map.reshape(K * H, K, h), precision=_HIGHEST)
  return out.reshape(B, T, N, h).astype(q.dtype)


def slim_kv_map(w_k, w_v) -> jax.Array:
  """W_KV = W_K⁻¹ W_V from a trained layer's kernels: `w_k [D, K, H]`, `w_v [D, K, h]` (or already
  flattened, `[D, K·H]`, `[D, K·h]`) → `[K·H, K·h]` in w_v's dtype.

  Solved on the host in float64 (a conversion of concrete weights, not a traced computation).
  Raises a `ValueError` unless W_K is square (D = K·H) and invertible (its smallest singular value
  above 1e-10 of its largest).
  """
  op = "slim_kv_map"
  w_k64, w_v64 = np.asarray(w_k, np.float64), np.asarray(w_v, np.float64)
  if w_k64.ndim not in (2, 3) or w_v64.ndim != w_k64.ndim:
    raise ValueError(f"{op}: `w_k` and `w_v` must have shapes [D, K, H] and [D, K, h] (or [D, K·H] "
                     f"and [D, K·h]), got {w_k64.shape} and {w_v64.shape}")
  if w_k64.ndim == 3 and w_k64.shape[1] != w_v64.shape[1]:
    raise ValueError(f"{op}: `w_k` [D, K, H] and `w_v` [D, K, h] must have the same K, got "
                     f"{w_k64.shape} and {w_v64.shape}")
  D = w_k64.shape[0]
  w_k64, w_v64 = w_k64.reshape(D, -1), w_v64.reshape(w_v64.shape[0], -1)
  if w_v64.shape[0] != D:
    raise ValueError(f"{op}: `w_k` and `w_v` must share the input width D, got {D} and "
                     f"{w_v64.shape[0]}")
  if w_k64.shape[1] != D:
    raise ValueError(f"{op}: W_K must be square to be inverted: [D, K·H] with D = K·H, got "
                     f"[{D}, {w_k64.shape[1]}] (slim attention is for MHA, where D = K·H)")
  singular = np.linalg.svd(w_k64, compute_uv=False)
  if not singular[0] > 0 or singular[-1] <= _SINGULAR_RCOND * singular[0]:
    raise ValueError(f"{op}: W_K is singular (smallest / largest singular value "
                     f"{singular[-1] / max(singular[0], np.finfo(np.float64).tiny):.3g}); the "
                     "values cannot be recovered from the keys")
  return jnp.asarray(np.linalg.solve(w_k64, w_v64), jnp.result_type(w_v))


SLIM_PARAMS = (
    # In the layer h = H: the map is [K·H, K·H]. Lecun-normal keeps V's scale that of K.
    ParamSpec("kv_map", lambda N, K, H: (K * H, K * H), jax.nn.initializers.lecun_normal()),)


def _example(*, N, K, H, h):
  del N
  rng = np.random.default_rng(0)
  return {"kv_map": (rng.standard_normal((K * H, K * h)) * (K * H) ** -0.5).astype(np.float32)}


register(Mechanism(
    name="slim_attention", fn=slim_attention, family="decode-kvcache", seeds=(215,),
    paper="Slim attention: cut your context memory in half without loss of accuracy -- K-cache is "
          "all you need for MHA", arxiv="2503.05840",
    reads=frozenset({"q", "k"}), params=SLIM_PARAMS, example=_example,
    state_size=lambda T, N, K, H, h, kw: T * K * H))
