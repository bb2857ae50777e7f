"""Slim attention (#215): with W_V = W_K · W_KV, attention that caches only K and recovers
V = K · W_KV equals standard multi-head attention (checked through the projections against a float64
rewrite), in both orders of the paper's product (values before or after the attention); the decode
state is the key cache alone, half of MHA's; `slim_kv_map` inverts W_K of a trained layer and refuses
a W_K that is not square or not invertible."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.nn import MultiHeadAttention
from attnjax.ops.decode import slim_attention, slim_kv_map
from tests import inputs
from tests import tolerances

F32 = tolerances.output(jnp.float32)


def _mha_float64(q, k, v, *, causal):
  """Softmax multi-head attention in float64, query head n reading key/value head n // (N/K)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  T, S = s.shape[-2:]
  if causal:
    s = np.where(np.tril(np.ones((T, S), bool)), s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", w, v)


def _projections(seed, *, D, K, H, h):
  """A square W_K `[D, K, H]` (D = K·H), a map W_KV `[K·H, K·h]` and W_V = W_K · W_KV, float64."""
  rng = np.random.default_rng(seed)
  w_k = rng.standard_normal((D, K, H)) / np.sqrt(D)
  kv_map = rng.standard_normal((K * H, K * h)) / np.sqrt(K * H)
  w_v = (w_k.reshape(D, K * H) @ kv_map).reshape(D, K, h)
  return w_k, kv_map, w_v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("fold_values", [False, True])
def test_equals_multi_head_attention_through_the_projections(causal, fold_values):
  # MHA: N = K = 2 heads of H = 4 on D = 8 features (W_K square), value heads of h = 3.
  B, T, N, K, H, h = 2, 9, 2, 2, 4, 3
  D = K * H
  w_k, kv_map, w_v = _projections(0, D=D, K=K, H=H, h=h)
  x = np.random.default_rng(1).standard_normal((B, T, D))
  keys, values = np.einsum("bsd,dkh->bskh", x, w_k), np.einsum("bsd,dkh->bskh", x, w_v)
  q, _, _ = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=2)
  want = _mha_float64(q, keys, values, causal=causal)
  # Only the keys (float32) reach the operator; v is a stand-in of the right shape.
  got = inputs.jit_with(slim_attention, causal=causal, fold_values=fold_values)(
      q, jnp.asarray(keys, jnp.float32), jnp.zeros((B, T, K, h)),
      kv_map=jnp.asarray(kv_map, jnp.float32))
  np.testing.assert_allclose(np.asarray(got), want, **F32)


def test_folded_values_equal_unfolded_over_a_cache():
  # GQA heads, a decode block over a partly filled cache, the value map on either side.
  q, k, v = inputs.qkv(B=2, T=3, S=11, N=4, K=2, H=8, h=6, seed=3)
  kv_map = jnp.asarray(np.random.default_rng(4).standard_normal((16, 12)) / 4.0, jnp.float32)
  contract = dict(causal=True, q_offset=np.array([5, 7]), kv_lengths=np.array([8, 10]))
  unfolded = slim_attention(q, k, v, kv_map=kv_map, **contract)
  folded = slim_attention(q, k, v, kv_map=kv_map, fold_values=True, **contract)
  np.testing.assert_allclose(np.asarray(folded), np.asarray(unfolded), **F32)
  # The values never enter: any v of the same shape gives the same output.
  np.testing.assert_array_equal(
      np.asarray(slim_attention(q, k, 3.0 * v + 1.0, kv_map=kv_map, **contract)),
      np.asarray(unfolded))


def test_the_decode_state_is_half_of_mhas():
  slim, softmax = aj.get_mechanism("slim_attention"), aj.get_mechanism("softmax")
  T, N, K, H = 100, 8, 8, 64
  assert slim.decode_state_floats(T, N, K, H, H) == T * K * H
  assert 2 * slim.decode_state_floats(T, N, K, H, H) == softmax.decode_state_floats(T, N, K, H, H)
  assert slim.reads == frozenset({"q", "k"})


def test_kv_map_of_a_trained_layer_gives_its_outputs():
  # A layer trained as MHA (no biases) whose value kernel is W_K · W_KV: slim_kv_map recovers the
  # map, and the slim layer with it computes what the softmax layer computes.
  B, T, D, N = 2, 7, 8, 2
  layer = dict(num_heads=N, use_bias=False, causal=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
  params = MultiHeadAttention(**layer).init(jax.random.PRNGKey(1), x)["params"]
  w_k = np.asarray(params["key"]["kernel"], np.float64)                 # [D, N, H], D = N·H
  kv_map = np.random.default_rng(5).standard_normal((D, D)) / np.sqrt(D)
  w_v = (w_k.reshape(D, D) @ kv_map).reshape(w_k.shape)
  mha = {**params, "value": {"kernel": jnp.asarray(w_v, jnp.float32)}}
  recovered = slim_kv_map(w_k, w_v)
  np.testing.assert_allclose(np.asarray(recovered), kv_map, **F32)
  slim = {key: value for key, value in params.items() if key != "value"}
  slim["kv_map"] = recovered
  got = MultiHeadAttention(mechanism="slim_attention", **layer).apply({"params": slim}, x)
  want = MultiHeadAttention(**layer).apply({"params": mha}, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), **F32)


def test_kv_map_refuses_a_w_k_it_cannot_invert():
  rng = np.random.default_rng(6)
  with pytest.raises(ValueError, match=r"slim_kv_map: W_K must be square"):
    slim_kv_map(rng.standard_normal((12, 2, 4)), rng.standard_normal((12, 2, 4)))
  singular = rng.standard_normal((8, 2, 4))
  singular[:, 1, 3] = singular[:, 0, 0]        # two equal columns
  with pytest.raises(ValueError, match=r"slim_kv_map: W_K is singular"):
    slim_kv_map(singular, rng.standard_normal((8, 2, 4)))
  with pytest.raises(ValueError, match=r"slim_kv_map: .* same K"):
    slim_kv_map(rng.standard_normal((8, 2, 4)), rng.standard_normal((8, 4, 2)))


def test_a_kv_map_of_the_wrong_shape_is_a_clear_error():
  q, k, v = inputs.qkv(B=1, T=4, N=2, K=2, H=4, h=3)
  with pytest.raises(ValueError, match=r"slim_attention: `kv_map` must have shape \[K·H, K·h\]"):
    slim_attention(q, k, v, kv_map=jnp.zeros((8, 8)))


def test_the_layer_caches_keys_only_and_decodes_as_its_full_forward():
  B, T, D, N = 2, 6, 8, 2
  layer = MultiHeadAttention(num_heads=N, mechanism="slim_attention", causal=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
  variables = layer.init(jax.random.PRNGKey(1), x, decode=True)
  assert set(variables["cache"]) == {"cached_key", "cache_index"}      # half the KV cache
  full = layer.apply(variables, x)
  cache = variables["cache"]
  for t in range(T):
    y, mutated = layer.apply({**variables, "cache": cache}, x[:, t:t + 1], decode=True,
                             mutable=["cache"])
    cache = mutated["cache"]
    np.testing.assert_allclose(np.asarray(y[:, 0]), np.asarray(full[:, t]), **F32)
