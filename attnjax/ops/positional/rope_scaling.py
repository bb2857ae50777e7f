"""RoPE context extension: position interpolation, NTK-aware base scaling, dynamic NTK and YaRN.

Each method changes RoPE's inverse frequencies `θ_i = b^(-2i/d)` (`i < d/2`, `d` the rotated dims,
`b` the base) so that a model trained on `L` positions (`original_max_position_embeddings`) reads
`s · L` of them (`s = factor`). The settings are a dict named and keyed as Hugging Face's
`rope_scaling`, so a checkpoint's config reads as it is:

  "linear"   position interpolation (Chen et al., "Extending Context Window of Large Language Models
             via Positional Interpolation", arXiv:2306.15595): `θ_i' = θ_i / s`, i.e. position `p`
             is rotated as `p / s` was.
  "ntk"      NTK-aware interpolation (bloc97; YaRN paper §3.1, eq. 16): a larger base,
             `b' = b · s^(d/(d-2))`: high frequencies barely move, the lowest is divided by `s`
             (Hugging Face has only the dynamic form below).
  "dynamic"  dynamic NTK (Hugging Face "dynamic"): the NTK base recomputed from the current length
             `ℓ = max(seq_len, L)`: `b' = b · (s ℓ / L - (s - 1))^(d/(d-2))`, `b' = b` while `ℓ ≤ L`.
             When decoding over a KV cache, keys keep the frequencies of the step that cached them
             (as in Hugging Face), so past `L` decoding differs from one full forward.
  "yarn"     YaRN (Peng et al., "YaRN: Efficient Context Window Extension of Large Language Models",
             arXiv:2309.00071, eqs. 17-23, as Hugging Face's `_compute_yarn_parameters`): NTK-by-parts
             interpolation. With `r_i = L θ_i / 2π` the rotations pair `i` completes over `L`
             positions, the dims whose `r_i > β_fast` (32) keep `θ_i`, those with `r_i < β_slow`
             (1) are interpolated to `θ_i / s`, and a linear ramp in `i` blends between:

                 θ_i' = θ_i / s · (1 - γ_i) + θ_i · γ_i,    γ_i = 1 - clip((i - lo) / (hi - lo), 0, 1)
                 lo, hi = max(⌊c(β_fast)⌋, 0), min(⌈c(β_slow)⌉, d - 1),
                 c(β) = d · ln(L / (2π β)) / (2 ln b)              (the dim whose r_i = β)

             (`truncate=False` keeps lo, hi unrounded). Attention temperature: the rotated q and k
             are both multiplied by `m = 0.1 ln s + 1` (1 when `s ≤ 1`), so logits are multiplied by
             `m² = 1/t` (the paper's `sqrt(1/t) = 0.1 ln s + 1`); `attention_factor` overrides `m`;
             DeepSeek's `mscale`, `mscale_all_dim` give `m = m(s, mscale) / m(s, mscale_all_dim)`,
             `m(s, a) = 0.1 a ln s + 1`. As in Hugging Face, with partial rotary only the rotated
             dims carry the factor.

`check_rope_scaling(dict)` validates and fills the defaults (a `ValueError` naming the key);
`scale_frequencies` applies a checked dict to the default frequencies. `attnjax.ops.positional.rope`
(`rope_parameters`, `rope_frequencies`, `apply_rope(..., scaling=...)`) and
`attnjax.nn.MultiHeadAttention(rope_scaling=...)` take the dict.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp

__all__ = ["ROPE_TYPES", "check_rope_scaling", "scale_frequencies", "yarn_attention_factor"]

ROPE_TYPES = ("default", "linear", "ntk", "dynamic", "yarn")
# Keys each type takes besides `rope_type` (required ones first), with their defaults.
_REQUIRED = {"default": (), "linear": ("factor",), "ntk": ("factor",),
             "dynamic": ("factor", "original_max_position_embeddings"),
             "yarn": ("factor", "original_max_position_embeddings")}
_OPTIONAL = {"yarn": {"beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": None, "mscale": None,
                      "mscale_all_dim": None, "truncate": True}}


def _number(name: str, value: Any, *, positive: bool = True) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(f"rope_scaling: `{name}` must be a number, got {value!r}")
  if positive and value <= 0:
    raise ValueError(f"rope_scaling: `{name}` must be > 0, got {value!r}")
  return float(value)


def check_rope_scaling(scaling: Optional[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
  """The checked `rope_scaling` dict with its defaults filled in (None stays None).

  Accepts Hugging Face's keys (`rope_type`, or the older alias `type`). Raises `ValueError` naming
  the key for an unknown type or key, a missing required key, `factor < 1`, a non-integer
  `original_max_position_embeddings`, or `beta_fast <= beta_slow`.
  """
  if scaling is None:
    return None
  if not isinstance(scaling, Mapping):
    raise ValueError(f"rope_scaling must be a dict with a `rope_type`, got {scaling!r}")
  values = dict(scaling)
  if "type" in values:
    if "rope_type" in values and values["rope_type"] != values["type"]:
      raise ValueError(f"rope_scaling: `type` ({values['type']!r}) and `rope_type` "
                       f"({values['rope_type']!r}) disagree")
    values["rope_type"] = values.pop("type")
  kind = values.pop("rope_type", None)
  if kind not in ROPE_TYPES:
    raise ValueError(f"rope_scaling: `rope_type` must be one of {ROPE_TYPES}, got {kind!r}")
  required, optional = _REQUIRED[kind], _OPTIONAL.get(kind, {})
  unknown = sorted(set(values) - set(required) - set(optional))
  if unknown:
    raise ValueError(f"rope_scaling: rope_type {kind!r} takes the keys "
                     f"{sorted(required + tuple(optional))}, got unknown keys {unknown}")
  missing = [key for key in required if values.get(key) is None]
  if missing:
    raise ValueError(f"rope_scaling: rope_type {kind!r} needs the keys {missing}")
  out: dict[str, Any] = {"rope_type": kind}
  if "factor" in required:
    out["factor"] = _number("factor", values["factor"])
    if out["factor"] < 1:
      raise ValueError(f"rope_scaling: `factor` must be >= 1 (the context extension ratio), got "
                       f"{values['factor']!r}")
  if "original_max_position_embeddings" in required:
    length = values["original_max_position_embeddings"]
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
      raise ValueError(f"rope_scaling: `original_max_position_embeddings` must be a positive "
                       f"integer (the training length), got {length!r}")
    out["original_max_position_embeddings"] = length
  for key, default in optional.items():
    value = values.get(key, default)
    if value is None or key == "truncate":
      out[key] = value
    else:
      out[key] = _number(key, value, positive=key not in ("mscale", "mscale_all_dim"))
  if kind == "yarn":
    if not isinstance(out["truncate"], bool):
      raise ValueError(f"rope_scaling: `truncate` must be a bool, got {out['truncate']!r}")
    if out["beta_fast"] <= out["beta_slow"]:
      raise ValueError(f"rope_scaling: `beta_fast` ({out['beta_fast']}) must be greater than "
                       f"`beta_slow` ({out['beta_slow']})")
  return out


def _mscale(factor: float, coefficient: float = 1.0) -> float:
  return 1.0 if factor <= 1 else 0.1 * coefficient * math.log(factor) + 1.0


def yarn_attention_factor(scaling: Mapping[str, Any]) -> float:
  """`m` of a checked "yarn" dict: q and k are multiplied by it, logits by `m²` (module docstring)."""
  factor = scaling["factor"]
  if scaling.get("attention_factor") is not None:
    return float(scaling["attention_factor"])
  mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
  if mscale and mscale_all_dim:
    return _mscale(factor, mscale) / _mscale(factor, mscale_all_dim)
  return _mscale(factor)


def _yarn_ramp(dim: int, base: float, scaling: Mapping[str, Any]) -> jax.Array:
  """`γ_i`, the share of pair `i` that keeps its frequency (1: extrapolated, 0: interpolated)."""
  length = scaling["original_max_position_embeddings"]

  def correction_dim(rotations):
    return dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(base))

  lo, hi = correction_dim(scaling["beta_fast"]), correction_dim(scaling["beta_slow"])
  if scaling["truncate"]:
    lo, hi = math.floor(lo), math.ceil(hi)
  lo, hi = max(lo, 0), min(hi, dim - 1)
  if lo == hi:
    hi += 0.001  # as Hugging Face: a step instead of a division by zero
  ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - lo) / (hi - lo), 0.0, 1.0)
  return 1.0 - ramp


def scale_frequencies(inv_freq: jax.Array, dim: int, *, base: float,
                      scaling: Optional[Mapping[str, Any]],
                      seq_len: Union[None, int, jax.Array] = None) -> tuple[jax.Array, float]:
  """`(θ', m)`: the frequencies `inv_freq = base^(-2i/dim)` `[dim/2]` under `scaling` (a dict
  checked here), and the factor `m` on the rotated q and k (1 except for "yarn").

  For "dynamic", `seq_len` (int, or `[B]` per sequence) is the current length `ℓ`; the result is
  then `[B, dim/2]` (`[dim/2]` for an int or None: `ℓ = L`, no change). Other types ignore it.
  """
  scaling = check_rope_scaling(scaling)
  kind = "default" if scaling is None else scaling["rope_type"]
  if kind == "default":
    return inv_freq, 1.0
  factor = scaling["factor"]
  exponent = dim / (dim - 2) if dim > 2 else 1.0
  if kind == "linear":
    return inv_freq / factor, 1.0
  if kind == "ntk":
    return _rescaled_base(dim, base * factor ** exponent), 1.0
  if kind == "dynamic":
    length = scaling["original_max_position_embeddings"]
    if seq_len is None:
      return inv_freq, 1.0
    ell = jnp.maximum(jnp.asarray(seq_len, jnp.float32), float(length))
    new_base = base * (factor * ell / length - (factor - 1)) ** exponent
    return _rescaled_base(dim, new_base), 1.0
  gamma = _yarn_ramp(dim, base, scaling)
  blended = inv_freq / factor * (1.0 - gamma) + inv_freq * gamma
  return blended, yarn_attention_factor(scaling)


def _rescaled_base(dim: int, base) -> jax.Array:
  """`base^(-2i/dim)` for a scalar base (`[dim/2]`) or a `[B]` of bases (`[B, dim/2]`)."""
  base = jnp.asarray(base, jnp.float32)
  exponents = -jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
  return base[..., None] ** exponents if base.ndim else base ** exponents
