"""Spatial Sparse Attention (SSA, Direct3D-S2): NSA's three gated branches on a 3-D voxel grid.

Tokens are voxels of a grid `spatial_shape = (D, H, W)` in row-major order (a 1-D or 2-D grid is read
as (1, 1, W) / (1, H, W)). With l the compression block, l' the selection block (a multiple of l) and
w the window, per axis, for query token t (arXiv:2505.17412 and the authors' code):

  compressed   the keys of each l x l x l block (the tokens whose coordinates // l are equal) are
               compressed into one token by the authors' `SparseDownBlock3d` (v2, their default):
                   x  = k + PE[c mod l]               (learned intra-block position code, keys only)
                   h  = mean_block(SiLU(GN_1(x)))      (GroupNorm over the sample's voxels, then
                                                        mean over the block's voxels)
                   k̃ = conv_2(SiLU(GN_2(conv_1(h)))) + mean_block(x)
               conv_i a 3x3x3 convolution (with bias) over the grid of blocks, submanifold: only
               occupied blocks are inputs and outputs (torchsparse's stride-1 convolution), GN_i a
               GroupNorm of `num_groups` groups over all K·H channels of the sample's occupied sites.
               Values the same without PE (own parameters). o_cmp = softmax(q·k̃ᵀ·scale)·ṽ over the
               occupied blocks (GQA: query head n reads key head n // (N/K)).
  selected     each selection block j (an l'^3 block) scores Σ_{n in t's GQA group} Σ_{compressed
               blocks i inside j} p_cmp[n, t, i] (the compressed probabilities); the group's top-k
               blocks (k = min(top_k, occupied blocks)) are attended with one softmax over their
               tokens: o_slc.
  window       non-overlapping w^3 windows of the grid shifted by `shift_window` (token c is in
               window (c + s) // w per axis, no wrap-around): o_win = softmax within t's window.

    o_t = g_t,0 · o_cmp + g_t,1 · o_slc + g_t,2 · o_win,     g = `gates [B, T, 3]` = σ(x W_g)

(one gate triple per token, shared by all heads: the authors' `Linear(hidden, 3)` + sigmoid; the
layer's projection adds a zero-initialized bias they omit).

Interpretations. A block is the set of tokens with equal block coordinates, not a range of flat
indices: the authors' kernels read each block as a contiguous run because their voxels are sorted
block by block; here tokens stay row-major and the selected branch permutes them into block-major
order (the grid zero-padded to whole selection blocks, the padding masked) so that each selection
block is one tile of `flex_attention`'s block mask (`core.sparse.selection_mask`); the output is
permuted back. Dense grids are the case the layer feeds; occupied voxels of a sparse volume are
served by `kv_lengths` (the first L row-major tokens are occupied: the statistics, blocks, windows
and candidates count only those), a general occupancy pattern is not. o_cmp runs on `flex_attention`
over the block tokens; the selection reads its probabilities from a dense `[T, #blocks]` softmax
without gradient (a top-k under no_grad, as in the authors' code). The branches share the one k, v
the layer projects (as the authors' code does). The paper's model is a non-causal DiT over one volume:
no causal attention, packing or KV-cache decoding. The authors also ship a lighter compression (v1:
a 1x1x1 convolution, SiLU, mean pool); v2 is their default and is the one implemented.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` (T = S), `gates [B,T,3]`;
`compress_pe_k [l,l,l,K·H]`, `compress_norm_k [2,2,K·H]` (GN_1 / GN_2 x scale / bias),
`compress_conv_k [2,3,3,3,K·H,K·H]`, `compress_conv_bias_k [2,K·H]` and the same for v with h and
no PE → `[B,T,N,h]`.
Paper: Wu et al., "Direct3D-S2: Gigascale 3D Generation Made Easy with Spatial Sparse Attention",
arXiv:2505.17412 (code: github.com/DreamTechAI/Direct3D-S2).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import flex
from attnjax.core import grid
from attnjax.core import masks
from attnjax.core import param_tables
from attnjax.core import sparse
from attnjax.core import windows
from attnjax.registry import Mechanism, TokenInput, example_params, register
from attnjax.typing import Array, Float, Key, Lengths, Output, Query, Value

__all__ = ["spatial_sparse_attention", "ssa_compress", "ssa_selection", "block_major_order",
           "SSA_TABLE"]

COMPRESS_BLOCK = 4   # the authors' DiT default (compression 4, selection 8, top-k 8, window 8)
GN_EPS = 1e-5        # torch GroupNorm's default, as the authors' SparseGroupNorm32


def _norm_init(key, shape, dtype=jnp.float32):
  """GroupNorm affine parameters `[2, 2, C]`: scales 1, biases 0 (torch's init)."""
  del key
  return jnp.stack([jnp.ones(shape[:1] + shape[2:]), jnp.zeros(shape[:1] + shape[2:])], 1).astype(dtype)


def _conv_init(key, shape, dtype=jnp.float32):
  """3x3x3 kernels `[2, 3, 3, 3, C, C]`: N(0, 1 / fan_in), fan_in = 27 C."""
  return (jax.random.normal(key, shape) * (27 * shape[-2]) ** -0.5).astype(dtype)


_zeros = jax.nn.initializers.zeros
# (name, shape(N, K, H, h, block), letters, init): see `attnjax.core.param_tables`.
SSA_TABLE = (
    ("compress_pe_k", lambda N, K, H, h, block=COMPRESS_BLOCK: (block, block, block, K * H),
     "[l, l, l, K·H]", _zeros),
    ("compress_norm_k", lambda N, K, H, h, block=COMPRESS_BLOCK: (2, 2, K * H), "[2, 2, K·H]",
     _norm_init),
    ("compress_conv_k", lambda N, K, H, h, block=COMPRESS_BLOCK: (2, 3, 3, 3, K * H, K * H),
     "[2, 3, 3, 3, K·H, K·H]", _conv_init),
    ("compress_conv_bias_k", lambda N, K, H, h, block=COMPRESS_BLOCK: (2, K * H), "[2, K·H]", _zeros),
    ("compress_norm_v", lambda N, K, H, h, block=COMPRESS_BLOCK: (2, 2, K * h), "[2, 2, K·h]",
     _norm_init),
    ("compress_conv_v", lambda N, K, H, h, block=COMPRESS_BLOCK: (2, 3, 3, 3, K * h, K * h),
     "[2, 3, 3, 3, K·h, K·h]", _conv_init),
    ("compress_conv_bias_v", lambda N, K, H, h, block=COMPRESS_BLOCK: (2, K * h), "[2, K·h]", _zeros),
)
SSA_SETTINGS = {"block": "compress_block"}
SSA_PARAMS = param_tables.param_specs(SSA_TABLE, settings=SSA_SETTINGS)
Gates = Float[Array, "B T 3"]


def _grid3(shape) -> tuple[int, int, int]:
  return (1,) * (3 - len(shape)) + tuple(shape)


def _first_tokens(shape3, block: int) -> np.ndarray:
  """Row-major flat index of the first token of each block of `block`^3 (blocks row-major): a block
  is occupied under `kv_lengths` L iff this index is below L (the occupied tokens are a prefix)."""
  starts = np.meshgrid(*(np.arange(-(-n // block)) * block for n in shape3), indexing="ij")
  return ((starts[0] * shape3[1] + starts[1]) * shape3[2] + starts[2]).reshape(-1)


def _group_norm(x, present, scale, bias, num_groups: int):
  """GroupNorm of `x [B, L, C]` over the `present [B, L]` sites of each example, float32."""
  B, L, C = x.shape
  xg = x.reshape(B, L, num_groups, C // num_groups)
  w = present.astype(jnp.float32)[:, :, None, None]
  count = jnp.maximum(jnp.sum(w, axis=1, keepdims=True) * (C // num_groups), 1.0)
  mean = jnp.sum(w * xg, axis=(1, 3), keepdims=True) / count
  var = jnp.sum(w * (xg - mean) ** 2, axis=(1, 3), keepdims=True) / count
  return ((xg - mean) * jax.lax.rsqrt(var + GN_EPS)).reshape(B, L, C) * scale + bias


def _conv3(x, kernel, bias, cshape):
  """Submanifold 3x3x3 convolution of `x [B, nc, C]` (absent sites zero) on the block grid."""
  B, _, C = x.shape
  y = jax.lax.conv_general_dilated(x.reshape((B,) + cshape + (C,)), kernel, (1, 1, 1), "SAME",
                                   dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                   precision=jax.lax.Precision.HIGHEST)
  return y.reshape(B, -1, kernel.shape[-1]) + bias


def ssa_compress(x, *, spatial_shape, block: int, norm, conv, conv_bias, pe=None, num_groups: int,
                 lengths=None):
  """The authors' `SparseDownBlock3d` (v2) over the `block`^3 blocks of `x [B, S, K, D]` on the grid
  `spatial_shape` (1-3 dims, row-major): `[B, nc, K, D]` float32, blocks in row-major order of their
  coordinates; tokens at or past `lengths [B]` are absent (a block with none is absent too)."""
  B, S, K, D = x.shape
  shape3 = _grid3(spatial_shape)
  valid = contract.valid_slots(B, S, lengths)
  x = contract.zero_padded(x, lengths).reshape(B, S, K * D)
  if pe is not None:  # the intra-block position code of each token (keys only, as the authors)
    c = np.stack(np.unravel_index(np.arange(S), shape3), -1) % block
    x = x + pe.astype(jnp.float32)[c[:, 0], c[:, 1], c[:, 2]][None]
  norm, conv, conv_bias = (a.astype(jnp.float32) for a in (norm, conv, conv_bias))
  h = jax.nn.silu(_group_norm(x, valid, norm[0, 0], norm[0, 1], num_groups))
  # Blocks never longer than their axis (an equal partition): no padding of short axes to `block`.
  window = tuple(min(block, n) for n in shape3)
  pooled, _ = windows.reduce_windows(jnp.stack([h, x], 2), shape3, window, kv_lengths=lengths)
  h, skip = pooled[:, :, 0], pooled[:, :, 1]                                    # [B, nc, C]
  cshape = tuple(-(-n // block) for n in shape3)
  present = (_first_tokens(shape3, block)[None] < contract.lengths_or_full(
      "ssa_compress", lengths, B, S)[:, None])                                   # [B, nc]
  h = jnp.where(present[..., None], h, 0.0)
  h = _conv3(h, conv[0], conv_bias[0], cshape)
  h = jnp.where(present[..., None], jax.nn.silu(
      _group_norm(h, present, norm[1, 0], norm[1, 1], num_groups)), 0.0)
  h = _conv3(h, conv[1], conv_bias[1], cshape) + skip
  return h.reshape(B, -1, K, D)


def ssa_selection(p_cmp, *, spatial_shape, compress_block: int, select_block: int, top_k: int,
                  K: int, lengths):
  """bool `[B, N, T, nb]`: the selection blocks (`select_block`^3, row-major) each query attends to,
  from the compressed probabilities `p_cmp [B, N, T, nc]`: each block scores the sum of the
  probabilities of the compression blocks inside it over the query's GQA group; the group keeps its
  `top_k` best occupied blocks."""
  B, N, T, nc = p_cmp.shape
  shape3 = _grid3(spatial_shape)
  ratio = select_block // compress_block
  cc = np.stack(np.unravel_index(np.arange(nc), [-(-n // compress_block) for n in shape3]), -1)
  sshape = [-(-n // select_block) for n in shape3]
  to_sel = np.ravel_multi_index(tuple((cc // ratio).T), sshape)                  # [nc]
  onehot = (to_sel[:, None] == np.arange(math.prod(sshape))[None]).astype(np.float32)
  group = jnp.sum(p_cmp.reshape(B, K, N // K, T, nc), axis=2, keepdims=True)
  score = jnp.einsum("bkgtc,cj->bkgtj", group, onehot)
  score = jnp.broadcast_to(score, (B, K, N // K, T, onehot.shape[1])).reshape(B, N, T, -1)
  occupied = _first_tokens(shape3, select_block)[None] < lengths[:, None]       # [B, nb]
  return sparse.top_k_blocks(score, top_k, candidates=occupied[:, None, None, :])


def block_major_order(spatial_shape, block: int) -> tuple[np.ndarray, int]:
  """`(order, P)`: the row-major token indices of a grid listed block by block (blocks of
  min(block, axis)^3 in row-major order, tokens row-major inside each), -1 where the grid is padded
  to whole blocks; each block is then the run `order[j·P : (j+1)·P]` of P tokens."""
  shape3 = _grid3(spatial_shape)
  sizes = [min(block, n) for n in shape3]
  counts = [-(-n // s) for n, s in zip(shape3, sizes, strict=True)]
  pad = [(0, c * s - n) for c, s, n in zip(counts, sizes, shape3, strict=True)]
  idx = np.pad(np.arange(math.prod(shape3)).reshape(shape3), pad, constant_values=-1)
  idx = idx.reshape(counts[0], sizes[0], counts[1], sizes[1], counts[2], sizes[2])
  return idx.transpose(0, 2, 4, 1, 3, 5).reshape(-1), math.prod(sizes)


def _selected_branch(q, k, v, selected, *, spatial_shape, select_block, lengths, scale,
                     implementation):
  """Attention of each query over the tokens of its selected blocks (block-major tiles)."""
  order, P = block_major_order(spatial_shape, select_block)
  idx = np.maximum(order, 0)
  inverse = np.empty(q.shape[1], np.int32)
  inverse[order[order >= 0]] = np.nonzero(order >= 0)[0]
  real = (order >= 0)[None] & (jnp.asarray(order)[None] < lengths[:, None])      # [B, S_pad]

  def base(b, n, q_idx, kv_idx):
    del n, q_idx
    return real[b, kv_idx]

  Sp = order.shape[0]
  block_mask, _ = sparse.selection_mask(selected[:, :, idx], T=Sp, S=Sp, q_block=1, block_size=P,
                                        base_mask=base)
  out = flex.flex_attention(q[:, idx], k[:, idx], v[:, idx], block_mask=block_mask, scale=scale,
                            implementation=implementation)
  return out[:, inverse]


def spatial_sparse_attention(
    q: Query, k: Key, v: Value, *, gates: Gates, compress_pe_k: jax.Array,
    compress_norm_k: jax.Array, compress_conv_k: jax.Array, compress_conv_bias_k: jax.Array,
    compress_norm_v: jax.Array, compress_conv_v: jax.Array, compress_conv_bias_v: jax.Array,
    causal: bool = False, segment_ids=None, q_offset=0, kv_lengths: Optional[Lengths] = None,
    scale: Optional[float] = None, implementation: Optional[str] = None, spatial_shape=None,
    compress_block: Optional[int] = None, select_block: int = 8, top_k: int = 8, window_size=8,
    shift_window=0, num_groups: int = 32) -> Output:
  """Spatial Sparse Attention (see the module docstring): gated sum of 3-D block-compressed, top-k
  3-D block-selected and 3-D window attention over voxel tokens on `spatial_shape`."""
  op = "spatial_sparse_attention"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  contract.reject_causal_or_packing(op, causal=causal, segment_ids=segment_ids,
                                    why="Direct3D-S2 attends over a whole volume")
  if T != S or not checks.is_static_zero(q_offset):
    raise ValueError(f"{op}: full self-attention over one grid only (T == S, q_offset 0); got "
                     f"T={T}, S={S}")
  shape = grid.check_spatial_shape(op, spatial_shape, S)
  block = jnp.shape(compress_pe_k)[0] if jnp.ndim(compress_pe_k) == 4 else 1
  block = block if compress_block is None else compress_block
  params = dict(compress_pe_k=compress_pe_k, compress_norm_k=compress_norm_k,
                compress_conv_k=compress_conv_k, compress_conv_bias_k=compress_conv_bias_k,
                compress_norm_v=compress_norm_v, compress_conv_v=compress_conv_v,
                compress_conv_bias_v=compress_conv_bias_v)
  param_tables.check_table(op, SSA_TABLE, params, N=N, K=K, H=H, h=h, block=block)
  checks.check_shape(op, "gates", gates, (B, T, 3), "[B, T, 3]")
  for name, value in (("compress_block", block), ("select_block", select_block),
                      ("top_k", top_k), ("num_groups", num_groups)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{op}: `{name}` must be a positive int, got {value!r}")
  if select_block % block:
    raise ValueError(f"{op}: `select_block` ({select_block}) must be a multiple of the compression "
                     f"block ({block})")
  if (K * H) % num_groups or (K * h) % num_groups:
    raise ValueError(f"{op}: `num_groups` ({num_groups}) must divide K·H = {K * H} and K·h = {K * h}")
  _, window, shift = windows.window_settings(op, shape, S, window_size, shift_window)
  scale = H ** -0.5 if scale is None else scale
  lengths = contract.lengths_or_full(op, kv_lengths, B, S)
  sizes = dict(spatial_shape=shape, block=block, num_groups=num_groups, lengths=kv_lengths)

  # Compressed branch over the occupied blocks (a prefix of the row-major blocks).
  kc = ssa_compress(k, **sizes, pe=compress_pe_k, norm=compress_norm_k, conv=compress_conv_k,
                    conv_bias=compress_conv_bias_k)
  vc = ssa_compress(v, **sizes, norm=compress_norm_v, conv=compress_conv_v,
                    conv_bias=compress_conv_bias_v)
  occupied = jnp.sum(_first_tokens(_grid3(shape), block)[None] < lengths[:, None], axis=1)
  o_cmp = flex.flex_attention(q, kc, vc, mask_mod=masks.padding(kv_lengths=occupied), scale=scale,
                              implementation=implementation)
  # Its probabilities (no gradient: the selection is a top-k under no_grad in the authors' code).
  s = jnp.einsum("btkgh,bckh->bkgtc", q.astype(jnp.float32).reshape(B, T, K, N // K, H),
                 jax.lax.stop_gradient(kc)) * scale
  seen = (jnp.arange(kc.shape[1])[None] < occupied[:, None])[:, None, None, None]
  p_cmp = jax.nn.softmax(jnp.where(seen, s, -jnp.inf), axis=-1).reshape(B, N, T, -1)
  selected = ssa_selection(jax.lax.stop_gradient(p_cmp), spatial_shape=shape, compress_block=block,
                           select_block=select_block, top_k=top_k, K=K, lengths=lengths)
  o_slc = _selected_branch(q, k, v, selected, spatial_shape=shape, select_block=select_block,
                           lengths=lengths, scale=scale, implementation=implementation)
  # Window branch: the authors shift coordinates by +s before // w; core.windows' Swin shift s'
  # tiles from s' - w, so s' = (w - s) mod w gives the same windows.
  o_win = contract.flex_with_contract(
      op, q, k, v, causal=False, segment_ids=None, q_offset=0, kv_lengths=kv_lengths, scale=scale,
      implementation=implementation, mask_mod=windows.window_mask(
          shape, window, tuple((w - s) % w for w, s in zip(window, shift, strict=True))))

  g = gates.astype(jnp.float32)[..., None, :, None]                                # [B, T, 1, 3, 1]
  out = (g[..., 0, :] * o_cmp.astype(jnp.float32) + g[..., 1, :] * o_slc.astype(jnp.float32)
         + g[..., 2, :] * o_win.astype(jnp.float32))
  return out.astype(q.dtype)


def _example(*, N, K, H, h):
  specs = param_tables.param_specs(SSA_TABLE, h=h, settings=SSA_SETTINGS)
  return dict(example_params(specs, N=N, K=K, H=H, perturb=0.5, settings=dict(compress_block=2)),
              compress_block=2, select_block=4, top_k=2, window_size=4, shift_window=2,
              num_groups=math.gcd(K * H, K * h, 4))


register(Mechanism(
    name="spatial_sparse_attention", fn=spatial_sparse_attention, family="sparse-trainable",
    seeds=(159,),
    paper="Direct3D-S2: Gigascale 3D Generation Made Easy with Spatial Sparse Attention",
    arxiv="2505.17412", patterns=frozenset({"self"}), decode=False, packed=False,
    complexity="O(T·(S/l³ + k·l'³ + w³))", params=SSA_PARAMS,
    token_inputs=(TokenInput("gates", side="q", shape=lambda N, K, H: (3,),
                             activation=jax.nn.sigmoid),),
    defaults=dict(select_block=8, top_k=8, window_size=8, shift_window=0, num_groups=32),
    example=_example))
