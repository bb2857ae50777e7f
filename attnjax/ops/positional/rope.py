"""Rotary position embedding (RoPE), half-split (GPT-NeoX / LLaMA) convention.

For a head vector `x` whose first `d` dims rotate (`d` even, `d ≤ H`), split those into halves
`x₁ = x[:d/2]`, `x₂ = x[d/2:d]`; at position `p`, with `θ_i = p · base^(-2i/d)`, `i < d/2`:

    x₁' = x₁ cos θ - x₂ sin θ        x₂' = x₂ cos θ + x₁ sin θ        x[d:] unchanged.

Each pair `(x₁[i], x₂[i])` is rotated by the angle `θ_i`, so `⟨rope(q, m), rope(k, n)⟩` depends
on the positions only through `n - m`: attention logits see relative positions. A `fraction < 1`
(partial rotary, GPT-NeoX / Phi) leaves the tail of each head unrotated.

Context extension (`scaling=`, Hugging Face's `rope_scaling` dict: "linear" position interpolation,
"ntk", "dynamic" NTK, "yarn") changes the frequencies, and for YaRN multiplies the rotated dims by
the attention factor `m`: see `rope_scaling.py`.

Not a registered mechanism: it is a positional transform applied to `q` and `k` before any mechanism
(`attnjax.nn.MultiHeadAttention` does so when `rope_base` is set).

Paper: Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", arXiv:2104.09864.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp

from attnjax.ops.positional import rope_scaling
from attnjax.typing import Array, Float, Int

__all__ = ["apply_rope", "check_positions", "rope_frequencies", "rope_parameters", "rotary_dim",
           "segment_positions"]

# Shapes in the signatures (jaxtyping; letters of `attnjax.typing`, d the rotated dims).
Heads = Float[Array, "B T N H"]
Positions = Int[Array, "*B T"] | Float[Array, "*B T"]   # integer, or float (interpolation)
# half = d / 2; [B, half] for "dynamic" with per-sequence lengths.
Frequencies = Float[Array, "half"] | Float[Array, "batch half"]
ScalarLength = Int[Array, ""]
SequenceLengths = Int[Array, "batch"]
SeqLen = Union[None, int, ScalarLength, SequenceLengths]
Scaling = Optional[Mapping[str, Any]]
SegmentPositions = Int[Array, "B T"]


def rotary_dim(head_dim: int, fraction: float = 1.0) -> int:
  """Number of rotated dims: `fraction · head_dim` rounded down to an even count.

  Raises:
    ValueError: `fraction` outside (0, 1]; a full rotation (`fraction == 1`) of an odd `head_dim`;
      or a fraction so small that no pair of dims rotates.
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"rope: `fraction` must be in (0, 1], got {fraction}")
  if fraction == 1.0 and head_dim % 2:
    raise ValueError(f"rope: rotating the whole head needs an even head dim H, got H={head_dim}; "
                     "use an even head dim or a `fraction` < 1 (partial rotary)")
  d = int(round(fraction * head_dim))
  d -= d % 2
  if d == 0:
    raise ValueError(f"rope: `fraction`={fraction} of head dim H={head_dim} rotates no pair of "
                     "dims; need fraction · H >= 2")
  return d


def rope_parameters(dim: int, *, base: float = 10000.0, scaling: Scaling = None,
                    seq_len: SeqLen = None) -> tuple[Frequencies, float]:
  """`(θ, m)`: the inverse frequencies `base^(-2i/dim)`, `i = 0 … dim/2 - 1` (float32 `[dim / 2]`),
  under the context extension `scaling` (`rope_scaling.py`), and the factor `m` on the rotated dims
  (YaRN's attention temperature; 1 otherwise).

  Args:
    dim: the (even) number of rotated dims.
    base: the wavelength base (10000 in the paper; larger bases extend the context).
    scaling: None, or a Hugging Face `rope_scaling` dict ({"rope_type": "linear" | "ntk" | "dynamic"
      | "yarn", "factor": s, ...}).
    seq_len: "dynamic" only: the current length, an int or `[B]` (then `θ` is `[B, dim / 2]`).
  """
  if dim <= 0 or dim % 2:
    raise ValueError(f"rope_frequencies: the rotary dim must be even and > 0, got {dim}")
  if base <= 1.0:
    raise ValueError(f"rope_frequencies: `base` must be > 1, got {base}")
  inv_freq = jnp.asarray(base, jnp.float32) ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  return rope_scaling.scale_frequencies(inv_freq, dim, base=base, scaling=scaling, seq_len=seq_len)


