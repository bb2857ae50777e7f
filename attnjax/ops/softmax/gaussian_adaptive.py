"""Gaussian adaptive attention (GAAM) and its speech application, density adaptive attention (DAAM).

Per head n, with G Gaussians of learned mean offsets δ_{n,g} and scales c_{n,g}, on a feature stream x:

    μ, σ²  = mean and variance of x along the normalized axis
    z_g    = (x - (μ + δ_{n,g})) / sqrt(σ² + ε)
    m      = Π_g exp(-z_g² / (2 c_{n,g}²)) / sqrt(2π c_{n,g}²), normalized to sum 1 along the axis
    y      = x ⊙ m

The density recalibrates each entry by how typical it is around a learned, shifted centre of its own
distribution: an entry near μ + δ is kept, outliers are damped (or the reverse, as δ moves), with
2·G numbers per head. DAAM (arXiv:2409.00391) is the same module, from the same authors' code,
applied to speech (mel) features for depression detection; both rows are served by this operator.

How it fits the q, k, v contract: GAAM reads one stream and has no query-key scores, so x is each
head's values v (`reads={"v"}`; q and k are taken for their shapes only, the layer creates no
projection for them, `scale` must stay None) and the output at a query is y at the query's own
token (self-attention; the queries sit at `q_offset + t` of a KV cache when decoding). The authors'
module (GaussianBlock.py of github.com/gioannides/Gaussian-Adaptive-Attention, the DAAM code in
models_pytorch.py of github.com/sdsuai/depression_audio_processing) normalizes along one chosen axis
split into head chunks, and their models use it both ways, so both are offered:
- `axis="features"` (default): along the h channels of each token's head (the heads are the chunks
  of the feature axis, as in the library's example and DAAMAudioCNNLSTM's mel bins). Each token is
  recalibrated on its own: causal and bidirectional alike, decoding and packed sequences are exact.
- `axis="sequence"`: along the positions of the sequence, per channel of each head (as
  DAAMAudioTransformer, whose tokens are the normalized axis): the statistics and the normalization
  pool every visible position of each (packed) sequence, so it is bidirectional only (causal is a
  ValueError; no running-statistics form is defined by the papers). The authors would split the
  positions themselves into head chunks; here the heads stay those of the layer.

Interpretations: the variance is the population one of the papers' equations (1/n, the authors'
library uses PyTorch's unbiased variance, a factor n/(n-1) that c absorbs); ε = 1e-8 as in the code;
the normalization is computed exactly as a softmax over the axis of Σ_g -z_g²/(2c_g²) (the constants
1/sqrt(2π c²) cancel; the authors divide by the sum clamped at ε, which only differs where every
product underflows). The residual x + y of the authors' GaussianBlock is the transformer block's,
not the operator's. Scales start from exp(N(0, 1)) and offsets from 0, as in GaussianBlock.py.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`: shapes only; `v [B,S,K,h]`; `mean_offsets`, `scales` `[N, G]`
→ `[B,T,N,h]` (GQA: query head n recalibrates value head n // (N/K) with its own offsets and scales).
Papers: Ioannides, Chadha and Elkins, "Gaussian Adaptive Attention is All You Need: Robust Contextual
Representations Across Multiple Modalities", arXiv:2401.11143; Ioannides, Kieback, Chadha and
Elkins, "Density Adaptive Attention-based Speech Network: Enhancing Feature Understanding for Mental
Health Disorders", arXiv:2409.00391.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import mixing
from attnjax.core import param_tables
from attnjax.registry import Mechanism, example_arrays, register
from attnjax.typing import Array, Float, Key, Lengths, Output, Query, SegmentIds, Value

__all__ = ["gaussian_adaptive_attention", "GAAM_TABLE", "AXES", "NUM_GAUSSIANS", "EPS"]

HeadGaussians = Float[Array, "N G"]

AXES = ("features", "sequence")
# Gaussians per head the layer creates (DAAMAudioTransformer's 16; the operator takes any G).
NUM_GAUSSIANS = 16
# Added to the variance, as the authors' eps.
EPS = 1e-8
_F32 = jnp.float32


def _lognormal(key, shape, dtype=_F32):
  """exp(N(0, 1)): the authors' initial scales c (GaussianBlock.py)."""
  return jnp.exp(jax.random.normal(key, shape)).astype(dtype)


# (name, shape(N, K, H, h, G), shape in letters, init): see `attnjax.core.param_tables`.
GAAM_TABLE = (
    ("mean_offsets", lambda N, K, H, h, G=NUM_GAUSSIANS: (N, G), "[N, G]",
     jax.nn.initializers.zeros),
    ("scales", lambda N, K, H, h, G=NUM_GAUSSIANS: (N, G), "[N, G]", _lognormal),
)


def _log_density(x, mean, var, offsets, scales_sq, eps):
  """Σ_g -z_g² / (2 c_g²) with z_g = (x - mean - δ_g) / sqrt(var + ε): x, mean, var `[B, L, N, h]`
  (broadcastable), offsets and squared scales `[N, G]`."""
  z = (x - mean)[..., None] - offsets[:, None, :]
  z = z * lax.rsqrt(var + eps)[..., None]
  return -jnp.sum(jnp.square(z) / (2.0 * scales_sq[:, None, :]), axis=-1)


