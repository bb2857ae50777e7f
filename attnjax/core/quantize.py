"""Low-precision formats emulated in float32, and the blocked attention loop of quantized attention
(SageAttention's int8 / fp8 / fp16 paths, SageAttention3's microscaling FP4 and 8-bit paths).

Formats (every value is returned dequantized or as the integers / grid values, in float32, so the
emulation runs on any platform; the casts use JAX's `float8_e4m3fn` / `float4_e2m1fn`):

  int8      `x̂ = clip(round_half_away(x / s), ±127)`, `s = max|x| / 127` over a block (the rounding
            of the authors' kernel: `x / s + 0.5·sign`, truncated)
  E4M3      8-bit float (FP8), 3 mantissa bits, largest 448, saturating here (JAX's cast makes NaN)
  E2M1      4-bit float (FP4): the values 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives
  NVFP4     microscaling: E2M1 values in 1×16 blocks along the reduction axis, each block with an
            E4M3 scale `s = e4m3(max|x| / 6)`; `x ≈ e2m1(x / s) · s`
  fp16      IEEE half precision

Statistics per group of tokens (`block_groups`): a group is `block` consecutive tokens of one batch
row counted from the start of its packed document (as a varlen kernel tiles each sequence from its
own start), so packed sequences quantize as they would alone. Slots at or past `kv_lengths` are
zeroed and take part in no statistic.

The attention loop (`blocked_attention`): scores of a query against a tile of `tile` keys counted
from the first key of the query's document, the online softmax of FlashAttention with a running
maximum per tile (`p̃ = exp(s - m_tile)`), `p̃` quantized per tile by `p_quant` before the product
with the values, and `l = Σ p̃` in float32 from the unquantized `p̃`:

    m_τ = max(m_{τ-1}, max_{j∈τ} s_ij)     l_τ = e^{m_{τ-1}-m_τ} l_{τ-1} + Σ_{j∈τ} p̃_ij
    acc_τ = e^{m_{τ-1}-m_τ} acc_{τ-1} + Σ_{j∈τ} p_quant(p̃)_ij v_j           o_i = acc / l

"xla" runs it tile by tile (`lax.scan`); "reference" materializes the scores `[B, K, G, T, R]` and
applies the same per-tile maxima and quantization at once (R = tiles · tile). Both quantize
identically, so they agree to float32 rounding.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]`, G = N / K query heads per key/value head.
Papers: Zhang et al., "SageAttention: Accurate 8-Bit Attention for Plug-and-play Inference
Acceleration", arXiv:2410.02367; Zhang et al., "SageAttention3: Microscaling FP4 Attention for
Inference and An Exploration of 8-Bit Training", arXiv:2505.11594.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from attnjax.core import contract
from attnjax.core import implementations

__all__ = ["INT8_MAX", "E4M3_MAX", "E2M1_MAX", "MICROBLOCK", "round_half_away", "to_e4m3",
           "to_e2m1", "to_fp16", "safe_divide", "block_groups", "group_absmax", "smooth",
           "quantize_int8", "quantize_fp8_channels", "quantize_nvfp4", "quantize_nvfp4_tokens",
           "quantize_p_fp16", "quantize_p_fp8", "quantize_p_nvfp4", "quantize_rows_int8",
           "ScoreOperands", "blocked_attention", "first_key_positions", "relative_positions",
           "gather_keys", "scores_at", "values_at", "visible_at", "straight_through",
           "MAX_EXACT_HEAD_DIM", "check_blocks", "check_int8_head_dim", "segment_pair",
           "exact_attention", "int8_score_operands"]

_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST
INT8_MAX = 127.0
E4M3_MAX = 448.0
E2M1_MAX = 6.0
MICROBLOCK = 16          # NVFP4's block of values sharing one E4M3 scale
# Largest head dim whose int8 dot products float32 sums exactly (H · 127² < 2²⁴).
MAX_EXACT_HEAD_DIM = (1 << 24) // 127 ** 2


# --------------------------------------------------------------------------------------------------
# Formats


def round_half_away(x: jax.Array) -> jax.Array:
  """Rounds to the nearest integer, halves away from zero (the kernel's `x + 0.5·sign`, truncated)."""
  return jnp.trunc(x + 0.5 * jnp.sign(x))


def to_e4m3(x: jax.Array) -> jax.Array:
  """`x` rounded to FP8 E4M3 (nearest, ties to even; saturating at ±448), as float32."""
  return jnp.clip(x, -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn).astype(_F32)


def to_e2m1(x: jax.Array) -> jax.Array:
  """`x` rounded to FP4 E2M1 (nearest, ties to even; saturating at ±6), as float32."""
  return jnp.clip(x, -E2M1_MAX, E2M1_MAX).astype(jnp.float4_e2m1fn).astype(_F32)


def to_fp16(x: jax.Array) -> jax.Array:
  """`x` rounded to IEEE half precision, as float32."""
  return x.astype(jnp.float16).astype(_F32)


def safe_divide(x: jax.Array, s: jax.Array) -> jax.Array:
  """`x / s`, 0 where `s` is 0 (a block of zeros quantizes to zeros)."""
  return jnp.where(s > 0, x / jnp.where(s > 0, s, 1.0), 0.0)


# --------------------------------------------------------------------------------------------------
# Groups of tokens and their statistics


def block_groups(B: int, L: int, block: int, segment_ids=None) -> jax.Array:
  """`[B, L]` int32: each token's group, named by the position of the group's first token: `block`
  consecutive tokens counted from the start of the token's packed document (`segment_ids [B, L]`;
  the whole row without)."""
  start, _ = contract.document_bounds(segment_ids, B, L)
  idx = jnp.arange(L, dtype=jnp.int32)[None]
  return start + (idx - start) // block * block


def _group_reduce(x: jax.Array, groups: jax.Array, reduce) -> jax.Array:
  """`reduce` (segment_max / segment_sum) of `x [B, L, ...]` over the tokens of each group of
  `groups [B, L]`, broadcast back to every token of the group: `[B, L, ...]`."""
  L = x.shape[1]
  return jax.vmap(lambda xb, gb: reduce(xb, gb, num_segments=L)[gb])(x, groups)


def group_absmax(x: jax.Array, groups: jax.Array, *, channels: bool = True) -> jax.Array:
  """`max |x|` over the tokens of each group (and over the last axis when `channels`), per token:
  `[B, L, ..., 1]` (or `[B, L, ...]`), for `x [B, L, ..., C]`."""
  a = jnp.abs(x.astype(_F32))
  if channels:
    a = jnp.max(a, axis=-1, keepdims=True)
  return _group_reduce(a, groups, jax.ops.segment_max)


def smooth(x: jax.Array, *, segment_ids=None, lengths=None, block: Optional[int] = None
           ) -> jax.Array:
  """`x_j - mean x` per channel and head over the tokens of each group: SageAttention's key
  smoothing over a packed document (`block=None`; the call's row without `segment_ids`), or
  SageAttention3's query smoothing over blocks of `block` tokens. Slots at or past `lengths` take
  no part and are 0 in the result. Float32, the shape of `x [B, L, K, C]`.

  For keys it is softmax-invariant (every score of a query moves by the same `q·mean`) and removes
  the common offset of outlier channels before quantization.
  """
  B, L = x.shape[:2]
  valid = contract.valid_slots(B, L, lengths)[:, :, None, None].astype(_F32)
  x = contract.zero_padded(x, lengths)
  groups = block_groups(B, L, L if block is None else block, segment_ids)
  total = _group_reduce(x, groups, jax.ops.segment_sum)
  count = _group_reduce(jnp.broadcast_to(valid, x.shape[:3] + (1,)), groups, jax.ops.segment_sum)
  return (x - safe_divide(total, count)) * valid


def quantize_int8(x: jax.Array, groups: jax.Array, *, multiplier: float = 1.0):
  """Symmetric per-block int8 of `x [B, L, K, C]`: `(x̂, s)` with integer values `x̂` in [-127, 127]
  (float32) and scales `s [B, L, K]` = `max |multiplier · x| / 127` over the block (the group's
  tokens and all C channels, per head); `x ≈ x̂ · s / multiplier`."""
  x = x.astype(_F32) * multiplier
  s = group_absmax(x, groups)[..., 0] / INT8_MAX
  return jnp.clip(round_half_away(safe_divide(x, s[..., None])), -INT8_MAX, INT8_MAX), s


def quantize_fp8_channels(x: jax.Array, groups: jax.Array) -> jax.Array:
  """SageAttention's per-channel FP8 values: `e4m3(x / s_c) · s_c` with `s_c = max |x_c| / 448` over
  the tokens of each group (a packed document) per head and channel, float32 `[B, L, K, C]`."""
  s = group_absmax(x, groups, channels=False) / E4M3_MAX
  return to_e4m3(safe_divide(x.astype(_F32), s)) * s


def _nvfp4_last_axis(x: jax.Array, amax: jax.Array) -> jax.Array:
  """`e2m1(x / s) · s` with `s = e4m3(amax / 6)` broadcast against `x` (dequantized NVFP4)."""
  s = to_e4m3(amax / E2M1_MAX)
  return to_e2m1(safe_divide(x, s)) * s


def quantize_nvfp4(x: jax.Array) -> jax.Array:
  """Microscaling FP4 along the last axis, dequantized: blocks of 16 consecutive values, each with
  an E4M3 scale `s = e4m3(max|x| / 6)` and E2M1 values `e2m1(x / s)` (a last partial block is
  padded with zeros, which change no maximum). Float32, the shape of `x`."""
  x = x.astype(_F32)
  C = x.shape[-1]
  width = -(-C // MICROBLOCK) * MICROBLOCK
  xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - C)])
  blocks = xp.reshape(x.shape[:-1] + (width // MICROBLOCK, MICROBLOCK))
  amax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
  return _nvfp4_last_axis(blocks, amax).reshape(xp.shape)[..., :C]


def quantize_nvfp4_tokens(x: jax.Array, groups: jax.Array) -> jax.Array:
  """Microscaling FP4 along the token axis (SageAttention3's V, whose reduction axis in P·V is the
  keys): per head and channel, blocks are the token groups `groups [B, L]` (16 tokens), dequantized
  float32 `[B, L, K, C]`."""
  return _nvfp4_last_axis(x.astype(_F32), group_absmax(x, groups, channels=False))


def quantize_p_fp16(p: jax.Array) -> jax.Array:
  """SageAttention's P̃ in fp16 (the fp16 P̃·V path)."""
  return to_fp16(p)


def quantize_p_fp8(p: jax.Array) -> jax.Array:
  """SageAttention's P̃ in FP8 with the static scale 1/448 (`e4m3(448 p̃) / 448`): p̃ ≤ 1."""
  return to_e4m3(E4M3_MAX * p) / E4M3_MAX


def quantize_p_nvfp4(p: jax.Array) -> jax.Array:
  """SageAttention3's two-level quantization of a tile of P̃ (last axis: the tile's keys, a multiple
  of 16): each row scaled into `[0, 448·6]` first (`s₁ = rowmax(p̃) / (448·6)`, float32), then NVFP4
  blocks of 16 keys, so the blocks' E4M3 scales use FP8's whole range: `p̂ = nvfp4(p̃ / s₁) · s₁`."""
  s1 = jnp.max(p, axis=-1, keepdims=True) / (E4M3_MAX * E2M1_MAX)
  return quantize_nvfp4(safe_divide(p, s1)) * s1


def quantize_rows_int8(x: jax.Array) -> jax.Array:
  """Per-row int8 along the last axis, dequantized: `round_half_away(x / s) · s`, `s = max|x| / 127`
  (SageBwd's P̃ of a tile, one scale per query row)."""
  s = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / INT8_MAX
  return jnp.clip(round_half_away(safe_divide(x, s)), -INT8_MAX, INT8_MAX) * s


# --------------------------------------------------------------------------------------------------
# The blocked attention loop


class ScoreOperands(NamedTuple):
  """What the scores are made of: `s_ij = score_scale · ((qa_i · ka_j) · q_mult_i · k_mult_j + qb_i ·
  kb_j)`, in base-2 units when `base2` (p̃ = 2^{s - m}).

  qa `[B,T,K,G,C]` / ka `[B,S,K,C]`: quantized values (int8 integers, whose product float32 holds
  exactly for C·127² < 2²⁴, or dequantized values); q_mult `[B,T,K,G]` / k_mult `[B,S,K]`: their
  per-token scales; qb `[B,T,K,G,H]` / kb `[B,S,K,H]`: an unquantized term (SageAttention3's
  `ΔS = q̄ kᵀ` of Q smoothing) or None; vd `[B,S,K,h]`: the dequantized values.
  """
  qa: jax.Array
  ka: jax.Array
  q_mult: jax.Array
  k_mult: jax.Array
  qb: Optional[jax.Array]
  kb: Optional[jax.Array]
  vd: jax.Array
  score_scale: float
  base2: bool


def first_key_positions(q_segment_ids, kv_segment_ids) -> jax.Array:
  """`[B, T]` int32: the first key position of each query's document (its tiles start there)."""
  same = jnp.asarray(kv_segment_ids)[:, None, :] == jnp.asarray(q_segment_ids)[:, :, None]
  return jnp.argmax(same, axis=-1).astype(jnp.int32)


def relative_positions(first: Optional[jax.Array], start: int, width: int) -> jax.Array:
  """Key positions `first + start + arange(width)`: `[B, T, width]`, or `[width]` when `first` is None
  (every query's tiles start at key 0)."""
  r = start + jnp.arange(width, dtype=jnp.int32)
  return r if first is None else first[:, :, None] + r


def gather_keys(x: jax.Array, pos: jax.Array) -> jax.Array:
  """`x [B, S, ...]` at key positions `pos` (`[R]` → `[B, R, ...]`; `[B, T, R]` → `[B, T, R, ...]`),
  clipped into range (the positions past S are masked by the caller)."""
  pos = jnp.clip(pos, 0, x.shape[1] - 1)
  if pos.ndim == 1:
    return jnp.take(x, pos, axis=1)
  return jax.vmap(lambda xb, pb: xb[pb])(x, pos)


def scores_at(ops: ScoreOperands, pos: jax.Array) -> jax.Array:
  """Scores `[B, K, G, T, R]` of every query against the keys at `pos` (see `relative_positions`)."""
  per_query = pos.ndim == 3
  ka, km = gather_keys(ops.ka, pos), gather_keys(ops.k_mult, pos)
  spec = "btkgc,btrkc->bkgtr" if per_query else "btkgc,brkc->bkgtr"
  s = jnp.einsum(spec, ops.qa, ka, precision=_HIGHEST)
  km = jnp.moveaxis(km, -1, 1)[:, :, None] if per_query else jnp.moveaxis(km, -1, 1)[:, :, None, None]
  s = s * jnp.transpose(ops.q_mult, (0, 2, 3, 1))[..., None] * km
  if ops.qb is not None:
    s = s + jnp.einsum(spec, ops.qb, gather_keys(ops.kb, pos), precision=_HIGHEST)
  return s * ops.score_scale


def values_at(ops: ScoreOperands, p: jax.Array, pos: jax.Array) -> jax.Array:
  """`Σ_r p[..., t, r] v[pos_r]`: `[B, K, G, T, h]`."""
  spec = "bkgtr,btrkh->bkgth" if pos.ndim == 3 else "bkgtr,brkh->bkgth"
  return jnp.einsum(spec, p, gather_keys(ops.vd, pos), precision=_HIGHEST)


def visible_at(mask_mod, B: int, T: int, S: int, pos: jax.Array) -> jax.Array:
  """The contract's mask at `pos`: bool `[B, 1, 1, T, R]` (positions past S hidden)."""
  kv = pos[:, None] if pos.ndim == 3 else pos[None, None, None]
  keep = kv < S
  if mask_mod is not None:
    b = jnp.arange(B, dtype=jnp.int32)[:, None, None, None]
    q_idx = jnp.arange(T, dtype=jnp.int32)[None, None, :, None]
    keep = keep & mask_mod(b, jnp.zeros((), jnp.int32), q_idx, jnp.clip(kv, 0, S - 1))
  return jnp.broadcast_to(keep, (B, 1, T, pos.shape[-1]))[:, :, None]


def _exp(ops: ScoreOperands, x):
  return jnp.exp2(x) if ops.base2 else jnp.exp(x)


def _finish(ops: ScoreOperands, acc, l, m):
  """`(o [B,T,N,h], lse [B,T,N])` from the loop's state (lse in natural units, 0 on empty rows)."""
  B, K, G, T, h = acc.shape
  some = l > 0
  out = jnp.where(some[..., None], acc / jnp.where(some, l, 1.0)[..., None], 0.0)
  lse = jnp.where(some, m + (jnp.log2 if ops.base2 else jnp.log)(jnp.where(some, l, 1.0)), 0.0)
  lse = lse * (math.log(2.0) if ops.base2 else 1.0)
  out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(B, T, K * G, h)
  return out, jnp.transpose(lse, (0, 3, 1, 2)).reshape(B, T, K * G)


def _blocked_xla(ops: ScoreOperands, *, mask_mod, first, tile: int, p_quant):
  B, T, K, G, _ = ops.qa.shape
  S, h = ops.ka.shape[1], ops.vd.shape[-1]

  def step(carry, tau):
    m, l, acc = carry
    pos = relative_positions(first, 0, tile) + tau * tile
    keep = visible_at(mask_mod, B, T, S, pos)
    s = jnp.where(keep, scores_at(ops, pos), -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.where(keep, _exp(ops, s - m_safe[..., None]), 0.0)
    alpha = jnp.where(jnp.isfinite(m), _exp(ops, m - m_safe), 0.0)
    l = alpha * l + jnp.sum(p, axis=-1)
    acc = alpha[..., None] * acc + values_at(ops, p_quant(p), pos)
    return (m_new, l, acc), None

  init = (jnp.full((B, K, G, T), -jnp.inf, _F32), jnp.zeros((B, K, G, T), _F32),
          jnp.zeros((B, K, G, T, h), _F32))
  (m, l, acc), _ = jax.lax.scan(step, init, jnp.arange(-(-S // tile), dtype=jnp.int32))
  return _finish(ops, acc, l, m)


def _blocked_reference(ops: ScoreOperands, *, mask_mod, first, tile: int, p_quant):
  B, T, K, G, _ = ops.qa.shape
  S = ops.ka.shape[1]
  n = -(-S // tile)
  pos = relative_positions(first, 0, n * tile)
  keep = visible_at(mask_mod, B, T, S, pos)
  s = jnp.where(keep, scores_at(ops, pos), -jnp.inf).reshape(B, K, G, T, n, tile)
  m = jax.lax.cummax(jnp.max(s, axis=-1), axis=4)                      # running maximum per tile
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(keep.reshape(B, 1, 1, T, n, tile), _exp(ops, s - m_safe[..., None]), 0.0)
  last = m_safe[..., -1:]
  weight = jnp.where(jnp.isfinite(m), _exp(ops, m_safe - last), 0.0)   # e^{m_τ - m_final}
  l = jnp.sum(jnp.sum(p, axis=-1) * weight, axis=-1)
  pq = (p_quant(p) * weight[..., None]).reshape(B, K, G, T, n * tile)
  return _finish(ops, values_at(ops, pq, pos), l, m[..., -1])


_IMPLEMENTATIONS = (("xla", _blocked_xla, ()), ("reference", _blocked_reference, ()))


def blocked_attention(op: str, ops: ScoreOperands, *, mask_mod, first: Optional[jax.Array],
                      tile: int, p_quant: Callable[[jax.Array], jax.Array],
                      implementation: Optional[str] = None) -> tuple[jax.Array, jax.Array]:
  """Quantized online-softmax attention over key tiles (see the module docstring).

  Args:
    op: the operator's name, for errors.
    ops: the score operands and dequantized values.
    mask_mod: the contract's mask (`contract.contract_mask`) or None.
    first: `[B, T]` first key of each query's document (`first_key_positions`), or None (key 0).
    tile: keys per tile (the online softmax's block, and the block `p_quant` sees).
    p_quant: the dequantized P̃ of a tile, along the last axis (`quantize_p_*`).
    implementation: "xla" (tile by tile) or "reference" (dense).

  Returns:
    `(out [B, T, N, h], lse [B, T, N])`, float32; `lse = log Σ_j e^{s_ij}` in natural units (0 on a
    row that sees no key, whose output is 0).
  """
  return implementations.dispatch(op, _IMPLEMENTATIONS, implementation, ops, mask_mod=mask_mod,
                                  first=first, tile=tile, p_quant=p_quant)


def straight_through(forward: Callable, surrogate: Callable, *args):
  """`forward(*args)` with the gradients of `surrogate(*args)` (a straight-through estimator: the
  quantized forward, the backward of the unquantized computation)."""

  @jax.custom_vjp
  def fn(*a):
    return forward(*a)

  def fn_fwd(*a):
    return forward(*a), a

  def fn_bwd(res, g):
    return jax.vjp(surrogate, *res)[1](g)

  fn.defvjp(fn_fwd, fn_bwd)
  return fn(*args)


# --------------------------------------------------------------------------------------------------
# Shared by the quantized mechanisms


def check_blocks(op: str, **blocks: int) -> None:
  """Raises ValueError unless every named block size is a positive int."""
  for name, size in blocks.items():
    if not isinstance(size, int) or size < 1:
      raise ValueError(f"{op}: `{name}` must be a positive int, got {size!r}")


def check_int8_head_dim(op: str, H: int) -> None:
  """Raises ValueError when float32 cannot sum H int8 products exactly (H > MAX_EXACT_HEAD_DIM)."""
  if H > MAX_EXACT_HEAD_DIM:
    raise ValueError(f"{op}: head dim H = {H} of `q` [B, T, N, H] is above {MAX_EXACT_HEAD_DIM}, "
                     "where float32 no longer sums the int8 products exactly")


def segment_pair(segment_ids):
  """`(query ids [B,T], key ids [B,S])` of the contract's `segment_ids` (one array or a pair)."""
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, (tuple, list)):
    return tuple(jnp.asarray(s) for s in segment_ids)
  return jnp.asarray(segment_ids), jnp.asarray(segment_ids)


def exact_attention(op: str, q, k, v, *, causal, segment_ids, q_offset, kv_lengths, scale,
                    implementation):
  """Full-precision softmax attention under the contract (the straight-through surrogate)."""
  flex_impl = "reference" if implementation == "reference" else "xla"
  return contract.flex_with_contract(op, q, k, v, causal=causal, segment_ids=segment_ids,
                                     q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                                     implementation=flex_impl)


def int8_score_operands(q, ks, vd, *, scale: float, q_groups, k_groups) -> ScoreOperands:
  """SageAttention's int8 QKᵀ operands: Q (times `scale · log₂e`, scores in base 2) and the smoothed
  keys `ks` quantized per block (`q_groups [B,T]`, `k_groups [B,S]`); `vd` the dequantized values."""
  B, T, N, H = q.shape
  K = ks.shape[2]
  q_int, q_scale = quantize_int8(q, q_groups, multiplier=scale * math.log2(math.e))
  k_int, k_scale = quantize_int8(ks, k_groups)
  G = N // K
  return ScoreOperands(
      qa=q_int.reshape(B, T, K, G, H), ka=k_int, q_mult=q_scale.reshape(B, T, K, G),
      k_mult=k_scale, qb=None, kb=None, vd=vd, score_scale=1.0, base2=True)
