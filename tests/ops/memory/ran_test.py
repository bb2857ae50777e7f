"""Recurrent Attention Network (#65): the paper's equations, and its claim that a Global Perception
Cell carried from window to window makes window-parallel attention encode a long document; its
recurrent decoding from a fixed-size state (cell, last read-out, current window) gives the same rows.

The reference below is a float64 numpy rewrite of the paper's / reference code's window loop (one
window, one key/value head, one token at a time), written from the equations in the operator's
docstring, not from its JAX code.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.ops.memory import ran
from attnjax.registry import example_params
from tests import numpy_math
from tests import tolerances
from tests.inputs import largest_intermediate, qkv

TOL = tolerances.output(jnp.float32)


# Compiled as a model runs it (eager op-by-op dispatch compiles every primitive separately).
_ran = jax.jit(ran.recurrent_attention_network,
               static_argnames=("window", "causal", "implementation", "return_document"))


def _params(seed=0, K=2, H=8, h=6):
  return example_params(ran.ran_param_specs(h=h), N=4, K=K, H=H, seed=seed, perturb=0.5)


# --------------------------------------------------------------------------------------------------
# float64 rewrite of the paper's window loop


def _stdnorm(x):
  return (x - x.mean()) / np.sqrt(np.mean(x * x) + 1e-7)


def _layer_norm(x):
  return (x - x.mean()) / np.sqrt(x.var() + 1e-5)


def _numpy_ran(q, k, v, p, *, window, causal, kv_lengths=None):
  """Outputs `[B, T, N, h]` and the document cell `[B, K, h]`, float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  p = {name: np.asarray(x, np.float64) for name, x in p.items()}
  B, T, N, H = q.shape
  K = k.shape[2]
  G = N // K
  scale = H ** -0.5
  out = np.zeros(q.shape[:3] + v.shape[-1:])
  docs = []
  for b in range(B):
    length = T if kv_lengths is None else int(kv_lengths[b])
    cell = [p["gpc_init"][g] for g in range(K)]
    prev = None                                # the previous window's cell outputs ĉ
    for start in range(0, T, window):
      idx = [i for i in range(start, min(start + window, T)) if i < length]
      if not idx:
        continue
      outputs = []
      for g in range(K):
        q_c = cell[g] @ p["cell_query_kernel"][g] + p["cell_query_bias"][g]
        k_c = cell[g] @ p["cell_key_kernel"][g] + p["cell_key_bias"][g]
        v_c = cell[g] @ p["cell_value_kernel"][g] + p["cell_value_bias"][g]
        keys = np.vstack([k_c, k[b, idx, g]])         # slot 0: the cell token
        values = np.vstack([v_c, v[b, idx, g]])
        for t in idx:                                 # the window's tokens
          seen = [0] + [1 + i for i, s in enumerate(idx) if not causal or s <= t]
          for n in range(g * G, (g + 1) * G):
            out[b, t, n] = numpy_math.softmax(scale * keys[seen] @ q[b, t, n]) @ values[seen]
        # The cell's row reads its whole window.
        outputs.append(_stdnorm(numpy_math.softmax(scale * keys @ q_c) @ values))
      if prev is None:
        cell = outputs
      else:
        cell = []
        for g in range(K):
          (w_t, w_g), (b_t, b_g) = p["cell_glu_kernel"][g], p["cell_glu_bias"][g]
          glu = (prev[g] @ w_t + b_t) * numpy_math.sigmoid(prev[g] @ w_g + b_g)
          cell.append(_layer_norm(outputs[g] + glu))
      prev = outputs
    docs.append(np.stack(cell))
  return out, np.stack(docs)


# --------------------------------------------------------------------------------------------------
# The equations


@pytest.mark.parametrize("causal", [False, True])
def test_matches_float64_rewrite_of_the_paper(causal):
  q, k, v = qkv(seed=0)
  p = _params(1)
  expected, expected_doc = _numpy_ran(q, k, v, p, window=4, causal=causal)  # last window: 1 token
  for impl in ("xla", "reference"):
    out, doc = _ran(q, k, v, window=4, causal=causal, implementation=impl, return_document=True,
                    **p)
    chex.assert_trees_all_close(out, expected, **TOL)
    chex.assert_trees_all_close(doc, expected_doc, **TOL)


