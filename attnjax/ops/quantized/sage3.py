"""SageAttention3: microscaling FP4 attention, and SageBwd, its trainable 8-bit form, emulated in jnp.

precision="fp4" (inference; the paper's Algorithm 1 with the authors' release's smoothing):

    K ← K - mean_j K_j (per channel, head and packed document); Q ← Q - q̄_b, q̄_b the mean of each
        block of `q_block` queries, its term ΔS = q̄_b Kᵀ added to the scores unquantized
    Q̂, K̂ = NVFP4 along the head dim, V̂ = NVFP4 along the keys: E2M1 values in 1×16 blocks of the
        reduction axis, each block with an E4M3 scale s = e4m3(max|x| / 6)
    S = scale · (Q̂ K̂ᵀ + ΔS),  P̃ = e^{S - m_τ} online over tiles of `k_block` keys
    two-level P: s₁ = rowmax(P̃_τ) / (448·6) per query row and tile, P̂ = NVFP4(P̃ / s₁)
    O = Σ_τ e^{…} (P̂_τ V̂_τ) s₁ / Σ P̃      (float32 accumulation; l from the unquantized P̃)

precision="int8" (SageBwd, the 8-bit attention for training): forward Q̂, K̂ (smoothed) int8 per
block of `q_block` queries / `k_block` keys with the softmax scale and log₂e folded into Q (scores in
base 2), P̃ int8 per query row of each tile (s = rowmax / 127), V̂ int8 per block of `k_block` keys;
backward (a custom VJP: the paper's backward is not autodiff of the quantized forward) quantizes six
of the seven matmuls to int8 per block and keeps dP = dO Vᵀ in 16 bit:

    S = Q̂K̂ᵀ s_Q s_K (recomputed),  P = e^{S - lse}     dV = int8(P)ᵀ int8(dO)
    dP = fp16(dO) fp16(V)ᵀ,  δ = rowsum(dO ∘ O),  dS = P ∘ (dP - δ)
    dQ = scale · int8(dS) K̂,  dK = scale · int8(dS)ᵀ Q̂

with int8(P), int8(dS) per block of `q_block` queries × `k_block` keys and int8(dO) per block of
`q_block` queries. dK is the gradient for the smoothed keys, which equals that for the keys: the
mean's share `-(1/S) Σ_j dK_j = -(1/S) Σ_i q_i Σ_j dS_ij` vanishes since every row of dS sums to 0.

Statistics (means, block maxima, V's blocks) follow `attnjax.core.quantize`: over the call's keys
that are not padding, per packed document; a key hidden by `causal` still enters them, as in the
authors' kernels. Masked keys get no weight; a row with no visible key gives zeros. Gradients of the
FP4 form: straight-through (those of exact softmax attention at the unquantized inputs).

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `[B,T,N,h]` (GQA when K divides N).
Paper: Zhang et al., "SageAttention3: Microscaling FP4 Attention for Inference and An Exploration of
8-Bit Training", arXiv:2505.11594 (code: github.com/thu-ml/SageAttention, sageattention3_blackwell).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import quantize
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, Value

__all__ = ["sage_attention3"]

_OP = "sage_attention3"
_PRECISIONS = ("fp4", "int8")
_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST


def _prepare(q, k, v, *, causal, segment_ids, q_offset, kv_lengths, scale, precision, smooth_k,
             smooth_q, q_block, k_block):
  """(score operands, P̃ quantizer, first key of each query's document, mask_mod, query groups)."""
  B, T, S, N, K, H, _ = checks.check_qkv(_OP, q, k, v)
  G = N // K
  mask_mod = contract.contract_mask(B=B, T=T, S=S, causal=causal, q_offset=q_offset,
                                    segment_ids=segment_ids, kv_lengths=kv_lengths, op=_OP)
  q_seg, kv_seg = quantize.segment_pair(segment_ids)
  if smooth_k:
    ks = quantize.smooth(k, segment_ids=kv_seg, lengths=kv_lengths)
  else:
    ks = contract.zero_padded(k, kv_lengths)
  v = contract.zero_padded(v, kv_lengths)
  q_groups = quantize.block_groups(B, T, q_block, q_seg)
  if precision == "fp4":
    qb = kb = None
    qs = q.astype(_F32)
    if smooth_q:
      qs = quantize.smooth(q, segment_ids=q_seg, block=q_block)
      qb, kb = (q.astype(_F32) - qs).reshape(B, T, K, G, H), ks
    ops = quantize.ScoreOperands(
        qa=quantize.quantize_nvfp4(qs).reshape(B, T, K, G, H), ka=quantize.quantize_nvfp4(ks),
        q_mult=jnp.ones((B, T, K, G), _F32), k_mult=jnp.ones((B, S, K), _F32), qb=qb, kb=kb,
        vd=quantize.quantize_nvfp4_tokens(v, quantize.block_groups(B, S, quantize.MICROBLOCK,
                                                                   kv_seg)),
        score_scale=scale, base2=False)
    p_quant = quantize.quantize_p_nvfp4
  else:
    k_groups = quantize.block_groups(B, S, k_block, kv_seg)
    v_int, v_scale = quantize.quantize_int8(v, k_groups)
    ops = quantize.int8_score_operands(q, ks, v_int * v_scale[..., None], scale=scale,
                                       q_groups=q_groups, k_groups=k_groups)
    p_quant = quantize.quantize_rows_int8
  first = None if q_seg is None else quantize.first_key_positions(q_seg, kv_seg)
  return ops, p_quant, first, mask_mod, q_groups


def _forward(q, k, v, *, implementation, **cfg):
  """`(out [B,T,N,h] float32, lse [B,T,N])` of the quantized forward."""
  ops, p_quant, first, mask_mod, _ = _prepare(q, k, v, **cfg)
  return quantize.blocked_attention(_OP, ops, mask_mod=mask_mod, first=first, tile=cfg["k_block"],
                                    p_quant=p_quant, implementation=implementation)


def _int8_blocks(x, q_groups, tile: int):
  """SageBwd's per-block int8 of a score-shaped `x [B,K,G,T,R]` (R keys relative to each query's
  first key, a multiple of `tile`), dequantized: one scale `max|x| / 127` per block of the query
  groups `q_groups [B,T]` × `tile` keys (per query head)."""
  B, K, G, T, R = x.shape
  tiles = x.reshape(B, K, G, T, R // tile, tile)
  amax = jnp.transpose(jnp.max(jnp.abs(tiles), axis=-1), (0, 3, 1, 2, 4))     # [B, T, K, G, n]
  s = jnp.transpose(quantize.group_absmax(amax, q_groups, channels=False), (0, 2, 3, 1, 4))
  s = s[..., None] / quantize.INT8_MAX
  q = jnp.clip(quantize.round_half_away(quantize.safe_divide(tiles, s)), -quantize.INT8_MAX,
               quantize.INT8_MAX)
  return (q * s).reshape(x.shape)


def _to_keys(spec_shared: str, spec_per_query: str, a, b, pos, S: int):
  """A key-side gradient `[B, S, K, c]` from score-shaped `a` and query-side `b`: summed over
  queries directly when the tiles start at key 0 (`pos [R]`), else per query and scattered to the
  key positions `pos [B, T, R]` (positions past S carry zeros)."""
  if pos.ndim == 1:
    return jnp.einsum(spec_shared, a, b, precision=_HIGHEST)[:, :S]
  per_query = jnp.einsum(spec_per_query, a, b, precision=_HIGHEST)          # [B, T, R, K, c]
  idx = jnp.clip(pos, 0, S - 1)
  zeros = jnp.zeros((per_query.shape[0], S) + per_query.shape[3:], _F32)
  return jax.vmap(lambda z, i, x: z.at[i.reshape(-1)].add(x.reshape((-1,) + x.shape[2:])))(
      zeros, idx, per_query)


def _sagebwd(res, g, *, scale: float, **cfg):
  """SageBwd's backward (see the module docstring): `(dq, dk, dv)`."""
  q, k, v, out, lse = res
  ops, _, first, mask_mod, q_groups = _prepare(q, k, v, scale=scale, **cfg)
  B, T, K, G, H = ops.qa.shape
  S, h, tile = k.shape[1], v.shape[-1], cfg["k_block"]
  pos = quantize.relative_positions(first, 0, -(-S // tile) * tile)
  keep = quantize.visible_at(mask_mod, B, T, S, pos)
  lse2 = jnp.transpose(lse.reshape(B, T, K, G), (0, 2, 3, 1)) / math.log(2.0)
  p = jnp.where(keep, jnp.exp2(quantize.scores_at(ops, pos) - lse2[..., None]), 0.0)
  do = g.astype(_F32)
  do_int, do_scale = quantize.quantize_int8(do, q_groups)
  do_q = (do_int * do_scale[..., None]).reshape(B, T, K, G, h)
  dv = _to_keys("bkgtr,btkgh->brkh", "bkgtr,btkgh->btrkh", _int8_blocks(p, q_groups, tile), do_q,
                pos, S)
  v16 = quantize.gather_keys(quantize.to_fp16(contract.zero_padded(v, cfg["kv_lengths"])), pos)
  spec = "btkgh,btrkh->bkgtr" if pos.ndim == 3 else "btkgh,brkh->bkgtr"
  dp = jnp.einsum(spec, quantize.to_fp16(do).reshape(B, T, K, G, h), v16, precision=_HIGHEST)
  delta = jnp.sum(do * out, axis=-1).reshape(B, T, K, G)
  ds = _int8_blocks(p * (dp - jnp.transpose(delta, (0, 2, 3, 1))[..., None]), q_groups, tile)
  k_hat = quantize.gather_keys(ops.ka * ops.k_mult[..., None], pos)
  spec = "bkgtr,btrkc->btkgc" if pos.ndim == 3 else "bkgtr,brkc->btkgc"
  dq = scale * jnp.einsum(spec, ds, k_hat, precision=_HIGHEST)
  q_hat = ops.qa * ops.q_mult[..., None] / (scale * math.log2(math.e))   # Q̂ in q's units
  dk = scale * _to_keys("bkgtr,btkgc->brkc", "bkgtr,btkgc->btrkc", ds, q_hat, pos, S)
  return (dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype))


def _trainable(q, k, v, cfg):
  """The int8 forward with SageBwd's backward as its VJP."""

  @jax.custom_vjp
  def fn(q, k, v):
    return _forward(q, k, v, **cfg)[0].astype(q.dtype)

  def fn_fwd(q, k, v):
    out, lse = _forward(q, k, v, **cfg)
    return out.astype(q.dtype), (q, k, v, out, lse)

  def fn_bwd(res, g):
    return _sagebwd(res, g, **{key: x for key, x in cfg.items() if key != "implementation"})

  fn.defvjp(fn_fwd, fn_bwd)
  return fn(q, k, v)


def sage_attention3(q: Query, k: Key, v: Value, *, causal: bool = False, segment_ids=None,
                    q_offset=0, kv_lengths: Optional[Lengths] = None,
                    scale: Optional[float] = None, implementation: Optional[str] = None,
                    precision: str = "fp4", smooth_k: bool = True,
                    smooth_q: Optional[bool] = None, q_block: int = 128,
                    k_block: int = 128) -> Output:
  """SageAttention3 (microscaling FP4 attention; `precision="int8"`: SageBwd, the trainable 8-bit
  form), emulated; see the module docstring. `smooth_q` (FP4 only; default on there): subtract each
  block of `q_block` queries' mean and add its term back unquantized; `k_block`: keys per tile (the
  online softmax's block; int8: also K's and V's quantization block; FP4: a multiple of 16)."""
  _, _, _, _, _, H, _ = checks.check_qkv(_OP, q, k, v)
  checks.check_implementation(_OP, implementation, ("xla", "reference"))
  quantize.check_blocks(_OP, q_block=q_block, k_block=k_block)
  if precision not in _PRECISIONS:
    raise ValueError(f"{_OP}: `precision` must be one of {_PRECISIONS}, got {precision!r}")
  if precision == "fp4" and k_block % quantize.MICROBLOCK:
    raise ValueError(f"{_OP}: `k_block` must be a multiple of {quantize.MICROBLOCK} for FP4 "
                     f"(P̃'s microscaling blocks), got {k_block}")
  if precision == "int8":
    if smooth_q:
      raise ValueError(f"{_OP}: `smooth_q` is for precision='fp4' (SageBwd smooths keys only)")
    quantize.check_int8_head_dim(_OP, H)
  smooth_q = precision == "fp4" if smooth_q is None else bool(smooth_q)
  scale = H ** -0.5 if scale is None else float(scale)
  masks = dict(causal=causal, segment_ids=segment_ids, q_offset=q_offset, kv_lengths=kv_lengths,
               scale=scale)
  cfg = dict(masks, implementation=implementation, precision=precision, smooth_k=smooth_k,
             smooth_q=smooth_q, q_block=q_block, k_block=k_block)
  if precision == "int8":
    return _trainable(q, k, v, cfg)
  return quantize.straight_through(
      lambda q, k, v: _forward(q, k, v, **cfg)[0].astype(q.dtype),
      lambda q, k, v: quantize.exact_attention(_OP, q, k, v, **masks,
                                               implementation=implementation), q, k, v)


register(Mechanism(
    name="sage_attention3", fn=sage_attention3, family="quantized", seeds=(117,),
    paper="SageAttention3: Microscaling FP4 Attention for Inference and An Exploration of 8-Bit "
          "Training", arxiv="2505.11594", decode=False, implementations=("xla", "reference"),
    # Not causal, as `sage_attention`: the smoothing means and block scales are taken over the
    # call's keys, so a causal row would depend on later keys through the quantization.
    patterns=frozenset({"self", "cross"}),
    # Tiles shorter than the test sequences (FP4 tiles: a multiple of the 16-value microblock).
    example={"q_block": 8, "k_block": 16}))
