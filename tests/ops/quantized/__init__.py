"""Float64 numpy rewrites of the low-precision formats and of the SageAttention papers' algorithms,
shared by the quantized tests; written from the papers' equations, independent of
`attnjax.core.quantize` (explicit loops over rows and key tiles, formats rounded on their grids).

Only the int8 quantizers run in float32, as the kernel does (`x / s + 0.5·sign`, truncated): their
integers are then the emulation's exactly, so the rewrite tests everything after them.
"""

import math

import numpy as np

LOG2E = math.log2(math.e)


# --------------------------------------------------------------------------------------------------
# Formats


def e2m1(x):
  """FP4 E2M1 on its grid: spacing 0.5 below 2, 1 in [2, 4), 2 in [4, 6]; ties to even; ±6 cap."""
  x = np.asarray(x, np.float64)
  a = np.minimum(np.abs(x), 6.0)
  e = np.clip(np.floor(np.log2(np.maximum(a, 1e-30))), 0, 2)   # binade, subnormals share binade 0
  step = 2.0 ** (e - 1)
  return np.sign(x) * np.minimum(np.round(a / step) * step, 6.0)   # np.round: halves to even


def e4m3(x):
  """FP8 E4M3 (3 mantissa bits, exponent bias 7, subnormal step 2^-9, largest 448), ties to even,
  saturating."""
  x = np.asarray(x, np.float64)
  a = np.minimum(np.abs(x), 448.0)
  e = np.maximum(np.floor(np.log2(np.maximum(a, 1e-30))), -6)
  step = 2.0 ** (e - 3)
  return np.sign(x) * np.minimum(np.round(a / step) * step, 448.0)


def fp16(x):
  return np.asarray(x, np.float64).astype(np.float16).astype(np.float64)


def nvfp4(x):
  """Microscaling FP4 along the last axis: blocks of 16 (a short last block as it is), scale
  e4m3(max|x| / 6), values e2m1(x / scale); dequantized."""
  x = np.asarray(x, np.float64)
  out = np.zeros_like(x)
  for start in range(0, x.shape[-1], 16):
    blk = x[..., start:start + 16]
    s = e4m3(np.max(np.abs(blk), axis=-1, keepdims=True) / 6.0)
    out[..., start:start + 16] = np.where(s > 0, e2m1(blk / np.where(s > 0, s, 1.0)) * s, 0.0)
  return out


def int8(x, multiplier=1.0):
  """One symmetric int8 block (all of `x`), float32 as the kernel: (integers, scale)."""
  x = np.asarray(x, np.float32) * np.float32(multiplier)
  s = np.float32(np.max(np.abs(x))) / np.float32(127.0)
  if s == 0:
    return np.zeros(x.shape, np.float64), 0.0
  r = x / s
  return np.clip(np.trunc(r + np.float32(0.5) * np.sign(r)), -127, 127).astype(np.float64), float(s)


def int8_rows(x, block, multiplier=1.0):
  """int8 per block of `block` rows of `x [L, C]` (all columns): dequantized values in units of
  `x · multiplier`, and the integers and per-row scales."""
  ints, scales = np.zeros(x.shape), np.zeros(x.shape[0])
  for start in range(0, x.shape[0], block):
    ints[start:start + block], scales[start:start + block] = int8(x[start:start + block], multiplier)
  return ints, scales


# --------------------------------------------------------------------------------------------------
# The attention loop of the papers (one query row at a time, key tiles in order)


def visible_row(i, S, *, causal, length, q_offset=0):
  """The keys query i sees: below `length`, and at most `i + q_offset` when causal."""
  j = np.arange(S)
  keep = j < length
  return keep & (j <= i + q_offset) if causal else keep


