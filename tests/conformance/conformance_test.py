"""Conformance of every registered mechanism to the operator contract (docs/DESIGN.md, "Tests").

Parametrized over the registry, so a mechanism is tested the moment it is registered: shapes and
dtypes; the signature's jaxtyping annotations; finite forward and gradients; jit equals eager; two
runs of one compiled program are bitwise equal; causal rows unaffected by future keys; each
supported pattern works and each unsupported one raises; every implementation agrees with the
reference in outputs at every pattern and in each gradient (dq, dk, dv and one per learned array,
compared by name) at the base pattern and its causal/noncausal twin (a mechanism with the reference
alone reports a skip); prefill followed by step-by-step decode equals the full forward (over a KV
cache, and with the carried state of recurrent mechanisms); packed sequences equal separate ones;
bf16 close to fp32 on the same input values; each example of a batch independent of the others;
every input and learned array the mechanism declares changes its output, and an input it declares
unread does not; a mechanism's `flex_mods` compute it as plain flex attention.

Per-token arrays a mechanism takes (`Mechanism.token_inputs`: forget gates, token types, ...) are
derived from q and k inside each call (`tests.inputs.token_inputs`), so they move with their tokens.

The sizes are this file's constants; each mechanism is called with its `example` keywords built at
those sizes (`Mechanism.example_kwargs_for`), which exercise it there (e.g. a window shorter than
the sequence). Compiled programs are shared between checks of the same mechanism and arguments (the
suite is compile-bound): the forward-only checks at the base pattern read the output of the gradient
program the other checks compile, and the eager run (op-by-op, the costliest check) covers one
mechanism per family by default and every mechanism under `make test-slow`, and so do the gradient
comparisons at the twin pattern, the bf16 gradients and decoding at per-row offsets (each one more
compiled program per mechanism; a gradient program is the costliest compile after eager).
"""

import functools

import beartype
import chex
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import attnjax as aj
from attnjax.core import flex
from attnjax.core import masks
from attnjax.registry import PATTERNS
from tests import inputs
from tests import tolerances

MECHANISMS = aj.list_mechanisms()
NAMES = [m.name for m in MECHANISMS]
# Batch, query length, key length (different, so cross-attention is not square), query heads, q/k
# head dim and value head dim (different from H, so a mix-up of the two fails).
B, T, S, N, H, HV = 2, 19, 23, 4, 8, 6
GQA_KV_HEADS = 2  # K for mechanisms that take fewer key/value heads than query heads


def _kv_heads(m):
  return GQA_KV_HEADS if m.gqa else N


@functools.lru_cache(maxsize=None)
def _example_cached(name):
  m = aj.get_mechanism(name)
  return m.example_kwargs_for(N=N, K=_kv_heads(m), H=H, h=HV)


def _example(m):
  """The mechanism's example keywords at this suite's sizes (built once per mechanism)."""
  return dict(_example_cached(m.name))


def _inputs(m, *, t=T, s=S, dtype=jnp.float32, seed=0):
  """q, k, v as host (numpy) arrays: the suite slices, pads and edits them on the host, because every
  eager JAX op on a new shape is one more compiled program (the suite is compile-bound)."""
  return tuple(np.asarray(x).astype(dtype) for x in inputs.qkv(B=B, T=t, S=s, N=N, K=_kv_heads(m),
                                                                 H=H, h=HV, seed=seed))


def _host(x):
  return np.asarray(x)


def _pattern_args(pattern):
  causal = pattern.startswith("causal")
  cross = pattern.endswith("cross")
  return causal, cross, (S if cross else T)


def _tokens(m, q, k):
  """The mechanism's per-token arrays (`Mechanism.token_inputs`), derived from q and k so that
  they follow every slicing, padding and cache garbage this suite applies to the tokens."""
  if not m.token_inputs:
    return {}
  return inputs.token_inputs(m, q, k, N=q.shape[2], K=k.shape[2], H=q.shape[3])


def _call_eager(m, q, k, v, **kwargs):
  q, k, v = (jnp.asarray(x) for x in (q, k, v))
  return m(q, k, v, **{**_example(m), **kwargs}, **_tokens(m, q, k))


def _split(m, kwargs):
  """The example keywords overridden by `kwargs`, split into arrays (traced arguments) and the rest
  (flags, ints, names: Python values, as in a model, that key the cache of compiled functions).
  `cross` is always explicit (default: T != S), so calls that differ only in spelling it share one
  compiled program."""
  kwargs = {**_example(m), **kwargs}
  arrays = {key: x for key, x in kwargs.items() if isinstance(x, (jax.Array, np.ndarray))}
  static = tuple(sorted((key, x) for key, x in kwargs.items() if key not in arrays))
  return arrays, static


