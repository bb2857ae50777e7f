"""Attention on the sphere: softmax attention whose sum over keys is a quadrature of an integral over
the sphere, globally or over a geodesic disc around each query point.

Bonev et al. (NVIDIA), "Attention on the Sphere", arXiv:2505.11157 (their code: torch-harmonics'
`AttentionS2` and `NeighborhoodAttentionS2`). Tokens are
samples of a signal at points x_j of S² with quadrature weights ω_j (the area each sample stands
for); the attention integral ∫ exp(s(x_i, y)) v(y) dy / ∫ exp(s(x_i, y)) dy becomes

    o_i = Σ_j ω_j exp(s_ij) v_j / Σ_j ω_j exp(s_ij)        s_ij = scale · q_i·k_j

that is, softmax with log ω_j added to the logits (as torch-harmonics passes the log weights as an
additive mask). On a latitude-longitude grid the rows near the poles stand for small areas; without
the weights they would get as much attention as the equator's, and the output would depend on the
grid rather than on the signal. The neighbourhood variant keeps only the keys within geodesic
distance θ_cutoff of the query point, arccos(x̂_i·x̂_j) ≤ θ_cutoff, i.e. x̂_i·x̂_j ≥ cos θ_cutoff.

Per-token inputs (side "kv"; a self-attention query reads its own point at its position):
`log_weights [B, S]` (log ω_j: any real numbers; `sphere_grid` gives the weights of a grid) and, for
the neighbourhood, `points [B, S, 3]` (directions; normalized here). Attention between two grids (the
paper's up- and down-sampling) passes `query_points [B, T, 3]`.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `[B,T,N,h]`.
"""

from __future__ import annotations

import math
from typing import Optional

import jax.numpy as jnp
import numpy as np

from attnjax.core import checks
from attnjax.core import contract
from attnjax.registry import Mechanism, TokenInput, register
from attnjax.typing import Array, Float, Key, Lengths, Output, PerKeyToken, Query, Value

__all__ = ["sphere_grid", "spherical_attention", "spherical_neighborhood_attention"]

Points = Float[Array, "B L 3"]


def sphere_grid(nlat: int, nlon: int) -> tuple[np.ndarray, np.ndarray]:
  """An equiangular latitude-longitude grid: cell-centre points `[nlat·nlon, 3]` (row-major: latitude
  from the north pole, then longitude) and their quadrature weights `[nlat·nlon]`, each cell's exact
  area Δφ (cos θ_top − cos θ_bottom), which sum to 4π. (torch-harmonics uses Clenshaw-Curtis or
  Gauss-Legendre weights on its grids; any rule whose weights are the areas serves.)"""
  edges = np.linspace(0.0, np.pi, nlat + 1)
  colat = 0.5 * (edges[:-1] + edges[1:])
  lon = (np.arange(nlon) + 0.5) * 2 * np.pi / nlon
  area = (np.cos(edges[:-1]) - np.cos(edges[1:])) * 2 * np.pi / nlon
  th, ph = np.meshgrid(colat, lon, indexing="ij")
  points = np.stack([np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th)], -1)
  return points.reshape(-1, 3), np.repeat(area, nlon)


def _log_weight_mod(op, log_weights, B, S):
  checks.check_shape(op, "log_weights", log_weights, (B, S), "[B, S]")
  lw = jnp.asarray(log_weights, jnp.float32)

  def score_mod(s, b, n, qi, ki):
    del n, qi
    return s + lw[b, ki]

  return score_mod


def spherical_attention(q: Query, k: Key, v: Value, *, log_weights: PerKeyToken,
                        causal: bool = False, segment_ids=None, q_offset=0,
                        kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                        implementation: Optional[str] = None) -> Output:
  """Global attention on the sphere: softmax with the keys' log quadrature weights added to the
  logits (module docstring). `log_weights [B, S]`."""
  op = "spherical_attention"
  B, _, S, _, _, _, _ = checks.check_qkv(op, q, k, v)
  return contract.flex_with_contract(op, q, k, v, causal=causal, segment_ids=segment_ids,
                                     q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                                     implementation=implementation,
                                     score_mod=_log_weight_mod(op, log_weights, B, S))


def _unit(x):
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def spherical_neighborhood_attention(q: Query, k: Key, v: Value, *, log_weights: PerKeyToken,
                                     points: Points, cutoff: float = math.pi / 8,
                                     query_points: Optional[Points] = None, causal: bool = False,
                                     segment_ids=None, q_offset=0,
                                     kv_lengths: Optional[Lengths] = None,
                                     scale: Optional[float] = None,
                                     implementation: Optional[str] = None) -> Output:
  """Neighbourhood attention on the sphere: the quadrature-weighted softmax over the keys whose
  points lie within geodesic distance `cutoff` (radians) of the query's point."""
  op = "spherical_neighborhood_attention"
  B, T, S, _, _, _, _ = checks.check_qkv(op, q, k, v)
  checks.check_shape(op, "points", points, (B, S, 3), "[B, S, 3]")
  if not 0 < cutoff:
    raise ValueError(f"{op}: `cutoff` (the disc's geodesic radius) must be positive, got {cutoff!r}")
  kp = _unit(points)
  if query_points is not None:
    checks.check_shape(op, "query_points", query_points, (B, T, 3), "[B, T, 3]")
    qp = _unit(query_points)
  elif T > S:
    raise ValueError(f"{op}: queries read their points from the keys' (self-attention); with T={T}"
                     f" > S={S} pass `query_points` [B, T, 3]")
  else:
    pos = jnp.clip(contract.query_positions(B, T, q_offset), 0, S - 1)
    qp = jnp.take_along_axis(kp, pos[..., None], axis=1)
  threshold = math.cos(min(cutoff, math.pi))

  def mask_mod(b, n, qi, ki):
    del n
    return jnp.sum(qp[b, qi] * kp[b, ki], axis=-1) >= threshold

  return contract.flex_with_contract(op, q, k, v, causal=causal, segment_ids=segment_ids,
                                     q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                                     implementation=implementation, mask_mod=mask_mod,
                                     score_mod=_log_weight_mod(op, log_weights, B, S))


_CITE = dict(family="geometric", seeds=(47,), paper="Attention on the Sphere", arxiv="2505.11157")
_LOG_WEIGHTS = TokenInput("log_weights", side="kv", kind="given")

register(Mechanism(
    name="spherical_attention", fn=spherical_attention, **_CITE,
    # A signal on the sphere has no token order; queries may sit on another grid (cross).
    patterns=frozenset({"self", "cross"}), decode=False, token_inputs=(_LOG_WEIGHTS,)))

register(Mechanism(
    name="spherical_neighborhood_attention", fn=spherical_neighborhood_attention, **_CITE,
    # Queries read their points from the key side; another grid's queries pass `query_points`,
    # which the layer does not create.
    patterns=frozenset({"self"}), decode=False,
    token_inputs=(_LOG_WEIGHTS, TokenInput("points", side="kv", kind="given",
                                           shape=lambda N, K, H: (3,))),
    # A disc of 1 radian holds about a quarter of the sphere's random points: the mask matters.
    example={"cutoff": 1.0}))
