"""score_mod / mask_mod inside a Pallas Triton kernel.

A mod is traced once at tile shapes (`core.closures.closure_jaxpr`, jitted helpers inlined) and cut
by `core.closures.split_constants`: what depends on the captured arrays alone runs outside the kernel;
the arrays the per-tile part reads become kernel inputs, flattened (`flat_table`), and each
`table[i, j, ...]` (a gather indexing every axis) becomes a pointer load at the flat index computed
from the tile's index arrays (`evaluate`). Loads of float tables are listed, so a backward kernel can
take the cotangent of each loaded value (`deltas`) and scatter it into the table's gradient.

`prepare_mod` raises NotImplementedError for what Triton cannot run, decided from the jaxpr alone and
so the same on every platform: a primitive without a Triton lowering rule, a captured array read
other than by indexing all its axes (a size-1 array may be used as a value), an out-of-bounds fill
gather (`jnp.take`'s default), a float array above `MAX_FLOAT_TABLE` elements where gradients are
taken.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jex

from attnjax.core import closures

__all__ = ["Mod", "prepare_mod", "evaluate", "flat_table", "MAX_FLOAT_TABLE", "CHUNK"]

# Elements of a float array captured by score_mod: its gradient is a one-hot reduction over the
# table per tile (O(tile · table size)), which past this costs more than the attention itself.
MAX_FLOAT_TABLE = 1 << 16
CHUNK = 16                      # table entries per step of that reduction (and the tables' padding)
_Literal = jex.Literal


def pow2(x: int) -> int:
  """The power of two ≥ max(x, 16) (16: Triton's smallest dot operand)."""
  return 1 << max(4, (x - 1).bit_length())




@dataclasses.dataclass(frozen=True, eq=False)
class Mod:
  """A mod traced for one tile: `split` (per-tile equations, hoisted values), the hoisted tables'
  `(shape, dtype)`, the ids of `concatenate`s kept as separate index parts (`lazy`), and the shapes of
  the loads of float tables in evaluation order (`float_loads`: where the backward adds a zero whose
  cotangent is the loaded value's)."""
  split: closures.Split
  tables: tuple
  lazy: frozenset
  float_loads: tuple

  def is_table(self, v) -> bool:
    return not isinstance(v, _Literal) and v in self.split.hoisted

  def float_tables(self) -> list[int]:
    return [t for t, (_, dt) in enumerate(self.tables) if jnp.issubdtype(dt, jnp.inexact)]


def _triton_primitives():
  from jax._src.pallas.triton import lowering   # the rule table is what Triton can lower
  return lowering.triton_lowering_rules


def _inner_jaxprs(eqn):
  for p in eqn.params.values():
    for x in (p if isinstance(p, (tuple, list)) else (p,)):
      if isinstance(x, jex.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, jex.Jaxpr):
        yield x


def _check_lowerable(eqns, rules):
  for eqn in eqns:
    if eqn.primitive not in rules:
      raise NotImplementedError(f"pallas_triton: a score_mod/mask_mod uses `{eqn.primitive}`, which "
                                "the Triton lowering does not support")
    for inner in _inner_jaxprs(eqn):
      _check_lowerable(inner.eqns, rules)


def _gather_parts(split: closures.Split, eqn, lazy) -> None:
  """Checks that a gather reads one element per index tuple, every axis indexed (`table[i, j]`)."""
  dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
  ndim = len(sizes)
  if (dn.offset_dims or dn.operand_batching_dims or sorted(dn.collapsed_slice_dims) != list(range(ndim))
      or sorted(dn.start_index_map) != list(range(ndim)) or any(s != 1 for s in sizes)):
    raise NotImplementedError("pallas_triton: a captured array is sliced, not indexed on every axis")
  if eqn.params["mode"] == jax.lax.GatherScatterMode.FILL_OR_DROP:
    raise NotImplementedError("pallas_triton: out-of-bounds fill gathers (jnp.take) are not supported")
  idx = eqn.invars[1]
  if not any(id(e) in lazy and e.outvars[0] is idx for e in split.eqns) and idx.aval.shape[-1] != 1:
    raise NotImplementedError("pallas_triton: gather indices not built by indexing")


def prepare_mod(fn: Callable, example_args, *, float_grads: bool):
  """Traces `fn` at tile shapes: `(Mod, hoisted values)`, or NotImplementedError (see docstring).
  `float_grads`: gradients to its float tables will be taken (bounds their size)."""
  closed = closures.closure_jaxpr(fn, *example_args, inline=True)
  split = closures.split_constants(closed)
  out_shape = split.outvars[0].aval.shape
  if len(out_shape) > 2 and any(d != 1 for d in out_shape[:-2]):
    raise NotImplementedError("pallas_triton: a mod's output has more than the tile's two axes")
  hoisted = set(split.hoisted)
  tables = tuple((tuple(v.aval.shape), v.aval.dtype) for v in split.hoisted)
  is_table = lambda v: not isinstance(v, _Literal) and v in hoisted
  gathers = {id(e): e for e in split.eqns
             if e.primitive is jax.lax.gather_p and is_table(e.invars[0])}
  gather_idx = {e.invars[1] for e in gathers.values()}
  uses: dict[Any, int] = {}
  for e in split.eqns:
    for v in e.invars:
      if not isinstance(v, _Literal):
        uses[v] = uses.get(v, 0) + 1
  lazy = frozenset(id(e) for e in split.eqns if e.primitive is jax.lax.concatenate_p
                   and e.outvars[0] in gather_idx and uses[e.outvars[0]] == 1
                   and e.params["dimension"] == e.outvars[0].aval.ndim - 1
                   and all(v.aval.shape[-1] == 1 for v in e.invars))
  rules = _triton_primitives()
  float_loads = []
  size = lambda v: math.prod(v.aval.shape)
  is_float = lambda v: jnp.issubdtype(v.aval.dtype, jnp.inexact)
  for v in split.hoisted:
    if float_grads and is_float(v) and size(v) > MAX_FLOAT_TABLE:
      raise NotImplementedError(f"pallas_triton: a captured float array of {size(v)} elements "
                                f"(> MAX_FLOAT_TABLE = {MAX_FLOAT_TABLE})")
  def read_as_value(v):      # mirrors `evaluate`'s `read`: a size-1 table is loaded whole
    if is_table(v):
      if size(v) != 1:
        raise NotImplementedError("pallas_triton: a captured array is used other than by indexing")
      if is_float(v):
        float_loads.append(tuple(v.aval.shape))

  for e in split.eqns:
    if id(e) in gathers:
      _gather_parts(split, e, lazy)
      if is_float(e.invars[0]):
        float_loads.append(tuple(e.outvars[0].aval.shape))
      continue
    if id(e) not in lazy:
      _check_lowerable([e], rules)
    for v in e.invars:
      read_as_value(v)
  read_as_value(split.outvars[0])
  return Mod(split, tables, lazy, tuple(float_loads)), split.hoist(*closed.consts)


def flat_table(x) -> jax.Array:
  """A hoisted array as the kernel reads it: flattened, padded to a power of two ≥ `CHUNK`."""
  x = jnp.ravel(x)
  return jnp.pad(x, (0, pow2(max(x.size, CHUNK)) - x.size))


def evaluate(mod: Mod, refs, args, deltas=None):
  """`fn(*args)` inside a kernel, reading hoisted tables from `refs`: `(out, loads)` where `loads`
  lists `(table number, flat index)` of every float-table load, in order. With `deltas`, each such
  load returns its value plus the matching delta (zeros whose cotangent is the value's)."""
  split = mod.split
  table_of = {v: t for t, v in enumerate(split.hoisted)}
  env = dict(zip(split.invars, args, strict=True))
  loads = []

  def load(t, flat):
    shape, dtype = mod.tables[t]
    value = refs[t][jnp.clip(flat, 0, max(1, math.prod(shape)) - 1)]
    if jnp.issubdtype(dtype, jnp.inexact):
      if deltas is not None:
        # In float32 (the deltas' dtype), then back: the mod's jaxpr was traced for the table's dtype.
        value = (value.astype(jnp.float32) + deltas[len(loads)]).astype(dtype)
      loads.append((t, flat))
    return value

  def read(v):
    if isinstance(v, _Literal):
      return v.val
    if v in table_of:        # a size-1 table used as a value (`prepare_mod` allows no other)
      t = table_of[v]
      return load(t, jnp.zeros(mod.tables[t][0], jnp.int32))
    return env[v]

  for eqn in split.eqns:
    if id(eqn) in mod.lazy:
      env[eqn.outvars[0]] = [read(v) for v in eqn.invars]
      continue
    if eqn.primitive is jax.lax.gather_p and mod.is_table(eqn.invars[0]):
      t = table_of[eqn.invars[0]]
      parts = env[eqn.invars[1]]
      parts = parts if isinstance(parts, list) else [parts]
      comps = [jax.lax.squeeze(p, (p.ndim - 1,)) for p in parts]
      shape = mod.tables[t][0]
      strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
      flat = 0
      for c, axis in zip(comps, eqn.params["dimension_numbers"].start_index_map, strict=True):
        flat = flat + jnp.clip(c.astype(jnp.int32), 0, shape[axis] - 1) * strides[axis]
      flat = jnp.broadcast_to(flat, eqn.outvars[0].aval.shape)
      env[eqn.outvars[0]] = load(t, flat)
      continue
    outs = closures.bind(eqn, [read(v) for v in eqn.invars])
    env.update(zip(eqn.outvars, outs, strict=True))
  return read(split.outvars[0]), loads