def online_row(scores, keep, values, tile, p_quant, base2):
  """Algorithm 1's inner loop for one query: tiles of `tile` keys, running maximum m, l from the
  unquantized p̃, the accumulator from p_quant(p̃) · values. Returns (o, lse in natural units)."""
  ex = np.exp2 if base2 else np.exp
  m, l, acc = -np.inf, 0.0, np.zeros(values.shape[-1])
  for start in range(0, len(scores), tile):
    sl = slice(start, start + tile)
    vis = keep[sl]
    if not vis.any():
      continue
    m_new = max(m, np.max(scores[sl][vis]))
    p = np.where(vis, ex(np.where(vis, scores[sl], m_new) - m_new), 0.0)
    alpha = ex(m - m_new) if np.isfinite(m) else 0.0
    l = alpha * l + p.sum()
    acc = alpha * acc + p_quant(p) @ values[sl]
    m = m_new
  if l == 0:
    return np.zeros_like(acc), 0.0
  lse = m + (np.log2(l) if base2 else np.log(l))
  return acc / l, lse * (math.log(2.0) if base2 else 1.0)


def smooth_rows(x):
  return x - x.mean(axis=0, keepdims=True)


def p_fp16(p):
  return fp16(p)


def p_fp8(p):
  return e4m3(448.0 * p) / 448.0


def p_two_level_fp4(p):
  """SageAttention3's P̃ of a tile row: s₁ = max / (448·6), then NVFP4 blocks of 16 keys."""
  s1 = np.max(p) / (448.0 * 6.0)
  return nvfp4(p / s1) * s1 if s1 > 0 else np.zeros_like(p)


def p_int8_row(p):
  ints, s = int8(p)
  return ints * s


