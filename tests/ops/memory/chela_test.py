"""CHELA (#218): short-long convolutions plus the tiled linear attention equal an explicit float64
rewrite and the scanned recurrence; q is not read; no `[T, T]` intermediate (the convolutions' FFT
and direct forms are tested in tests/core/conv_test.py); recurrent decoding (the linear memory and
the convolutions' input tails, a fixed size) gives the same rows in calls of any length. `slow`
holds only the same checks at extra sizes.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.ops.memory.chela import CHELA_SPECS, chela_attention
from attnjax.registry import example_params
from tests import numpy_math
from tests import tolerances
from tests.inputs import jit_with, largest_intermediate, qkv

TOL = tolerances.output(jnp.float32)


def _elu1(x):
  return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def _chela_numpy(k, v, p, causal):
  """CHELA by its definition, float64, from the key stream x = k alone: short convolution, SiLU,
  stabilized long convolution, shared-stream feature maps, quadratic normalized linear attention,
  output gate from the token's own x."""
  k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
  p = {name: np.asarray(x, np.float64) for name, x in p.items()}
  B, T, K, _ = k.shape
  G = p["query_kappa"].shape[0] // K
  conv = lambda x, kern: np.stack([sum(kern[..., l] * x[:, t - l]
                                       for l in range(min(t + 1, kern.shape[-1])))
                                   for t in range(T)], 1)
  silu = lambda x: x / (1.0 + np.exp(-x))
  lam = np.log1p(np.exp(p["long_decay"]))[..., None]
  long = p["long_kernel"] * np.exp(-lam * np.arange(p["long_kernel"].shape[-1]))
  long = long / np.abs(long).sum(-1, keepdims=True)
  z = conv(silu(conv(k, p["short_kernel"])), long)
  keys = _elu1(p["key_kappa"] * z + p["key_mu"])
  queries = _elu1(p["query_kappa"] * np.repeat(z, G, axis=2) + p["query_mu"])
  scores = np.einsum("btnf,bsnf->bnts", queries, np.repeat(keys, G, axis=2))
  if causal:
    scores = scores * np.tril(np.ones((T, T)))
  o = np.einsum("bnts,bsnh->btnh", scores, np.repeat(v, G, axis=2)) / scores.sum(-1).transpose(
      0, 2, 1)[..., None]
  gate = numpy_math.sigmoid(np.einsum("btnh,nh->btn", np.repeat(k, G, axis=2), p["gate_weight"])
                  + p["gate_bias"])
  return gate[..., None] * o


def _check_chela(causal, *, chunk, seed, **sizes):
  q, k, v = qkv(seed=seed, **sizes)
  N, K, H = q.shape[2], k.shape[2], q.shape[3]
  params = example_params(CHELA_SPECS, N=N, K=K, H=H, seed=3, perturb=0.3)
  expected = _chela_numpy(k, v, params, causal)
  for impl in ("xla", "reference"):
    out = jit_with(chela_attention, causal=causal, chunk_size=chunk, implementation=impl)(
        q, k, v, **params)
    chex.assert_trees_all_close(out, expected, **TOL)


@pytest.mark.parametrize("causal", [True, False])
def test_chela_short_long_convolutions_and_tiled_linear_attention_equal_its_definition(causal):
  """FFT + chunked and direct + scanned paths equal the explicit rewrite: T = 21 over chunks of 8,
  2 query heads per kv head, 2 examples."""
  _check_chela(causal, chunk=8, seed=12)


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False])
def test_chela_equals_its_definition_at_more_sizes(causal):
  _check_chela(causal, chunk=16, seed=14, B=1, T=70, N=4, K=1, h=5)


def test_chela_reads_only_the_key_stream_and_values():
  """Queries and keys come from one shared convolution stream (the paper has no query projection):
  q gives only the shape and dtype, and the registration says so; a logit scale, which the
  normalizer would cancel, is rejected."""
  q, k, v = qkv(seed=15, T=9)
  params = example_params(CHELA_SPECS, seed=4, perturb=0.3)
  fn = jit_with(chela_attention, causal=True, chunk_size=4)
  out = fn(q, k, v, **params)
  chex.assert_trees_all_equal(fn(jnp.zeros_like(q), k, v, **params), out)
  chex.assert_trees_all_equal(fn(7.0 * q[::-1], k, v, **params), out)
  assert aj.get_mechanism("chela_attention").reads == frozenset({"k", "v"})
  with pytest.raises(ValueError, match="chela_attention: `scale` must be None"):
    chela_attention(q, k, v, scale=0.5, **params)


def test_chela_memory_grows_linearly():
  """Doubling T at most doubles (plus tiling slack) the largest forward+backward intermediate; a
  `[T, T]` score matrix would quadruple it."""
  params = example_params(CHELA_SPECS, N=1, K=1, H=4, perturb=0.3)
  fn = lambda q, k, v: jnp.sum(chela_attention(q, k, v, causal=True, chunk_size=16, **params))
  sizes = [largest_intermediate(jax.value_and_grad(fn, argnums=(0, 1, 2)),
                                *qkv(seed=9, B=1, T=T, N=1, K=1, H=4, h=4))
           for T in (1024, 2048)]
  assert sizes[1] <= tolerances.MEMORY_DOUBLING_RATIO_MAX * sizes[0], sizes


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


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_chela_recurrent_decoding_carries_memory_and_convolution_tails(impl):
  """A long kernel of 5 taps so its tail rolls: prefill 4 tokens, a 7-token chunk (past two chunk
  ends of 4 and more than the kernel's reach), then single steps; every row equals the float64
  definition and the full forward, 2 query heads per kv head. The state keeps one shape and the
  registry's size; its short-convolution tail is the last 2 inputs x = k."""
  T = 13
  q, k, v = qkv(seed=25, T=T)
  params = example_params(CHELA_SPECS, N=4, K=2, H=8, seed=5, perturb=0.3)
  params["long_kernel"] = params["long_kernel"][..., :5]
  out, states = _decode_in_calls(chela_attention, q, k, v, [4, 11, 12], chunk_size=4,
                                 implementation=impl, **params)
  chex.assert_trees_all_close(out, _chela_numpy(k, v, params, True), **TOL)
  full = jit_with(chela_attention, causal=True, chunk_size=4, implementation=impl)(q, k, v,
                                                                                   **params)
  chex.assert_trees_all_close(out, full, **TOL)
  chex.assert_trees_all_equal_shapes(*states)
  mech = aj.get_mechanism("chela_attention")
  floats = sum(x.size for x in jax.tree.leaves(states[0])) // q.shape[0]
  assert floats == mech.decode_state_floats(T, 4, 2, 8, 6, params)
  assert states[0]["long_inputs"].shape[1] == 4
  for n, state in zip([4, 11, 12, 13], states, strict=True):
    chex.assert_trees_all_close(state["short_inputs"], k[:, n - 2:n], **TOL)
