"""Low-rank and compressed-key attention: Linformer, Agent attention, RITA group attention, YOSO.

Each replaces the `[T, S]` softmax by attention over a small set of summary tokens (projected,
pooled or clustered keys) or, for YOSO, by a hashing estimate of a collision-probability kernel:

  linformer_attention   softmax(Q (E K)ᵀ s) (F V)                E, F: [k, S_max] learned     O(T·k)
  agent_attention       softmax(Q Aᵀ s) softmax(A Kᵀ s) V + DWC(V),  A = pool(Q), n agents    O(T·n)
  group_attention       softmax(Q Cᵀ s + log |g|) V̄              C: k-means centroids of K   O(T·G)
  yoso_attention        Σ_j (1 - arccos(q̂·k̂_j)/π)^τ v_j, L2-normalised; LSH-sampled        O(T·m)

The softmax parts reuse `attnjax.ops.dot_product.dot_product_attention` (so `implementation=`
picks its "xla" or "reference" path); statistics are float32 and outputs come back in q's dtype.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import checks
from attnjax.core import masks
from attnjax.ops.dot_product import contract_mask, dot_product_attention
from attnjax.registry import Mechanism, ParamSpec, register

_F32 = jnp.float32

# Fixed sizes of the learned arrays the Flax layer creates (ParamSpec shapes cannot depend on S).
LINFORMER_MAX_LENGTH = 512     # n in the paper: the longest sequence the projections cover
LINFORMER_PROJ_DIM = 128       # k in the paper (their experiments use k = 128 and 256 at n = 512)
AGENT_NUM = 49                 # the paper's default number of agent tokens (7 x 7)
AGENT_BIAS_LENGTH = 7          # low-resolution agent bias, interpolated to the sequence length
AGENT_DWC_KERNEL = 3           # depthwise-conv kernel on the values (3 x 3 in the paper's 2-D form)


def _lengths(op: str, kv_lengths, B: int, S: int):
  """`kv_lengths` validated as `[B]` int32, or S for every row when absent."""
  if kv_lengths is None:
    return jnp.full((B,), S, jnp.int32)
  checks.check_shape(op, "kv_lengths", kv_lengths, (B,), "[B]")
  return jnp.asarray(kv_lengths, jnp.int32)


def _only_reference(op: str, implementation: Optional[str]):
  if implementation not in (None, "reference"):
    raise ValueError(f"{op}: unknown implementation {implementation!r}; choose from ['reference']")


def _no_causal_or_packing(op: str, *, causal: bool, segment_ids, why: str):
  # Mechanism.__call__ checks patterns; direct calls of the function get the same clear error.
  if causal:
    raise ValueError(f"{op}: causal attention is not defined for this mechanism ({why})")
  if segment_ids is not None:
    raise ValueError(f"{op}: packed sequences (`segment_ids`) are not supported ({why})")


# --------------------------------------------------------------------------------------------------
# Linformer


def linformer_attention(q, k, v, *, proj_k, proj_v, causal=False, segment_ids=None, q_offset=0,
                        kv_lengths=None, scale=None, implementation=None):
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
  _no_causal_or_packing(op, causal=causal, segment_ids=segment_ids,
                        why="E K mixes every key position")
  for name, p in (("proj_k", proj_k), ("proj_v", proj_v)):
    if jnp.ndim(p) != 3 or p.shape[0] not in (1, K) or p.shape[1:] != proj_k.shape[1:]:
      raise ValueError(f"{op}: `{name}` must have shape [K={K} or 1, k, n] (and match proj_k "
                       f"{jnp.shape(proj_k)}), got {jnp.shape(p)}")
  k_proj, max_len = proj_k.shape[1:]
  if S > max_len:
    raise ValueError(f"{op}: the key length S={S} exceeds the projections' maximum length "
                     f"n={max_len}; create proj_k / proj_v with at least {S} columns")
  valid = (jnp.arange(S) < _lengths(op, kv_lengths, B, S)[:, None])[:, :, None, None]
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


# --------------------------------------------------------------------------------------------------
# Agent attention


def adaptive_pool_weights(lengths, n: int, T: int):
  """`[B, n, T]` weights of 1-D adaptive average pooling of the first `lengths[b]` positions.

  Bin i covers `[floor(i L / n), ceil((i + 1) L / n))` (PyTorch's `AdaptiveAvgPool1d`); each row
  averages its bin. Bins are empty only when L = 0.
  """
  i = jnp.arange(n)[None, :]
  L = jnp.asarray(lengths, jnp.int32)[:, None]
  start = (i * L) // n
  end = -((-(i + 1) * L) // n)
  t = jnp.arange(T)[None, None, :]
  inside = (t >= start[..., None]) & (t < end[..., None])
  return inside / jnp.maximum(end - start, 1)[..., None].astype(_F32)


def _resize_last(x, size: int):
  # Linear interpolation with half-pixel centres (PyTorch `interpolate(align_corners=False)`).
  return jax.image.resize(x, x.shape[:-1] + (size,), method="linear", antialias=False)


def agent_attention(q, k, v, *, agent_bias_k, agent_bias_q, dwc_kernel, dwc_bias, causal=False,
                    segment_ids=None, q_offset=0, kv_lengths=None, scale=None,
                    implementation=None):
  """Agent attention: n agent tokens pooled from Q aggregate the keys, then broadcast to queries.

      A   = pool(Q)                                   [n, H]  adaptive average pooling over tokens
      V_A = softmax(s · A Kᵀ + B_1) V                 agent aggregation      [n, h]
      O   = softmax(s · Q Aᵀ + B_2) V_A + DWC(V)       agent broadcast + depthwise conv on values

  equal to the generalized linear attention `φ_q(Q) φ_k(K)ᵀ V` with `φ_q(Q) = softmax(Q Aᵀ)`,
  `φ_k(K)ᵀ = softmax(A Kᵀ)` (rows of the `[T, S]` product sum to 1), at O(T·n) cost.

  What is included from the paper (its 2-D vision form, here on a 1-D sequence): agent pooling,
  both softmaxes, the agent biases as learned low-resolution tables `[N, n, L0]` / `[N, L0, n]`
  linearly interpolated to the key / query length (the paper's block bias interpolated from 7 x 7;
  its per-row/column bias terms have no 1-D counterpart of fixed size and are left out), and the
  depthwise convolution over the value sequence with bias ("same" zero padding). Agents pool over
  the whole sequence, so the mechanism is non-causal, self-attention only (the DWC term needs
  T = S) and cannot separate packed sequences. With `kv_lengths` the agents pool and the keys and
  values count only the valid prefix (padded values are zeroed before the convolution); a row
  whose batch element has no valid key returns zeros. `q_offset` is unused.

  Paper: Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention",
  arXiv:2312.08874.

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, h]`, K dividing N, T = S.
    agent_bias_k: B_1 table `[N, n, L0]` (n agents); agent_bias_q: B_2 table `[N, L0, n]`.
    dwc_kernel: `[K, w, h]` depthwise kernel over w positions; dwc_bias: `[K, h]`.
    scale: defaults to `H ** -0.5` (both softmaxes). implementation: for `dot_product_attention`.

  Returns:
    `[B, T, N, h]` in q's dtype.
  """
  op = "agent_attention"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  _no_causal_or_packing(op, causal=causal, segment_ids=segment_ids,
                        why="agents pool every query of the sequence")
  if T != S:
    raise ValueError(f"{op}: self-attention only (the value convolution needs T == S), got "
                     f"T={T}, S={S}")
  if jnp.ndim(agent_bias_k) != 3 or agent_bias_k.shape[0] != N:
    raise ValueError(f"{op}: `agent_bias_k` must have shape [N={N}, n, L0], got "
                     f"{jnp.shape(agent_bias_k)}")
  n, L0 = agent_bias_k.shape[1:]
  checks.check_shape(op, "agent_bias_q", agent_bias_q, (N, L0, n), "[N, L0, n]")
  if jnp.ndim(dwc_kernel) != 3 or dwc_kernel.shape[0] != K or dwc_kernel.shape[2] != h:
    raise ValueError(f"{op}: `dwc_kernel` must have shape [K={K}, w, h={h}], got "
                     f"{jnp.shape(dwc_kernel)}")
  checks.check_shape(op, "dwc_bias", dwc_bias, (K, h), "[K, h]")
  lengths = _lengths(op, kv_lengths, B, S)
  qf, kf = q.astype(_F32), k.astype(_F32)
  valid = (jnp.arange(S) < lengths[:, None])[:, :, None, None]
  vf = jnp.where(valid, v.astype(_F32), 0.0)

  agents = jnp.einsum("bit,btnh->binh", adaptive_pool_weights(lengths, n, T), qf)
  bias_k = _resize_last(agent_bias_k.astype(_F32), S)[None]                       # [1, N, n, S]
  bias_q = _resize_last(jnp.swapaxes(agent_bias_q.astype(_F32), 1, 2), T)         # [N, n, T]
  bias_q = jnp.swapaxes(bias_q, 1, 2)[None]                                        # [1, N, T, n]
  agent_v = dot_product_attention(agents, kf, vf, bias=bias_k, kv_lengths=kv_lengths, scale=scale,
                                  implementation=implementation)
  out = dot_product_attention(qf, agents, agent_v, bias=bias_q, scale=scale,
                              implementation=implementation)
  out = out + jnp.repeat(_depthwise_conv(vf, dwc_kernel, dwc_bias), N // K, axis=2)
  # A batch element with no valid key has empty rows: zeros (the conv bias would leak otherwise).
  out = jnp.where((lengths > 0)[:, None, None, None], out, 0.0)
  return out.astype(q.dtype)


def _depthwise_conv(x, kernel, bias):
  """Per-channel convolution over the sequence axis of `x [B, S, K, h]`, "same" zero padding."""
  width = kernel.shape[1]
  left = width // 2
  xp = jnp.pad(x, ((0, 0), (left, width - 1 - left), (0, 0), (0, 0)))
  S = x.shape[1]
  kernel = kernel.astype(_F32)
  out = sum(xp[:, j:j + S] * kernel[:, j] for j in range(width))
  return out + bias.astype(_F32)


# --------------------------------------------------------------------------------------------------
# RITA group attention


def kmeans_groups(k, valid, num_groups: int, num_iters: int):
  """Lloyd's k-means of the keys of each (batch, kv head), deterministic; no gradient.

  Init: centroid g is the valid key at position `floor((2g + 1) L / 2G)` (evenly spaced, so
  G = L starts from every key). Empty clusters keep their previous centroid.

  Args:
    k: `[B, S, K, H]` float32; valid: `[B, S]` bool (padding is assigned to no group).

  Returns:
    one-hot assignments `[B, S, K, G]` float32 (all zero on padded keys).
  """
  k = jax.lax.stop_gradient(k)
  B, S = valid.shape
  G = num_groups
  L = jnp.sum(valid, axis=1)
  idx = jnp.clip(((2 * jnp.arange(G) + 1)[None] * L[:, None]) // (2 * G), 0, S - 1)
  centroids = jnp.take_along_axis(k, idx[:, :, None, None], axis=1)                # [B, G, K, H]

  def assign(c):
    # argmin |k - c|² = argmax 2 k·c - |c|²
    score = 2 * jnp.einsum("bskh,bgkh->bskg", k, c) - jnp.sum(c * c, -1).transpose(0, 2, 1)[:, None]
    return jax.nn.one_hot(jnp.argmax(score, -1), G, dtype=_F32) * valid[:, :, None, None]

  def step(_, c):
    onehot = assign(c)
    count = jnp.sum(onehot, axis=1).transpose(0, 2, 1)[..., None]                  # [B, G, K, 1]
    total = jnp.einsum("bskg,bskh->bgkh", onehot, k)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), c)

  return assign(jax.lax.fori_loop(0, num_iters, step, centroids))


def group_attention(q, k, v, *, num_groups: int = 64, num_iters: int = 10, causal=False,
                    segment_ids=None, q_offset=0, kv_lengths=None, scale=None,
                    implementation=None):
  """RITA group attention: keys clustered into G groups; queries attend to size-weighted centroids.

      c_g = mean_{j∈g} k_j,   V̄_g = mean_{j∈g} v_j,   n_g = |g|
      o_i = Σ_g n_g exp(s · q_i·c_g) V̄_g / Σ_g n_g exp(s · q_i·c_g)
          = softmax_g(s · q_i·c_g + log n_g) V̄_g

  i.e. softmax attention in which every key of a group is replaced by the group's centroid:
  `o_i = Σ_j Ã_ij v_j` with `Ã_ij = exp(s q_i·c_g(j)) / Σ_l exp(s q_i·c_g(l))`. The paper's
  guarantee: if every key lies within distance d of its group's centroid, each weight Ã_ij is
  within a factor `exp(±2 s ‖q_i‖ d)` of softmax attention's A_ij, so
  `‖o_i - softmax_i‖ <= (exp(2 s ‖q_i‖ d) - 1) max_j ‖v_j‖`. With G = S (each key its own group)
  this is exactly softmax attention. Groups come from `num_iters` Lloyd iterations per example and
  kv head with a deterministic init (`kmeans_groups`); assignments carry no gradient, centroids
  and group values do. Cost O((num_iters + T)·S·G) → linear in S for fixed G. RITA's scheduler
  adapts G to meet the bound during training; here G is fixed. Groups mix positions, so there is
  no causal or packed form; keys past `kv_lengths` join no group.

  Paper: Liang et al., "RITA: Group Attention is All You Need for Timeseries Analytics",
  arXiv:2306.01926.

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, h]`, K dividing N.
    num_groups: G (>= 1). num_iters: k-means iterations (>= 0).
    scale: defaults to `H ** -0.5`. implementation: for `dot_product_attention`.

  Returns:
    `[B, T, N, h]` in q's dtype.
  """
  op = "group_attention"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  _no_causal_or_packing(op, causal=causal, segment_ids=segment_ids,
                        why="groups mix key positions")
  if num_groups < 1 or num_iters < 0:
    raise ValueError(f"{op}: need num_groups >= 1 and num_iters >= 0, got {num_groups}, "
                     f"{num_iters}")
  kf, vf = k.astype(_F32), v.astype(_F32)
  valid = jnp.arange(S)[None] < _lengths(op, kv_lengths, B, S)[:, None]
  onehot = kmeans_groups(kf, valid, num_groups, num_iters)
  count = jnp.sum(onehot, axis=1)                                                   # [B, K, G]
  denom = jnp.maximum(count, 1.0).transpose(0, 2, 1)[..., None]
  centroids = jnp.einsum("bskg,bskh->bgkh", onehot, kf) / denom
  group_v = jnp.einsum("bskg,bskh->bgkh", onehot, vf) / denom
  count = jnp.repeat(count, N // K, axis=1)[:, :, None, :]                          # [B, N, 1, G]
  out = dot_product_attention(q.astype(_F32), centroids, group_v,
                              bias=jnp.log(jnp.maximum(count, 1.0)), mask=count > 0, scale=scale,
                              implementation=implementation)
  return out.astype(q.dtype)


# --------------------------------------------------------------------------------------------------
# YOSO


def _unit(x, eps: float = 1e-12):
  """x / max(|x|, eps) along the last axis (PyTorch `F.normalize`), with a finite gradient at 0."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), eps * eps))


