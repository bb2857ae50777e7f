"""Tables of an operator's learned arrays: one row per array gives the registry's `ParamSpec`s, the
operator's shape checks and example arrays at any value width.

A row is `(name, shape, letters, init)`: `shape(N, K, H, h, **extra)` is the array's shape for N
query heads, K key/value heads, key head dim H and value width h (extra sizes, such as Mega's EMA
dimension, are keywords with defaults); `letters` is the same shape in words, for error messages;
`init` a `jax.nn.initializers` initializer. In the Flax layer h = H (its head dim); an operator
called directly takes its arrays at the value width of `v`.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.registry import ParamSpec

Row = tuple[str, Callable[..., tuple], str, Callable]


def param_specs(table: Sequence[Row], *, h: Optional[int] = None,
                settings: Optional[Mapping[str, str]] = None) -> tuple[ParamSpec, ...]:
  """The table's ParamSpecs, for value width `h` (None: h = H, as in the Flax layer). `settings`
  maps the rows' extra size keywords to the mechanism keywords that set them (e.g. `{"block":
  "compress_block"}`), so the layer sizes the arrays from the mechanism's settings."""
  settings = dict(settings or {})

  def shape(f):
    def sized(N, K, H, **chosen):
      extra = {size: chosen[key] for size, key in settings.items() if key in chosen}
      return tuple(f(N, K, H, H if h is None else h, **extra))
    return sized

  return tuple(ParamSpec(name, shape(f), init, settings=tuple(settings.values()))
               for name, f, _, init in table)


def check_table(op: str, table: Sequence[Row], params: dict, *, N: int, K: int, H: int, h: int,
                **extra):
  """Raises unless every array of `params` has its row's shape at these sizes."""
  checks.check_param_shapes(
      op, {name: (tuple(f(N, K, H, h, **extra)), letters) for name, f, letters, _ in table}, params)


def fan_in_normal(key, shape, dtype=jnp.float32):
  """Initializer of a kernel `[..., in, out]`: N(0, 1/in), so each output stays O(1)."""
  return (jax.random.normal(key, shape) * shape[-2] ** -0.5).astype(dtype)


__all__ = ["Row", "param_specs", "check_table", "fan_in_normal"]