def _run_max(x: jax.Array, p: mixing.MixerInputs) -> jax.Array:
  """Maximum of `x: [B, S, ...]` over each slot's packed run, at every slot of the run."""
  if not p.segmented:
    return jnp.broadcast_to(jnp.max(x, axis=1, keepdims=True), x.shape)
  flags = jnp.broadcast_to(p.starts.reshape(p.starts.shape + (1,) * (x.ndim - 2)), x.shape)

  def combine(a, b):
    fa, xa = a
    fb, xb = b
    return fa | fb, jnp.where(fb, xb, jnp.maximum(xa, xb))

  running = lax.associative_scan(combine, (flags, x), axis=1)[1]
  S = x.shape[1]
  slots = jnp.arange(S)
  ends = jnp.concatenate([p.starts[:, 1:], jnp.ones((p.starts.shape[0], 1), bool)], axis=1)
  end = lax.cummin(jnp.where(ends, slots[None, :], S - 1), axis=1, reverse=True)
  return jnp.take_along_axis(running, end.reshape(end.shape + (1,) * (x.ndim - 2)), axis=1)


def gaussian_adaptive_attention(q: Query, k: Key, v: Value, *, mean_offsets: HeadGaussians,
                                scales: HeadGaussians, causal: bool = False,
                                segment_ids: Optional[SegmentIds] = None, q_offset=0,
                                kv_lengths: Optional[Lengths] = None,
                                scale: Optional[float] = None,
                                implementation: Optional[str] = None, axis: str = "features",
                                eps: float = EPS) -> Output:
  """GAAM / DAAM: each head's values times a normalized product of Gaussian densities of their
  standardized entries along `axis` (see the module docstring)."""
  op = "gaussian_adaptive_attention"
  if axis not in AXES:
    raise ValueError(f"{op}: `axis` must be one of {AXES}, got {axis!r}")
  checks.check_implementation(op, implementation, ("reference",))
  if axis == "sequence":
    contract.reject_causal_or_packing(
        op, causal=causal, segment_ids=None,
        why="axis='sequence' normalizes over every position of the sequence")
  p = mixing.prepare_mixer_inputs(op, q, k, v, segment_ids=segment_ids, q_offset=q_offset,
                                  kv_lengths=kv_lengths, scale=scale, decode=True)
  _, _, _, N, K, H, h = p.dims
  G = jnp.shape(mean_offsets)[-1] if jnp.ndim(mean_offsets) == 2 else NUM_GAUSSIANS
  param_tables.check_table(op, GAAM_TABLE, {"mean_offsets": mean_offsets, "scales": scales},
                           N=N, K=K, H=H, h=h, G=G)
  offsets = mean_offsets.astype(_F32)
  scales_sq = jnp.square(scales.astype(_F32))
  visible = mixing.take_query_rows(p.valid, p)[:, :, None, None]                  # [B, T, 1, 1]

  if axis == "features":
    # Only the queries' own tokens are needed: gather them first (one row when decoding).
    x = mixing.take_query_rows(p.v, p)                                              # [B, T, N, h]
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    weights = jax.nn.softmax(_log_density(x, mean, var, offsets, scales_sq, eps), axis=-1)
    return jnp.where(visible, x * weights, 0.0).astype(q.dtype)

  # axis == "sequence": statistics over each run's visible positions, per channel of each head.
  x, valid = p.v, p.valid[:, :, None, None]                                         # zero if hidden
  count = jnp.maximum(mixing.run_total(p.valid.astype(_F32), p), 1.0)[:, :, None, None]
  mean = mixing.run_total(x, p) / count
  var = mixing.run_total(jnp.where(valid, jnp.square(x - mean), 0.0), p) / count
  logit = jnp.where(valid, _log_density(x, mean, var, offsets, scales_sq, eps), -jnp.inf)
  shift = lax.stop_gradient(_run_max(logit, p))
  e = jnp.where(valid, jnp.exp(logit - jnp.where(jnp.isfinite(shift), shift, 0.0)), 0.0)
  total = mixing.run_total(e, p)
  y = x * e / jnp.where(total > 0, total, 1.0)
  return jnp.where(visible, mixing.take_query_rows(y, p), 0.0).astype(q.dtype)


def _example(*, N: int = 4):
  """Three Gaussians per head with offsets off 0 and scales near 1.5 (broad enough that bf16
  inputs stay close to float32 ones)."""
  return example_arrays(139, {"mean_offsets": ((N, 3), 0.0, 0.5), "scales": ((N, 3), 1.5, 0.2)})


register(Mechanism(
    name="gaussian_adaptive_attention", fn=gaussian_adaptive_attention, family="softmax-variant",
    seeds=(139, 214),
    paper="Gaussian Adaptive Attention is All You Need: Robust Contextual Representations Across "
          "Multiple Modalities",
    arxiv="2401.11143",
    # Per-token recalibration of each head's values (axis="features"): every self pattern, decoding
    # and packing are exact; axis="sequence" is bidirectional only (a ValueError otherwise).
    patterns=frozenset({"self", "causal_self"}), reads=frozenset({"v"}),
    complexity="O(T·h·G)", implementations=("reference",),
    params=param_tables.param_specs(GAAM_TABLE), example=_example))
