"""Neighborhood attention (NA), dilated NA (DiNA) and generalized NA (GNA) on 1-D, 2-D and 3-D grids.

Tokens lie on a grid `spatial_shape` (row-major, `attnjax.core.grid`; None: a 1-D sequence). Per grid
axis of length L, with kernel (window) size k, stride s, dilation δ, a query at coordinate x sees the
keys at coordinates y with the same residue (x mod δ = y mod δ) and, on that residue's subgrid
(i = x // δ, j = y // δ, L_r = ceil((L - x mod δ) / δ) tokens), inside its window:

    non-causal:  leader = min((i // s)·s + s // 2, L_r - 1)     the centre query of i's stride group
                 start  = clamp(leader - k // 2, 0, L_r - k)    the window SHIFTED at the borders
                 start <= j < start + k                         exactly k keys, never truncated
    causal:      leader = min((i // s)·s + s - 1, L_r - 1)      the last query of the group
                 leader - k < j <= i                            the window over the past

and a query sees the keys visible on every axis, so a non-causal query sees exactly ∏ k_a keys, at
corners too. NA is s = δ = 1 (each query its k nearest neighbours per axis), DiNA δ > 1 (the k nearest
of its own residue class: a receptive field δ times wider at the same cost), GNA any s (queries in a
tile of s share the window of the tile's leader; s = k with k dividing L is blocked, non-overlapping
window attention). These are NATTEN's semantics (SHI-Labs/NATTEN: the window start of its NA / DiNA
kernels, the stride-group leaders of its Flex mask in `backends/flex.py`, and its argument checks:
k·δ <= L per axis, 1 <= s <= k). With k = L on every axis, non-causal NA is full self-attention.

`rpb` (NA and DiNA only, as in NAT / DiNAT; NATTEN >= 0.20 and GNA have none): a learned relative
position bias `[N, 2k_0 - 1, ..., 2k_{d-1} - 1]` per query head, in NATTEN's layout: the pair's entry is
at `(j_a - i_a) + k_a - 1` per axis (subgrid offsets: δ apart counts as 1), added to the scaled logit.

The windows are a `mask_mod` over grid coordinates on `flex_attention` (its `xla` path visits only the
key tiles a window touches) and the bias a `score_mod`, both under the call contract:
- `causal=True` makes every grid axis causal (NATTEN's `is_causal=True`); in 1-D that is causal NA
  (a window over the last k tokens of the residue class). GNA's `is_causal` sets axes one by one.
- self-attention only: the grid is the key/value slots (`prod(spatial_shape) = S`); a query block
  over a KV cache sits at flat positions `q_offset + t` of that grid, so causal decoding over a cache
  that holds the whole map (`kv_lengths`: its filled part) equals the full forward. `kv_lengths`
  only hides slots: windows are placed on the grid of all S slots, so a non-causal query next to
  padding sees fewer than ∏ k keys.
- `segment_ids` (1-D only): every packed document is its own sequence (coordinates and L from its
  start and length), so packed equals separate; a document shorter than k·δ is seen whole.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `[B,T,N,h]`. Papers: Hassani et al.,
"Neighborhood Attention Transformer", arXiv:2204.07143; Hassani and Shi, "Dilated Neighborhood
Attention Transformer", arXiv:2209.15001; Hassani et al., "Generalized Neighborhood Attention:
Multi-dimensional Sparse Attention at the Speed of Light", arXiv:2504.16922.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import grid
from attnjax.core.relative import query_position
from attnjax.registry import Mechanism, ParamSpec, example_params, register
from attnjax.typing import Array, Float, Key, Lengths, MaskMod, Output, Query, ScoreMod, Value

__all__ = ["generalized_neighborhood_attention", "neighborhood_attention",
           "dilated_neighborhood_attention", "neighborhood_attention_rpb", "neighborhood_mask",
           "neighborhood_bias", "RPB_KERNEL_SIZE"]

# The default kernel size of the registered `neighborhood_attention_rpb` (NAT's). The layer sizes its
# learned table from the mechanism's `kernel_size` and `spatial_shape`: `[N, 2k-1]` for a sequence,
# `[N, 2k_0-1, 2k_1-1(, 2k_2-1)]` for a 2-D / 3-D map.
RPB_KERNEL_SIZE = 7
IntOrTuple = Union[int, Sequence[int]]
# `rpb`: one table per query head, one axis of 2k - 1 relative offsets per grid axis.
RelativeBias = Float[Array, "N ..."]


def _axis_visible(x, y, length, kernel: int, stride: int, dilation: int, causal: bool):
  """Whether the key at coordinate `y` is in the window of the query at `x` on one axis of `length`
  tokens (int arrays, broadcastable; see the module docstring)."""
  i, j = x // dilation, y // dilation
  residue = x % dilation
  sub_length = (length - residue + dilation - 1) // dilation       # tokens of x's residue class
  if causal:
    leader = jnp.minimum((i // stride) * stride + stride - 1, sub_length - 1)
    inside = (j <= i) & (leader - j < kernel)
  else:
    leader = jnp.minimum((i // stride) * stride + stride // 2, sub_length - 1)
    # Shifted, not truncated, at the borders; a map shorter than the kernel (only a packed document
    # can be) is seen whole.
    start = jnp.maximum(jnp.minimum(leader - kernel // 2, sub_length - kernel), 0)
    inside = (start <= j) & (j < start + kernel)
  return inside & (residue == y % dilation)


def neighborhood_mask(spatial_shape: Sequence[int], kernel_size: Sequence[int],
                      stride: Sequence[int], dilation: Sequence[int], is_causal: Sequence[bool], *,
                      q_offset=0, documents=None) -> MaskMod:
  """The `mask_mod` of (generalized) neighborhood attention on the grid `spatial_shape` (per-axis
  tuples of ints / bools; see the module docstring). Queries sit at flat positions
  `q_offset + q_idx` of the grid. `documents`: `(start, end) [B, L]` of each token's packed document
  (1-D grids): coordinates and the axis length are then taken within the query's document."""

  def mask_mod(b, n, q_idx, kv_idx):
    del n
    q_pos = query_position(q_offset, b, q_idx)
    if documents is not None:
      start, end = documents
      q_start = start[b, q_pos]
      return _axis_visible(q_pos - q_start, kv_idx - q_start, end[b, q_pos] - q_start,
                           kernel_size[0], stride[0], dilation[0], is_causal[0])
    keep = None
    for x, y, length, kernel, s, d, c in zip(
        grid.coordinates(q_pos, spatial_shape), grid.coordinates(kv_idx, spatial_shape),
        spatial_shape, kernel_size, stride, dilation, is_causal, strict=True):
      axis = _axis_visible(x, y, length, kernel, s, d, c)
      keep = axis if keep is None else keep & axis
    return keep

  return mask_mod


