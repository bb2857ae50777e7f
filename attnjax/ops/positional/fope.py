"""Fourier Position Embedding (FoPE): RoPE whose every rotated pair carries a Fourier series, with the
frequencies too low to be trained clipped to zero.

RoPE rotates pair `m` (`x₁[m] = x[m]`, `x₂[m] = x[m + d/2]`, half-split convention as `rope.py`) at
position `p` by the single frequency `ω_m = base^(-2m/d)`. FoPE (Hua et al., eq. 11 and §5):

1. Clip to floor: a frequency that cannot complete one period within the training length `L`,
   `ω_m < 2π / L`, is set to 0 (`cos = 1`, `sin = 0`: that pair is left unrotated and carries no
   position). Since `ω_m` falls with `m`, the `D` kept pairs are a prefix `m < D`.
2. Fourier series: each kept pair mixes every kept frequency, the dominant one with weight ~1 and
   the others with small fixed random weights, separately for the cosine and the sine part:

       C_m(p) = Σ_{k<D} A[k, m] cos(ω_k p),        S_m(p) = Σ_{k<D} Bc[k, m] sin(ω_k p)
       x₁'[m] = x₁[m] C_m(p) - x₂[m] S_m(p),       x₂'[m] = x₂[m] C_m(p) + x₁[m] S_m(p)

   with `A = I + E_A`, `Bc = I + E_B`, `E ~ N(0, σ² / D)` drawn once and never trained
   (`fope_coefficients`). `σ` is the paper's hyper-parameter (0.3, 0.4, 0.6 for its 60M, 180M, 1.2B
   models). The coefficients may differ per key/value head (`[K, D, D]`; query head `n` uses those
   of its key head `n // (N / K)`, so q and k of a head pair see the same series) or be shared
   (`[1, D, D]` or `[D, D]`).

With `E = 0` and no clipping this is RoPE exactly (tested). The relative-position property holds
exactly for `σ = 0` (clipped pairs are the identity); for `σ > 0` the products of two different
frequencies in `C_m(p_q) C_m(p_k) + S_m(p_q) S_m(p_k)` depend on the absolute positions, so the
logit is relative only up to terms of first order in `σ` (the paper models these extra frequencies
as the spectrum damage a trained network produces anyway; tests measure the deviation's linear
scaling in `σ`).

Interpretations, against the authors' code (TsinghuaC3I/Fourier-Position-Embedding, olmo/model.py,
`FourierEmbedding`, configs "eye_xavier_norm_σ-sep_basis_head-ignore_clamp_zero"): separate cosine
and sine coefficients and per-head coefficients as there; the noise std `σ / sqrt(D)` is their
Xavier-normal std `σ · sqrt(2 / (D + D))` of one `[D, D]` matrix (their 3-D per-head tensor folds
the head axis into Xavier's fans; here `σ` means the same with and without per-head coefficients).
Their code keeps only `min(D, H/4)` output pairs and fills the rest, and the clipped pairs, with
`cos = sin = 1` (a fixed 45° rotation scaled by √2, still position-free); here every kept pair gets
its series and clipped pairs are the paper's zero frequency (`cos = 1`, `sin = 0`).

Not a registered mechanism: a positional transform of q and k before any mechanism
(`attnjax.nn.MultiHeadAttention(rope_base=..., fope={"train_length": L, "sigma": σ})`).

Paper: Hua et al., "Fourier Position Embedding: Enhancing Attention's Periodic Extension for Length
Generalization", arXiv:2412.17739.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from attnjax import catalog
from attnjax.ops.positional import rope
from attnjax.typing import Array, Float, Int

__all__ = ["apply_fope", "check_fope", "fope_coefficients", "fope_kept_pairs"]

Heads = Float[Array, "B T N H"]
Positions = Int[Array, "*batch T"] | Float[Array, "*batch T"]
Coefficients = Float[Array, "C D D"] | Float[Array, "D D"]

FOPE_DEFAULTS = {"train_length": None, "sigma": 0.3, "separate_heads": True}


def check_fope(settings: Optional[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
  """The checked FoPE settings with defaults (None stays None): `train_length` (int, the clipping
  floor's `L`; None: no clipping), `sigma` (>= 0, default 0.3), `separate_heads` (bool, default
  True: one coefficient pair per key/value head). Raises `ValueError` naming the key."""
  if settings is None:
    return None
  if not isinstance(settings, Mapping):
    raise ValueError(f"fope: settings must be a dict (keys {sorted(FOPE_DEFAULTS)}), got {settings!r}")
  unknown = sorted(set(settings) - set(FOPE_DEFAULTS))
  if unknown:
    raise ValueError(f"fope: unknown keys {unknown}; FoPE takes {sorted(FOPE_DEFAULTS)}")
  out = {**FOPE_DEFAULTS, **settings}
  length = out["train_length"]
  if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
    raise ValueError(f"fope: `train_length` must be None or a positive integer, got {length!r}")
  sigma = out["sigma"]
  if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 <= sigma < math.inf:
    raise ValueError(f"fope: `sigma` must be a number >= 0, got {sigma!r}")
  out["sigma"] = float(sigma)
  if not isinstance(out["separate_heads"], bool):
    raise ValueError(f"fope: `separate_heads` must be a bool, got {out['separate_heads']!r}")
  return out


def fope_kept_pairs(dim: int, *, base: float = 10000.0, train_length: Optional[int] = None) -> int:
  """`D`, the number of pairs whose frequency `base^(-2m/dim)` completes a period within
  `train_length` (`≥ 2π / L`); all `dim / 2` without a length. At least 1 (the first pair has
  frequency 1 ≥ 2π/L for any L ≥ 7); raises if none is kept."""
  half = dim // 2
  if train_length is None:
    return half
  floor = 2 * math.pi / train_length
  kept = sum(1 for m in range(half) if base ** (-2.0 * m / dim) >= floor)
  if kept == 0:
    raise ValueError(f"fope: `train_length`={train_length} clips every frequency (the largest, 1, "
                     f"is below 2π/L = {floor:.3g}); FoPE needs train_length >= 7")
  return kept


def fope_coefficients(key: jax.Array, *, heads: int, kept: int, sigma: float,
                      dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """The fixed random Fourier coefficients `(A, Bc)`, each `[heads, D, D] = I + N(0, σ²/D)`: column
  `m` weights the frequencies of pair `m`'s series (cosine and sine part)."""
  key_a, key_b = jax.random.split(key)
  eye = jnp.eye(kept, dtype=jnp.float32)
  draw = lambda k: eye + sigma / math.sqrt(kept) * jax.random.normal(k, (heads, kept, kept))
  return draw(key_a).astype(dtype), draw(key_b).astype(dtype)