def sage_int8(q, k, v, *, causal=False, kv_lengths=None, scale=None, q_block=128, k_block=64,
              pv="fp16", smooth_k=True):
  """SageAttention (arXiv:2410.02367): `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  S, K, h = k.shape[1], k.shape[2], v.shape[3]
  scale = H ** -0.5 if scale is None else scale
  out = np.zeros((B, T, N, h))
  for b in range(B):
    L = S if kv_lengths is None else int(kv_lengths[b])
    for kh in range(K):
      kb, vb = np.zeros((S, H)), np.zeros((S, h))
      kb[:L] = smooth_rows(k[b, :L, kh]) if smooth_k else k[b, :L, kh]
      vb[:L] = v[b, :L, kh]
      k_int, k_s = int8_rows(kb.astype(np.float32), k_block)
      if pv == "fp16":
        vq, p_quant = fp16(vb), p_fp16
      else:
        sc = np.max(np.abs(vb[:L]), axis=0) / 448.0
        vq, p_quant = np.where(sc > 0, e4m3(vb / np.where(sc > 0, sc, 1.0)) * sc, 0.0), p_fp8
      for n in range(kh * (N // K), (kh + 1) * (N // K)):
        q_int, q_s = int8_rows(q[b, :, n], q_block, scale * LOG2E)
        for i in range(T):
          scores = (k_int @ q_int[i]) * q_s[i] * k_s
          out[b, i, n] = online_row(scores, visible_row(i, S, causal=causal, length=L), vq,
                                    k_block, p_quant, base2=True)[0]
  return out


def sage3_fp4(q, k, v, *, causal=False, kv_lengths=None, scale=None, q_block=128, k_block=128,
              smooth_k=True, smooth_q=True):
  """SageAttention3's FP4 attention (arXiv:2505.11594, Algorithm 1; Q smoothing of the authors'
  release): float64 `[B,T,N,h]`."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  S, K, h = k.shape[1], k.shape[2], v.shape[3]
  scale = H ** -0.5 if scale is None else scale
  out = np.zeros((B, T, N, h))
  for b in range(B):
    L = S if kv_lengths is None else int(kv_lengths[b])
    for kh in range(K):
      kb, vb = np.zeros((S, H)), np.zeros((S, h))
      kb[:L] = smooth_rows(k[b, :L, kh]) if smooth_k else k[b, :L, kh]
      vb[:L] = v[b, :L, kh]
      vq = np.zeros_like(vb)                   # NVFP4 along the keys: 16-token blocks per channel
      for start in range(0, S, 16):
        vq[start:start + 16] = nvfp4(vb[start:start + 16].T).T
      for n in range(kh * (N // K), (kh + 1) * (N // K)):
        qn = q[b, :, n]
        qm = np.zeros_like(qn)
        if smooth_q:
          for start in range(0, T, q_block):
            qm[start:start + q_block] = qn[start:start + q_block].mean(axis=0)
        qq, kq = nvfp4(qn - qm), nvfp4(kb)
        for i in range(T):
          scores = scale * (kq @ qq[i] + kb @ qm[i])
          out[b, i, n] = online_row(scores, visible_row(i, S, causal=causal, length=L), vq,
                                    k_block, p_two_level_fp4, base2=False)[0]
  return out


def _sagebwd_head(qn, kb, vb, vq, don, keep, *, scale, q_block, k_block):
  """SageBwd for one query head against its key/value head: forward (o, lse) and (dq, dk, dv)."""
  T, S = qn.shape[0], kb.shape[0]
  q_int, q_s = int8_rows(qn, q_block, scale * LOG2E)
  k_int, k_s = int8_rows(kb.astype(np.float32), k_block)
  s2 = (q_int @ k_int.T) * q_s[:, None] * k_s[None]                   # base-2 scores
  o, lse = np.zeros((T, vb.shape[1])), np.zeros(T)
  for i in range(T):
    o[i], lse[i] = online_row(s2[i], keep[i], vq, k_block, p_int8_row, base2=True)
  p = np.where(keep, np.exp2(s2 - lse[:, None] / math.log(2.0)), 0.0)

  def blocks(x):                                   # int8 per q_block × k_block block, dequantized
    y = np.zeros_like(x)
    for r in range(0, T, q_block):
      for c in range(0, S, k_block):
        ints, s = int8(x[r:r + q_block, c:c + k_block])
        y[r:r + q_block, c:c + k_block] = ints * s
    return y

  do_int, do_s = int8_rows(don, q_block)
  dv = blocks(p).T @ (do_int * do_s[:, None])
  dp = fp16(don) @ fp16(vb).T
  ds = blocks(p * (dp - np.sum(don * o, axis=1, keepdims=True)))
  dq = scale * ds @ (k_int * k_s[:, None])
  dk = scale * ds.T @ (q_int * q_s[:, None] / (scale * LOG2E))
  return o, dq, dk, dv


def sagebwd(q, k, v, do, *, causal=False, kv_lengths=None, scale=None, q_block=128, k_block=128):
  """SageAttention3's 8-bit trainable attention (SageBwd): forward with int8 Q̂K̂ᵀ, P̃ (per row of a
  tile) and V̂ (per block of keys), and the backward with six int8 matmuls and dP = dO Vᵀ in fp16.
  Returns float64 (out, dq, dk, dv) for the output cotangent `do [B,T,N,h]`."""
  q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
  B, T, N, H = q.shape
  S, K, h = k.shape[1], k.shape[2], v.shape[3]
  scale = H ** -0.5 if scale is None else scale
  out, dq = np.zeros((B, T, N, h)), np.zeros((B, T, N, H))
  dk, dv = np.zeros((B, S, K, H)), np.zeros((B, S, K, h))
  for b in range(B):
    L = S if kv_lengths is None else int(kv_lengths[b])
    keep = np.stack([visible_row(i, S, causal=causal, length=L) for i in range(T)])
    for kh in range(K):
      kb, vb = np.zeros((S, H)), np.zeros((S, h))
      kb[:L] = smooth_rows(k[b, :L, kh])
      vb[:L] = v[b, :L, kh]
      v_int, v_s = int8_rows(vb, k_block)
      for n in range(kh * (N // K), (kh + 1) * (N // K)):
        o, dqn, dkn, dvn = _sagebwd_head(q[b, :, n], kb, vb, v_int * v_s[:, None], do[b, :, n],
                                         keep, scale=scale, q_block=q_block, k_block=k_block)
        out[b, :, n], dq[b, :, n] = o, dqn
        dk[b, :, kh] += dkn
        dv[b, :, kh] += dvn
  return out, dq, dk, dv
