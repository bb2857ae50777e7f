"""Twins-SVT's spatially separable self-attention: locally-grouped (LSA) and global sub-sampled (GSA).

    LSA:  o_i = Σ_{j ∈ win(i)} softmax_j(scale · q_i·k_j) v_j        non-overlapping windows of the map
    GSA:  o_i = Σ_u softmax_u(scale · q_i·k̂_u) v̂_u                  one key per sr x sr window u
          k̂_u = Σ_p W^K_p k_{u,p},   v̂_u = Σ_p W^V_p v_{u,p}    (a strided conv, kernel = stride = sr)

Twins-SVT alternates the two in consecutive blocks. LSA is Twins' `GroupAttention`: softmax inside
the `ws x ws` groups (Twins-SVT: ws = 7). GSA is PVT's spatial-reduction attention, which Twins uses:
keys and values come from a `Conv2d(kernel=stride=sr)` of the map. In the q, k, v contract the
sub-sampling acts on the projected keys and values, as a strided convolution per key/value head:
`reduction_k [P, K, H, H]`, `reduction_v [P, K, h, h]` (P = prod(sr) offsets of a window, row-major).
A strided conv of the map followed by the k/v projection is a strided conv of the map, so this is the
paper's conv composed with the projections, restricted to mixing channels within a head; the
LayerNorm Twins applies between the conv and the k/v projection has no place in the contract and is
not applied, nor is the conv bias (a key bias shifts every score of a query equally; a value bias is
the k/v projection's). `sr` is read from the kernels (P = sr^d on a d-axis grid) unless given.

Maps whose sides are not multiples of the window: the last window is smaller (LSA: Twins pads and
masks the padding; GSA: the conv over a zero-padded map). `kv_lengths` hides padded slots (a GSA
window with no real token is hidden). Non-causal self-attention over one map.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `[B,T,N,h]`, tokens on `spatial_shape`
(row-major, `attnjax.core.grid`; None = 1-D).
Paper: Chu et al., "Twins: Revisiting the Design of Spatial Attention in Vision Transformers",
arXiv:2104.13840.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import grid
from attnjax.core import param_tables
from attnjax.core import windows
from attnjax.registry import Mechanism, example_params, register
from attnjax.typing import Array, Float, Key, Lengths, Output, Query, Value

__all__ = ["twins_lsa_attention", "twins_gsa_attention", "GSA_TABLE", "DEFAULT_GSA_POSITIONS"]

# The Flax layer's reduction window: P = 4 offsets (sr = 2 on a map, as in Twins-SVT's third stage;
# sr = 4 on a 1-D sequence). Kernels passed directly may have any P = sr^d.
DEFAULT_GSA_POSITIONS = 4

KeyKernel = Float[Array, "P K H H"]
ValueKernel = Float[Array, "P K h h"]


def _conv_init(key, shape, dtype=jnp.float32):
  # A conv's fan-in is every offset of the window times the input channels.
  return (jax.random.normal(key, shape) * (shape[0] * shape[2]) ** -0.5).astype(dtype)


GSA_TABLE = (
    ("reduction_k", lambda N, K, H, h, p=DEFAULT_GSA_POSITIONS: (p, K, H, H), "[P, K, H, H]",
     _conv_init),
    ("reduction_v", lambda N, K, H, h, p=DEFAULT_GSA_POSITIONS: (p, K, h, h), "[P, K, h, h]",
     _conv_init),
)

_WHY = "every query attends over the whole map"


def twins_lsa_attention(q: Query, k: Key, v: Value, *, window_size=7,
                        spatial_shape: Optional[Sequence[int]] = None, causal: bool = False,
                        segment_ids=None, q_offset=0, kv_lengths: Optional[Lengths] = None,
                        scale: Optional[float] = None,
                        implementation: Optional[str] = None) -> Output:
  """Twins LSA: softmax inside non-overlapping `window_size` groups of the map."""
  op = "twins_lsa_attention"
  _, T, S, _, _, _, _ = checks.check_qkv(op, q, k, v)
  contract.reject_causal_or_packing(op, causal=causal, segment_ids=segment_ids, why=_WHY)
  contract.check_self_attention(op, T=T, S=S, q_offset=q_offset, kv_lengths=kv_lengths)
  shape, window, no_shift = windows.window_settings(op, spatial_shape, S, window_size)
  return contract.flex_with_contract(op, q, k, v, causal=False, segment_ids=None, q_offset=q_offset,
                                     kv_lengths=kv_lengths, scale=scale,
                                     implementation=implementation,
                                     mask_mod=windows.window_mask(shape, window, no_shift,
                                                                  offset=q_offset))


def twins_gsa_attention(q: Query, k: Key, v: Value, *, reduction_k: KeyKernel,
                        reduction_v: ValueKernel, sr=None,
                        spatial_shape: Optional[Sequence[int]] = None, causal: bool = False,
                        segment_ids=None, q_offset=0, kv_lengths: Optional[Lengths] = None,
                        scale: Optional[float] = None,
                        implementation: Optional[str] = None) -> Output:
  """Twins GSA: every query attends to one strided-conv summary of the keys/values per sr x sr window."""
  op = "twins_gsa_attention"
  _, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  contract.reject_causal_or_packing(op, causal=causal, segment_ids=segment_ids, why=_WHY)
  contract.check_self_attention(op, T=T, S=S, q_offset=q_offset, kv_lengths=kv_lengths)
  shape = grid.check_spatial_shape(op, spatial_shape, S)
  if jnp.ndim(reduction_k) != 4:
    raise ValueError(f"{op}: `reduction_k` must have shape [P, K, H, H] = [P, {K}, {H}, {H}], got "
                     f"{jnp.shape(reduction_k)}")
  P = reduction_k.shape[0]
  if sr is None:
    side = round(P ** (1.0 / len(shape)))
    if side ** len(shape) != P:
      raise ValueError(f"{op}: `reduction_k` has P = {P} offsets, not sr^{len(shape)} for the grid "
                       f"{shape}; pass `sr`")
    window = (side,) * len(shape)
  else:
    window = grid.per_axis(sr, len(shape), op, "sr")
    if any(w < 1 for w in window) or int(jnp.prod(jnp.array(window))) != P:
      raise ValueError(f"{op}: `sr` {sr!r} gives {window} windows, which need P = prod(sr) "
                       f"offsets; the kernels have P = {P}")
  param_tables.check_table(op, GSA_TABLE, {"reduction_k": reduction_k, "reduction_v": reduction_v},
                           N=N, K=K, H=H, h=h, p=P)
  keys, lengths = windows.reduce_windows(k, shape, window, kernel=reduction_k, kv_lengths=kv_lengths)
  values, _ = windows.reduce_windows(v, shape, window, kernel=reduction_v, kv_lengths=kv_lengths)
  return contract.flex_with_contract(op, q, keys.astype(k.dtype), values.astype(v.dtype),
                                     causal=False, segment_ids=None, q_offset=0, kv_lengths=lengths,
                                     scale=scale, implementation=implementation)


_TWINS = dict(family="local-window", seeds=(109,),
              paper="Twins: Revisiting the Design of Spatial Attention in Vision Transformers",
              arxiv="2104.13840", patterns=frozenset({"self"}), decode=False, packed=False)
register(Mechanism(name="twins_lsa_attention", fn=twins_lsa_attention, **_TWINS,
                   complexity="O(T·w²)", example={"window_size": 4}))
register(Mechanism(
    name="twins_gsa_attention", fn=twins_gsa_attention, **_TWINS, complexity="O(T²/sr²)",
    params=param_tables.param_specs(GSA_TABLE),
    example=lambda *, N, K, H, h: example_params(param_tables.param_specs(GSA_TABLE, h=h), N=N, K=K,
                                                 H=H)))
