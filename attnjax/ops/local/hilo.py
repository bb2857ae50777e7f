"""HiLo attention (LITv2): local-window heads for high frequencies, pooled-key heads for low ones.

The N heads are split: the last `N_lo = floor(alpha · N)` heads are Lo-Fi, the first `N - N_lo`
Hi-Fi (the authors' code concatenates Hi-Fi then Lo-Fi outputs):

    Hi-Fi head:  o_i = Σ_{j ∈ win(i)} softmax_j(scale · q_i·k_j) v_j         s x s windows
    Lo-Fi head:  o_i = Σ_u softmax_u(scale · q_i·k̄_u) v̄_u                    every query, all windows
                 k̄_u = mean_{j ∈ window u} k_j,  v̄_u = mean_{j ∈ window u} v_j

In the paper (and the authors' code, `HiLo.lofi`) the map x is average-pooled first and then
projected to keys and values. Average pooling and a linear map (bias included) commute, so pooling the
projected k and v, as here in the q, k, v contract, is the same computation. `window_size = 1` makes
every head Lo-Fi over unpooled keys (plain multi-head attention), as in the authors' code.

Maps whose sides are not multiples of s: the last window on that axis is smaller, for the Hi-Fi
windows and for the Lo-Fi pooling alike (a partial window's mean is over the tokens it has:
`AvgPool2d(ceil_mode=True, count_include_pad=False)`); the authors' classification maps are
multiples of s, where this is exactly their `AvgPool2d(s, s)`. `kv_lengths` hides padded slots from
both groups (pooling averages real tokens only). Non-causal self-attention over one map: the Lo-Fi
keys summarize the whole map, so neither causal masking nor packed documents apply.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `[B,T,N,h]`, tokens on `spatial_shape`
(row-major, `attnjax.core.grid`; None = 1-D).
Paper: Pan, Cai and Zhuang, "Fast Vision Transformers with HiLo Attention", arXiv:2205.13213.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import windows
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, Value

__all__ = ["hilo_attention", "lofi_heads"]


def lofi_heads(num_heads: int, alpha: float, window) -> int:
  """The number of Lo-Fi heads: `floor(alpha · N)`, or all heads when the window is 1 x 1."""
  if all(w == 1 for w in window):
    return num_heads
  return int(num_heads * alpha)


def hilo_attention(q: Query, k: Key, v: Value, *, window_size=2, alpha: float = 0.5,
                   spatial_shape: Optional[Sequence[int]] = None, causal: bool = False,
                   segment_ids=None, q_offset=0, kv_lengths: Optional[Lengths] = None,
                   scale: Optional[float] = None, implementation: Optional[str] = None) -> Output:
  """HiLo: Hi-Fi heads attend inside s x s windows, Lo-Fi heads to window-averaged keys and values."""
  op = "hilo_attention"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  contract.reject_causal_or_packing(op, causal=causal, segment_ids=segment_ids,
                                    why="Lo-Fi heads attend to keys pooled over the whole map")
  contract.check_self_attention(op, T=T, S=S, q_offset=q_offset, kv_lengths=kv_lengths)
  if not 0.0 <= float(alpha) <= 1.0:
    raise ValueError(f"{op}: `alpha` (the share of Lo-Fi heads) must lie in [0, 1], got {alpha!r}")
  shape, window, no_shift = windows.window_settings(op, spatial_shape, S, window_size)
  scale = H ** -0.5 if scale is None else scale
  n_lo = lofi_heads(N, alpha, window)
  n_hi = N - n_lo
  group = N // K
  if n_hi % group:
    # The head split falls inside a key/value group: give each query head its own copy.
    k, v, group = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2), 1
  split = n_hi // group
  call = lambda q_, k_, v_, **kw: contract.flex_with_contract(
      op, q_, k_, v_, causal=False, segment_ids=None, scale=scale, implementation=implementation,
      **kw)
  outs = []
  if n_hi:
    outs.append(call(q[:, :, :n_hi], k[:, :, :split], v[:, :, :split], q_offset=q_offset,
                     kv_lengths=kv_lengths,
                     mask_mod=windows.window_mask(shape, window, no_shift, offset=q_offset)))
  if n_lo:
    pooled_k, lengths = windows.reduce_windows(k[:, :, split:], shape, window, kv_lengths=kv_lengths)
    pooled_v, _ = windows.reduce_windows(v[:, :, split:], shape, window, kv_lengths=kv_lengths)
    outs.append(call(q[:, :, n_hi:], pooled_k.astype(k.dtype), pooled_v.astype(v.dtype),
                     q_offset=0, kv_lengths=lengths))
  return jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]


register(Mechanism(
    name="hilo_attention", fn=hilo_attention, family="local-window", seeds=(223,),
    paper="Fast Vision Transformers with HiLo Attention", arxiv="2205.13213",
    patterns=frozenset({"self"}), decode=False, packed=False, complexity="O(T·(s² + T/s²))",
    example={"window_size": 4, "alpha": 0.5}))
