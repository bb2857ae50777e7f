"""Infini-attention (#75): the output is the gated mix of causal local softmax attention and a read
of the compressive memory, equal to a float64 transcription of eqs. (1)-(6) in both fast paths and
the reference; the memory (M, z) has one size after any number of segments and is all the last
segment reads of the prefix; the delta rule differs from the linear rule and leaves M unchanged when
a value is already retrieved exactly; the gate interpolates between the two reads; recurrent
decoding (memory + current segment's buffer, a fixed size) gives the same rows in calls of any
length that cross segment ends. `slow` holds only the same checks at extra sizes, gradients and
packing.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.core.feature_maps import elu_plus_one
from attnjax.ops.memory.infini import infini_attention, infini_memory
from tests import numpy_math
from tests import tolerances
from tests.inputs import jit_with, qkv

TOL = tolerances.output(jnp.float32)
GTOL = tolerances.grad(jnp.float32)


def _elu1(x):
  return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def _ratio(num, den):
  den = den[..., None]
  return np.where(den == 0, 0.0, num / np.where(den == 0, 1.0, den))


def _infini_numpy(q, k, v, gate, L, rule, scale=None):
  """Infini-attention eqs. (1)-(6), float64, one segment at a time; also returns the final
  memory (M, z)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  K, h = k.shape[2], v.shape[3]
  G = N // K
  scale = H ** -0.5 if scale is None else scale
  g = numpy_math.sigmoid(gate)
  M, z = np.zeros((B, K, H, h)), np.zeros((B, K, H))
  out = np.zeros((B, T, N, h))
  for s0 in range(0, T, L):
    sl = slice(s0, min(s0 + L, T))
    qs, ks, vs = q[:, sl], k[:, sl], v[:, sl]
    n = ks.shape[1]
    for head in range(N):
      kvh = head // G
      logits = np.einsum("btd,bsd->bts", qs[:, :, head], ks[:, :, kvh]) * scale
      logits = np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf)
      local = np.einsum("bts,bsd->btd", numpy_math.softmax(logits), vs[:, :, kvh])             # eq. (1)
      sq = _elu1(qs[:, :, head])
      mem = _ratio(np.einsum("btf,bfd->btd", sq, M[:, kvh]),                         # eq. (3)
                   np.einsum("btf,bf->bt", sq, z[:, kvh]))
      out[:, sl, head] = g[head] * mem + (1 - g[head]) * local                      # eq. (6)
    sk = _elu1(ks)
    dv = vs
    if rule == "delta":                                                             # eq. (5)
      dv = vs - _ratio(np.einsum("blkf,bkfd->blkd", sk, M), np.einsum("blkf,bkf->blk", sk, z))
    M = M + np.einsum("blkf,blkd->bkfd", sk, dv)                                    # eq. (4)
    z = z + sk.sum(1)
  return out, M, z


def _check_infini(rule, scale, *, L, seed, **sizes):
  q, k, v = qkv(seed=seed, **sizes)
  gate = jnp.linspace(-1.5, 2.0, q.shape[2])
  expected, M, z = _infini_numpy(q, k, v, gate, L, rule, scale)
  for impl in ("xla", "reference"):
    out = jit_with(infini_attention, segment_length=L, update_rule=rule, scale=scale,
                   implementation=impl)(q, k, v, gate=gate)
    chex.assert_trees_all_close(out, expected, **TOL)
  memory = jit_with(infini_memory, segment_length=L, update_rule=rule)(k, v)
  chex.assert_trees_all_close(memory, (M, z), **TOL)