def test_padding_matches_float64_rewrite():
  """Keys past `kv_lengths` carry garbage; the valid rows and the document cell are those of the
  shorter documents (a short last window, windows past the length leave the cell unchanged)."""
  q, k, v = qkv(seed=2)
  p = _params(3)
  lengths = np.array([13, 6])
  garbage = lambda x: x.at[1, 6:].set(1e4)
  expected, expected_doc = _numpy_ran(q, k, v, p, window=4, causal=False, kv_lengths=lengths)
  for impl in ("xla", "reference"):
    out, doc = _ran(q, garbage(k), garbage(v), window=4, kv_lengths=jnp.asarray(lengths),
                    implementation=impl, return_document=True, **p)
    chex.assert_trees_all_close(out[0], expected[0], **TOL)
    chex.assert_trees_all_close(out[1, :6], expected[1, :6], **TOL)
    chex.assert_trees_all_close(doc, expected_doc, **TOL)


# --------------------------------------------------------------------------------------------------
# The claim: the cell carries the document across windows


def test_cell_carries_information_across_windows():
  """Window 2 (positions 8-11) never attends to window 0's tokens, yet a change in window 0 changes
  its output; with a cell whose key and value ignore its state, the change no longer reaches it."""
  q, k, v = qkv(seed=4, T=12)
  p = _params(5)
  run = lambda k, v, p: _ran(q, k, v, window=4, causal=True, **p)
  k2, v2 = k.at[:, :4].multiply(-2.0), v.at[:, :4].add(3.0)
  base, changed = run(k, v, p), run(k2, v2, p)
  assert tolerances.rel_rms(changed[:, 8:], base[:, 8:]) > tolerances.STRONG_CHANGE_REL_RMS
  # A cell token whose key and value ignore the cell (zero kernels) carries nothing between windows.
  cut = {**p, "cell_key_kernel": np.zeros_like(p["cell_key_kernel"]),
         "cell_value_kernel": np.zeros_like(p["cell_value_kernel"])}
  chex.assert_trees_all_close(run(k2, v2, cut)[:, 8:], run(k, v, cut)[:, 8:], **TOL)
  # ... while the attention inside window 0 still sees the change.
  assert (tolerances.rel_rms(run(k2, v2, cut)[:, :4], run(k, v, cut)[:, :4])
          > tolerances.STRONG_CHANGE_REL_RMS)


def test_causal_rows_ignore_future_keys():
  q, k, v = qkv(seed=6, T=14)
  p = _params(7)
  for cut in (5, 8):   # inside window 1, and the first token of window 2
    k2, v2 = k.at[:, cut + 1:].set(7.0), v.at[:, cut + 1:].set(7.0)
    for impl in ("xla", "reference"):
      out = _ran(q, k, v, window=4, causal=True, implementation=impl, **p)
      out2 = _ran(q, k2, v2, window=4, causal=True, implementation=impl, **p)
      chex.assert_trees_all_close(out2[:, :cut + 1], out[:, :cut + 1], **TOL)


def test_gqa_equals_repeated_key_value_heads():
  """K = 2 key/value heads for N = 4 query heads equals 4 heads holding each key/value head (and its
  cell parameters) twice."""
  q, k, v = qkv(seed=8)
  p = _params(9)
  rep = lambda x: jnp.repeat(x, 2, axis=2)
  p4 = {name: np.repeat(x, 2, axis=0) for name, x in p.items()}
  gqa = _ran(q, k, v, window=5, causal=True, **p)
  mha = _ran(q, rep(k), rep(v), window=5, causal=True, **p4)
  chex.assert_trees_all_close(gqa, mha, **TOL)


def test_query_block_over_a_cache_equals_full_forward():
  """Queries deep in a KV cache (window 2 of 4) rebuild the cell from the cache exactly."""
  q, k, v = qkv(seed=10, T=14)
  p = _params(11)
  full = _ran(q, k, v, window=4, causal=True, **p)
  garbage = lambda x: x.at[:, 11:].set(1e4)
  part = _ran(q[:, 9:11], garbage(k), garbage(v), window=4, causal=True, q_offset=9,
              kv_lengths=jnp.array([11, 11]), **p)
  chex.assert_trees_all_close(part, full[:, 9:11], **TOL)


# --------------------------------------------------------------------------------------------------
# Recurrent decoding: the cell, the last completed window's read-out and the current window


# T = 19 with W = 4: the prefill crosses position 4, the 7-token chunk crosses 8 and 12, the last
# piece 16.
PIECES = (6, 1, 7, 1, 4)


def _decode_in_pieces(p, q, k, v, *, window, pieces=PIECES):
  """The recurrent form over consecutive pieces of the sequence (the first from no state at a Python
  int offset, the others from the carried state at a traced offset): the outputs concatenated, and
  the state after each piece."""
  run = lambda q, k, v, **kw: ran.recurrent_attention_network(
      q, k, v, window=window, causal=True, return_final_state=True, **kw, **p)
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