def rope_frequencies(dim: int, *, base: float = 10000.0, scaling: Scaling = None,
                     seq_len: SeqLen = None) -> Frequencies:
  """Inverse frequencies `base^(-2i/dim)`, `i = 0 … dim/2 - 1`, float32 `[dim / 2]`, under the
  context extension `scaling` (the first entry of `rope_parameters`).

  Args:
    dim: the (even) number of rotated dims.
    base: the wavelength base (10000 in the paper; larger bases extend the context).
    scaling: None, or a Hugging Face `rope_scaling` dict (see `rope_parameters`).
    seq_len: "dynamic" only: the current length (int or `[B]`).
  """
  return rope_parameters(dim, base=base, scaling=scaling, seq_len=seq_len)[0]


def apply_rope(x: Heads, positions: Positions, *, base: float = 10000.0, fraction: float = 1.0,
               dim: Optional[int] = None, scaling: Scaling = None, seq_len: SeqLen = None) -> Heads:
  """Rotates the first `d` dims of each head of `x` by position-dependent angles (RoPE).

  `x'[..., :d/2] = x₁ cos θ - x₂ sin θ`, `x'[..., d/2:d] = x₂ cos θ + x₁ sin θ`,
  `x'[..., d:] = x[..., d:]` with `θ[b, t, i] = positions[b, t] · base^(-2i/d)` (see the module
  docstring); with `scaling`, the scaled frequencies, and the rotated dims times YaRN's `m`.

  Args:
    x: `[B, T, N, H]` queries or keys (any float dtype).
    positions: `[B, T]` or `[T]` positions, integer or float (float allows position interpolation).
    base: frequency base, default 10000 (RoFormer).
    fraction: share of the head dim that rotates; `d = fraction · H` rounded down to an even count.
    dim: the rotated dim count `d` itself (even, ≤ H); overrides `fraction`.
    scaling: None, or a Hugging Face `rope_scaling` dict: "linear" | "ntk" | "dynamic" | "yarn"
      (`rope_scaling.py`).
    seq_len: "dynamic" only: the current length `[B]` or int. Default: per sequence, its largest
      position + 1 (Hugging Face takes the largest over the batch; per sequence keeps the examples
      of a batch independent).

  Returns:
    `[B, T, N, H]` in x's dtype; the rotation is computed in float32.
  """
  if jnp.ndim(x) != 4:
    raise ValueError(f"apply_rope: `x` must have shape [B, T, N, H], got shape {jnp.shape(x)}")
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise TypeError(f"apply_rope: `x` must be floating point, got {jnp.result_type(x)}")
  B, T, _, H = x.shape
  positions = check_positions("apply_rope", positions, B, T)
  if dim is None:
    d = rotary_dim(H, fraction)
  else:
    if dim <= 0 or dim % 2 or dim > H:
      raise ValueError(f"apply_rope: `dim` (rotated dims) must be even, in [2, H={H}]; got {dim}")
    d = dim
  scaling = rope_scaling.check_rope_scaling(scaling)
  if scaling is not None and scaling["rope_type"] == "dynamic" and seq_len is None:
    seq_len = jnp.max(positions, axis=1).astype(jnp.int32) + 1           # [B or 1]
  inv_freq, factor = rope_parameters(d, base=base, scaling=scaling, seq_len=seq_len)
  if inv_freq.ndim == 2:
    inv_freq = inv_freq[:, None, :]                                       # [B or 1, 1, d/2]
  # [B or 1, T, d/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  cos = jnp.cos(angles)[:, :, None, :] * factor
  sin = jnp.sin(angles)[:, :, None, :] * factor
  xf = x.astype(jnp.float32)
  x1, x2, rest = xf[..., :d // 2], xf[..., d // 2:d], xf[..., d:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
  return out.astype(x.dtype)


def segment_positions(segment_ids: SegmentPositions) -> SegmentPositions:
  """Position of each token inside its packed segment, `[B, T]` int32.

  Segments are runs of equal ids: `positions[b, t] = t - (start of the run containing t)`, so each
  document of a packed row counts from 0, as if it were run alone.
  """
  segment_ids = jnp.asarray(segment_ids)
  if segment_ids.ndim != 2:
    raise ValueError(f"segment_positions: `segment_ids` must have shape [B, T], "
                     f"got shape {segment_ids.shape}")
  T = segment_ids.shape[1]
  idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), segment_ids.shape)
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def check_positions(op: str, positions, B: int, T: int) -> jax.Array:
  """`positions` as `[1 or B, T]` (a `[T]` array gains a leading axis); a ValueError naming `op`
  otherwise. Shared by the rotary transforms (RoPE, FoPE)."""
  positions = jnp.asarray(positions)
  if positions.shape == (T,):
    return positions[None]
  if positions.ndim != 2 or positions.shape[1] != T or positions.shape[0] not in (1, B):
    raise ValueError(f"{op}: `positions` must have shape [B, T] = [{B}, {T}] or [T] = [{T}], "
                     f"got shape {positions.shape}")
  return positions
