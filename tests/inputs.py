"""Shared test inputs and probes: one q, k, v builder with one argument order, and the shapes of a
program's intermediate arrays (for memory-scaling tests)."""

import functools

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np


def qkv(*, B=2, T=13, S=None, N=4, K=2, H=8, h=6, seed=0, dtype=jnp.float32,
        key_per_array=False):
  """Standard-normal `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` (S = T by default).

  The three arrays come from `split(PRNGKey(seed), 3)`, or with `key_per_array` from `PRNGKey(seed)`,
  `PRNGKey(seed + 1)`, `PRNGKey(seed + 2)` (the draws some tests were written against).
  """
  S = T if S is None else S
  if key_per_array:
    keys = [jax.random.PRNGKey(seed + i) for i in range(3)]
  else:
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return tuple(jax.random.normal(key, shape, jnp.float32).astype(dtype)
               for key, shape in zip(keys, ((B, T, N, H), (B, S, K, H), (B, S, K, h)), strict=True))


def jit_with(fn, **static):
  """`fn` with the keywords `static` fixed, compiled as one program (eager dispatch compiles every
  primitive separately, several times slower); array arguments stay traced."""
  return jax.jit(functools.partial(fn, **static))


def intermediate_shapes(fn, *args) -> list[tuple[int, ...]]:
  """The shape of every array in `fn(*args)`'s jaxpr, sub-jaxprs (scan, pjit, ...) included."""
  shapes = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      shapes.extend(tuple(getattr(var.aval, "shape", ())) for var in eqn.outvars)
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if isinstance(sub, jax_core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jax_core.Jaxpr):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return shapes


def largest_intermediate(fn, *args) -> int:
  """Element count of the largest array in `fn`'s jaxpr, sub-jaxprs included."""
  return max((int(np.prod(shape)) for shape in intermediate_shapes(fn, *args)), default=0)