@pytest.mark.parametrize("rule,scale", [("linear", None), ("delta", 0.6)])
def test_infini_is_the_gated_mix_of_local_attention_and_memory_retrieval(rule, scale):
  """Both paths equal the float64 transcription: 4 segments (the last partial), 2 query heads per
  kv head, 2 examples; a non-default `scale` scales the local softmax logits."""
  _check_infini(rule, scale, L=4, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_infini_equals_the_paper_equations_at_more_sizes(rule):
  _check_infini(rule, None, L=6, seed=11, B=1, T=37, N=4, K=1, h=5)


def test_infini_memory_stays_constant_in_size_and_is_all_the_prefix_leaves():
  """(M, z) has one size after any number of segments (and the registered decode state does not
  grow with T); the last segment's output is the gated mix of its own causal softmax attention and
  a read of the (M, z) of everything before it."""
  L, N, K, H, h = 4, 4, 2, 8, 6
  gate = np.array([-1.0, 0.3, 0.0, 2.0])
  memory = jit_with(infini_memory, segment_length=L)
  shapes = set()
  for segments in (1, 3, 6):
    q, k, v = qkv(seed=3, T=segments * L)
    M, z = memory(k, v)
    shapes.add((M.shape, z.shape))
    _, M64, z64 = _infini_numpy(q, k, v, gate, L, "linear")
    chex.assert_trees_all_close((M, z), (M64, z64), **TOL)
  assert shapes == {((2, K, H, h), (2, K, H))}
  mech = aj.get_mechanism("infini_attention")
  sizes = {mech.decode_state_floats(T, N, K, H, h, {"segment_length": L})
           for T in (L, 10 * L, 10**6)}
  assert len(sizes) == 1, sizes
  # The last of 6 segments reads the memory of the first 5 (the last M, z above) and nothing else.
  T = 6 * L
  q, k, v = qkv(seed=3, T=T)
  _, M64, z64 = _infini_numpy(q[:, :T - L], k[:, :T - L], v[:, :T - L], gate, L, "linear")
  out = jit_with(infini_attention, segment_length=L)(q, k, v, gate=jnp.asarray(gate))
  qs, ks, vs = (np.asarray(x[:, T - L:], np.float64) for x in (q, k, v))
  sq = _elu1(qs).reshape(2, L, K, N // K, H)
  read = _ratio(np.einsum("btkgf,bkfh->btkgh", sq, M64), np.einsum("btkgf,bkf->btkg", sq, z64))
  logits = np.einsum("btnd,bsnd->bnts", qs, np.repeat(ks, N // K, axis=2)) * H ** -0.5
  logits = np.where(np.tril(np.ones((L, L), bool)), logits, -np.inf)
  local = np.einsum("bnts,bsnd->btnd", numpy_math.softmax(logits), np.repeat(vs, N // K, axis=2))
  g = numpy_math.sigmoid(gate)[:, None]
  chex.assert_trees_all_close(out[:, T - L:], g * read.reshape(2, L, N, h) + (1 - g) * local,
                              **TOL)


def test_infini_delta_rule_differs_and_keeps_memory_when_value_is_retrieved():
  L = 4
  q, k, v = qkv(seed=4, T=2 * L)
  M1, z1 = jit_with(infini_memory, segment_length=L)(k[:, :L], v[:, :L])
  # Second segment: values equal to what the memory already retrieves for their keys.
  sk = elu_plus_one(k[:, L:])
  retrieved = (jnp.einsum("blkf,bkfh->blkh", sk, M1)
               / jnp.einsum("blkf,bkf->blk", sk, z1)[..., None])
  v2 = v.at[:, L:].set(retrieved)
  M_delta, _ = jit_with(infini_memory, segment_length=L, update_rule="delta")(k, v2)
  M_linear, _ = jit_with(infini_memory, segment_length=L, update_rule="linear")(k, v2)
  chex.assert_trees_all_close(M_delta, M1, **TOL)
  assert not np.allclose(M_linear, M1, atol=tolerances.STATE_CHANGED_MAX_ABS)
  # On ordinary inputs the two rules give different outputs from the third segment on.
  q, k, v = qkv(seed=5, T=3 * L)
  gate = jnp.zeros((4,))
  lin = jit_with(infini_attention, segment_length=L, update_rule="linear")(q, k, v, gate=gate)
  dlt = jit_with(infini_attention, segment_length=L, update_rule="delta")(q, k, v, gate=gate)
  chex.assert_trees_all_close(dlt[:, :2 * L], lin[:, :2 * L], **TOL)
  assert not np.allclose(dlt[:, 2 * L:], lin[:, 2 * L:], atol=tolerances.CHANGED_MAX_ABS)


def test_infini_gate_interpolates_between_local_and_memory():
  L = 4
  q, k, v = qkv(seed=6, T=3 * L)
  run = jit_with(infini_attention, segment_length=L)
  local_only = run(q, k, v, gate=jnp.full((4,), -1e4))
  memory_only = run(q, k, v, gate=jnp.full((4,), 1e4))
  expected, _, _ = _infini_numpy(q, k, v, np.full((4,), -np.inf), L, "linear")
  chex.assert_trees_all_close(local_only, expected, **TOL)
  # The first segment reads an empty memory: zeros.
  chex.assert_trees_all_close(memory_only[:, :L], jnp.zeros_like(memory_only[:, :L]))
  gate = jnp.array([-2.0, -0.5, 0.5, 3.0])
  g = jax.nn.sigmoid(gate)[:, None]
  chex.assert_trees_all_close(run(q, k, v, gate=gate), g * memory_only + (1 - g) * local_only,
                              **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_infini_fast_path_gradients_equal_reference(rule):
  q, k, v = qkv(seed=1, B=1, T=11)
  gate = jnp.array([0.5, -0.5, 1.0, 0.0])

  def grads(impl):
    loss = lambda q, k, v, g: jnp.sum(jnp.sin(infini_attention(
        q, k, v, gate=g, segment_length=3, update_rule=rule, implementation=impl)))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, gate)

  chex.assert_trees_all_close(grads("xla"), grads("reference"), **GTOL)


@pytest.mark.slow
def test_infini_delta_rule_packed_equals_separate():
  q, k, v = qkv(seed=2, B=1, T=12)
  gate = jnp.array([0.5, -0.5, 1.0, 0.0])
  seg = jnp.array([[0] * 5 + [1] * 7])
  for impl in ("xla", "reference"):
    fn = jit_with(infini_attention, segment_length=3, update_rule="delta", implementation=impl)
    packed = fn(q, k, v, gate=gate, segment_ids=seg)
    for part in (slice(0, 5), slice(5, 12)):
      alone = fn(q[:, part], k[:, part], v[:, part], gate=gate)
      chex.assert_trees_all_close(packed[:, part], alone, **TOL)


def test_infini_rejects_bad_arguments():
  q, k, v = qkv(seed=7)
  with pytest.raises(ValueError, match="gate"):
    infini_attention(q, k, v, gate=jnp.zeros((3,)), segment_length=4)
  with pytest.raises(ValueError, match="update_rule"):
    infini_attention(q, k, v, gate=jnp.zeros((4,)), segment_length=4, update_rule="hebb")
  with pytest.raises(ValueError, match="causal"):
    infini_attention(q, k, v, gate=jnp.zeros((4,)), segment_length=4, causal=False)


def _decode_in_calls(fn, q, k, v, cuts, **kw):
  """`fn` over the tokens [0, cuts[0]), [cuts[0], cuts[1]), ... carrying the recurrent state: the
  first call from state None at offset 0, the others compiled with a traced offset. Returns the
  concatenated outputs and the state after each call."""
  step = jax.jit(lambda q, k, v, state, n: fn(q, k, v, causal=True, q_offset=n, initial_state=state,
                                              return_final_state=True, **kw))
  out, state = jax.jit(lambda q, k, v: fn(q, k, v, causal=True, initial_state=None,
                                          return_final_state=True, **kw))(
      q[:, :cuts[0]], k[:, :cuts[0]], v[:, :cuts[0]])
  outs, states = [out], [state]
  for a, b in zip(cuts, cuts[1:] + [q.shape[1]], strict=True):
    out, state = step(q[:, a:b], k[:, a:b], v[:, a:b], state, jnp.int32(a))
    outs.append(out)
    states.append(state)
  return jnp.concatenate(outs, axis=1), states


@pytest.mark.parametrize("rule,impl", [("linear", "xla"), ("delta", "xla"), ("linear", "reference")])
def test_infini_recurrent_decoding_carries_memory_and_segment_buffer(rule, impl):
  """Prefill 4 tokens (past the end of segment 0, L = 3), a 7-token chunk that crosses two segment
  ends, then single steps (the last opens a segment): every row equals the float64 transcription
  and the full forward, 2 query heads per kv head. The state keeps one shape and the registry's
  size after every call, and it is the memory (M, z) of the complete segments plus the open
  segment's keys and values."""
  L, T = 3, 13
  q, k, v = qkv(seed=21, T=T)
  gate = jnp.array([-1.0, 0.4, 1.2, 0.0])
  kw = dict(gate=gate, segment_length=L, update_rule=rule, implementation=impl)
  out, states = _decode_in_calls(infini_attention, q, k, v, [4, 11, 12], **kw)
  expected, _, _ = _infini_numpy(q, k, v, gate, L, rule)
  chex.assert_trees_all_close(out, expected, **TOL)
  chex.assert_trees_all_close(out, jit_with(infini_attention, segment_length=L, update_rule=rule,
                                            implementation=impl)(q, k, v, gate=gate), **TOL)
  chex.assert_trees_all_equal_shapes(*states)
  mech = aj.get_mechanism("infini_attention")
  floats = sum(x.size for x in jax.tree.leaves(states[0])) // q.shape[0]
  assert floats == mech.decode_state_floats(T, 4, 2, 8, 6, {"segment_length": L})
  for n, state in zip([4, 11, 12, 13], states, strict=True):
    done = n // L * L
    _, M, z = _infini_numpy(q[:, :done], k[:, :done], v[:, :done], gate, L, rule)
    chex.assert_trees_all_close((state["memory"], state["normalizer"]), (M, z), **TOL)
    chex.assert_trees_all_close(state["keys"][:, :n - done], k[:, done:n], **TOL)
    chex.assert_trees_all_close(state["values"][:, :n - done], v[:, done:n], **TOL)


def test_infini_recurrent_decoding_rejects_what_it_cannot_carry():
  q, k, v = qkv(seed=22, T=4)
  kw = dict(gate=jnp.zeros((4,)), segment_length=3, return_final_state=True)
  with pytest.raises(ValueError, match="infini_attention: recurrent decoding .* `kv_lengths`"):
    infini_attention(q, k, v, kv_lengths=jnp.array([4, 4]), **kw)
  with pytest.raises(ValueError, match="infini_attention: recurrent decoding needs `q_offset`"):
    infini_attention(q, k, v, q_offset=jnp.array([0, 2]), **kw)
  _, state = infini_attention(q, k, v, **kw)
  with pytest.raises(ValueError, match=r"infini_attention: `initial_state\['keys'\]` must have"):
    infini_attention(q, k, v, initial_state={**state, "keys": state["keys"][:, :1]}, **kw)
  with pytest.raises(ValueError, match="infini_attention: `initial_state` needs"):
    infini_attention(q, k, v, gate=jnp.zeros((4,)), segment_length=3, initial_state={})
