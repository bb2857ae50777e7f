"""Feature maps φ for linear attention: `φ(q) · φ(k)` stands in for the softmax kernel `exp(q · k)`.

Every map works on the last axis of `[..., F]` arrays and returns float32 features. Maps with
randomness take the random matrix as an argument (no hidden PRNG state); maps whose constants come
from data statistics say so.

| name | φ(x) | paper |
| --- | --- | --- |
| identity | x | |
| elu_plus_one | elu(x) + 1 | Katharopoulos et al., arXiv:2006.16236 |
| relu | max(x, 0) | |
| l2_normalize | x / ‖x‖ (cosine similarity) | Cottention, arXiv:2409.18747 |
| softmax_features | softmax over the feature axis | Efficient Attention, arXiv:1812.01243 |
| lognormal | exp(α x), α from `lognormal_temperatures` | LLN Attention, arXiv:2311.13541 |
| favor_plus | exp(W x - ‖x‖²/2) / √m | Performer, arXiv:2009.14794 |
| taylor2 | [1, x, vec(x xᵀ)/√2] | TaylorShift, arXiv:2403.02920; FAST, arXiv:2402.07901 |
| bounded_exp | exp(x - max x) | ReGLA, arXiv:2502.01578 |

Exponential features (FAVOR+, LLN) get their range from `stabilized_exp_features`, which is exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.core import linear

__all__ = ["FEATURE_MAPS", "bounded_exp", "elu_plus_one", "favor_plus", "favor_plus_logits",
           "feature_max_over_keys", "get", "identity", "l2_normalize", "lognormal",
           "lognormal_temperatures", "orthogonal_random_features", "relu", "running_feature_max",
           "running_max_log_decay", "softmax_features", "stabilized_exp_features", "taylor2",
           "unit_rows"]

_F32 = jnp.float32


def identity(x):
  """`x` itself, in float32: plain linear attention on the raw queries and keys."""
  return x.astype(_F32)


def elu_plus_one(x):
  """`elu(x) + 1 > 0` (Katharopoulos et al., "Transformers are RNNs", arXiv:2006.16236)."""
  return jax.nn.elu(x.astype(_F32)) + 1.0


def relu(x):
  """`max(x, 0)`: a nonnegative map, zero for negative coordinates."""
  return jax.nn.relu(x.astype(_F32))


def l2_normalize(x, eps: float = 1e-6):
  """`x / max(‖x‖, eps)`: dot products of normalized rows are cosine similarities."""
  x = x.astype(_F32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def unit_rows(x, eps: float = 1e-12):
  """`x / max(‖x‖, eps)` along the last axis in `x`'s dtype (PyTorch's `F.normalize`), with a finite
  gradient at x = 0 (the norm's own gradient there is NaN, so this goes through rsqrt of the
  clamped squared norm)."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), eps * eps))


def softmax_features(x):
  """Softmax over the feature axis (Efficient Attention's ρ_q)."""
  return jax.nn.softmax(x.astype(_F32), axis=-1)


def lognormal(x, alpha):
  """`exp(α x)` with α broadcast against x's leading axes (Linear Log-Normal Attention)."""
  return jnp.exp(jnp.asarray(alpha, _F32) * x.astype(_F32))


def _sample_positions(x, n, lengths):
  """Up to n evenly spaced positions of `x [B,T,...]` per example, among its first `lengths [B]`
  (all T when None): `[B, min(n, T), ...]` float32."""
  T = x.shape[1]
  m = min(n, T)
  frac = (jnp.arange(m) + 0.5) / m
  size = jnp.full((x.shape[0],), T) if lengths is None else jnp.maximum(lengths, 1)
  idx = jnp.floor(frac[None] * size[:, None]).astype(jnp.int32)                # [B, m]
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x.astype(_F32), idx, axis=1)


