"""Conformance of every registered mechanism to the operator contract (DESIGN.md, "Tests").

Parametrized over the registry, so a mechanism is tested the moment it is registered: shapes and dtypes;
finite forward and gradients; jit equals eager; causal rows unaffected by future keys; each supported
pattern works and each unsupported one raises; every implementation agrees with the reference in
outputs and gradients; prefill followed by step-by-step decode equals the full forward (over a KV
cache, and with the carried state of recurrent mechanisms); packed sequences
equal separate ones; bf16 close to fp32; each example of a batch independent of the others; every
input and learned array the mechanism declares changes its output, and an input it declares unread
does not. Each mechanism is called with its `example` keywords, which exercise it at these small
sizes. Compiled programs are shared between checks of the same mechanism and arguments (the suite
is compile-bound).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.registry import PATTERNS
from tests import tolerances

MECHANISMS = aj.list_mechanisms()
NAMES = [m.name for m in MECHANISMS]
B, T, S, N, H, HV = 2, 19, 23, 4, 8, 6


def _kv_heads(m):
  return 2 if m.gqa else N


def _inputs(m, *, t=T, s=S, dtype=jnp.float32, seed=0):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  K = _kv_heads(m)
  q = jax.random.normal(kq, (B, t, N, H), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (B, s, K, H), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (B, s, K, HV), jnp.float32).astype(dtype)
  return q, k, v


def _pattern_args(pattern):
  causal = pattern.startswith("causal")
  cross = pattern.endswith("cross")
  return causal, cross, (S if cross else T)


def _call_eager(m, q, k, v, **kwargs):
  return m(q, k, v, **{**m.example_kwargs, **kwargs})


@functools.lru_cache(maxsize=None)
def _compiled(name, static_items):
  m, static = aj.get_mechanism(name), dict(static_items)
  return jax.jit(lambda q, k, v, arrays: m(q, k, v, **static, **arrays))


def _call(m, q, k, v, **kwargs):
  """The mechanism with its example keywords, compiled as one program, as a model runs it (eager
  op-by-op dispatch compiles every primitive separately: 3-6x slower to test). Array keywords are
  traced arguments; the rest (flags, ints, names) stay Python values, as in a model, and key the
  cache of compiled functions."""
  kwargs = {**m.example_kwargs, **kwargs}
  arrays = {key: x for key, x in kwargs.items() if isinstance(x, (jax.Array, np.ndarray))}
  static = tuple(sorted((key, x) for key, x in kwargs.items() if key not in arrays))
  try:
    fn = _compiled(m.name, static)
  except TypeError:  # an unhashable setting: compile for this call only
    fn = jax.jit(lambda q, k, v, arrays: m(q, k, v, **dict(static), **arrays))
  return fn(q, k, v, arrays)


def _some_pattern(m):
  return "causal_self" if "causal_self" in m.patterns else sorted(m.patterns)[0]


@pytest.fixture(params=NAMES)
def mech(request):
  return aj.get_mechanism(request.param)


def test_registry_records_are_complete(mech):
  assert mech.seeds and all(isinstance(s, int) for s in mech.seeds)
  assert mech.paper and mech.arxiv and mech.family
  assert mech.patterns and set(mech.patterns) <= set(PATTERNS)
  assert mech.summary, f"{mech.name}: the operator needs a docstring"
  assert "reference" in mech.implementations


@pytest.mark.parametrize("pattern", PATTERNS)
def test_patterns_supported_or_clear_error(mech, pattern):
  causal, cross, s = _pattern_args(pattern)
  q, k, v = _inputs(mech, s=s)
  if pattern in mech.patterns:
    out = _call(mech, q, k, v, causal=causal, cross=cross)
    chex.assert_shape(out, (B, T, N, HV))
    chex.assert_tree_all_finite(out)
  else:
    with pytest.raises(ValueError, match=mech.name):
      _call(mech, q, k, v, causal=causal, cross=cross)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_preserved_and_gradients_finite(mech, dtype):
  causal, cross, s = _pattern_args(_some_pattern(mech))
  q, k, v = _inputs(mech, s=s, dtype=dtype)
  out = _call(mech, q, k, v, causal=causal, cross=cross)
  assert out.dtype == dtype
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(_call(mech, *a, causal=causal, cross=cross).astype(
      jnp.float32) ** 2), argnums=(0, 1, 2)))(q, k, v)
  chex.assert_tree_all_finite(grads)
  for g, x in zip(grads, (q, k, v), strict=True):
    chex.assert_equal_shape([g, x])


def test_jit_equals_eager(mech):
  causal, cross, s = _pattern_args(_some_pattern(mech))
  q, k, v = _inputs(mech, s=s)
  eager = _call_eager(mech, q, k, v, causal=causal, cross=cross)
  jitted = jax.jit(lambda *a: _call_eager(mech, *a, causal=causal, cross=cross))(q, k, v)
  chex.assert_trees_all_close(jitted, eager, **tolerances.output(jnp.float32))


def test_causal_rows_ignore_future_keys(mech):
  if "causal_self" not in mech.patterns:
    pytest.skip("no causal self-attention")
  q, k, v = _inputs(mech, s=T)
  cut = 7
  out = _call(mech, q, k, v, causal=True)
  noise = jax.random.normal(jax.random.PRNGKey(9), k[:, cut + 1:].shape) * 10
  k2 = k.at[:, cut + 1:].set(noise)
  v2 = v.at[:, cut + 1:].set(noise[..., :HV] if HV <= H else noise)
  out2 = _call(mech, q, k2, v2, causal=True)
  chex.assert_trees_all_close(out2[:, :cut + 1], out[:, :cut + 1], **tolerances.output(jnp.float32))


@pytest.mark.parametrize("pattern", ["self", "causal_self", "cross"])
def test_implementations_agree_with_reference(mech, pattern):
  if pattern not in mech.patterns:
    pytest.skip(f"{pattern} unsupported")
  causal, cross, s = _pattern_args(pattern)
  q, k, v = _inputs(mech, s=s)

  def run(impl):
    def loss(q, k, v):
      out = _call(mech, q, k, v, causal=causal, cross=cross, implementation=impl)
      return jnp.sum(out * jnp.sin(out)), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads

  ref_out, ref_grads = run("reference")
  for impl in mech.implementations:
    if impl == "reference":
      continue
    out, grads = run(impl)
    chex.assert_trees_all_close(out, ref_out, **tolerances.output(jnp.float32))
    chex.assert_trees_all_close(grads, ref_grads, **tolerances.grad(jnp.float32))


def test_prefill_then_decode_equals_full_forward(mech):
  if not mech.decode or "causal_self" not in mech.patterns:
    pytest.skip("no decode")
  q, k, v = _inputs(mech, s=T)
  full = _call(mech, q, k, v, causal=True)
  # The cache holds every key; unfilled slots carry large garbage that must stay hidden.
  garbage = lambda x, n: x.at[:, n:].set(1e4)
  prefill = 11
  out = _call(mech, q[:, :prefill], garbage(k, prefill), garbage(v, prefill), causal=True,
              cross=False, q_offset=0, kv_lengths=jnp.full((B,), prefill))
  chex.assert_trees_all_close(out, full[:, :prefill], **tolerances.output(jnp.float32))

  def step(q_t, k_t, v_t, t):
    return _call(mech, q_t, k_t, v_t, causal=True, cross=False, q_offset=t,
                 kv_lengths=jnp.full((B,), t + 1))

  # The first step with a Python int offset (known at trace time), the rest as a layer decodes: one
  # compiled step with a traced offset.
  jit_step = jax.jit(step)
  for t in range(prefill, T):
    run = step if t == prefill else lambda *a: jit_step(*a[:3], jnp.asarray(a[3], jnp.int32))
    out = run(q[:, t:t + 1], garbage(k, t + 1), garbage(v, t + 1), t)
    chex.assert_trees_all_close(out[:, 0], full[:, t], **tolerances.output(jnp.float32))


def test_decode_with_per_row_offsets(mech):
  if not mech.decode or "causal_self" not in mech.patterns:
    pytest.skip("no decode")
  q, k, v = _inputs(mech, s=T)
  full = _call(mech, q, k, v, causal=True)
  pos = jnp.array([5, 12])          # each batch row decodes its own next position
  q_step = jnp.stack([q[0, pos[0]], q[1, pos[1]]])[:, None]
  out = _call(mech, q_step, k, v, causal=True, cross=False, q_offset=pos, kv_lengths=pos + 1)
  chex.assert_trees_all_close(out[:, 0], jnp.stack([full[0, pos[0]], full[1, pos[1]]]),
                              **tolerances.output(jnp.float32))


def test_recurrent_decode_equals_full_forward(mech):
  """A recurrent mechanism's carried state gives the full forward's rows, and holds exactly the
  `state_size` numbers per sequence the registry reports."""
  if not mech.recurrent:
    pytest.skip("decodes over a KV cache")
  q, k, v = _inputs(mech, s=T)
  full = _call(mech, q, k, v, causal=True)
  prefill = 11
  out, state = _call(mech, q[:, :prefill], k[:, :prefill], v[:, :prefill], causal=True,
                     q_offset=0, initial_state=None, return_final_state=True)
  chex.assert_trees_all_close(out, full[:, :prefill], **tolerances.output(jnp.float32))
  floats = sum(x.size for x in jax.tree.leaves(state)) // B
  assert floats == mech.decode_state_floats(T, N, _kv_heads(mech), H, HV, mech.example_kwargs)

  @jax.jit
  def step(q_t, k_t, v_t, state, t):
    return _call(mech, q_t, k_t, v_t, causal=True, q_offset=t, initial_state=state,
                 return_final_state=True)

  for t in range(prefill, T):
    out, new_state = step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], state, jnp.int32(t))
    chex.assert_trees_all_close(out[:, 0], full[:, t], **tolerances.output(jnp.float32))
    chex.assert_trees_all_equal_shapes(new_state, state)  # fixed size: it does not grow with t
    state = new_state


@pytest.mark.parametrize("causal", [False, True])
def test_packed_equals_separate(mech, causal):
  pattern = "causal_self" if causal else "self"
  if not mech.packed or pattern not in mech.patterns:
    pytest.skip("no packed sequences for this pattern")
  lengths = (8, 11)
  q, k, v = _inputs(mech, t=sum(lengths), s=sum(lengths))
  seg = jnp.repeat(jnp.arange(2), jnp.array(lengths), total_repeat_length=sum(lengths))
  seg = jnp.broadcast_to(seg, (B, sum(lengths)))
  packed = _call(mech, q, k, v, causal=causal, segment_ids=seg)
  start = 0
  for n in lengths:
    part = slice(start, start + n)
    alone = _call(mech, q[:, part], k[:, part], v[:, part], causal=causal)
    chex.assert_trees_all_close(packed[:, part], alone, **tolerances.output(jnp.float32))
    start += n


def test_bf16_close_to_fp32(mech):
  causal, cross, s = _pattern_args(_some_pattern(mech))
  q, k, v = _inputs(mech, s=s)
  out32 = _call(mech, q, k, v, causal=causal, cross=cross)
  out16 = _call(mech, *(x.astype(jnp.bfloat16) for x in (q, k, v)), causal=causal, cross=cross)
  assert tolerances.rel_rms(out16, out32) < tolerances.BF16_VS_FP32_REL_RMS


def test_examples_of_a_batch_are_independent(mech):
  causal, cross, s = _pattern_args(_some_pattern(mech))
  q, k, v = _inputs(mech, s=s)
  out = _call(mech, q, k, v, causal=causal, cross=cross)
  other = _inputs(mech, s=s, seed=5)
  changed = [x.at[1].set(3 * y[1]) for x, y in zip((q, k, v), other, strict=True)]
  out2 = _call(mech, *changed, causal=causal, cross=cross)
  chex.assert_trees_all_close(out2[0], out[0], **tolerances.output(jnp.float32))
  assert tolerances.rel_rms(out2[1], out[1]) > 1e-3  # the change reached example 1


def test_reads_exactly_the_inputs_it_declares(mech):
  """q, k, v in `reads` and every learned array change the output; an unread input does not (the
  layer creates no projection for it)."""
  causal, cross, s = _pattern_args(_some_pattern(mech))
  qkv = _inputs(mech, s=s)
  base = _call(mech, *qkv, causal=causal, cross=cross)
  other = _inputs(mech, s=s, seed=5)
  for i, name in enumerate("qkv"):
    args = list(qkv)
    args[i] = other[i]
    out = _call(mech, *args, causal=causal, cross=cross)
    if name in mech.reads:
      assert tolerances.rel_rms(out, base) > 1e-3, f"{name} is declared read but does not matter"
    else:
      chex.assert_trees_all_equal(out, base)
  example = mech.example_kwargs
  rng = np.random.default_rng(0)
  for spec in mech.params:
    value = np.asarray(example[spec.name], np.float32)
    bumped = value + (0.5 * float(np.std(value)) + 0.1) * rng.standard_normal(value.shape)
    out = _call(mech, *qkv, causal=causal, cross=cross,
                **{spec.name: bumped.astype(np.float32)})
    assert tolerances.rel_rms(out, base) > 1e-4, f"learned array {spec.name} does not matter"


def test_unknown_mechanism_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown attention mechanism 'nope'"):
    aj.get_mechanism("nope")