def test_recurrent_decode_matches_float64_rewrite_across_window_boundaries():
  """Prefill, single steps and a chunk crossing two window boundaries, from the fixed-size state
  (the cell after the completed windows, the last read-out ĉ, the current window's W - 1 slots),
  give the paper's outputs (GQA: N = 4 query heads over K = 2)."""
  q, k, v = qkv(seed=14, T=19)
  p = _params(15)
  out, states = _decode_in_pieces(p, q, k, v, window=4)
  expected, _ = _numpy_ran(q, k, v, p, window=4, causal=True)
  chex.assert_trees_all_close(out, expected, **TOL)
  chex.assert_trees_all_close(out, _ran(q, k, v, window=4, causal=True, **p), **TOL)
  B, K, H, h = 2, 2, 8, 6
  chex.assert_shape([states[0]["cell"], states[0]["previous"]], (B, K, h))
  chex.assert_shape([states[0]["keys"], states[0]["values"]], [(B, 3, K, H), (B, 3, K, h)])
  for state in states[1:]:                # fixed size: it does not grow with the tokens
    chex.assert_trees_all_equal_shapes(state, states[0])
  floats = sum(x.size for x in jax.tree.leaves(states[0])) // B
  mech = aj.get_mechanism("recurrent_attention_network")
  assert floats == mech.decode_state_floats(19, 4, K, H, h, {"window": 4})


def test_recurrent_zero_state_is_no_tokens_yet():
  """The layer's first state is zeros: at offset 0 it equals no state (the learned initial cell,
  not a zero cell, starts the first window)."""
  q, k, v = qkv(seed=16, T=6)
  p = _params(17)
  run = jax.jit(lambda state: ran.recurrent_attention_network(
      q, k, v, window=4, causal=True, q_offset=jnp.int32(0), initial_state=state,
      return_final_state=True, **p))
  fresh = run(None)
  zeros = run(jax.tree.map(jnp.zeros_like, fresh[1]))
  chex.assert_trees_all_close(zeros, fresh, **TOL)


def test_memory_is_bounded_by_the_window():
  """Windows are processed in parallel with no `[T, T]` intermediate (forward and backward)."""
  T, W = 256, 16
  q, k, v = qkv(seed=12, B=1, T=T, N=1, K=1, H=4, h=4)
  p = example_params(ran.RAN_SPECS, N=1, K=1, H=4)

  def loss(q, k, v, window):
    return jnp.sum(ran.recurrent_attention_network(q, k, v, window=window, causal=True, **p))

  windowed = largest_intermediate(jax.value_and_grad(lambda *a: loss(*a, W), argnums=(0, 1, 2)),
                                  q, k, v)
  whole = largest_intermediate(lambda *a: loss(*a, T), q, k, v)
  assert whole >= T * T
  assert windowed < T * T // 4


def test_rejects_bad_input():
  q, k, v = qkv(seed=13)
  p = _params()
  with pytest.raises(ValueError, match="segment_ids"):
    ran.recurrent_attention_network(q, k, v, segment_ids=jnp.zeros((2, 13), jnp.int32), **p)
  with pytest.raises(ValueError, match="window"):
    ran.recurrent_attention_network(q, k, v, window=0, **p)
  with pytest.raises(ValueError, match=r"cell_key_kernel.*\[K, h, H\]"):
    ran.recurrent_attention_network(q, k, v, **{**p, "cell_key_kernel": p["cell_key_kernel"][:1]})
  with pytest.raises(ValueError, match="self-attention only"):
    ran.recurrent_attention_network(q, k[:, :7], v[:, :7], **p)
  with pytest.raises(ValueError, match="causal"):
    ran.recurrent_attention_network(q, k, v, return_final_state=True, **p)
  with pytest.raises(ValueError, match="return_document"):
    ran.recurrent_attention_network(q, k, v, causal=True, return_final_state=True,
                                    return_document=True, **p)
  with pytest.raises(ValueError, match=r"initial_state\['keys'\].*\[B, W - 1, K, H\]"):
    ran.recurrent_attention_network(
        q, k, v, window=4, causal=True, return_final_state=True, **p,
        initial_state={"cell": jnp.zeros((2, 2, 6)), "previous": jnp.zeros((2, 2, 6)),
                       "keys": jnp.zeros((2, 4, 2, 8)), "values": jnp.zeros((2, 3, 2, 6))})