@catalog.serves(158, kind="positional transform", name="attnjax.ops.positional.apply_fope")
def apply_fope(x: Heads, positions: Positions, *, cos_coef: Coefficients, sin_coef: Coefficients,
               base: float = 10000.0, train_length: Optional[int] = None, fraction: float = 1.0,
               dim: Optional[int] = None) -> Heads:
  """FoPE on the first `d` dims of each head of `x` (module docstring); the rest unchanged.

  Args:
    x: `[B, T, N, H]` queries or keys (any float dtype).
    positions: `[B, T]` or `[T]` positions, integer or float.
    cos_coef, sin_coef: `[C, D, D]` (C divides N: head `n` uses `n // (N / C)`) or `[D, D]`, the
      cosine and sine series coefficients (`fope_coefficients`), `D = fope_kept_pairs(d, ...)`.
    base: RoPE's frequency base.
    train_length: the training length `L`; pairs with frequency below `2π / L` are unrotated.
    fraction, dim: the rotated dims `d`, as `rope.apply_rope`.

  Returns:
    `[B, T, N, H]` in x's dtype (computed in float32).
  """
  if jnp.ndim(x) != 4:
    raise ValueError(f"apply_fope: `x` must have shape [B, T, N, H], got shape {jnp.shape(x)}")
  B, T, N, H = x.shape
  positions = rope.check_positions("apply_fope", positions, B, T)
  if dim is None:
    d = rope.rotary_dim(H, fraction)
  elif dim <= 0 or dim % 2 or dim > H:
    raise ValueError(f"apply_fope: `dim` (rotated dims) must be even, in [2, H={H}]; got {dim}")
  else:
    d = dim
  kept = fope_kept_pairs(d, base=base, train_length=train_length)
  coefs = []
  for name, c in (("cos_coef", cos_coef), ("sin_coef", sin_coef)):
    c = jnp.asarray(c, jnp.float32)
    c = c[None] if c.ndim == 2 else c
    if c.ndim != 3 or c.shape[1:] != (kept, kept) or N % c.shape[0]:
      raise ValueError(f"apply_fope: `{name}` must have shape [C, D, D] or [D, D] with D = {kept} "
                       f"kept pairs (of d/2 = {d // 2}) and C dividing N = {N}, got shape "
                       f"{jnp.shape(c)}")
    coefs.append(c)
  if coefs[0].shape != coefs[1].shape:
    raise ValueError(f"apply_fope: `cos_coef` {coefs[0].shape} and `sin_coef` {coefs[1].shape} must "
                     "have the same shape")
  inv_freq = rope.rope_frequencies(d, base=base)[:kept]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq                   # [B', T, D]
  # Each pair's series: [B', T, C, D]; then repeated to the N heads of x.
  series_cos = jnp.einsum("btk,ckm->btcm", jnp.cos(angles), coefs[0])
  series_sin = jnp.einsum("btk,ckm->btcm", jnp.sin(angles), coefs[1])
  group = N // coefs[0].shape[0]
  series_cos = jnp.repeat(series_cos, group, axis=2)
  series_sin = jnp.repeat(series_sin, group, axis=2)
  # Clipped pairs: zero frequency, cos 1 and sin 0 (unrotated).
  clipped = d // 2 - kept
  pad = lambda a, value: jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, clipped)), constant_values=value)
  cos, sin = pad(series_cos, 1.0), pad(series_sin, 0.0)
  xf = x.astype(jnp.float32)
  x1, x2, rest = xf[..., :d // 2], xf[..., d // 2:d], xf[..., d:]
  # positions' batch is 1 or B, so the products have x's leading shape [B, T, N].
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
  return out.astype(x.dtype)
