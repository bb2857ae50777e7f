"""Conformance of every registered module (`attnjax.modules`) to its contract, parametrized over the
registry, so a module is tested the moment it is registered: the record is complete; the Linen class
with no arguments works on the kind's input; the output keeps the input's shape (or the declared
one) and dtype, fp32 and bf16; the pure function on the Linen class's weights equals the Linen call;
jit equals eager; gradients (input and every weight) are finite; bf16 is close to fp32 on the same
values; each example of a batch is independent of the others; every weight changes the output; and
the gates the Linen class sows lie in the range the paper bounds them to.

Each module runs at its kind's example shape (`attnjax.modules.EXAMPLE_SHAPES`) with its `example`
settings; compiled programs are shared between checks (the suite is compile-bound).
"""

import dataclasses
import functools
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax import modules
from tests import tolerances

MODULES = aj.list_modules()
NAMES = [m.name for m in MODULES]


@pytest.fixture(params=NAMES)
def record(request):
  return aj.get_module(request.param)


def _shape(rec):
  return modules.EXAMPLE_SHAPES[rec.kind]


def _inputs(rec, seed=0, dtype=jnp.float32):
  """x and the extra inputs as host arrays (bf16-representable values, so fp32 and bf16 calls see the
  same numbers). Each channel (last axis) gets its own mean, as a network's features have: a
  zero-mean draw would give pooled channel descriptors near zero, where a gate barely moves."""
  rng = np.random.default_rng(seed)
  draw = lambda shape: rng.standard_normal(shape) + rng.standard_normal(shape[-1])
  shape = _shape(rec)

  def extra(e):
    if e.fixed is not None:  # e.g. a graph's edge list: used as is
      return None
    return np.exp(draw(e.shape(shape))) if e.positive else draw(e.shape(shape))

  arrays = [draw(shape)] + [extra(e) for e in rec.extra_inputs]
  cast = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(dtype))  # noqa: E731
  return tuple(np.asarray(e.fixed(shape)) if a is None else cast(a)
               for a, e in zip(arrays, (None,) + rec.extra_inputs, strict=True))


@functools.lru_cache(maxsize=None)
def _layer(name):
  rec = aj.get_module(name)
  return rec.linen(**rec.example)


@functools.lru_cache(maxsize=None)
def _variables(name):
  rec = aj.get_module(name)
  return _layer(name).init(jax.random.PRNGKey(0), *_inputs(rec))


@functools.lru_cache(maxsize=None)
def _apply(name):
  """`(variables, *inputs) -> (y, gates)` jitted: the Linen call with its sown gates."""
  layer = _layer(name)

  def run(variables, *inputs):
    y, state = layer.apply(variables, *inputs, mutable=["intermediates"])
    gates = [x for path, x in jax.tree_util.tree_leaves_with_path(state)
             if any(getattr(k, "key", None) == modules.GATE for k in path)]
    return y, gates

  return jax.jit(run)


def _cast(tree, dtype):
  return jax.tree.map(lambda a: jnp.asarray(a).astype(dtype) if jnp.issubdtype(
      jnp.asarray(a).dtype, jnp.floating) else a, tree)


def test_record_is_complete(record):
  assert record.kind in modules.KINDS and record.family and record.paper and record.arxiv
  assert record.seeds or record.baseline
  assert record.summary, f"{record.name}: the function needs a docstring"
  assert record.fn.__doc__ and record.linen.__doc__


