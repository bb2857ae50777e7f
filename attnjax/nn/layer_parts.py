"""Parts of `attnjax.nn.MultiHeadAttention` kept out of its file: the positional transform of q and
k (RoPE with scaling, or FoPE with its fixed coefficients in 'buffers'), the per-token arrays a
mechanism declares (`registry.TokenInput`), and the KV cache's overrun check. Each function takes
the layer (`self`) and runs inside its `__call__`, so the variables it creates belong to the layer.
Also the mechanism lookup and call keywords of the layers that make their own q, k, v
(`ConvShareAttention`, `FoldedProjectionAttention`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from attnjax import registry
from attnjax.ops.positional import fope as fope_lib
from attnjax.ops.positional import rope
from attnjax.ops.positional import rope_scaling as rope_scaling_lib

__all__ = ["check_cache_room", "init_kv_cache", "mechanism_kwargs", "plain_mechanism", "rotary",
           "row_end", "token_input"]


def init_kv_cache(self, k: jax.Array, v: Optional[jax.Array]) -> None:
  """Creates the layer's cache ('cached_key', 'cached_value' of the full-length k, v, and
  'cache_index' 0) on the first decode call, sized by that input; `v` None: keys only."""
  self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
  if v is not None:
    self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
  self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))


def plain_mechanism(owner: str, mechanism, *, causal: bool, cross: bool) -> registry.Mechanism:
  """The record of `mechanism` (a registry name or record) for a layer that creates no arrays for
  it: one with learned or per-token arrays, or without this pattern, is an error naming `owner`."""
  mech = mechanism if isinstance(mechanism, registry.Mechanism) else registry.get(mechanism)
  if mech.params or mech.token_inputs:
    raise ValueError(f"{owner}: mechanism {mech.name!r} takes learned or per-token arrays; use one "
                     "without (e.g. 'softmax')")
  mech.check_pattern(causal=causal, cross=cross)
  return mech


def mechanism_kwargs(self, *, segment_ids=None, kv_lengths=None) -> dict[str, Any]:
  """The layer's `mechanism_kwargs`, `scale` and `implementation`, plus the call's packing and
  padding when given."""
  kwargs = {**dict(self.mechanism_kwargs or {}), "scale": self.scale,
            "implementation": self.implementation}
  if segment_ids is not None:
    kwargs["segment_ids"] = segment_ids
  if kv_lengths is not None:
    kwargs["kv_lengths"] = kv_lengths
  return kwargs


def rotary(self, K: int, H: int):
  """The positional transform `(x, positions, seq_len) -> x` of q and k (None without RoPE):
  RoPE (with `rope_scaling`) or FoPE, whose fixed coefficients are created here in 'buffers'."""
  if self.rope_base is None:
    if self.rope_scaling is not None or self.fope is not None:
      raise ValueError("MultiHeadAttention: `rope_scaling` and `fope` modify RoPE; set `rope_base`")
    return None
  try:
    scaling = rope_scaling_lib.check_rope_scaling(self.rope_scaling)
    settings = fope_lib.check_fope(self.fope)
  except ValueError as e:
    raise ValueError(f"MultiHeadAttention: {e}") from None
  base, fraction = self.rope_base, self.rope_fraction
  if settings is None:
    return lambda x, pos, seq_len: rope.apply_rope(x, pos, base=base, fraction=fraction,
                                                   scaling=scaling, seq_len=seq_len)
  if scaling is not None:
    raise ValueError("MultiHeadAttention: `fope` and `rope_scaling` are not combined; set one")
  length = settings["train_length"]
  kept = fope_lib.fope_kept_pairs(rope.rotary_dim(H, fraction), base=base, train_length=length)
  heads = K if settings["separate_heads"] else 1

  def draw(part):
    # Drawn once from the 'params' stream at init, like a parameter, but never trained.
    return lambda: fope_lib.fope_coefficients(self.make_rng("params"), heads=heads, kept=kept,
                                              sigma=settings["sigma"],
                                              dtype=self.param_dtype)[part]

  cos_coef = self.variable(registry.BUFFERS, "fope_cos_coef", draw(0)).value
  sin_coef = self.variable(registry.BUFFERS, "fope_sin_coef", draw(1)).value
  return lambda x, pos, seq_len: fope_lib.apply_fope(
      x, pos, cos_coef=cos_coef, sin_coef=sin_coef, base=base, train_length=length,
      fraction=fraction)


def token_input(op: str, spec: registry.TokenInput, dims: tuple[int, int, int], x: jax.Array,
                given: Mapping[str, Any], dense) -> jax.Array:
  """The per-token array `spec` for the tokens of `x` `[B, L, D]`: `[B, L, *shape]`."""
  shape = tuple(spec.shape(*dims))
  if spec.kind == "given":
    if spec.name not in given:
      raise ValueError(f"MultiHeadAttention: mechanism {op!r} needs the "
                       f"per-token array `{spec.name}` [B, L, *{shape}] in apply(..., "
                       f"{spec.name}=...) (L = the {'query' if spec.side == 'q' else 'key'} length)")
    value = jnp.asarray(given[spec.name])
    if value.shape != x.shape[:2] + shape:
      raise ValueError(f"MultiHeadAttention: `{spec.name}` must have shape {x.shape[:2] + shape}, "
                       f"got {value.shape}")
    return value
  if spec.name in given:
    raise ValueError(f"MultiHeadAttention: `{spec.name}` is computed by the layer from its input; "
                     "do not pass it")
  y = dense(features=shape or (1,), bias_init=spec.bias_init, use_bias=True,
            name=f"{spec.name}_proj")(x)
  y = y.reshape(x.shape[:2] + shape)
  return y if spec.activation is None else spec.activation(y)


def row_end(positions) -> jax.Array:
  """Largest position + 1 of each sequence: `[B]` of `[B, T]` positions, `[1]` of `[T]`."""
  positions = jnp.asarray(positions)
  positions = positions[None] if positions.ndim == 1 else positions
  return jnp.max(positions, axis=-1).astype(jnp.int32) + 1


def _overrun_message(index, T, s_max) -> str:
  return (f"MultiHeadAttention: decoding {int(T)} token(s) at cache index {int(index)} overruns the "
          f"KV cache of length {int(s_max)}; initialise the cache on a sequence as long as the "
          "prompt plus every token to generate")


def _raise_overrun(index, T, s_max):
  raise ValueError(_overrun_message(index, T, s_max))


def check_cache_room(index, T: int, s_max: int):
  """Raises when `index + T > s_max`: a `ValueError` now when `index` is concrete, else a runtime
  error from the compiled program (a host callback that runs only on overrun)."""
  try:
    concrete = int(index)
  except (jax.errors.ConcretizationTypeError, TypeError):
    jax.lax.cond(index + T > s_max,
                 lambda: jax.debug.callback(_raise_overrun, index, T, s_max), lambda: None)
  else:
    if concrete + T > s_max:
      raise ValueError(_overrun_message(concrete, T, s_max))