@functools.lru_cache(maxsize=None)
def _compiled(name, static_items):
  m, static = aj.get_mechanism(name), dict(static_items)
  return jax.jit(lambda q, k, v, arrays: m(q, k, v, **static, **arrays, **_tokens(m, q, k)))


def _call(m, q, k, v, **kwargs):
  """The mechanism with its example keywords, compiled as one program, as a model runs it (eager
  op-by-op dispatch compiles every primitive separately: 3-6x slower to test)."""
  kwargs.setdefault("cross", q.shape[1] != k.shape[1])
  arrays, static = _split(m, kwargs)
  try:
    fn = _compiled(m.name, static)
  except TypeError:  # an unhashable setting: compile for this call only
    fn = jax.jit(lambda q, k, v, arrays: m(q, k, v, **dict(static), **arrays, **_tokens(m, q, k)))
  return fn(q, k, v, arrays)


def _learned(m, arrays):
  """Names of the mechanism's trainable arrays among `arrays` (those the optimizer moves)."""
  return tuple(spec.name for spec in m.params if spec.trainable and spec.name in arrays
               and jnp.issubdtype(arrays[spec.name].dtype, jnp.floating))


@functools.lru_cache(maxsize=None)
def _compiled_gradients(name, static_items, learned):
  m, static = aj.get_mechanism(name), dict(static_items)

  def loss(q, k, v, params, fixed):
    out = m(q, k, v, **static, **fixed, **params, **_tokens(m, q, k))
    return jnp.sum(out * jnp.sin(out)), out

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


def _gradients(m, q, k, v, **kwargs):
  """`(out, grads)`: the output and the gradients of a scalar loss of it, by name: "dq", "dk",
  "dv" and "d<array>" for each trainable array of the mechanism. Compiled once per arguments."""
  kwargs.setdefault("cross", q.shape[1] != k.shape[1])
  arrays, static = _split(m, kwargs)
  learned = _learned(m, arrays)
  params = {name: arrays[name] for name in learned}
  fixed = {key: x for key, x in arrays.items() if key not in params}
  try:
    fn = _compiled_gradients(m.name, static, learned)
  except TypeError:  # an unhashable setting
    fn = _compiled_gradients.__wrapped__(m.name, static, learned)
  (_, out), (dq, dk, dv, dparams) = fn(q, k, v, params, fixed)
  return out, {"dq": dq, "dk": dk, "dv": dv, **{f"d{key}": g for key, g in dparams.items()}}


def _forward(m, q, k, v, **kwargs):
  """The output of the compiled gradient program of these arguments (the one the dtype, bitwise and
  implementations checks compile): forward-only checks at the same arguments share it instead of
  compiling a forward program of their own. Single-array outputs only."""
  kwargs.setdefault("implementation", _fast_path(m))
  out, _ = _gradients(m, q, k, v, **kwargs)
  return out


def _assert_close_by_name(got, want, tol, what):
  """Each named array of `got` close to the one of `want`; a failure names the array."""
  assert got.keys() == want.keys(), (sorted(got), sorted(want))
  for name in want:
    np.testing.assert_allclose(np.asarray(got[name], np.float32),
                               np.asarray(want[name], np.float32),
                               err_msg=f"{what}: {name} differs", **tol)


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


def test_signature_annotations_hold_under_jaxtyped(mech):
  """The operator's jaxtyping annotations (`q: Query, k: Key, v: Value -> Output`, and those of its
  other arguments) hold at these sizes (GQA, h != H), and a key of another head dim fails the check
  before the body runs. Traced only (`eval_shape`): nothing is compiled."""
  causal, _, s = _pattern_args(_some_pattern(mech))
  q, k, v = _inputs(mech, s=s)
  checked = jaxtyping.jaxtyped(mech.fn, typechecker=beartype.beartype)
  kwargs = {key: jnp.asarray(x) if isinstance(x, np.ndarray) else x
            for key, x in {**_example(mech), "causal": causal}.items()}
  tokens = _tokens(mech, q, k)
  out = jax.eval_shape(lambda q, k, v: checked(q, k, v, **kwargs, **tokens), q, k, v)
  chex.assert_shape(out, (B, T, N, HV))
  with pytest.raises(jaxtyping.TypeCheckError):
    jax.eval_shape(lambda q, k, v: checked(q, k, v, **kwargs, **tokens), q, k[..., :H - 2], v)


