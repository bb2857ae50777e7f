"""YOSO: LSH-sampled collision-probability attention (arXiv:2111.09714)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import masks
from attnjax.core.contract import contract_mask, lengths_or_full
from attnjax.core.feature_maps import unit_rows
from attnjax.typing import Key, Output, Query, Value
from attnjax.registry import Mechanism, register

_F32 = jnp.float32

__all__ = ["yoso_attention", "collision_probability", "yoso_expectation", "yoso_lsh"]


# --------------------------------------------------------------------------------------------------
# YOSO


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


def yoso_attention(q: Query, k: Key, v: Value, *, hash_bits: int = 8, num_hashes: int = 32,
                   rng=None, normalize_output: bool = True, causal=False, segment_ids=None,
                   q_offset=0, kv_lengths=None, scale=None, implementation=None) -> Output:
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
  checks.check_implementation(op, implementation, ("reference",))
  if hash_bits < 1 or num_hashes < 1:
    raise ValueError(f"{op}: need hash_bits >= 1 and num_hashes >= 1, got {hash_bits}, "
                     f"{num_hashes}")
  qn = unit_rows(q.astype(_F32))
  kn = jnp.repeat(unit_rows(k.astype(_F32)), N // K, axis=2)
  vf = jnp.repeat(v.astype(_F32), N // K, axis=2)
  if rng is None or causal or segment_ids is not None:
    mask_mod = contract_mask(B=B, T=T, S=S, causal=causal, q_offset=q_offset,
                             segment_ids=segment_ids, kv_lengths=kv_lengths, op=op)
    visible = None if mask_mod is None else masks.evaluate_mask(mask_mod, B, N, T, S)
    out = yoso_expectation(qn, kn, vf, visible, hash_bits)
  else:
    valid = jnp.arange(S)[None] < lengths_or_full(op, kv_lengths, B, S)[:, None]
    vf = jnp.where(valid[:, :, None, None], vf, 0.0)
    out = yoso_lsh(qn, kn, vf, rng, hash_bits=hash_bits, num_hashes=num_hashes)
  if normalize_output:
    out = unit_rows(out)
  return out.astype(q.dtype)



register(Mechanism(
    name="yoso_attention", fn=yoso_attention, seeds=(105,), family="linear",
    paper="You Only Sample (Almost) Once: Linear Cost Self-Attention Via Bernoulli Sampling",
    arxiv="2111.09714", implementations=("reference",), rng="rng",
    complexity="O(T·S) exact expectation; O((T + S)·m) sampled (rng given)",
    example=dict(hash_bits=4)))