def collision_probability(cos, hash_bits: int):
  """`(1 - arccos(cos)/π)^τ`: probability that τ random-hyperplane sign bits of two unit vectors
  with cosine `cos` all agree. The value is exact up to |cos| = 1; the gradient is taken with cos
  clipped away from ±1, where arccos' derivative is infinite."""
  exact = (1.0 - jnp.arccos(jnp.clip(cos, -1.0, 1.0)) / math.pi) ** hash_bits
  smooth = (1.0 - jnp.arccos(jnp.clip(cos, -1.0 + 1e-6, 1.0 - 1e-6)) / math.pi) ** hash_bits
  return smooth + jax.lax.stop_gradient(exact - smooth)


def yoso_expectation(qn, kn, v, visible, hash_bits: int):
  """Exact YOSO cumulation `Σ_j visible_ij (1 - arccos(q̂_i·k̂_j)/π)^τ v_j`, dense O(T·S).

  qn: `[B, T, N, H]`, kn: `[B, S, N, H]` unit vectors; v: `[B, S, N, h]`; visible: `[B, N, T, S]`
  bool or None. Returns `[B, T, N, h]` float32.
  """
  weight = collision_probability(jnp.einsum("btnh,bsnh->bnts", qn, kn), hash_bits)
  if visible is not None:
    weight = jnp.where(visible, weight, 0.0)
  return jnp.einsum("bnts,bsnh->btnh", weight, v)


