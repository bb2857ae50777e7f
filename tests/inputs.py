"""Shared test inputs and probes: one q, k, v builder with one argument order, a gradient comparison
of a fast path with its reference, and the shapes of a program's intermediate arrays (for
memory-scaling tests)."""

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


def perturbed(variables, seed=1, std=0.3):
  """Every leaf of a Flax variable tree moved by std·N(0, 1), so zero-initialized biases and unit
  scales take part in a comparison."""
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [a + std * jax.random.normal(k, a.shape, a.dtype)
                                   for a, k in zip(leaves, keys, strict=True)])


def jit_with(fn, **static):
  """`fn` with the keywords `static` fixed, compiled as one program (eager dispatch compiles every
  primitive separately, several times slower); array arguments stay traced."""
  return jax.jit(functools.partial(fn, **static))


def assert_same_gradients(fn, reference, args, dout, names, *, tol):
  """The gradients of `Σ fn(*args) · dout` and `Σ reference(*args) · dout` with respect to every
  argument are close (`tol`: keywords of `np.testing.assert_allclose`; an argument may be a pytree).
  Both are compiled. `names`: one per argument, for the failure message."""
  argnums = tuple(range(len(args)))
  grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * dout), argnums=argnums))(*args)
           for f in (fn, reference)]
  for name, got, want in zip(names, *grads, strict=True):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), err_msg=name, **tol)


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


def token_inputs(mech, q_tokens, kv_tokens, *, N, K, H, kinds=("projected", "given")) -> dict:
  """Arrays for `mech.token_inputs` (of the given kinds), derived from the tokens themselves:
  side "q" from `q_tokens [B, T, ...]`, side "kv" from `kv_tokens [B, S, ...]` (e.g. q and k, or a
  layer's input x), by a fixed random projection of each token's features, then the declared
  activation (float), `> 0` (bool) or an argmax over `num_values` (int).

  Deriving them from the tokens (not drawing them per call) keeps them consistent wherever a suite
  slices, masks, pads or fills a cache with garbage: a token's entry moves with the token.
  """
  out = {}
  for i, spec in enumerate(mech.token_inputs):
    if spec.kind not in kinds:
      continue
    x = q_tokens if spec.side == "q" else kv_tokens
    x = x.astype(jnp.float32).reshape(x.shape[:2] + (-1,))
    shape = tuple(spec.shape(N, K, H))
    values = spec.num_values if spec.dtype == "int" else 1
    width = int(np.prod(shape, dtype=int)) * values
    w = jax.random.normal(jax.random.PRNGKey(1000 + i), (x.shape[-1], width)) * x.shape[-1] ** -0.5
    y = (x @ w).reshape(x.shape[:2] + shape + ((values,) if spec.dtype == "int" else ()))
    if spec.dtype == "bool":
      y = y > 0
    elif spec.dtype == "int":
      y = jnp.argmax(y, axis=-1).astype(jnp.int32)
    elif spec.activation is not None and spec.kind == "projected":
      y = spec.activation(y)
    out[spec.name] = y
  return out