def neighborhood_bias(rpb, spatial_shape: Sequence[int], kernel_size: Sequence[int],
                      dilation: Sequence[int], *, q_offset=0, documents=None) -> ScoreMod:
  """A `score_mod` adding `rpb[n, (j_0 - i_0) + k_0 - 1, ...]` (NATTEN's relative position bias;
  subgrid offsets per axis) to each logit. Indices are clipped for pairs outside the window (masked)."""

  def score_mod(score, b, n, q_idx, kv_idx):
    q_pos = query_position(q_offset, b, q_idx)
    if documents is not None:
      q_start = documents[0][b, q_pos]
      pairs = [(q_pos - q_start, kv_idx - q_start)]
    else:
      pairs = zip(grid.coordinates(q_pos, spatial_shape), grid.coordinates(kv_idx, spatial_shape),
                  strict=True)
    index = [n]
    for (x, y), kernel, d in zip(pairs, kernel_size, dilation, strict=True):
      index.append(jnp.clip(y // d - x // d + kernel - 1, 0, 2 * kernel - 2))
    return score + rpb[tuple(index)].astype(score.dtype)

  return score_mod


def _positive(op: str, name: str, values: tuple[int, ...], low: int = 1):
  if any(v < low for v in values):
    raise ValueError(f"{op}: `{name}` must be >= {low} on every axis, got {values}")


def _neighborhood(op: str, q, k, v, *, kernel_size, stride, dilation, is_causal, rpb, spatial_shape,
                  causal, segment_ids, q_offset, kv_lengths, scale, implementation, odd_kernel):
  """The general operator behind the three public ones (checks, masks, one flex pass)."""
  B, T, S, N, _, _, _ = checks.check_qkv(op, q, k, v)
  contract.check_self_attention(op, T=T, S=S, q_offset=q_offset, kv_lengths=kv_lengths,
                                segment_ids=segment_ids)
  if T > S:
    raise ValueError(f"{op}: self-attention over the grid of the {S} key slots; got T={T} > S={S}")
  shape = grid.check_spatial_shape(op, spatial_shape, S)
  ndim = len(shape)
  kernel_size = grid.per_axis(kernel_size, ndim, op, "kernel_size")
  stride = grid.per_axis(stride, ndim, op, "stride")
  dilation = grid.per_axis(dilation, ndim, op, "dilation")
  for name, values in (("kernel_size", kernel_size), ("stride", stride), ("dilation", dilation)):
    _positive(op, name, values)
  if odd_kernel and any(w % 2 == 0 for w in kernel_size):
    raise ValueError(f"{op}: `kernel_size` must be odd on every axis (a window centred on its "
                     f"query), got {kernel_size}")
  if any(s > w for s, w in zip(stride, kernel_size, strict=True)):
    raise ValueError(f"{op}: `stride` cannot exceed `kernel_size` on any axis, got stride {stride}, "
                     f"kernel_size {kernel_size}")
  if any(w * d > n for w, d, n in zip(kernel_size, dilation, shape, strict=True)):
    raise ValueError(f"{op}: `kernel_size` x `dilation` {kernel_size} x {dilation} exceeds the grid "
                     f"`spatial_shape` {shape} on some axis")
  if isinstance(is_causal, (bool, np.bool_)):
    is_causal = (bool(is_causal),) * ndim
  if (not isinstance(is_causal, (tuple, list)) or len(is_causal) != ndim
      or not all(isinstance(c, (bool, np.bool_)) for c in is_causal)):
    raise ValueError(f"{op}: `is_causal` must be a bool or {ndim} bools (one per grid axis), got "
                     f"{is_causal!r}")
  # The contract's `causal` makes every axis causal (it then implies the flat causal mask too).
  is_causal = tuple(bool(c) or bool(causal) for c in is_causal)
  documents = None
  if segment_ids is not None:
    if ndim != 1:
      raise ValueError(f"{op}: `segment_ids` (packed sequences) need a 1-D grid, got "
                       f"`spatial_shape` {shape}")
    documents = contract.document_bounds(jnp.asarray(segment_ids), B, S)
  score_mod = None
  if rpb is not None:
    checks.check_shape(op, "rpb", rpb, (N,) + tuple(2 * w - 1 for w in kernel_size),
                       "[N" + "".join(f", 2·k_{a} - 1" for a in range(ndim)) + "]")
    score_mod = neighborhood_bias(jnp.asarray(rpb), shape, kernel_size, dilation, q_offset=q_offset,
                                  documents=documents)
  mask_mod = neighborhood_mask(shape, kernel_size, stride, dilation, is_causal, q_offset=q_offset,
                               documents=documents)
  return contract.flex_with_contract(op, q, k, v, causal=causal, segment_ids=segment_ids,
                                     q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                                     implementation=implementation, mask_mod=mask_mod,
                                     score_mod=score_mod)


def generalized_neighborhood_attention(
    q: Query, k: Key, v: Value, *, kernel_size: IntOrTuple, stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1, is_causal: Union[bool, Sequence[bool]] = False,
    spatial_shape: Optional[Sequence[int]] = None, causal: bool = False, segment_ids=None,
    q_offset=0, kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
    implementation: Optional[str] = None) -> Output:
  """Generalized neighborhood attention (GNA): window, stride, dilation and causality per grid axis.

  `kernel_size` (any size >= 1, even too), `stride` (1 <= s <= k), `dilation`: an int or one per
  axis of `spatial_shape`; `is_causal`: a bool or one per axis (`causal=True` sets all). Stride 1 is
  (dilated) NA, stride = kernel the blocked attention of non-overlapping tiles (module docstring).
  """
  return _neighborhood("generalized_neighborhood_attention", q, k, v, kernel_size=kernel_size,
                       stride=stride, dilation=dilation, is_causal=is_causal, rpb=None,
                       spatial_shape=spatial_shape, causal=causal, segment_ids=segment_ids,
                       q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                       implementation=implementation, odd_kernel=False)


def neighborhood_attention(
    q: Query, k: Key, v: Value, *, kernel_size: IntOrTuple,
    rpb: Optional[RelativeBias] = None, spatial_shape: Optional[Sequence[int]] = None,
    causal: bool = False, segment_ids=None, q_offset=0, kv_lengths: Optional[Lengths] = None,
    scale: Optional[float] = None, implementation: Optional[str] = None) -> Output:
  """Neighborhood attention (NAT): each token attends to its k nearest neighbours per grid axis.

  `kernel_size`: odd, an int or one per axis; the window is shifted at the borders so every query
  sees exactly ∏ k keys. `rpb`: optional `[N, 2k_0-1, ...]` relative position bias (module docstring).
  """
  return _neighborhood("neighborhood_attention", q, k, v, kernel_size=kernel_size, stride=1,
                       dilation=1, is_causal=False, rpb=rpb, spatial_shape=spatial_shape,
                       causal=causal, segment_ids=segment_ids, q_offset=q_offset,
                       kv_lengths=kv_lengths, scale=scale, implementation=implementation,
                       odd_kernel=True)


def dilated_neighborhood_attention(
    q: Query, k: Key, v: Value, *, kernel_size: IntOrTuple, dilation: IntOrTuple,
    rpb: Optional[RelativeBias] = None, spatial_shape: Optional[Sequence[int]] = None,
    causal: bool = False, segment_ids=None, q_offset=0, kv_lengths: Optional[Lengths] = None,
    scale: Optional[float] = None, implementation: Optional[str] = None) -> Output:
  """Dilated neighborhood attention (DiNAT): the k nearest neighbours on the query's residue class
  mod δ per axis (NA on each δ-subsampled grid; δ = 1 is NA). `rpb` in subgrid offsets."""
  return _neighborhood("dilated_neighborhood_attention", q, k, v, kernel_size=kernel_size, stride=1,
                       dilation=dilation, is_causal=False, rpb=rpb, spatial_shape=spatial_shape,
                       causal=causal, segment_ids=segment_ids, q_offset=q_offset,
                       kv_lengths=kv_lengths, scale=scale, implementation=implementation,
                       odd_kernel=True)


def neighborhood_attention_rpb(
    q: Query, k: Key, v: Value, *, rpb: RelativeBias,
    kernel_size: IntOrTuple = RPB_KERNEL_SIZE, dilation: IntOrTuple = 1,
    spatial_shape: Optional[Sequence[int]] = None, causal: bool = False, segment_ids=None,
    q_offset=0, kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
    implementation: Optional[str] = None) -> Output:
  """(Dilated) neighborhood attention with its learned relative position bias `rpb` (NAT / DiNAT).

  The registered form of NA with a bias: the Flax layer creates `rpb` at the shape its
  `kernel_size` and `spatial_shape` settings imply (`[N, 2k-1]` per grid axis).
  """
  return _neighborhood("neighborhood_attention_rpb", q, k, v, kernel_size=kernel_size, stride=1,
                       dilation=dilation, is_causal=False, rpb=rpb, spatial_shape=spatial_shape,
                       causal=causal, segment_ids=segment_ids, q_offset=q_offset,
                       kv_lengths=kv_lengths, scale=scale, implementation=implementation,
                       odd_kernel=True)


_NAT = dict(paper="Neighborhood Attention Transformer", arxiv="2204.07143")


def _decode_slots(T, N, K, H, h, kw) -> int:
  """Cache numbers causal decoding reads: on a 1-D sequence the last (k - 1)·δ + 1 slots (the
  window over the past of the query's residue class); on a grid, the whole cache."""
  kernel, dilation = kw.get("kernel_size", RPB_KERNEL_SIZE), kw.get("dilation", 1)
  if kw.get("spatial_shape") is None and isinstance(kernel, int) and isinstance(dilation, int):
    return min((kernel - 1) * dilation + 1, T) * K * (H + h)
  return T * K * (H + h)


_COMMON = dict(family="local-window", patterns=frozenset({"self", "causal_self"}),
               complexity="O(T·∏k)", state_size=_decode_slots)
def _rpb_shape(N, K, H, kernel_size=RPB_KERNEL_SIZE, spatial_shape=None):
  del K, H
  ndim = 1 if spatial_shape is None else len(spatial_shape)
  kernel = grid.per_axis(kernel_size, ndim, "neighborhood_attention_rpb", "kernel_size")
  return (N,) + tuple(2 * k - 1 for k in kernel)


RPB_PARAMS = (ParamSpec("rpb", _rpb_shape, jax.nn.initializers.truncated_normal(0.02),
                        settings=("kernel_size", "spatial_shape")),)

register(Mechanism(name="neighborhood_attention", fn=neighborhood_attention, seeds=(183,), **_NAT,
                   **_COMMON, example=dict(kernel_size=5)))
register(Mechanism(name="neighborhood_attention_rpb", fn=neighborhood_attention_rpb, seeds=(183,),
                   **_NAT, **_COMMON, params=RPB_PARAMS,
                   example=lambda *, N, K, H: example_params(RPB_PARAMS, N=N, K=K, H=H,
                                                             perturb=0.5)))
register(Mechanism(name="dilated_neighborhood_attention", fn=dilated_neighborhood_attention,
                   seeds=(154,), paper="Dilated Neighborhood Attention Transformer",
                   arxiv="2209.15001", **_COMMON, example=dict(kernel_size=3, dilation=2)))
register(Mechanism(name="generalized_neighborhood_attention", fn=generalized_neighborhood_attention,
                   seeds=(121,), paper="Generalized Neighborhood Attention: Multi-dimensional Sparse "
                                       "Attention at the Speed of Light", arxiv="2504.16922",
                   **_COMMON, example=dict(kernel_size=3, stride=2, dilation=2)))