def _fast_path(m):
  """The implementation compared with the reference (the first other one), or the reference."""
  return next((impl for impl in m.implementations if impl != "reference"), "reference")


@pytest.mark.parametrize("pattern", PATTERNS)
def test_unsupported_patterns_raise_a_clear_error(mech, pattern):
  """A pattern the record does not list raises, naming the mechanism (a supported one is run and
  checked by test_supported_patterns_run_and_implementations_agree)."""
  if pattern in mech.patterns:
    pytest.skip("supported: run by test_supported_patterns_run_and_implementations_agree")
  causal, cross, s = _pattern_args(pattern)
  q, k, v = _inputs(mech, s=s)
  with pytest.raises(ValueError, match=mech.name):
    _call(mech, q, k, v, causal=causal, cross=cross)


def test_dtype_preserved_gradients_finite_and_bf16_close_to_fp32(mech):
  """fp32 and bf16 inputs: the output keeps their dtype, the gradients are finite and shaped as
  their inputs, and the bf16 output is close to the fp32 one on the same values (the fp32 inputs
  are the bf16 ones, widened: the check measures computing in bf16, not rounding the inputs, which
  a quantizing mechanism's discrete steps would amplify). The fp32 program is the one the
  implementations check compiles (shared). bf16 gradients: a family's first mechanism here, the
  others in `test_bf16_gradients_are_finite` (slow)."""
  causal, cross, s = _pattern_args(_some_pattern(mech))
  outs = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    q, k, v = (x.astype(dtype) for x in _inputs(mech, s=s, dtype=jnp.bfloat16))
    if dtype == jnp.bfloat16 and mech.name not in REPRESENTATIVES:
      out = _call(mech, q, k, v, causal=causal, cross=cross, implementation=_fast_path(mech))
    else:
      out, grads = _gradients(mech, q, k, v, causal=causal, cross=cross,
                              implementation=_fast_path(mech))
      chex.assert_tree_all_finite(grads)
      for name, x in zip(("dq", "dk", "dv"), (q, k, v), strict=True):
        chex.assert_equal_shape([grads[name], x])
    assert out.dtype == dtype
    outs[dtype] = _host(out).astype(np.float32)
  assert tolerances.rel_rms(outs[jnp.bfloat16], outs[jnp.float32]) < tolerances.BF16_VS_FP32_REL_RMS


# The first mechanism of each family (one per family's code patterns): the costliest checks run for
# these in the default suite and for the rest under `make test-slow`.
_FIRST_OF_FAMILY = {}
for _m in MECHANISMS:
  _FIRST_OF_FAMILY.setdefault(_m.family, _m.name)
REPRESENTATIVES = frozenset(_FIRST_OF_FAMILY.values())


def _costly_cases(names=NAMES):
  """`names` as parameters, those outside REPRESENTATIVES marked slow."""
  return [pytest.param(name, marks=() if name in REPRESENTATIVES else pytest.mark.slow)
          for name in names]


# Eager (op-by-op) dispatch compiles each primitive on its own, the costliest check of the suite
# (5-10 s a mechanism on 2 cores).
@pytest.mark.parametrize("name", _costly_cases())
def test_jit_equals_eager(name):
  mech = aj.get_mechanism(name)
  causal, cross, s = _pattern_args(_some_pattern(mech))
  q, k, v = _inputs(mech, s=s)
  eager = _call_eager(mech, q, k, v, causal=causal, cross=cross,
                      implementation=_fast_path(mech))
  jitted = _forward(mech, q, k, v, causal=causal, cross=cross)
  chex.assert_trees_all_close(jitted, eager, **tolerances.output(jnp.float32))


def test_two_runs_of_a_compiled_program_are_bitwise_equal(mech):
  """Same compiled program, same inputs: the output and every gradient are bitwise equal (no
  order-dependent reductions, no hidden randomness)."""
  causal, cross, s = _pattern_args(_some_pattern(mech))
  q, k, v = _inputs(mech, s=s)
  impl = _fast_path(mech)   # the program the implementations check compiles (shared)
  first_out, first = _gradients(mech, q, k, v, causal=causal, cross=cross, implementation=impl)
  second_out, second = _gradients(mech, q, k, v, causal=causal, cross=cross, implementation=impl)
  chex.assert_trees_all_equal(second_out, first_out)
  for name in first:
    np.testing.assert_array_equal(second[name], first[name], err_msg=f"{name} differs between runs")