def lognormal_temperatures(q, k, *, scale, kv_lengths=None, num_samples: int = 64,
                           steps: int = 32):
  """Moment-matched `(α, β)` of Linear Log-Normal Attention, per example and head `[B,N]`.

  Softmax weights of a query are log-normal with log-variance `σ²_sm = Var_j(scale · q·k_j)`.
  As in the paper, `α = σ̃/σ_q`, `β = σ̃/σ_k` (σ_q, σ_k the spreads of this example's q and k in
  this head) with the common spread σ̃ chosen so that LLN's weight `Σ_f exp(α q_f + β k_{j,f})`,
  a sum of log-normals, has the same log-variance: `Var_j log Σ_f exp(...) = σ²_sm`, both sides
  averaged over queries. The authors fit this relation with a line in σ̃²; here σ̃ is its root,
  found by bisection (on a log scale) from up to `num_samples` evenly spaced queries and keys of
  each example (keys before `kv_lengths`). No statistic is pooled across examples; no gradient.
  """
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  qs = _sample_positions(q, num_samples, kv_lengths if T == S else None)       # [B,Mq,N,H]
  ks = jnp.repeat(_sample_positions(k, num_samples, kv_lengths), N // K, axis=2)
  logits = scale * jnp.einsum("binf,bjnf->bnij", qs, ks)
  target = jnp.mean(jnp.var(logits, axis=-1), axis=-1)                        # [B,N]
  spread = lambda x: jnp.maximum(jnp.std(x, axis=(1, 3)), 1e-12)               # [B,N]
  sig_q, sig_k = spread(qs), spread(ks)
  qn = jnp.swapaxes(qs / sig_q[:, None, :, None], 1, 2)[:, :, :, None]         # [B,N,Mq,1,H]
  kn = jnp.swapaxes(ks / sig_k[:, None, :, None], 1, 2)[:, :, None]            # [B,N,1,Mk,H]

  def lln_log_var(sig):                                                        # sig: [B,N]
    x = sig[..., None, None, None] * (qn + kn)
    return jnp.mean(jnp.var(jax.nn.logsumexp(x, axis=-1), axis=-1), axis=-1)

  def bisect(_, bounds):
    lo, hi = bounds
    mid = jnp.sqrt(lo * hi)
    below = lln_log_var(mid) < target
    return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

  lo, hi = jax.lax.fori_loop(0, steps, bisect, (jnp.full((B, N), 1e-3), jnp.full((B, N), 1e3)))
  sig = jax.lax.stop_gradient(jnp.sqrt(lo * hi))
  return sig / sig_q, sig / sig_k


def bounded_exp(x):
  """`exp(x - max_f x_f)` ∈ (0, 1]: positive and bounded whatever the input scale (ReGLA)."""
  x = x.astype(_F32)
  return jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True)))


def taylor2(x):
  """Second-order Taylor features `[1, x, vec(x xᵀ)/√2]` of width 1 + F + F².

  `taylor2(q) · taylor2(k) = 1 + q·k + (q·k)²/2`, the second-order Taylor expansion of `exp(q·k)`.
  """
  x = x.astype(_F32)
  outer = (x[..., :, None] * x[..., None, :]).reshape(x.shape[:-1] + (-1,)) * (0.5 ** 0.5)
  return jnp.concatenate([jnp.ones(x.shape[:-1] + (1,), _F32), x, outer], axis=-1)


def orthogonal_random_features(key, num_features: int, dim: int, *, scaling: str = "chi"):
  """`[m, F]` random features: rows orthogonal in blocks of F, each marginally N(0, I).

  Each block is the orthogonal factor of a Gaussian matrix's QR decomposition, its columns' signs
  fixed by `sign(diag R)` so that it is Haar-distributed (without that fix LAPACK's QR makes the
  first entry of every row negative, and the estimate is biased). Row norms: `scaling="chi"`
  (default) draws them as the norms of independent Gaussian vectors (chi with F degrees of freedom),
  so every row is marginally N(0, I) and the FAVOR+ estimate stays unbiased while rows of a block
  are exactly orthogonal (lower variance); `scaling="sqrt_dim"` fixes every norm to √F (the paper's
  regularized variant). Performer, arXiv:2009.14794, section 2.4.
  """
  if scaling not in ("chi", "sqrt_dim"):
    raise ValueError(f"orthogonal_random_features: `scaling` must be 'chi' or 'sqrt_dim', "
                     f"got {scaling!r}")
  num_blocks = -(-num_features // dim)
  k_blocks, k_norms = jax.random.split(key)
  qmat, rmat = jnp.linalg.qr(jax.random.normal(k_blocks, (num_blocks, dim, dim), _F32))
  signs = jnp.where(jnp.diagonal(rmat, axis1=-2, axis2=-1) < 0, -1.0, 1.0)
  # rows = the sign-fixed columns of each block's Q
  w = jnp.swapaxes(qmat * signs[:, None, :], -1, -2).reshape(num_blocks * dim, dim)[:num_features]
  if scaling == "sqrt_dim":
    return w * (dim ** 0.5)
  norms = jnp.linalg.norm(jax.random.normal(k_norms, (num_features, dim), _F32), axis=-1)
  return w * norms[:, None]


def favor_plus_logits(x, projection):
  """`W x - ‖x‖²/2` `[..., m]`: the exponents of FAVOR+'s positive random features (float32)."""
  x = x.astype(_F32)
  w = jnp.asarray(projection, _F32)
  return jnp.einsum("...f,mf->...m", x, w) - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)


def favor_plus(x, projection, *, stabilizer=None):
  """Positive random features `exp(W x - ‖x‖²/2) / √m` with `W = projection [m, F]`.

  `E_W[φ(q) · φ(k)] = exp(q · k)` exactly when each row of W is N(0, I) (the softmax kernel,
  unbiased). `stabilizer` (broadcast against `[..., m]`) is subtracted inside the exponent for
  range; a constant per query row, or one per feature shared by all keys, cancels in normalized
  attention (see `favor_plus_attention`).
  """
  logits = favor_plus_logits(x, projection)
  if stabilizer is not None:
    logits = logits - jax.lax.stop_gradient(stabilizer)
  return jnp.exp(logits) * (logits.shape[-1] ** -0.5)