def yoso_lsh(qn, kn, v, rng, *, hash_bits: int, num_hashes: int):
  """YOSO's Bernoulli-sampling estimate of `yoso_expectation` (no mask) with m = `num_hashes`
  independent hashes of τ = `hash_bits` random hyperplanes each.

  Per hash: every key adds v_j to the bucket of its τ-bit code (a table of 2^τ rows), every query
  reads its bucket, so `Σ_j 1[code(q_i) = code(k_j)] v_j` costs O((T + S)·(τH + h)); the average
  over hashes is unbiased because `P[code(q) = code(k)] = (1 - θ/π)^τ`. Hyperplanes are
  `jax.random.normal(rng, [m, N, H, τ])` (explicit key: no hidden randomness).

  Gradients: exact for v; the sign codes are piecewise constant, so q and k get none from this
  estimator (use the expectation form to train q and k).
  """
  B, T, N, H = qn.shape
  buckets = 2 ** hash_bits
  planes = jax.random.normal(rng, (num_hashes, N, H, hash_bits), _F32)
  powers = 2 ** jnp.arange(hash_bits, dtype=jnp.int32)
  head = (jnp.arange(B)[:, None, None] * N + jnp.arange(N)[None, None, :]) * buckets

  def code(x, plane):
    bits = jnp.einsum("btnh,nhr->btnr", x, plane) > 0
    return jnp.sum(bits * powers, -1) + head                                       # [B, L, N]

  def one_hash(acc, plane):
    table = jax.ops.segment_sum(v.reshape(-1, v.shape[-1]), code(kn, plane).reshape(-1),
                                num_segments=B * N * buckets)
    return acc + table[code(qn, plane)], None

  acc, _ = jax.lax.scan(one_hash, jnp.zeros(qn.shape[:3] + v.shape[-1:], _F32), planes)
  return acc / num_hashes