def test_shape_dtype_gates_and_the_pure_function(record):
  """fp32 and bf16: shape and dtype kept, finite; the sown gates in the paper's range; the pure
  function on the Linen weights (and the settings it shares with the Linen class) equals the call."""
  variables = _variables(record.name)
  outs = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    inputs = _inputs(record, dtype=dtype)
    y, gates = _apply(record.name)(variables, *inputs)
    assert y.dtype == dtype
    chex.assert_shape(y, record.output_shape(_shape(record), record.example))
    chex.assert_tree_all_finite(y)
    outs[dtype] = np.asarray(y, np.float32)
    if record.gate_range is not None:
      assert gates, f"{record.name}: declares gate_range but sows no ('intermediates', 'gate')"
      low, high = record.gate_range
      for g in gates:
        g = np.asarray(g, np.float32)
        assert np.all(g >= low) and np.all(g <= high), (record.name, g.min(), g.max())
  assert tolerances.rel_rms(outs[jnp.bfloat16], outs[jnp.float32]) < tolerances.BF16_VS_FP32_REL_RMS
  layer = _layer(record.name)
  takes = inspect.signature(record.fn).parameters
  settings = {f.name: getattr(layer, f.name) for f in dataclasses.fields(layer)
              if f.name in takes and f.name not in variables.get("params", {})}
  inputs = _inputs(record)
  pure = record.fn(*inputs, **variables.get("params", {}), **settings)
  np.testing.assert_allclose(np.asarray(pure), outs[jnp.float32],
                             **tolerances.output(jnp.float32))


def test_jit_equals_eager_and_gradients_are_finite(record):
  variables = _variables(record.name)
  inputs = _inputs(record)
  eager = _layer(record.name).apply(variables, *inputs)
  jitted, _ = _apply(record.name)(variables, *inputs)
  chex.assert_trees_all_close(jitted, eager, **tolerances.output(jnp.float32))

  def loss(params, *inputs):
    y, _ = _apply(record.name)({**variables, "params": params}, *inputs)
    return jnp.sum(jnp.sin(y.astype(jnp.float32)))

  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables.get("params", {}), *inputs)
  chex.assert_tree_all_finite(grads)
  assert float(jnp.max(jnp.abs(grads[1]))) > 0, "the output does not depend on x"


def test_examples_of_a_batch_are_independent(record):
  """Changing the second example changes its output and leaves the first's; a graph's examples
  are the example graph's two connected components (`modules.EXAMPLE_COMPONENTS`)."""
  variables = _variables(record.name)
  inputs = _inputs(record)
  other = _inputs(record, seed=5)
  if record.kind == "graph":
    first, second = (np.asarray(c) for c in modules.EXAMPLE_COMPONENTS)
    changed = [inputs[0].copy(), *inputs[1:]]
    changed[0][second] = 3 * other[0][second]
  else:
    first, second = np.asarray([0]), slice(1, None)
    changed = [np.concatenate([a[:1], 3 * b[1:]]) for a, b in zip(inputs, other, strict=True)]
  y, _ = _apply(record.name)(variables, *inputs)
  y2, _ = _apply(record.name)(variables, *changed)
  chex.assert_trees_all_close(y2[first], y[first], **tolerances.output(jnp.float32))
  assert tolerances.rel_rms(y2[second], y[second]) > tolerances.CHANGED_REL_RMS


def _jittered(tree, seed):
  """Each weight moved by noise of its own scale: a start where scales the paper initializes at zero
  (residual gains such as DANet's γ) no longer hide the weights behind them."""
  rng = np.random.default_rng(seed)

  def move(a):
    a = np.asarray(a, np.float32)
    return jnp.asarray(a + (0.5 * float(np.std(a)) + 0.1) * rng.standard_normal(a.shape))

  return jax.tree.map(move, tree)


def test_every_weight_changes_the_output(record):
  """From jittered weights, moving any one weight changes the output."""
  variables = _variables(record.name)
  variables = {**variables, "params": _jittered(variables.get("params", {}), seed=1)}
  inputs = _inputs(record)
  base, _ = _apply(record.name)(variables, *inputs)
  for path, _ in jax.tree_util.tree_leaves_with_path(variables["params"]):
    moved = _jittered(variables["params"], seed=2)
    params = jax.tree_util.tree_map_with_path(
        lambda p, a, b, path=path: b if p == path else a, variables["params"], moved)
    y, _ = _apply(record.name)({**variables, "params": params}, *inputs)
    assert tolerances.rel_rms(y, base) > tolerances.PARAM_CHANGED_REL_RMS, (
        f"{record.name}: weight {jax.tree_util.keystr(path)} does not matter")


def test_unknown_module_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown attention module 'nope'"):
    aj.get_module("nope")
  with pytest.raises(ValueError, match="kind must be one of"):
    aj.list_modules(kind="nope")
