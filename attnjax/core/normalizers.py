"""Streamable normalizers: how scores become attention weights, in a form a tiled kernel can stream.

Attention with normalizer (f, h) is

    o_i = Σ_j f(s_ij) v_j / (Σ_j h(s_ij) + ε)            (or Σ_j f(s_ij) v_j when unnormalized)

Softmax is f = h = exp, ε = 0. A kernel that visits keys block by block keeps a running shift m_i and
works with the shifted functions f̃(s, m) = f(s)·e^{-m}, h̃(s, m) = h(s)·e^{-m}; when m grows, earlier
partial sums are rescaled by e^{m_old - m_new}. Every normalizer here is therefore given by its shifted
forms, and f̃, h̃ must be exactly `f·e^{-m}`, `h·e^{-m}` for the rescaling to be exact. The shift is the
running row maximum, clamped from below at `max_floor` (a floor of 0 keeps e^{-m} bounded for functions
like e^s - 1 whose scale does not vanish as s → -inf).

The kernel stores one residual per row, `lse = m + log(Σ h̃ + ε e^{-m})` (the log of the denominator);
since f̃ is homogeneous in e^{-m}, the final weights are `f̃(s, lse)`, which is all the backward pass
needs. Derivatives f̃', h̃' come from `jax.jvp` on the elementwise functions.

Unnormalized normalizers (sigmoid, ReLU attention) use no shift (m = 0) and report `lse = 0`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp

Shifted = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Normalizer:
  """Weights f(s) / (Σ h(s) + eps), given by their shifted forms (see module docstring).

  Attributes:
    name: registry name.
    weight: f̃(s, m) = f(s)·e^{-m}, elementwise.
    mass: h̃(s, m); None means h = f (softmax-like; saves one evaluation).
    normalized: False for unnormalized weights (o = Σ f(s) v; no shift, lse = 0).
    eps: added to the denominator Σ h(s).
    max_floor: lower clamp of the running shift m.
  """
  name: str
  weight: Shifted
  mass: Optional[Shifted] = None
  normalized: bool = True
  eps: float = 0.0
  max_floor: float = float("-inf")

  def shift(self, row_max: jax.Array) -> jax.Array:
    """The running shift for a row maximum (0 for unnormalized; finite whenever a key is visible)."""
    if not self.normalized:
      return jnp.zeros_like(row_max)
    return jnp.maximum(row_max, self.max_floor)

  def weight_and_mass(self, s, m):
    """(f̃(s, m), h̃(s, m))."""
    w = self.weight(s, m)
    return w, (w if self.mass is None else self.mass(s, m))

  def weight_grads(self, s, m):
    """(f̃, ∂f̃/∂s, ∂h̃/∂s) elementwise at fixed m."""
    ones = jnp.ones_like(s)
    w, dw = jax.jvp(lambda x: self.weight(x, m), (s,), (ones,))
    if self.mass is None:
      return w, dw, dw
    _, dh = jax.jvp(lambda x: self.mass(x, m), (s,), (ones,))
    return w, dw, dh

  def denominator(self, mass_sum, m):
    """Σ h̃ + ε·e^{-m} (the shifted denominator)."""
    if self.eps:
      return mass_sum + self.eps * jnp.exp(-m)
    return mass_sum


def _exp(s, m):
  return jnp.exp(s - m)


SOFTMAX = Normalizer("softmax", weight=_exp)

# Softpick: Zuhri et al., "Softpick: No Attention Sink, No Massive Activations with Rectified Softmax",
# arXiv:2504.20966. f(s) = relu(e^s - 1), h(s) = |e^s - 1|; shifted: e^{-m}(e^s - 1) = e^{s-m} - e^{-m}.
SOFTPICK = Normalizer(
    "softpick",
    weight=lambda s, m: jax.nn.relu(jnp.exp(s - m) - jnp.exp(-m)),
    mass=lambda s, m: jnp.abs(jnp.exp(s - m) - jnp.exp(-m)),
    eps=1e-6,
    max_floor=0.0,
)

# Sigmoid attention: Ramapuram et al., "Theory, Analysis, and Best Practices for Sigmoid Self-Attention",
# arXiv:2409.04431. Weights sigmoid(s) with no normalization (their bias -log S is a score_mod).
SIGMOID = Normalizer("sigmoid", weight=lambda s, m: jax.nn.sigmoid(s), normalized=False)

# ReLU attention (ReLA): Zhang et al., "Sparse Attention with Linear Units", arXiv:2104.07012.
# Weights relu(s), unnormalized (the paper normalizes the output with RMSNorm in the layer).
RELU = Normalizer("relu", weight=lambda s, m: jax.nn.relu(s), normalized=False)

# Unnormalized exponential weights e^s: with a score_mod that subtracts a row's log-sum-exp computed
# in an earlier pass, a two-pass form of a normalizer that needs more than the running max (Cog).
EXP = Normalizer("exp", weight=lambda s, m: jnp.exp(s), normalized=False)

_NORMALIZERS = {n.name: n for n in (SOFTMAX, SOFTPICK, SIGMOID, RELU, EXP)}


def register_normalizer(normalizer: Normalizer) -> Normalizer:
  """Makes `normalizer` available by name to every attention operator."""
  if normalizer.name in _NORMALIZERS and _NORMALIZERS[normalizer.name] is not normalizer:
    raise ValueError(f"normalizer {normalizer.name!r} is already registered")
  _NORMALIZERS[normalizer.name] = normalizer
  return normalizer


def get_normalizer(normalizer: Union[str, Normalizer]) -> Normalizer:
  """Looks a normalizer up by name (or passes a `Normalizer` through)."""
  if isinstance(normalizer, Normalizer):
    return normalizer
  try:
    return _NORMALIZERS[normalizer]
  except KeyError:
    raise ValueError(f"unknown normalizer {normalizer!r}; known: {sorted(_NORMALIZERS)}") from None


def list_normalizers() -> list[str]:
  """The registered normalizer names (what `get_normalizer` accepts), sorted."""
  return sorted(_NORMALIZERS)