def yoso_attention(q, k, v, *, hash_bits: int = 8, num_hashes: int = 32, rng=None,
                   normalize_output: bool = True, causal=False, segment_ids=None, q_offset=0,
                   kv_lengths=None, scale=None, implementation=None):
  """YOSO: attention with the LSH collision probability of unit q, k as kernel, sampled by hashing.

      c_i = Σ_j (1 - arccos(q̂_i·k̂_j)/π)^τ v_j,      o_i = c_i / |c_i|     (q̂ = q/|q|, k̂ = k/|k|)

  `rng=None` gives the exact expectation (the reference, O(T·S), honouring every mask of the
  contract: causal, packed, padding, decode over a cache). With a PRNG key `rng`, c is the paper's
  linear-cost Bernoulli-sampling estimate (`yoso_lsh`: m hashes of τ hyperplanes, averaged), whose
  mean over hash draws is the expectation; it supports `kv_lengths` (padded keys are dropped). The
  sampled estimator has no causal or packed form (one hash table pools all keys), so a causal or
  packed call computes the exact expectation whether or not `rng` is given: a causal YOSO model
  trains and decodes with it. The output normalisation is the authors' (their code L2-normalises
  each output row; a row with no visible key stays zero). Set `normalize_output=False` for the
  raw cumulation c. q and k are normalised to unit length and the kernel has no temperature, so a
  `scale` other than None is an error. In `attnjax.nn.MultiHeadAttention` the key comes from the
  'sample' rng stream when `apply` is given one (`rngs={'sample': key}`), else the expectation
  runs.

  Paper: Zeng et al., "You Only Sample (Almost) Once: Linear Cost Self-Attention Via Bernoulli
  Sampling", arXiv:2111.09714.

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, h]`, K dividing N.
    hash_bits: τ, hyperplanes per hash (kernel exponent). num_hashes: m, hashes averaged.
    rng: None (exact expectation) or a `jax.random` key (sampled estimate, non-causal and unpacked
      calls only; see above).
    scale: must be None (unit q, k: a scale has no meaning). implementation: "reference" or None.

  Returns:
    `[B, T, N, h]` in q's dtype.
  """
  op = "yoso_attention"
  if scale is not None:
    raise ValueError(f"{op}: `scale` must be None, got {scale}: q and k are normalised to unit "
                     "length and the collision kernel (1 - arccos(q̂·k̂)/π)^τ has no temperature "
                     "(`hash_bits` τ sets its sharpness)")
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  _only_reference(op, implementation)
  if hash_bits < 1 or num_hashes < 1:
    raise ValueError(f"{op}: need hash_bits >= 1 and num_hashes >= 1, got {hash_bits}, "
                     f"{num_hashes}")
  qn = _unit(q.astype(_F32))
  kn = jnp.repeat(_unit(k.astype(_F32)), N // K, axis=2)
  vf = jnp.repeat(v.astype(_F32), N // K, axis=2)
  if rng is None or causal or segment_ids is not None:
    mask_mod = contract_mask(B=B, T=T, S=S, causal=causal, q_offset=q_offset,
                             segment_ids=segment_ids, kv_lengths=kv_lengths, op=op)
    visible = None if mask_mod is None else masks.evaluate_mask(mask_mod, B, N, T, S)
    out = yoso_expectation(qn, kn, vf, visible, hash_bits)
  else:
    valid = jnp.arange(S)[None] < _lengths(op, kv_lengths, B, S)[:, None]
    vf = jnp.where(valid[:, :, None, None], vf, 0.0)
    out = yoso_lsh(qn, kn, vf, rng, hash_bits=hash_bits, num_hashes=num_hashes)
  if normalize_output:
    out = _unit(out)
  return out.astype(q.dtype)


# --------------------------------------------------------------------------------------------------
# Registration


def _example_array(seed: int, shape):
  # Concrete learned arrays at the conformance sizes (numpy: no device work at import).
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


_LINEAR = dict(family="linear", decode=False, packed=False)

register(Mechanism(
    name="linformer_attention", fn=linformer_attention, seeds=(86,), **_LINEAR,
    paper="Linformer: Self-Attention with Linear Complexity", arxiv="2006.04768",
    # The sequence projection needs every key: non-causal only (self, and cross over S <= n keys).
    patterns=frozenset({"self", "cross"}), complexity="O(T·k + S·k)",
    params=(ParamSpec("proj_k", lambda N, K, H: (K, LINFORMER_PROJ_DIM, LINFORMER_MAX_LENGTH),
                      _linformer_init),
            ParamSpec("proj_v", lambda N, K, H: (K, LINFORMER_PROJ_DIM, LINFORMER_MAX_LENGTH),
                      _linformer_init)),
    example=dict(proj_k=_example_array(1, (2, 8, 32)) / 5,
                 proj_v=_example_array(2, (2, 8, 32)) / 5)))

register(Mechanism(
    name="agent_attention", fn=agent_attention, seeds=(59,), **_LINEAR,
    paper="Agent Attention: On the Integration of Softmax and Linear Attention",
    arxiv="2312.08874", patterns=frozenset({"self"}), complexity="O(T·n)",
    params=(ParamSpec("agent_bias_k", lambda N, K, H: (N, AGENT_NUM, AGENT_BIAS_LENGTH),
                      jax.nn.initializers.truncated_normal(0.02)),
            ParamSpec("agent_bias_q", lambda N, K, H: (N, AGENT_BIAS_LENGTH, AGENT_NUM),
                      jax.nn.initializers.truncated_normal(0.02)),
            # The layer's value head dim is H, so h = H here.
            ParamSpec("dwc_kernel", lambda N, K, H: (K, AGENT_DWC_KERNEL, H),
                      jax.nn.initializers.normal(AGENT_DWC_KERNEL ** -0.5)),
            ParamSpec("dwc_bias", lambda N, K, H: (K, H), jax.nn.initializers.zeros)),
    example=dict(agent_bias_k=_example_array(3, (4, 5, 7)) * 0.1,
                 agent_bias_q=_example_array(4, (4, 7, 5)) * 0.1,
                 dwc_kernel=_example_array(5, (2, 3, 6)) * 0.5,
                 dwc_bias=_example_array(6, (2, 6)) * 0.1)))

register(Mechanism(
    name="group_attention", fn=group_attention, seeds=(101,), **_LINEAR,
    paper="RITA: Group Attention is All You Need for Timeseries Analytics", arxiv="2306.01926",
    patterns=frozenset({"self", "cross"}), complexity="O((T + S)·G)",
    example=dict(num_groups=6, num_iters=4)))

register(Mechanism(
    name="yoso_attention", fn=yoso_attention, seeds=(105,), family="linear",
    paper="You Only Sample (Almost) Once: Linear Cost Self-Attention Via Bernoulli Sampling",
    arxiv="2111.09714", implementations=("reference",), rng="rng",
    complexity="O(T·S) exact expectation; O((T + S)·m) sampled (rng given)",
    example=dict(hash_bits=4)))
