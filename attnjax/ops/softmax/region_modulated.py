"""Region-modulated attention (VideoGrain's ST-Layout Attn): logits pushed toward the row's maximum for
query-key pairs in the same region and toward its minimum for pairs in different regions.

    s_ij  = scale · q_i·k_j                      m_i = max_j s_ij,  n_i = min_j s_ij   (visible keys)
    λ_i   = ξ(t) · (1 - |R(i)|)                  ξ(t) = strength · ((t - 1) / 1000)^5
    s'_ij = s_ij + λ_i (m_i - s_ij)   if r_i = r_j          (positive pair: raised toward the max)
    s'_ij = s_ij - λ_i (s_ij - n_i)   if r_i ≠ r_j          (negative pair: lowered toward the min)
    o_i   = Σ_j softmax_j(s'_ij) v_j

r_i, r_j are region ids of the query and key tokens (`q_regions [B,T]`, `kv_regions [B,S]`, any ints):
in self-attention the layout segment of each pixel of the video, in cross-attention the segment of each
pixel (queries) and the local prompt each text token belongs to (keys; tokens of no local prompt get an
id no pixel has, so every pixel treats them as negative). The bias magnitude scales with the row's logit
range (m_i - n_i bounds it), shrinks for large regions (|R(i)| is the region's share, below) and decays
over the denoising trajectory through ξ(t): with `timestep` t (1..1000, DDPM steps) ξ = strength ·
((t - 1)/1000)^5, as the authors' controller (`treg`); `timestep=None` uses ξ = strength. Their
strengths are 0.3 for self- and 1.0 for cross-attention, applied in the first 15 of 50 DDIM steps (the
caller chooses when to call this operator).

|R(i)| (`size_weighting`): "keys" (default) is the share of the query's visible keys that lie in its
region, the code's `reg_sizes` for self-attention (region pixels / all pixels of the clip); "queries"
is the share of the call's query tokens (of the query's packed segment) in its region, the code's
`reg_sizes_c` for cross-attention, where keys are text tokens (call it per frame to get a frame's area,
as the code does); None gives λ_i = ξ. m_i, n_i and the shares are taken over the keys the contract's
masks leave visible (causal, packed documents, `kv_lengths`), so decoding over a KV cache with the
regions cached beside the keys equals the full forward. A zero strength gives softmax attention.

Streamable: a first pass over key blocks finds each row's arg-max / arg-min key and the region counts
(O(T·block) memory, no gradient); m_i = scale · q_i·k_{argmax} is then recomputed differentiably from
q and k, and s' is a flex `score_mod` reading m, n, λ and the region ids, so every flex path serves it
(`xla` with block skipping of the contract's masks; gradients reach q and k through m and n too).

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]`, `q_regions [B,T]`, `kv_regions [B,S]` (int)
→ `[B,T,N,h]`.
Paper: Yang, Zhu, Fan and Yang, "VideoGrain: Modulating Space-Time Attention for Multi-grained Video
Editing", arXiv:2502.17258 (ICLR 2025); the modulation follows DenseDiffusion (Kim et al.,
arXiv:2308.12964). Formula and settings as in the authors' code (github.com/knightyxp/VideoGrain,
`video_diffusion/prompt_attention/attention_util.py`, `ST_Layout_Attn_Control`).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import flex_xla
from attnjax.core.contract import contract_mask, flex_with_contract
from attnjax.registry import Mechanism, TokenInput, register
from attnjax.typing import Key, Lengths, Output, PerKeyToken, PerQueryToken, Query, Value

__all__ = ["region_modulated_attention", "SIZE_WEIGHTINGS"]

SIZE_WEIGHTINGS = ("keys", "queries", None)
# The DDPM schedule length the authors' time factor ((t - 1) / 1000)^5 is written for.
NUM_TRAIN_TIMESTEPS = 1000


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _row_statistics(q, k, q_regions, kv_regions, mask_mod, scale):
  """Per row, over the visible keys: (argmax, argmin, same-region count, visible count), each
  `[B, K, G, T]` int32. One pass over key blocks (O(T·block) memory); no gradient (indices and
  counts)."""
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  c = min(flex_xla.default_block_size()[1], _round_up(S, 8))
  Sp = _round_up(S, c)
  qf = jax.lax.stop_gradient(q).astype(jnp.float32).reshape(B, T, K, G, H)
  kf = jnp.pad(jax.lax.stop_gradient(k).astype(jnp.float32), ((0, 0), (0, Sp - S), (0, 0), (0, 0)))
  kv_reg = jnp.pad(kv_regions, ((0, 0), (0, Sp - S)))
  b = jnp.arange(B, dtype=jnp.int32)[:, None, None, None, None]
  n = flex_xla.head_index(K, G)
  qi = jnp.arange(T, dtype=jnp.int32)[None, None, None, :, None]
  q_reg = q_regions[:, None, None, :, None]
  shape = (B, K, G, T)

  def block(carry, j):
    best, worst, arg_best, arg_worst, same, seen = carry
    ki = j * c + jnp.arange(c, dtype=jnp.int32)[None, None, None, None, :]
    s = jnp.einsum("btkgh,bckh->bkgtc", qf, jax.lax.dynamic_slice_in_dim(kf, j * c, c, axis=1))
    s = s * scale
    visible = ki < S
    if mask_mod is not None:
      visible = jnp.logical_and(visible, mask_mod(b, n, qi, ki))
    visible = jnp.broadcast_to(visible, s.shape)
    hi = jnp.where(visible, s, -jnp.inf)
    lo = jnp.where(visible, s, jnp.inf)
    block_best, block_worst = jnp.max(hi, -1), jnp.min(lo, -1)
    # Ties keep the earlier key (strict comparison), as argmax does within the block.
    arg_best = jnp.where(block_best > best, j * c + jnp.argmax(hi, -1), arg_best)
    arg_worst = jnp.where(block_worst < worst, j * c + jnp.argmin(lo, -1), arg_worst)
    region = jax.lax.dynamic_slice_in_dim(kv_reg, j * c, c, axis=1)[:, None, None, None, :]
    match = jnp.logical_and(visible, region == q_reg)
    same = same + jnp.sum(match, -1, dtype=jnp.int32)
    seen = seen + jnp.sum(visible, -1, dtype=jnp.int32)
    return (jnp.maximum(best, block_best), jnp.minimum(worst, block_worst), arg_best, arg_worst,
            same, seen), None

  zeros = jnp.zeros(shape, jnp.int32)
  init = (jnp.full(shape, -jnp.inf), jnp.full(shape, jnp.inf), zeros, zeros, zeros, zeros)
  (_, _, arg_best, arg_worst, same, seen), _ = jax.lax.scan(block, init,
                                                            jnp.arange(Sp // c, dtype=jnp.int32))
  return arg_best, arg_worst, same, seen


def _query_region_share(q_regions, segment_ids):
  """`[B, T]`: the share of the call's query tokens (of the same packed segment) in each query's
  region. Query blocks against all T queries: O(T·block) memory."""
  B, T = q_regions.shape
  seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids)
  c = min(flex_xla.default_block_size()[0], _round_up(T, 8))
  Tp = _round_up(T, c)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, Tp - T)))
  reg_p, seg_p = pad(q_regions), pad(seg)

  def block(j):
    r = jax.lax.dynamic_slice_in_dim(reg_p, j * c, c, axis=1)[:, :, None]
    s = jax.lax.dynamic_slice_in_dim(seg_p, j * c, c, axis=1)[:, :, None]
    same_seg = s == seg[:, None, :]
    return (jnp.sum(jnp.logical_and(same_seg, r == q_regions[:, None, :]), -1),
            jnp.sum(same_seg, -1))

  same, total = jax.lax.map(block, jnp.arange(Tp // c, dtype=jnp.int32))
  unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(B, Tp)[:, :T].astype(jnp.float32)
  return unblock(same) / jnp.maximum(unblock(total), 1.0)


def region_modulated_attention(q: Query, k: Key, v: Value, *, q_regions: PerQueryToken,
                               kv_regions: PerKeyToken, causal: bool = False, segment_ids=None,
                               q_offset=0, kv_lengths: Optional[Lengths] = None,
                               scale: Optional[float] = None, implementation: Optional[str] = None,
                               strength: float = 0.3, timestep=None,
                               size_weighting: Optional[str] = "keys") -> Output:
  """Region-modulated attention (see the module docstring): same-region logits raised toward the row
  max, cross-region logits lowered toward the row min, by ξ(t)·(1 - region share)."""
  op = "region_modulated_attention"
  B, T, S, N, K, H, _ = checks.check_qkv(op, q, k, v)
  checks.check_shape(op, "q_regions", q_regions, (B, T), "[B, T]")
  checks.check_shape(op, "kv_regions", kv_regions, (B, S), "[B, S]")
  for name, ids in (("q_regions", q_regions), ("kv_regions", kv_regions)):
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
      raise ValueError(f"{op}: `{name}` must hold integer region ids, got {jnp.result_type(ids)}")
  if size_weighting not in SIZE_WEIGHTINGS:
    raise ValueError(f"{op}: `size_weighting` must be one of {SIZE_WEIGHTINGS}, got "
                     f"{size_weighting!r}")
  G = N // K
  scale = H ** -0.5 if scale is None else scale
  xi = jnp.asarray(strength, jnp.float32)
  if timestep is not None:
    xi = xi * ((jnp.asarray(timestep, jnp.float32) - 1.0) / NUM_TRAIN_TIMESTEPS) ** 5
  q_regions = jnp.asarray(q_regions, jnp.int32)
  kv_regions = jnp.asarray(kv_regions, jnp.int32)

  mask_mod = contract_mask(B=B, T=T, S=S, causal=causal, q_offset=q_offset,
                           segment_ids=segment_ids, kv_lengths=kv_lengths, op=op)
  arg_best, arg_worst, same, seen = _row_statistics(q, k, q_regions, kv_regions, mask_mod, scale)
  # m_i and n_i recomputed from q and k at the arg-extrema, so gradients reach both.
  qf = q.astype(jnp.float32).reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)      # [B,K,G,T,H]
  kg = jnp.broadcast_to(k.astype(jnp.float32).transpose(0, 2, 1, 3)[:, :, None], (B, K, G, S, H))
  pick = lambda idx: jnp.sum(qf * jnp.take_along_axis(kg, idx[..., None], axis=3), -1) * scale
  any_visible = seen > 0
  # A row with no visible key gets finite stand-ins; flex gives it zeros anyway.
  row_max = jnp.where(any_visible, pick(arg_best), 0.0).reshape(B, N, T)
  row_min = jnp.where(any_visible, pick(arg_worst), 0.0).reshape(B, N, T)
  if size_weighting == "keys":
    share = (same / jnp.maximum(seen, 1)).astype(jnp.float32).reshape(B, N, T)
  elif size_weighting == "queries":
    q_seg = segment_ids[0] if isinstance(segment_ids, (tuple, list)) else segment_ids
    share = _query_region_share(q_regions, q_seg)[:, None, :]
  else:
    share = jnp.zeros((1, 1, 1), jnp.float32)
  lam = jnp.broadcast_to(xi * (1.0 - share), (B, N, T))

  def score_mod(s, b, n, qi, ki):
    # Indices broadcast as [B, ., ., T, .]; tiles may run past T and S (padding): clip.
    qc, kc = jnp.clip(qi, 0, T - 1), jnp.clip(ki, 0, S - 1)
    positive = q_regions[b, qc] == kv_regions[b, kc]
    lam_i = lam[b, n, qc]
    return jnp.where(positive, s + lam_i * (row_max[b, n, qc] - s),
                     s - lam_i * (s - row_min[b, n, qc]))

  return flex_with_contract(op, q, k, v, causal=causal, segment_ids=segment_ids, q_offset=q_offset,
                            kv_lengths=kv_lengths, scale=scale, implementation=implementation,
                            score_mod=score_mod)


# The conformance suite and the layer draw ids in [0, num_values); the operator takes any ints.
_REGIONS = 4

register(Mechanism(
    name="region_modulated_attention", fn=region_modulated_attention, family="softmax-variant",
    seeds=(116,),
    paper="VideoGrain: Modulating Space-Time Attention for Multi-grained Video Editing",
    arxiv="2502.17258",
    token_inputs=(TokenInput("q_regions", side="q", kind="given", dtype="int", num_values=_REGIONS),
                  TokenInput("kv_regions", side="kv", kind="given", dtype="int",
                             num_values=_REGIONS)),
    # A strength above the authors' 0.3 so the tests see the modulation clearly.
    example={"strength": 0.8}))