def test_causal_rows_ignore_future_keys(mech):
  if "causal_self" not in mech.patterns:
    pytest.skip("no causal self-attention")
  q, k, v = _inputs(mech, s=T)
  cut = 7
  out = _host(_forward(mech, q, k, v, causal=True))
  noise = 10 * np.random.default_rng(9).standard_normal(k[:, cut + 1:].shape).astype(np.float32)
  k2, v2 = k.copy(), v.copy()
  k2[:, cut + 1:] = noise
  v2[:, cut + 1:] = noise[..., :HV] if HV <= H else noise
  out2 = _host(_forward(mech, q, k2, v2, causal=True))
  chex.assert_trees_all_close(out2[:, :cut + 1], out[:, :cut + 1], **tolerances.output(jnp.float32))


def _flipped_pattern(m):
  """The supported pattern that differs from the base one in causality alone, or None."""
  base = _some_pattern(m)
  flipped = base[len("causal_"):] if base.startswith("causal_") else f"causal_{base}"
  return flipped if flipped in m.patterns else None


def _gradient_patterns(m):
  """The patterns at which implementations are compared in their gradients too: the base pattern,
  and for a family's first mechanism also the one that differs from it in causality alone (so both
  mask directions of the family's backward are checked; the other mechanisms' flipped pattern is
  `test_flipped_pattern_gradients_agree`, slow). At the other patterns the outputs are compared: a
  gradient program costs about three forward ones to compile, and the cross patterns only change
  the key length."""
  flipped = _flipped_pattern(m) if m.name in REPRESENTATIVES else None
  return {_some_pattern(m)} | ({flipped} - {None})


@pytest.mark.parametrize("pattern", PATTERNS)
def test_supported_patterns_run_and_implementations_agree(mech, pattern):
  """Each supported pattern runs (shape, finite output) and every implementation agrees with the
  reference in the output, and in each gradient at `_gradient_patterns` (a mechanism with the
  reference alone is run)."""
  if pattern not in mech.patterns:
    pytest.skip(f"{pattern} unsupported")
  causal, cross, s = _pattern_args(pattern)
  q, k, v = _inputs(mech, s=s)
  fast = _fast_path(mech)
  with_grads = pattern in _gradient_patterns(mech)
  run = _gradients if with_grads else lambda *a, **kw: (_call(*a, **kw), None)
  out, grads = run(mech, q, k, v, causal=causal, cross=cross, implementation=fast)
  chex.assert_shape(out, (B, T, N, HV))
  chex.assert_tree_all_finite(out)
  if fast == "reference":
    return
  ref_out, ref_grads = run(mech, q, k, v, causal=causal, cross=cross, implementation="reference")
  for impl in [impl for impl in mech.implementations if impl != "reference"]:
    if impl != fast:
      out, grads = run(mech, q, k, v, causal=causal, cross=cross, implementation=impl)
    np.testing.assert_allclose(out, ref_out, err_msg=f"{impl}: output differs from the reference",
                               **tolerances.output(jnp.float32))
    if with_grads:
      _assert_close_by_name(grads, ref_grads, tolerances.grad(jnp.float32),
                            f"{impl} against the reference")


@pytest.mark.parametrize("name", _costly_cases(sorted(set(NAMES) - REPRESENTATIVES)))
def test_bf16_gradients_are_finite(name):
  """bf16 gradients finite and shaped as their inputs (the representatives' are checked in
  test_dtype_preserved_gradients_finite_and_bf16_close_to_fp32)."""
  mech = aj.get_mechanism(name)
  causal, cross, s = _pattern_args(_some_pattern(mech))
  q, k, v = _inputs(mech, s=s, dtype=jnp.bfloat16)
  _, grads = _gradients(mech, q, k, v, causal=causal, cross=cross, implementation=_fast_path(mech))
  chex.assert_tree_all_finite(grads)
  for name, x in zip(("dq", "dk", "dv"), (q, k, v), strict=True):
    chex.assert_equal_shape([grads[name], x])


