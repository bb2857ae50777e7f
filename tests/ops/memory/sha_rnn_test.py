"""SHA-RNN attention (#56): equals a float64 rewrite of the author's equations (LayerNorm'd
query, vector gates, over-parametrized value gate), with a bounded memory too; with open gates it is
plain single-head causal attention; its gates act per channel; with a bounded memory it decodes from
a state that is that memory alone.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.ops.memory.sha_rnn import sha_rnn_attention, sha_rnn_param_specs
from attnjax.ops.softmax import dot_product_attention
from attnjax.registry import example_params
from tests import numpy_math
from tests import tolerances
from tests.inputs import qkv

TOL = tolerances.output(jnp.float32)


def _np(x):
  return np.asarray(x, np.float64)


def _layer_norm(x, eps):
  """LayerNorm without affine over the last axis."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True) + eps)


def _sha_params(seed=0, h=6, perturb=1.0):
  return example_params(sha_rnn_param_specs(h=h), seed=seed, perturb=perturb)


def _numpy_sha(q, k, v, p, *, q_offset=0, eps=1e-12, memory=None):
  """The SHA attention in float64 (the author's `Attention`, only the query projected), per head;
  with `memory` M, the query at position t reads the positions t - M, ..., t."""
  q, k, v, p = _np(q), _np(k), _np(v), {name: _np(x) for name, x in p.items()}
  N, K, H, h = q.shape[2], k.shape[2], q.shape[3], v.shape[3]
  mean = q.mean(-1, keepdims=True)
  ln = (q - mean) / np.sqrt(((q - mean) ** 2).mean(-1, keepdims=True) + eps)
  queries = numpy_math.sigmoid(p["q_gate"]) * (ln * p["query_ln_scale"] + p["query_ln_bias"])
  keys = numpy_math.sigmoid(p["k_gate"]) * k
  out = np.zeros(q.shape[:3] + (h,))
  for g in range(K):
    # The over-parametrized value gate: one linear map of σ(s_v) to [c ‖ f], gate σ(f)·tanh(c).
    cf = numpy_math.sigmoid(p["v_gate"][g]) @ p["v_gate_kernel"][g] + p["v_gate_bias"][g]
    values = numpy_math.sigmoid(cf[h:]) * np.tanh(cf[:h]) * v[:, :, g]
    for n in range(g * (N // K), (g + 1) * (N // K)):
      logits = H ** -0.5 * np.einsum("bth,bsh->bts", queries[:, :, n], keys[:, :, g])
      t, s = np.arange(q.shape[1])[:, None] + q_offset, np.arange(k.shape[1])[None, :]
      seen = (s <= t) if memory is None else (s <= t) & (t - s <= memory)
      out[:, :, n] = np.einsum("bts,bsd->btd", numpy_math.softmax(logits, where=seen), values)
  return out


def test_sha_rnn_attention_matches_float64_paper_equations():
  q, k, v = qkv(seed=5, T=15)
  p = _sha_params(1)
  chex.assert_trees_all_close(sha_rnn_attention(q, k, v, **p), _numpy_sha(q, k, v, p), **TOL)
  # Queries for the last 6 positions over a memory of all 15 states.
  chex.assert_trees_all_close(sha_rnn_attention(q[:, 9:], k, v, q_offset=9, **p),
                              _numpy_sha(q[:, 9:], k, v, p, q_offset=9), **TOL)


def test_sha_rnn_bounded_memory_matches_float64_paper_equations():
  """With a memory of M past states the query at t reads positions t - M, ..., t: full forward,
  queries over a KV cache, and packed documents (the memory stays inside each)."""
  q, k, v = qkv(seed=9, T=15)
  p = _sha_params(3)
  sha = jax.jit(lambda q, k, v, **kw: sha_rnn_attention(q, k, v, memory=4, **kw, **p),
                static_argnames=("q_offset",))
  chex.assert_trees_all_close(sha(q, k, v), _numpy_sha(q, k, v, p, memory=4), **TOL)
  chex.assert_trees_all_close(sha(q[:, 9:], k, v, q_offset=9),
                              _numpy_sha(q[:, 9:], k, v, p, q_offset=9, memory=4), **TOL)
  seg = jnp.broadcast_to(jnp.repeat(jnp.arange(2), jnp.array([6, 9]), total_repeat_length=15),
                         (2, 15))
  packed = sha(q, k, v, segment_ids=seg)
  chex.assert_trees_all_close(packed[:, 6:], _numpy_sha(q[:, 6:], k[:, 6:], v[:, 6:], p, memory=4),
                              **TOL)


# T = 19 with a memory of 5: the 7-token chunk is longer than the memory, so the window slides past
# tokens of the same call.
PIECES = (6, 1, 7, 1, 4)


def _decode_in_pieces(p, q, k, v, *, memory, pieces=PIECES):
  """The recurrent form over consecutive pieces of the sequence (the first from no state at a Python
  int offset, the others from the carried state at a traced offset): the outputs concatenated, and
  the state after each piece."""
  run = lambda q, k, v, **kw: sha_rnn_attention(q, k, v, memory=memory, return_final_state=True,
                                                **kw, **p)
  first = jax.jit(lambda q, k, v: run(q, k, v, q_offset=0, initial_state=None))
  step = jax.jit(lambda q, k, v, state, n: run(q, k, v, q_offset=n, initial_state=state))
  outs, states, n = [], [], 0
  for T in pieces:
    part = slice(n, n + T)
    if not states:
      out, state = first(q[:, part], k[:, part], v[:, part])
    else:
      out, state = step(q[:, part], k[:, part], v[:, part], states[-1], jnp.int32(n))
    outs.append(out)
    states.append(state)
    n += T
  return jnp.concatenate(outs, axis=1), states


def test_sha_rnn_recurrent_decode_carries_the_memory_only():
  """Decoding from a state of the last M keys and values (no KV cache) gives the paper's rows:
  prefill, single steps and a chunk longer than the memory (GQA: N = 4 query heads over K = 2);
  the state has M slots whatever the length."""
  q, k, v = qkv(seed=10, T=19)
  p = _sha_params(4)
  out, states = _decode_in_pieces(p, q, k, v, memory=5)
  chex.assert_trees_all_close(out, _numpy_sha(q, k, v, p, memory=5), **TOL)
  chex.assert_trees_all_close(out, sha_rnn_attention(q, k, v, memory=5, **p), **TOL)
  B, K, H, h = 2, 2, 8, 6
  chex.assert_shape([states[0]["keys"], states[0]["values"]], [(B, 5, K, H), (B, 5, K, h)])
  for state in states[1:]:                # fixed size: it does not grow with the tokens
    chex.assert_trees_all_equal_shapes(state, states[0])
  # The state is the memory: the raw keys and values of the last M positions.
  chex.assert_trees_all_close(states[-1], {"keys": k[:, -5:], "values": v[:, -5:]}, **TOL)
  floats = sum(x.size for x in jax.tree.leaves(states[0])) // B
  mech = aj.get_mechanism("sha_rnn_attention")
  assert floats == mech.decode_state_floats(19, 4, K, H, h, {"memory": 5})
  # A zero state at offset 0 (the layer's first state) is no tokens yet.
  zeros = jax.tree.map(jnp.zeros_like, states[0])
  fresh = sha_rnn_attention(q[:, :6], k[:, :6], v[:, :6], memory=5, q_offset=0,
                            initial_state=zeros, return_final_state=True, **p)
  chex.assert_trees_all_close(fresh[0], out[:, :6], **TOL)


def test_sha_rnn_with_open_gates_is_single_head_causal_attention_over_normalized_queries():
  q, k, v = qkv(seed=6)
  p = _sha_params(perturb=0.0)       # the layer's init: λ = 1, β = 0
  h = v.shape[-1]
  p.update(q_gate=np.full_like(p["q_gate"], 40.0), k_gate=np.full_like(p["k_gate"], 40.0),
           v_gate_kernel=np.zeros_like(p["v_gate_kernel"]),
           v_gate_bias=np.full_like(p["v_gate_bias"], 40.0))   # σ(40)·tanh(40) = 1 on every channel
  assert p["v_gate_bias"].shape[-1] == 2 * h
  chex.assert_trees_all_close(sha_rnn_attention(q, k, v, **p),
                              dot_product_attention(_layer_norm(q, 1e-12), k, v, causal=True),
                              **TOL)


def test_sha_rnn_gates_are_per_channel_vectors():
  q, k, v = qkv(seed=7)
  p = _sha_params(2)
  sha = jax.jit(lambda q, k, v, p: sha_rnn_attention(q, k, v, **p))
  base = sha(q, k, v, p)
  # Key gate of head 0, channel 3: the same as scaling that one channel of that head's keys.
  bumped = np.array(p["k_gate"])
  bumped[0, 3] += 2.0
  sig = jax.nn.sigmoid
  ratio = sig(bumped[0, 3]) / sig(p["k_gate"][0, 3])
  chex.assert_trees_all_close(sha(q, k, v, {**p, "k_gate": bumped}),
                              sha(q, k.at[:, :, 0, 3].multiply(ratio), v, p), **TOL)
  assert tolerances.rel_rms(sha(q, k, v, {**p, "k_gate": bumped}), base) > tolerances.CHANGED_REL_RMS
  # Value gate of head 0, channel 2 (its f logit): only channel 2 of the query heads reading head 0
  # changes.
  h = v.shape[-1]
  bias = np.array(p["v_gate_bias"])
  bias[0, h + 2] += 2.0
  out = sha(q, k, v, {**p, "v_gate_bias": bias})
  changed = np.abs(np.asarray(out - base)).max(axis=(0, 1)) > tolerances.REACHED_ABS  # [N, h]
  expected = np.zeros_like(changed)
  expected[:2, 2] = True                                                    # heads 0, 1 read head 0
  np.testing.assert_array_equal(changed, expected)


def test_sha_rnn_is_causal_only():
  q, k, v = qkv(seed=8)
  with pytest.raises(ValueError, match="causal"):
    sha_rnn_attention(q, k, v, causal=False, **_sha_params())
  with pytest.raises(ValueError, match=r"v_gate.*\[K, h\]"):
    sha_rnn_attention(q, k, v[..., :5], **_sha_params())   # arrays sized for h = 6
  with pytest.raises(ValueError, match="memory"):   # unbounded: no fixed-size state
    sha_rnn_attention(q, k, v, memory=None, return_final_state=True, **_sha_params())
  with pytest.raises(ValueError, match="memory"):
    sha_rnn_attention(q, k, v, memory=0, **_sha_params())
  with pytest.raises(ValueError, match=r"initial_state\['values'\].*\[B, M, K, h\]"):
    sha_rnn_attention(q, k, v, memory=3, return_final_state=True, **_sha_params(),
                      initial_state={"keys": jnp.zeros((2, 3, 2, 8)),
                                     "values": jnp.zeros((2, 4, 2, 6))})
