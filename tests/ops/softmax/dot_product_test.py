"""dot_product_attention: parity with `jax.nn.dot_product_attention`, a float64 dense reference over
random shapes (hypothesis), and clear errors for every bad input."""

import functools

import beartype
import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from attnjax.ops import softmax
from attnjax.ops.softmax.dot_product import dot_product_attention as dpa
from tests import inputs
from tests import tolerances

IMPLS = ("xla", "reference")


def _rand(rng, *shape):
  return jnp.asarray(rng.normal(size=shape), jnp.float32)


def numpy_attention(q, k, v, *, bias=None, mask=None, causal=False, window=None, segment_ids=None,
                    softcap=None, scale=None, kv_lengths=None, q_lengths=None):
  """Float64 dense softmax attention of the operator contract (empty rows give zeros)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  k, v = np.repeat(k, N // K, axis=2), np.repeat(v, N // K, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) * (H ** -0.5 if scale is None else scale)
  if bias is not None:
    s = s + np.asarray(bias, np.float64)
  if softcap is not None:
    s = softcap * np.tanh(s / softcap)
  qi, ki = np.arange(T)[:, None], np.arange(S)[None, :]
  vis = np.ones((B, N, T, S), bool)
  if mask is not None:
    vis &= np.asarray(mask, bool)
  if causal:
    vis &= qi >= ki
  if window is not None:
    # An int counts keys on each side, the query's own included; a pair gives distances.
    left, right = (window - 1, window - 1) if np.ndim(window) == 0 else window
    if left is not None:
      vis &= ki >= qi - left
    if right is not None:
      vis &= ki <= qi + right
  if segment_ids is not None:
    seg = np.asarray(segment_ids)
    vis &= (seg[:, :, None] == seg[:, None, :])[:, None]
  if kv_lengths is not None:
    vis &= (ki[None] < np.asarray(kv_lengths)[:, None, None])[:, None]
  if q_lengths is not None:
    vis &= (qi[None] < np.asarray(q_lengths)[:, None, None])[:, None]
  s = np.where(vis, s, -np.inf)
  m = np.max(s, -1, keepdims=True)
  e = np.where(vis, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
  den = e.sum(-1, keepdims=True)
  w = e / np.where(den == 0, 1.0, den)
  return np.einsum("bnts,bsnh->btnh", w, v).astype(np.float32), vis.any(-1)


# --------------------------------------------------------------------------------------------------
# Parity with jax.nn.dot_product_attention


def _qkv(rng, B=2, T=11, S=11, N=4, K=2, H=8, h=None):
  """q, k, v drawn in turn from the numpy generator `rng` (not `tests.inputs.qkv`, which draws from
  one JAX key): the parity cases draw more arrays from the same generator after them."""
  return _rand(rng, B, T, N, H), _rand(rng, B, S, K, H), _rand(rng, B, S, K, h or H)


PARITY = {
    "plain": (dict(), dict()),
    "causal": (dict(causal=True), dict(is_causal=True)),
    "window_int": (dict(window=3), dict(local_window_size=2)),     # 3 keys a side = distance 2
    "window_pair": (dict(window=(4, 1)), dict(local_window_size=(4, 1))),
    "causal_window": (dict(causal=True, window=(3, 0)),
                      dict(is_causal=True, local_window_size=(3, 0))),
}


@pytest.mark.parametrize("name", sorted(PARITY))
@pytest.mark.parametrize("impl", IMPLS)
def test_parity_with_jax_nn(name, impl):
  rng = np.random.default_rng(0)
  q, k, v = _qkv(rng)
  ours_kw, theirs_kw = PARITY[name]
  # Compiled (eager dispatch would compile every primitive separately).
  ours = jax.jit(lambda q, k, v: dpa(q, k, v, implementation=impl, **ours_kw))
  theirs = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla",
                                                                **theirs_kw))
  chex.assert_trees_all_close(ours(q, k, v), theirs(q, k, v), **tolerances.output(jnp.float32))
  loss = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2)))(q, k, v)
  chex.assert_trees_all_close(loss(ours), loss(theirs), **tolerances.grad(jnp.float32))


@pytest.mark.parametrize("impl", IMPLS)
def test_parity_bias_and_mask(impl):
  rng = np.random.default_rng(1)
  q, k, v = _qkv(rng, T=9, S=14, N=6, K=3)
  mask = jnp.asarray(rng.random((2, 1, 9, 14)) > 0.3).at[..., 0].set(True)   # no empty row
  for bias_shape in [(2, 6, 9, 14), (1, 6, 1, 14)]:
    bias = _rand(rng, *bias_shape)
    ours = jax.jit(lambda q, k, v, bias: dpa(q, k, v, bias=bias, mask=mask, implementation=impl))
    theirs = jax.jit(lambda q, k, v, bias: jax.nn.dot_product_attention(q, k, v, bias=bias,
                                                                        mask=mask))
    chex.assert_trees_all_close(ours(q, k, v, bias), theirs(q, k, v, bias),
                                **tolerances.output(jnp.float32))
    grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2, 3)))(
        q, k, v, bias)
    chex.assert_trees_all_close(grad(ours), grad(theirs), **tolerances.grad(jnp.float32))


@pytest.mark.parametrize("impl", IMPLS)
def test_parity_gqa_mqa(impl):
  rng = np.random.default_rng(2)
  for K in (1, 2, 8):
    q, k, v = _qkv(rng, T=10, S=13, N=8, K=K, H=4, h=6)
    ours = jax.jit(functools.partial(dpa, causal=True, implementation=impl))(q, k, v)
    chex.assert_shape(ours, (2, 10, 8, 6))
    # jax.nn needs equal head dims; compare with repeated heads and our contract's reference.
    want, _ = numpy_attention(q, k, v, causal=True)
    chex.assert_trees_all_close(ours, want, **tolerances.output(jnp.float32))
    q2, k2, v2 = _qkv(rng, T=10, S=13, N=8, K=K, H=4)
    chex.assert_trees_all_close(jax.jit(functools.partial(dpa, implementation=impl))(q2, k2, v2),
                                jax.jit(jax.nn.dot_product_attention)(q2, k2, v2),
                                **tolerances.output(jnp.float32))


@pytest.mark.parametrize("impl", IMPLS)
def test_parity_sequence_lengths(impl):
  rng = np.random.default_rng(3)
  q, k, v = _qkv(rng, B=3, T=12, S=15)
  q_len, kv_len = jnp.asarray([12, 5, 1], jnp.int32), jnp.asarray([15, 3, 9], jnp.int32)
  ours = inputs.jit_with(dpa, implementation=impl)(q, k, v, q_lengths=q_len, kv_lengths=kv_len)
  theirs = jax.jit(jax.nn.dot_product_attention)(q, k, v, query_seq_lengths=q_len,
                                                 key_value_seq_lengths=kv_len)
  # Rows jax.nn leaves masked differ.
  valid = np.arange(12)[None, :] < np.asarray(q_len)[:, None]
  chex.assert_trees_all_close(np.asarray(ours)[valid], np.asarray(theirs)[valid],
                              **tolerances.output(jnp.float32))
  np.testing.assert_array_equal(np.asarray(ours)[~valid], 0.0)      # ours: zeros by contract


@pytest.mark.parametrize("impl", IMPLS)
def test_segment_ids_softcap_and_offset(impl):
  rng = np.random.default_rng(4)
  q, k, v = _qkv(rng, B=2, T=16, S=16)
  seg = jnp.asarray(np.sort(rng.integers(0, 3, (2, 16)), axis=1), jnp.int32)
  capped = inputs.jit_with(dpa, causal=True, softcap=0.5, implementation=impl)
  got = capped(q, k, v, segment_ids=seg)
  want, _ = numpy_attention(q, k, v, segment_ids=seg, causal=True, softcap=0.5)
  chex.assert_trees_all_close(got, want, **tolerances.output(jnp.float32))
  # Cross-attention segment pair equals the single array when T == S.
  pair = capped(q, k, v, segment_ids=(seg, seg))
  chex.assert_trees_all_close(pair, got, **tolerances.output(jnp.float32))
  # q_offset: the last 4 queries of a 16-token causal run.
  causal = inputs.jit_with(dpa, causal=True, implementation=impl)
  tail = causal(q[:, 12:], k, v, q_offset=12)
  full = causal(q, k, v)
  chex.assert_trees_all_close(tail, full[:, 12:], **tolerances.output(jnp.float32))


def test_numpy_integer_window():
  rng = np.random.default_rng(5)
  q, k, v = _qkv(rng)
  chex.assert_trees_all_close(dpa(q, k, v, window=np.int32(2)), dpa(q, k, v, window=2),
                              **tolerances.output(jnp.float32))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("w", [1, 3, 6])
def test_int_window_counts_keys_as_the_sliding_window_mechanism(w, causal):
  """One meaning of an int window: a query sees at most w keys on each allowed side, itself included
  (causal: keys p-w+1..p), in dot_product_attention, the sliding_window mechanism and
  masks.sliding_window(w - 1, w - 1)."""
  import attnjax as aj   # pylint: disable=import-outside-toplevel
  from attnjax.core import masks   # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(6)
  q, k, v = _qkv(rng, T=13, S=13)
  p, j = np.arange(13)[:, None], np.arange(13)[None, :]
  vis = (np.abs(p - j) < w) & ((j <= p) if causal else True)
  assert (vis.sum(-1) == (np.minimum(w, p[:, 0] + 1) if causal else
                          np.minimum(p[:, 0], w - 1) + np.minimum(12 - p[:, 0], w - 1) + 1)).all()
  want, _ = numpy_attention(q, k, v, mask=np.broadcast_to(vis, (2, 4, 13, 13)))
  got = dpa(q, k, v, window=w, causal=causal)
  mech = aj.attention("sliding_window", q, k, v, window=w, causal=causal)
  chex.assert_trees_all_close(got, want, **tolerances.output(jnp.float32))
  chex.assert_trees_all_close(mech, want, **tolerances.output(jnp.float32))
  dense = masks.evaluate_mask(masks.sliding_window(w - 1, w - 1), 1, 1, 13, 13)[0, 0]
  np.testing.assert_array_equal(dense, np.abs(p - j) < w)


def test_window_zero_and_bool_are_rejected_and_sliding_window_needs_one():
  import attnjax as aj   # pylint: disable=import-outside-toplevel
  q = jnp.ones((1, 4, 1, 2))
  with pytest.raises(ValueError, match="`window`.*>= 1"):
    dpa(q, q, q, window=0)
  with pytest.raises(ValueError, match="`window`"):
    dpa(q, q, q, window=True)
  # (0, 0) is a pair of distances: only the query's own position.
  chex.assert_trees_all_close(dpa(q, q, q, window=(0, 0)), dpa(q, q, q, window=1))
  mech = aj.get_mechanism("sliding_window")
  assert "window" not in mech.defaults      # no silent 4096
  with pytest.raises(TypeError, match="window"):
    mech(q, q, q, causal=True)
  for bad in (0, 2.5):
    with pytest.raises(ValueError, match="`window`"):
      mech(q, q, q, causal=True, window=bad)


# --------------------------------------------------------------------------------------------------
# Property tests


@st.composite
def valid_configs(draw):
  B = draw(st.integers(1, 2))
  T, S = draw(st.integers(1, 12)), draw(st.integers(1, 12))
  K, G = draw(st.integers(1, 3)), draw(st.integers(1, 3))
  H, h = draw(st.integers(1, 8)), draw(st.integers(1, 8))
  kw = dict(causal=draw(st.booleans()))
  if draw(st.booleans()):
    side = st.one_of(st.none(), st.integers(0, 5))       # a pair gives distances
    kw["window"] = draw(st.one_of(st.integers(1, 6), st.tuples(side, side)))
  if draw(st.booleans()):
    kw["bias"] = tuple(draw(st.sampled_from([1, d])) for d in (B, K * G, T, S))
  if draw(st.booleans()):
    kw["mask"] = tuple(draw(st.sampled_from([1, d])) for d in (B, K * G, T, S))
  if T == S and draw(st.booleans()):
    kw["segment_ids"] = True
  if draw(st.booleans()):
    kw["kv_lengths"] = True
  return (B, T, S, K * G, K, H, h), kw, draw(st.sampled_from(IMPLS)), draw(st.integers(0, 2 ** 16))


def _materialize(shape, kw, seed):
  B, T, S, N, K, H, h = shape
  rng = np.random.default_rng(seed)
  q, k, v = _rand(rng, B, T, N, H), _rand(rng, B, S, K, H), _rand(rng, B, S, K, h)
  kw = dict(kw)
  if "bias" in kw:
    kw["bias"] = _rand(rng, *kw["bias"])
  if "mask" in kw:
    kw["mask"] = jnp.asarray(rng.random(kw["mask"]) > 0.3)
  if "segment_ids" in kw:
    kw["segment_ids"] = jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), axis=1), jnp.int32)
  if "kv_lengths" in kw:
    kw["kv_lengths"] = jnp.asarray(rng.integers(0, S + 1, (B,)), jnp.int32)
  return q, k, v, kw


@hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
@hypothesis.given(valid_configs())
def test_property_valid_inputs_match_dense_reference(config):
  shape, kw, impl, seed = config
  q, k, v, kw = _materialize(shape, kw, seed)
  # One compiled program per example (eager dispatch would compile every primitive at these shapes).
  arrays = {key: x for key, x in kw.items() if isinstance(x, jax.Array)}
  static = {key: x for key, x in kw.items() if key not in arrays}
  got = jax.jit(lambda q, k, v, arrays: dpa(q, k, v, implementation=impl, **static, **arrays))(
      q, k, v, arrays)
  want, rows = numpy_attention(q, k, v, **kw)
  B, T, S, N, K, H, h = shape
  chex.assert_shape(got, (B, T, N, h))
  chex.assert_trees_all_close(got, want, **tolerances.output(jnp.float32))
  assert np.all(np.asarray(got)[~np.moveaxis(rows, 1, 2)] == 0)


BAD_KINDS = ("q_rank", "k_rank", "v_rank", "v_heads", "k_not_dividing", "head_dim", "v_length",
             "batch", "mask_shape", "mask_rank", "bias_shape", "bias_rank", "window", "window_pair",
             "segment_ids", "kv_lengths", "int_q")


@hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
@hypothesis.given(
    st.tuples(st.integers(1, 3), st.integers(2, 9), st.integers(2, 9), st.integers(1, 3),
              st.integers(1, 3), st.integers(2, 8)),
    st.sampled_from(BAD_KINDS))
def test_property_bad_inputs_raise_naming_argument(dims, kind):
  B, T, S, K, G, H = dims
  N = K * G
  q, k, v = jnp.ones((B, T, N, H)), jnp.ones((B, S, K, H)), jnp.ones((B, S, K, H))
  kw, name, error = {}, None, ValueError
  if kind == "q_rank":
    q, name = q[0], "`q`"
  elif kind == "k_rank":
    k, name = k[..., None], "`k`"
  elif kind == "v_rank":
    v, name = v[0], "`v`"
  elif kind == "v_heads":
    v, name = jnp.ones((B, S, K + 1, H)), "`v`"
  elif kind == "k_not_dividing":
    k = v = jnp.ones((B, S, N + 1, H))
    name = "`k`"
  elif kind == "head_dim":
    k, name = jnp.ones((B, S, K, H + 1)), "`k`"
  elif kind == "v_length":
    v, name = jnp.ones((B, S + 1, K, H)), "`v`"
  elif kind == "batch":
    k, name = jnp.ones((B + 1, S, K, H)), "`k`"
  elif kind == "mask_shape":
    kw["mask"], name = jnp.ones((B, N, T + 1, S), bool), "`mask`"
  elif kind == "mask_rank":
    kw["mask"], name = jnp.ones((T, S), bool), "`mask`"
  elif kind == "bias_shape":
    kw["bias"], name = jnp.ones((B, N + 1, T, S)), "`bias`"
  elif kind == "bias_rank":
    kw["bias"], name = jnp.ones((N, T, S)), "`bias`"
  elif kind == "window":
    kw["window"], name = -1, "`window`"
  elif kind == "window_pair":
    kw["window"], name = (2, -3), "`window`"
  elif kind == "segment_ids":
    kw["segment_ids"], name = jnp.ones((B, T + 1), jnp.int32), "`segment_ids"
  elif kind == "kv_lengths":
    kw["kv_lengths"], name = jnp.ones((B, 1), jnp.int32), "`kv_lengths`"
  elif kind == "int_q":
    q, name, error = jnp.ones((B, T, N, H), jnp.int32), "`q`", TypeError
  with pytest.raises(error) as info:
    dpa(q, k, v, **kw)
  assert name in str(info.value), (kind, str(info.value))


@pytest.mark.parametrize("window", [(1, 2, 3), "ab", 1.5])
def test_malformed_window_names_argument(window):
  q = jnp.ones((1, 4, 1, 2))
  with pytest.raises((ValueError, TypeError), match="`window`"):
    dpa(q, q, q, window=window)


def test_single_segment_ids_need_self_attention():
  q, k = jnp.ones((1, 4, 1, 2)), jnp.ones((1, 6, 1, 2))
  with pytest.raises(ValueError, match="segment_ids"):
    dpa(q, k, k, segment_ids=jnp.zeros((1, 4), jnp.int32))


@pytest.mark.parametrize("name, kwargs", [
    ("dot_product_attention", dict(bias=jnp.zeros((1, 4, 9, 9)), mask=jnp.ones((1, 1, 9, 9), bool),
                                   kv_lengths=jnp.array([9, 4]))),
    ("softmax_attention", {}), ("alibi_attention", {}), ("softcap_attention", {}),
    ("document_masked_attention", dict(segment_ids=jnp.zeros((2, 9), jnp.int32))),
    ("sliding_window_attention", dict(window=3)), ("prefix_lm_attention", dict(prefix_length=3)),
    ("flex_mechanism", {})])
def test_signature_shapes_hold_under_jaxtyped(name, kwargs):
  """The folder's operators' jaxtyping annotations hold (GQA, h != H), and a key of the wrong head
  dim fails the shape check before the body runs."""
  checked = jaxtyping.jaxtyped(getattr(softmax, name), typechecker=beartype.beartype)
  q, k, v = inputs.qkv(B=2, T=9, N=4, K=2, H=8, h=6)
  assert checked(q, k, v, causal=True, **kwargs).shape == (2, 9, 4, 6)
  with pytest.raises(jaxtyping.TypeCheckError):
    checked(q, k[..., :6], v, causal=True, **kwargs)
