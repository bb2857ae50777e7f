"""Shared test inputs and probes: one q, k, v builder with one argument order, and the largest
intermediate array of a program (for memory-scaling tests)."""

import functools

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np


def qkv(*, B=2, T=13, S=None, N=4, K=2, H=8, h=6, seed=0, dtype=jnp.float32):
  """Standard-normal `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` (S = T by default)."""
  S = T if S is None else S
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  return tuple(jax.random.normal(key, shape, jnp.float32).astype(dtype)
               for key, shape in ((kq, (B, T, N, H)), (kk, (B, S, K, H)), (kv, (B, S, K, h))))


def jit_with(fn, **static):
  """`fn` with the keywords `static` fixed, compiled as one program (eager dispatch compiles every
  primitive separately, several times slower); array arguments stay traced."""
  return jax.jit(functools.partial(fn, **static))


def largest_intermediate(fn, *args) -> int:
  """Element count of the largest array in `fn`'s jaxpr, sub-jaxprs included."""
  def walk(jaxpr):
    best = 0
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        best = max(best, int(np.prod(getattr(var.aval, "shape", ()))))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if isinstance(sub, jax_core.ClosedJaxpr):
            best = max(best, walk(sub.jaxpr))
          elif isinstance(sub, jax_core.Jaxpr):
            best = max(best, walk(sub))
    return best
  return walk(jax.make_jaxpr(fn)(*args).jaxpr)
