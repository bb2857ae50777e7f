"""split_k_decode (Lean Attention, arXiv:2405.10480): equal to softmax attention for any number of
splits, and the paper's property: partial states merged by the associative lse reduction, in any
order and grouping, equal the unsplit result."""

import functools

import beartype
import chex
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import attnjax
from attnjax.core import flex
from attnjax.core import masks
from attnjax.core.merge import merge_attention_states
from attnjax.ops.decode import split_k
from attnjax.ops.softmax import softmax_attention
from tests import tolerances

B, T, S, N, K, H, h = 2, 5, 23, 4, 2, 8, 6


def _inputs(seed=0, T=T, S=S):
  rng = np.random.default_rng(seed)
  normal = lambda shape: jnp.asarray(rng.standard_normal(shape, np.float32))
  return normal((B, T, N, H)), normal((B, S, K, H)), normal((B, S, K, h))


@functools.partial(jax.jit, static_argnames=("num_splits", "causal"))
def _split_k(q, k, v, kv_lengths, q_offset, *, num_splits, causal):
  return split_k.split_k_decode(q, k, v, causal=causal, q_offset=q_offset, kv_lengths=kv_lengths,
                                num_splits=num_splits)


_softmax = jax.jit(functools.partial(softmax_attention, implementation="reference"),
                   static_argnames=("causal",))


@pytest.mark.parametrize("num_splits", [1, 3, 5, 40])
def test_equals_softmax_for_any_num_splits(num_splits):
  """Decode-shaped (T < S, queries at the end of per-row lengths), GQA, S = 23 not divisible."""
  q, k, v = _inputs()
  kv_lengths = jnp.array([23, 14], jnp.int32)
  q_offset = kv_lengths - T
  got = _split_k(q, k, v, kv_lengths, q_offset, num_splits=num_splits, causal=True)
  want = _softmax(q, k, v, causal=True, q_offset=q_offset, kv_lengths=kv_lengths)
  chex.assert_trees_all_close(got, want, **tolerances.output(jnp.float32))


def test_equals_softmax_noncausal_packed_cross():
  q, k, v = _inputs(1)
  q_seg = jnp.array([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]], jnp.int32)
  kv_seg = jnp.asarray(np.sort(np.random.default_rng(7).integers(0, 3, (B, S)), axis=1), jnp.int32)
  got = jax.jit(lambda q, k, v, segs: attnjax.attention("split_k_decode", q, k, v, segment_ids=segs,
                                                         num_splits=3))(q, k, v, (q_seg, kv_seg))
  want = _softmax(q, k, v, segment_ids=(q_seg, kv_seg))
  chex.assert_trees_all_close(got, want, **tolerances.output(jnp.float32))


def test_gradients_equal_softmax():
  """The lse of each chunk carries gradient through the merge; the sum equals softmax's gradient."""
  q, k, v = _inputs(2, T=4, S=11)
  loss = lambda fn: jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v))),
                                     argnums=(0, 1, 2)))
  got = loss(lambda q, k, v: split_k.split_k_decode(q, k, v, causal=True, q_offset=7, num_splits=3))
  want = loss(lambda q, k, v: softmax_attention(q, k, v, causal=True, q_offset=7,
                                                implementation="reference"))
  chex.assert_trees_all_close(got(q, k, v), want(q, k, v), **tolerances.grad(jnp.float32))


@jax.jit
def _chunk_state(q, k_chunk, v_chunk, lo, q_offset):
  """(out, lse) of one key chunk starting at global key `lo`, causal at positions `q_offset + t`."""
  # Mask mods see chunk-local key indices: shift them to global positions.
  mod = lambda b, n, qi, kv: masks.causal(q_offset)(b, n, qi, kv + lo)
  return flex.flex_attention(q, k_chunk, v_chunk, mask_mod=mod, return_residuals=True,
                             implementation="reference")


def _merge2(a, b):
  return merge_attention_states([a[0], b[0]], [a[1], b[1]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_associative_merge_in_any_order_equals_unsplit(seed):
  """Lean Attention's reduction: split the keys at random points, merge the partial states pairwise
  in a random order (left fold) and as a balanced tree: both equal the unsplit (out, lse)."""
  rng = np.random.default_rng(seed)
  q, k, v = _inputs(seed, T=3, S=17)
  cuts = np.sort(rng.choice(np.arange(1, 17), size=4, replace=False))
  edges = [0, *cuts.tolist(), 17]
  bounds = list(zip(edges[:-1], edges[1:], strict=True))
  q_offset = 14
  states = [_chunk_state(q, k[:, lo:hi], v[:, lo:hi], lo, q_offset) for lo, hi in bounds]
  want = _chunk_state(q, k, v, 0, q_offset)

  order = rng.permutation(len(states))
  folded = functools.reduce(_merge2, [states[i] for i in order])
  chex.assert_trees_all_close(folded, want, **tolerances.output(jnp.float32))

  level = [states[i] for i in rng.permutation(len(states))]
  while len(level) > 1:
    level = [_merge2(*level[i:i + 2]) if i + 1 < len(level) else level[i]
             for i in range(0, len(level), 2)]
  chex.assert_trees_all_close(level[0], want, **tolerances.output(jnp.float32))

  flat = merge_attention_states(*map(list, zip(*states, strict=True)))
  chex.assert_trees_all_close(flat, want, **tolerances.output(jnp.float32))


def test_registry_record():
  mech = attnjax.get_mechanism("split_k_decode")
  assert mech.fn is split_k.split_k_decode
  assert mech.seeds == (5,) and mech.family == "decode-kvcache" and mech.arxiv == "2405.10480"
  assert mech.paper.startswith("Lean Attention")
  assert mech.example_kwargs == dict(num_splits=3)


def test_bad_arguments_raise():
  q, k, v = jnp.zeros((B, 2, N, H)), jnp.zeros((B, 6, K, H)), jnp.zeros((B, 6, K, h))
  with pytest.raises(ValueError, match="num_splits"):
    split_k.split_k_decode(q, k, v, num_splits=0)
  with pytest.raises(ValueError, match="kv_lengths"):
    split_k.split_k_decode(q, k, v, kv_lengths=jnp.array([3, 4, 5]))
  with pytest.raises(ValueError, match="q_offset"):
    split_k.split_k_decode(q, k, v, causal=True, q_offset=jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="split_k_decode"):
    split_k.split_k_decode(q, jnp.zeros((B, 6, 3, H)), jnp.zeros((B, 6, 3, h)))


def test_signature_shapes_hold_under_jaxtyped():
  """The annotations hold (GQA, h != H, T < S), and per-row lengths of the wrong batch fail the
  shape check before the body runs."""
  checked = jaxtyping.jaxtyped(split_k.split_k_decode, typechecker=beartype.beartype)
  q, k, v = _inputs()
  lengths = jnp.array([23, 14], jnp.int32)
  assert checked(q, k, v, kv_lengths=lengths, num_splits=3).shape == (B, T, N, h)
  with pytest.raises(jaxtyping.TypeCheckError):
    checked(q, k, v, kv_lengths=jnp.array([23, 14, 5], jnp.int32), num_splits=3)
