"""Query-adaptive long-context head detection (QAdA): which heads need more than a local window.

For a query at position p (absolute, `q_offset + t`) the visible keys j < E (E = min(p + 1, length))
split into sinks (the first `num_sinks`), the local window (the last `local_window` before E, sinks
excluded) and the bulk between them, n = max(0, E - local_window - num_sinks) keys. The test
computes the local scores exactly and models the bulk scores s_j = scale · q·k_j as Gaussian, with
the bulk keys k ~ N(μ_K, Σ_K) (second moments), so that their softmax mass is log-normal in closed
form:

    μ_s = scale · q·μ_K        σ_s² = scale² · qᵀ Σ_K q
    Σ_{j ∈ bulk} e^{s_j}  ≈  n · E[e^s] = n · exp(μ_s + σ_s² / 2)
    m̂ = n e^{μ_s + σ_s²/2} / (n e^{μ_s + σ_s²/2} + Σ_{j ∈ sinks ∪ local} e^{s_j})

and the head needs full attention for that query when the predicted long-context mass m̂ exceeds
`threshold` (τ); otherwise it can run on sinks + local window. The oracle (`long_context_mass`) is
the same share with the true bulk scores, m = Σ_{bulk} e^{s_j} / Σ_{visible} e^{s_j}.

The test reads only the local (and sink) keys and the bulk's moments (H + H² numbers per key head),
so its cost per query does not grow with the context; `key_moments` computes the moments of any key
range (e.g. once from the prompt's bulk after prefill, then reused). Interpretation: the paper fits
the Gaussian to the bulk keys' mean and covariance; where those come from (the prompt, a calibration
set) is the caller's choice, passed as `key_mean`, `key_cov`. The covariance is the population (1/n)
moment. Each query head is judged separately (GQA: its key head's moments).

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`; `key_mean [B,K,H]`, `key_cov [B,K,H,H]` (or with a T axis,
`[B,T,K,H]`, `[B,T,K,H,H]`, per query); outputs `[B,T,N]`.
Paper: Donhauser, Arnal, Pezeshki, Cabannes, Lopez-Paz, Ahuja, "Unveiling Simplicities of Attention:
Adaptive Long-Context Head Identification", arXiv:2502.09647.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax import catalog
from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import dense
from attnjax.typing import Bool, Float, Key, Lengths, Query

__all__ = ["key_moments", "long_context_head_detector", "long_context_mass", "key_ranges"]

HeadScalars = Float[jax.Array, "B T N"]
HeadFlags = Bool[jax.Array, "B T N"]
_HIGHEST = jax.lax.Precision.HIGHEST


def _check(op: str, num_sinks, local_window):
  for name, value, low in (("num_sinks", num_sinks, 0), ("local_window", local_window, 1)):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f"{op}: `{name}` must be an int >= {low}, got {value!r}")


def key_ranges(B: int, T: int, S: int, *, num_sinks: int, local_window: int, q_offset=0,
               kv_lengths=None):
  """`(sink, local, bulk)` bool `[B, T, S]`: each query's sink, local-window and bulk keys (see the
  module docstring; every visible key is in exactly one)."""
  end = jnp.minimum(contract.query_positions(B, T, q_offset) + 1,
                    contract.lengths_or_full("key_ranges", kv_lengths, B, S)[:, None])[..., None]
  j = jnp.arange(S, dtype=jnp.int32)[None, None]
  visible = j < end
  sink = visible & (j < num_sinks)
  local = visible & ~sink & (j >= end - local_window)
  return sink, local, visible & ~sink & ~local


def key_moments(k: Key, valid=None) -> tuple[jax.Array, jax.Array]:
  """`(mean, cov)` float32 of the keys where `valid` (`[B, S]`, or `[B, T, S]` for one key set per
  query; all keys when None): `[B, (T,) K, H]` and `[B, (T,) K, H, H]` (population covariance; zeros
  for an empty set)."""
  kf = k.astype(jnp.float32)
  if valid is None:
    valid = jnp.ones(k.shape[:2], bool)
  per_query = valid.ndim == 3
  w = valid.astype(jnp.float32) if per_query else valid.astype(jnp.float32)[:, None]
  count = jnp.maximum(jnp.sum(w, axis=-1), 1.0)[..., None, None]             # [B, T', 1, 1]
  mean = jnp.einsum("bts,bskh->btkh", w, kf, precision=_HIGHEST) / count
  second = jnp.einsum("bts,bskh,bskg->btkhg", w, kf, kf, precision=_HIGHEST) / count[..., None]
  cov = second - mean[..., :, None] * mean[..., None, :]
  if not per_query:
    mean, cov = mean[:, 0], cov[:, 0]
  return mean, cov


def _local_and_bulk(op, q, k, *, num_sinks, local_window, q_offset, kv_lengths, scale):
  B, T, S, _, _, _, _ = checks.check_qkv(op, q, k, k)
  _check(op, num_sinks, local_window)
  s, _ = dense.contract_scores(op, q, k, k, scale=scale)                     # [B, N, T, S]
  sink, local, bulk = (x[:, None] for x in key_ranges(
      B, T, S, num_sinks=num_sinks, local_window=local_window, q_offset=q_offset,
      kv_lengths=kv_lengths))
  return s, sink | local, bulk


@catalog.serves(199, kind="function", name="attnjax.ops.sparse.long_context_mass")
def long_context_mass(q: Query, k: Key, *, num_sinks: int = 16, local_window: int = 64, q_offset=0,
                      kv_lengths: Optional[Lengths] = None,
                      scale: Optional[float] = None) -> HeadScalars:
  """The oracle: each head's true attention mass on the bulk keys, `[B, T, N]` float32 (0 where the
  bulk is empty)."""
  s, near, bulk = _local_and_bulk("long_context_mass", q, k, num_sinks=num_sinks,
                                  local_window=local_window, q_offset=q_offset,
                                  kv_lengths=kv_lengths, scale=scale)
  lse_bulk = dense.masked_logsumexp(s, bulk)[..., 0]
  lse_all = dense.masked_logsumexp(s, bulk | near)[..., 0]
  mass = jnp.where(jnp.any(bulk, axis=-1), jnp.exp(lse_bulk - lse_all), 0.0)
  return jnp.moveaxis(mass, 1, 2)


@catalog.serves(199, kind="function", name="attnjax.ops.sparse.long_context_head_detector")
def long_context_head_detector(q: Query, k: Key, *, key_mean, key_cov, threshold: float = 0.5,
                               num_sinks: int = 16, local_window: int = 64, q_offset=0,
                               kv_lengths: Optional[Lengths] = None,
                               scale: Optional[float] = None) -> tuple[HeadFlags, HeadScalars]:
  """QAdA (see the module docstring): `(needs_full [B,T,N] bool, predicted_mass [B,T,N] float32)`
  from the sink and local keys and the bulk keys' moments `key_mean`, `key_cov`."""
  op = "long_context_head_detector"
  B, T, S, N, K, H, _ = checks.check_qkv(op, q, k, k)
  G = N // K
  mean = jnp.asarray(key_mean, jnp.float32)
  cov = jnp.asarray(key_cov, jnp.float32)
  if mean.ndim == 3:                                                          # shared by every query
    checks.check_shape(op, "key_mean", mean, (B, K, H), "[B, K, H]")
    checks.check_shape(op, "key_cov", cov, (B, K, H, H), "[B, K, H, H]")
    mean, cov = mean[:, None], cov[:, None]
  else:
    checks.check_shape(op, "key_mean", mean, (B, T, K, H), "[B, T, K, H]")
    checks.check_shape(op, "key_cov", cov, (B, T, K, H, H), "[B, T, K, H, H]")
  _check(op, num_sinks, local_window)
  end = jnp.minimum(contract.query_positions(B, T, q_offset) + 1,
                    contract.lengths_or_full(op, kv_lengths, B, S)[:, None])       # [B, T]
  # Only the sink and local keys are read: gathered per query, never the bulk.
  local = end[..., None] - local_window + jnp.arange(local_window, dtype=jnp.int32)
  sinks = jnp.broadcast_to(jnp.arange(num_sinks, dtype=jnp.int32), (B, T, num_sinks))
  idx = jnp.concatenate([sinks, local], axis=-1)                                # [B, T, L]
  near = jnp.concatenate([sinks < end[..., None], local >= max(num_sinks, 0)], axis=-1)
  near = near & (idx >= 0)
  kg = k.astype(jnp.float32)[jnp.arange(B)[:, None, None], jnp.clip(idx, 0, S - 1)]  # [B,T,L,K,H]
  scale = H ** -0.5 if scale is None else scale
  qf = q.astype(jnp.float32).reshape(B, T, K, G, H)
  s = scale * jnp.einsum("btkgh,btlkh->bkgtl", qf, kg, precision=_HIGHEST).reshape(B, N, T, -1)
  near = near[:, None]
  count = jnp.maximum(end - local_window - num_sinks, 0).astype(jnp.float32)[:, None]   # [B, 1, T]
  mu = scale * jnp.einsum("btkgh,btkh->bkgt", qf, jnp.broadcast_to(mean, (B, T, K, H)),
                          precision=_HIGHEST)
  var = scale ** 2 * jnp.einsum("btkgh,btkhf,btkgf->bkgt", qf,
                                jnp.broadcast_to(cov, (B, T, K, H, H)), qf, precision=_HIGHEST)
  mu, var = mu.reshape(B, N, T), jnp.maximum(var.reshape(B, N, T), 0.0)
  # log of the predicted bulk normalizer n · exp(μ + σ²/2), next to the exact local one.
  log_bulk = jnp.log(jnp.maximum(count, 1.0)) + mu + 0.5 * var
  log_near = dense.masked_logsumexp(s, near)[..., 0]
  has_near = jnp.any(near, axis=-1)
  # m̂ = 1 / (1 + exp(log_near - log_bulk)): a sigmoid, stable for any magnitudes.
  predicted = jnp.where(has_near, jax.nn.sigmoid(log_bulk - log_near), 1.0)
  predicted = jnp.where(count > 0, predicted, 0.0)
  predicted = jnp.moveaxis(predicted, 1, 2)
  return predicted > threshold, predicted