# ---------------------------------------------------------------------------------------------
# Range for exponential features `φ_q = exp(a)`, `φ_k = exp(b)` (FAVOR+, LLN): exact stabilizers.
#
# A key feature column m is divided by exp(M_m), M_m the largest key exponent b_sm over the keys a
# query sees, and the query feature becomes exp(a_tm + M_m - c_t) with c_t = max_m (a_tm + M_m).
# The products are exp(a_tm + b_sm - c_t): c_t cancels in normalized attention, every factor is
# <= 1, and the query's largest feature meets a key column whose sum is >= 1, so no row underflows
# to zero however large the inputs. Causal attention uses the running max M_{s,m} over the keys so
# far; `running_max_log_decay` turns its growth into the gate exp(M_{s-1,m} - M_{s,m}) <= 1 of the
# gated linear recurrence, which rescales the state exactly as the max moves.


def feature_max_over_keys(b, segment_ids=None):
  """Non-causal: max over positions of key exponents `b [B,S,K,F]` (-inf where none), per
  feature, at every key `[B,S,K,F]`: within each document if `segment_ids [B,S]` is given, else
  over the whole sequence (padded slots must hold -inf)."""
  B, S = b.shape[:2]
  if segment_ids is None:
    return jnp.broadcast_to(jnp.max(b, axis=1, keepdims=True), b.shape)
  run = linear.run_index(jnp.asarray(segment_ids))
  seg = jax.vmap(lambda xb, rb: jax.ops.segment_max(xb, rb, num_segments=S))(b, run)
  return jnp.take_along_axis(seg, run[:, :, None, None], axis=1)


def running_feature_max(b, run=None, initial=None):
  """Causal: running max over positions of key exponents `b [B,S,K,F]`, restarting where the
  run numbers `run [B,S]` change, starting from `initial [B,K,F]` (None: -inf)."""
  if initial is not None:
    b = jnp.maximum(b, initial[:, None])        # a running max from `initial` = max with it
  if run is None:
    return jax.lax.cummax(b, axis=1)
  r = jnp.broadcast_to(run[:, :, None, None], b.shape)

  def combine(earlier, later):
    (r1, m1), (r2, m2) = earlier, later
    return r2, jnp.where(r1 == r2, jnp.maximum(m1, m2), m2)

  return jax.lax.associative_scan(combine, (r, b), axis=1)[1]


def running_max_log_decay(m, run=None, initial=None):
  """`M_{s-1} - M_s` (<= 0) for a running max `m [B,S,K,F]`: the log gate that keeps a state of
  keys divided by exp(M) consistent as M grows. 0 at a document's first key (the state restarts)
  and where either max is -inf (nothing stored yet); `initial [B,K,F]` is the max before s = 0."""
  first = (jnp.full_like(m[:, :1], -jnp.inf) if initial is None else
           initial[:, None].astype(m.dtype))
  prev = jnp.concatenate([first, m[:, :-1]], axis=1)
  valid = jnp.isfinite(prev) & jnp.isfinite(m)
  if run is not None:
    same = jnp.concatenate([jnp.zeros_like(run[:, :1], bool), run[:, 1:] == run[:, :-1]], 1)
    valid = valid & same[:, :, None, None]
  return jax.lax.stop_gradient(jnp.where(valid, prev - m, 0.0))


def stabilized_exp_features(a, b, a_max, b_max):
  """Query and key features `exp(a + M - c)`, `exp(b - M)` (see above).

  a: `[B,T,N,F]` query exponents; b: `[B,S,K,F]` key exponents (-inf at padded slots); b_max: the
  key max M at every key `[B,S,K,F]`; a_max: M at every query `[B,T,K,F]` (the keys it sees; K
  divides N). -inf maxima (no key) count as 0. Returns float32 `(φ_q, φ_k)`.
  """
  safe = lambda m: jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  kf = jnp.exp(b - safe(b_max))
  ql = a + jnp.repeat(safe(a_max), a.shape[2] // a_max.shape[2], axis=2)
  qf = jnp.exp(ql - jax.lax.stop_gradient(jnp.max(ql, axis=-1, keepdims=True)))
  return qf, kf


FEATURE_MAPS = {
    "identity": identity,
    "elu_plus_one": elu_plus_one,
    "relu": relu,
    "l2_normalize": l2_normalize,
    "softmax_features": softmax_features,
    "bounded_exp": bounded_exp,
    "taylor2": taylor2,
}


def get(name: str):
  """A parameter-free feature map by name."""
  try:
    return FEATURE_MAPS[name]
  except KeyError:
    raise ValueError(f"unknown feature map {name!r}; choose from {sorted(FEATURE_MAPS)}") from None