@pytest.mark.parametrize("name", _costly_cases(sorted(set(NAMES) - REPRESENTATIVES)))
def test_flipped_pattern_gradients_agree(name):
  """Every implementation's gradients equal the reference's at the pattern of the other causality
  (the representatives' are in test_supported_patterns_run_and_implementations_agree)."""
  mech = aj.get_mechanism(name)
  pattern, fast = _flipped_pattern(mech), _fast_path(mech)
  if pattern is None or fast == "reference":
    pytest.skip("no other causality, or the reference alone")
  causal, cross, s = _pattern_args(pattern)
  q, k, v = _inputs(mech, s=s)
  _, ref_grads = _gradients(mech, q, k, v, causal=causal, cross=cross, implementation="reference")
  for impl in [impl for impl in mech.implementations if impl != "reference"]:
    _, grads = _gradients(mech, q, k, v, causal=causal, cross=cross, implementation=impl)
    _assert_close_by_name(grads, ref_grads, tolerances.grad(jnp.float32),
                          f"{impl} against the reference at {pattern}")


def test_prefill_then_decode_equals_full_forward(mech):
  if not mech.decode or "causal_self" not in mech.patterns:
    pytest.skip("no decode")
  q, k, v = _inputs(mech, s=T)
  full = _host(_forward(mech, q, k, v, causal=True))
  # The cache holds every key; unfilled slots carry large garbage that must stay hidden.
  garbage = lambda x, n: np.concatenate([x[:, :n], np.full_like(x[:, n:], 1e4)], axis=1)
  prefill = 11
  out = _call(mech, q[:, :prefill], garbage(k, prefill), garbage(v, prefill), causal=True,
              cross=False, q_offset=0, kv_lengths=np.full((B,), prefill, np.int32))
  chex.assert_trees_all_close(out, full[:, :prefill], **tolerances.output(jnp.float32))

  def step(q_t, k_t, v_t, t):
    return _call(mech, q_t, k_t, v_t, causal=True, cross=False, q_offset=t,
                 kv_lengths=jnp.full((B,), t + 1, jnp.int32))

  # As a layer decodes: one compiled step with a traced offset (the prefill above has a static one).
  jit_step = jax.jit(step)
  for t in range(prefill, T):
    out = _host(jit_step(q[:, t:t + 1], garbage(k, t + 1), garbage(v, t + 1), np.int32(t)))
    chex.assert_trees_all_close(out[:, 0], full[:, t], **tolerances.output(jnp.float32))


@pytest.mark.parametrize("name", _costly_cases())
def test_decode_with_per_row_offsets(name):
  """Each batch row decodes at its own position (a family's first mechanism by default, every
  mechanism under `make test-slow`; the step program at a scalar offset is checked for all by
  test_prefill_then_decode_equals_full_forward)."""
  mech = aj.get_mechanism(name)
  if not mech.decode or "causal_self" not in mech.patterns:
    pytest.skip("no decode")
  q, k, v = _inputs(mech, s=T)
  full = _host(_forward(mech, q, k, v, causal=True))
  pos = np.array([5, 12], np.int32)          # each batch row decodes its own next position
  q_step = np.stack([q[0, pos[0]], q[1, pos[1]]])[:, None]
  out = _host(_call(mech, q_step, k, v, causal=True, cross=False, q_offset=pos, kv_lengths=pos + 1))
  chex.assert_trees_all_close(out[:, 0], np.stack([full[0, pos[0]], full[1, pos[1]]]),
                              **tolerances.output(jnp.float32))


def test_recurrent_decode_equals_full_forward(mech):
  """A recurrent mechanism's carried state gives the full forward's rows, and holds exactly the
  `state_size` numbers per sequence the registry reports."""
  if not mech.recurrent:
    pytest.skip("decodes over a KV cache")
  q, k, v = _inputs(mech, s=T)
  full = _forward(mech, q, k, v, causal=True)
  prefill = 11
  out, state = _call(mech, q[:, :prefill], k[:, :prefill], v[:, :prefill], causal=True,
                     q_offset=0, initial_state=None, return_final_state=True)
  chex.assert_trees_all_close(out, full[:, :prefill], **tolerances.output(jnp.float32))
  floats = sum(x.size for x in jax.tree.leaves(state)) // B
  assert floats == mech.decode_state_floats(T, N, _kv_heads(mech), H, HV, _example(mech))

  @jax.jit
  def step(q_t, k_t, v_t, state, t):
    return _call(mech, q_t, k_t, v_t, causal=True, q_offset=t, initial_state=state,
                 return_final_state=True)

  for t in range(prefill, T):
    out, new_state = step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], state, jnp.int32(t))
    chex.assert_trees_all_close(out[:, 0], full[:, t], **tolerances.output(jnp.float32))
    chex.assert_trees_all_equal_shapes(new_state, state)  # fixed size: it does not grow with t
    state = new_state


