"""Closure conversion of user functions (score_mod, mask_mod) for custom VJPs and kernels.

A `score_mod` or `mask_mod` may close over arrays: segment ids, learnable biases, tracers of an
enclosing `jit` or `vmap`. A custom VJP's backward pass is traced after the enclosing transformation
has returned, and a Pallas kernel may not capture arrays at all, so both need every captured array as
an explicit argument. `closure_convert_all` hoists them (all of them, unlike `jax.closure_convert`,
which hoists only values that may carry a tangent); `split_constants` further separates the part of
the function that depends on the constants alone (computed once, outside a kernel) from the part that
depends on the arguments (evaluated per tile, inside it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from jax.extend import core as jex

__all__ = ["closure_jaxpr", "closure_convert_all", "split_constants", "Split", "bind"]


def closure_jaxpr(fn: Callable, *example_args, inline: bool = False):
  """`jax.make_jaxpr(fn)(*example_args)`: a ClosedJaxpr whose consts are every array `fn` closes over.

  `inline=True` traces with jit disabled, so jitted helpers (`jnp.where`, `jnp.clip`, ...) appear as
  their primitives instead of nested calls: what a kernel that inspects the primitives wants.
  """
  if inline:
    with jax.disable_jit():
      return jax.make_jaxpr(fn)(*example_args)
  return jax.make_jaxpr(fn)(*example_args)


def closure_convert_all(fn: Callable, *example_args):
  """Hoists every array `fn` closes over into explicit trailing arguments: returns
  `(converted(*args, *consts), consts)` with `converted(*args, *consts) == fn(*args)`.

  Unlike `jax.closure_convert`, which hoists only values that may carry a tangent, this hoists all of
  them (integer segment ids, tracers of an enclosing `vmap`): a custom VJP's backward pass is traced
  after the enclosing transformation has returned, so nothing traced may stay in a closure.
  """
  closed = closure_jaxpr(fn, *example_args)
  num_args = len(example_args)

  def converted(*args):
    return jax.core.eval_jaxpr(closed.jaxpr, args[num_args:], *args[:num_args])[0]

  return converted, tuple(closed.consts)


def _read(env, v):
  return v.val if isinstance(v, jex.Literal) else env[v]


def bind(eqn, invals) -> list:
  """Applies one jaxpr equation to values (as `jax.core.eval_jaxpr` does): its outputs, as a list."""
  out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
  return out if eqn.primitive.multiple_results else [out]


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """A closed jaxpr cut by data dependence (see `split_constants`).

  Attributes:
    invars, outvars: the jaxpr's arguments and results.
    eqns: the equations that depend on an argument, or on no input at all (an `iota`, a literal
      broadcast: cheap, and evaluated where they are needed), in order.
    hoisted: the values computed from the constants alone that `eqns` (or the results) read.
    hoist: `hoist(*consts) -> values of hoisted`, in plain JAX (outside any kernel, differentiable).
  """
  invars: tuple
  outvars: tuple
  eqns: tuple
  hoisted: tuple
  hoist: Callable[..., list]


def split_constants(closed) -> Split:
  """Separates what a closed jaxpr computes from its constants alone from what depends on its
  arguments: `fn(*args) == eval(eqns, args, hoisted=hoist(*closed.consts))`.

  A kernel evaluates `eqns` per tile and receives the hoisted values as inputs, so a constant's own
  arithmetic (a cast of a table, a static slice `table[0]`) runs once outside it, and what reaches
  the kernel is the arrays the per-tile code actually indexes.
  """
  jaxpr = closed.jaxpr
  const_dep = set(jaxpr.constvars)       # values that depend on the constants alone
  arg_dep = set(jaxpr.invars)
  inner = []
  for eqn in jaxpr.eqns:
    ins = [v for v in eqn.invars if not isinstance(v, jex.Literal)]
    if any(v in arg_dep for v in ins):
      arg_dep.update(eqn.outvars)
      inner.append(eqn)
    elif any(v in const_dep for v in ins):
      const_dep.update(eqn.outvars)
    else:
      inner.append(eqn)                  # no input but literals
  needed = []
  for v in [v for e in inner for v in e.invars] + list(jaxpr.outvars):
    if not isinstance(v, jex.Literal) and v in const_dep and v not in needed:
      needed.append(v)
  # Outside: the constants' own equations and the argument-free ones they may read.
  outer = [e for e in jaxpr.eqns if not any(
      not isinstance(v, jex.Literal) and v in arg_dep for v in e.invars)]

  def hoist(*consts):
    env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts, strict=True))
    for eqn in outer:
      env.update(zip(eqn.outvars, bind(eqn, [_read(env, v) for v in eqn.invars]), strict=True))
    return [env[v] for v in needed]

  return Split(tuple(jaxpr.invars), tuple(jaxpr.outvars), tuple(inner), tuple(needed), hoist)
