"""Implementation tables: `implementation=None` tries each entry in order; an entry that cannot serve
the input raises `NotImplementedError` and the next one is tried. A named implementation is used alone.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
from jax.interpreters import ad


def current_platform() -> str:
  """The default JAX backend, e.g. "cpu" or "gpu"."""
  return jax.default_backend()


def under_forward_mode(*arrays) -> bool:
  """Whether any of `arrays` (None skipped) is traced for forward-mode autodiff (`jax.jvp`,
  `jax.jacfwd`, `jax.hessian`), which cannot enter a custom VJP: the tiled implementations then
  raise `NotImplementedError` (or take a plain form), so that automatic dispatch falls through."""
  return any(isinstance(x, ad.JVPTracer) for x in arrays if x is not None)


def dispatch(op: str, table: Sequence[tuple[str, Callable, Sequence[str]]],
             implementation: Optional[str], *args, **kwargs):
  """Calls the first implementation of `table` that accepts the input.

  Args:
    op: operator name, for error messages.
    table: `(name, fn, platforms)` in order of preference; `platforms` empty means every platform.
    implementation: a name from the table, or None to choose automatically.
  """
  names = [name for name, _, _ in table]
  if implementation is not None:
    for name, fn, _ in table:
      if name == implementation:
        return fn(*args, **kwargs)
    raise ValueError(f"{op}: unknown implementation {implementation!r}; choose from {names}")
  platform = current_platform()
  reasons = []
  for name, fn, platforms in table:
    if platforms and platform not in platforms:
      continue
    try:
      return fn(*args, **kwargs)
    except NotImplementedError as e:
      reasons.append(f"{name}: {e}")
  raise NotImplementedError(f"{op}: no implementation serves this input ({'; '.join(reasons)})")