def test_packed_equals_separate(mech):
  """Two packed documents equal each alone, under causal self-attention when the mechanism has it
  (else noncausal): the documents' masks are the same code for both patterns, and each pattern
  costs two compiled programs."""
  causal = "causal_self" in mech.patterns
  if not mech.packed or not ({"self", "causal_self"} & set(mech.patterns)):
    pytest.skip("no packed self-attention")
  # Two documents of one length (one compiled program serves both alone), packed at offsets 0 and 9.
  lengths = (9, 9)
  q, k, v = _inputs(mech, t=sum(lengths), s=sum(lengths))
  seg = np.broadcast_to(np.repeat(np.arange(2, dtype=np.int32), lengths), (B, sum(lengths)))
  packed = _host(_call(mech, q, k, v, causal=causal, segment_ids=seg))
  start = 0
  for n in lengths:
    part = slice(start, start + n)
    alone = _host(_call(mech, q[:, part], k[:, part], v[:, part], causal=causal))
    chex.assert_trees_all_close(packed[:, part], alone, **tolerances.output(jnp.float32))
    start += n


def test_examples_of_a_batch_are_independent(mech):
  causal, cross, s = _pattern_args(_some_pattern(mech))
  q, k, v = _inputs(mech, s=s)
  out = _host(_forward(mech, q, k, v, causal=causal, cross=cross))
  other = _inputs(mech, s=s, seed=5)
  changed = [np.concatenate([x[:1], 3 * y[1:]]) for x, y in zip((q, k, v), other, strict=True)]
  out2 = _host(_forward(mech, *changed, causal=causal, cross=cross))
  chex.assert_trees_all_close(out2[0], out[0], **tolerances.output(jnp.float32))
  assert tolerances.rel_rms(out2[1], out[1]) > tolerances.CHANGED_REL_RMS  # reached example 1


def test_reads_exactly_the_inputs_it_declares(mech):
  """q, k, v in `reads` and every learned array change the output; an unread input does not (the
  layer creates no projection for it)."""
  causal, cross, s = _pattern_args(_some_pattern(mech))
  qkv = _inputs(mech, s=s)
  base = _forward(mech, *qkv, causal=causal, cross=cross)
  other = _inputs(mech, s=s, seed=5)
  for i, name in enumerate("qkv"):
    args = list(qkv)
    args[i] = other[i]
    out = _forward(mech, *args, causal=causal, cross=cross)
    if name in mech.reads:
      assert tolerances.rel_rms(out, base) > tolerances.CHANGED_REL_RMS, (
          f"{name} is declared read but does not matter")
    else:
      chex.assert_trees_all_equal(out, base)
  example = _example(mech)
  rng = np.random.default_rng(0)
  for spec in mech.params:
    value = np.asarray(example[spec.name], np.float32)
    bumped = value + (0.5 * float(np.std(value)) + 0.1) * rng.standard_normal(value.shape)
    out = _forward(mech, *qkv, causal=causal, cross=cross,
                   **{spec.name: bumped.astype(np.float32)})
    assert tolerances.rel_rms(out, base) > tolerances.PARAM_CHANGED_REL_RMS, (
        f"learned array {spec.name} does not matter")


def test_flex_mods_compute_the_mechanism(mech):
  """A mechanism that declares `flex_mods` (the form context parallelism runs) equals plain flex
  attention under those mods, at its base pattern."""
  if mech.flex_mods is None:
    pytest.skip("no flex_mods")
  causal, cross, s = _pattern_args(_some_pattern(mech))
  if cross:
    pytest.skip("context-parallel forms are self-attention")
  q, k, v = _inputs(mech, s=s)
  mods = mech.flex_mods_for(causal, N, _example(mech))
  mods = {"causal": causal, **mods}
  mask = masks.combine_masks(masks.causal(0) if mods.pop("causal") else None, mods.get("mask_mod"))
  flex_out = jax.jit(lambda q, k, v: flex.flex_attention(
      q, k, v, mask_mod=mask, score_mod=mods.get("score_mod"), implementation="xla"))(q, k, v)
  chex.assert_trees_all_close(flex_out, _forward(mech, q, k, v, causal=causal, cross=cross),
                              **tolerances.output(jnp.float32))


def test_unknown_mechanism_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown attention mechanism 'nope'"):
    aj.get_mechanism("nope")
