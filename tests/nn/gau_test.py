"""GAU (#226) and TacoLM's gated cross-attention as Flax layers.

The defining computation is Hua et al.'s pseudo-code (Code 1 of arXiv:2202.10447): one SiLU dense
layer gives U, V and the shared Z; Q and K are per-dim scales and offsets of Z; the weights are
relu(QKᵀ / n + b)²; the output is (U ⊙ A V) W_o plus the shortcut. Checked against a float64 numpy
rewrite of that code (bidirectional; causal with Mega/TacoLM's per-row n = i + 1 and with a fixed n),
plus: the unit is one head whose gate U can shut it (a closed gate gives the identity), causal rows
ignore the future, decoding over the cache equals the full forward, and the paper's parameter
statement (two GAUs with e = 2D have the weights of one attention + feed-forward layer, up to the
small Z projection). The cross-attention unit is checked against a numpy rewrite of the authors'
`GatedCrossAttention.forward` (softmax and relu², padded text).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.nn import MLP, GatedAttentionUnit, GatedCrossAttentionUnit, MultiHeadAttention
from tests import inputs
from tests import tolerances

B, T, D, E, S_QK, L = 2, 11, 16, 24, 8, 6
F32 = tolerances.output(jnp.float32)


def _x(shape=(B, T, D), seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)



def _layernorm(x, p):
  x = np.asarray(x, np.float64)
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * np.float64(p["scale"]) + np.float64(p["bias"])


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _gau_float64(x, p, *, causal, length=None):
  """Code 1 of the paper in float64 (per example): norm, SiLU dense split into u, v, base, scale and
  offset, relu(qk / n + bias)², u * (kernel @ v), dense, shortcut. Causal: row i uses n = i + 1
  (Mega/TacoLM) unless `length` fixes n; the weights of future keys are zeroed."""
  f = lambda a: np.asarray(a, np.float64)
  out = []
  for xb in np.asarray(x, np.float64):
    h = _layernorm(xb, p["norm"])
    uvz = _silu(h @ f(p["uvz"]["kernel"]) + f(p["uvz"]["bias"]))
    u, v, base = uvz[:, :E], uvz[:, E:2 * E], uvz[:, 2 * E:]
    q = base * f(p["gamma"])[0] + f(p["beta"])[0]
    k = base * f(p["gamma"])[1] + f(p["beta"])[1]
    n = xb.shape[0]
    rel = np.arange(n)[None, :] - np.arange(n)[:, None]
    bias = f(p["relative_bias"])[np.clip(rel, -(L - 1), L - 1) + L - 1]
    if causal and length is None:
      scale = 1.0 / (np.arange(n) + 1.0)[:, None]
    else:
      scale = 1.0 / (length or n)
    kernel = np.maximum(q @ k.T * scale + bias, 0.0) ** 2
    if causal:
      kernel = kernel * np.tril(np.ones((n, n)))
    y = (u * (kernel @ v)) @ f(p["out"]["kernel"]) + f(p["out"]["bias"])
    out.append(xb + y)
  return np.stack(out)


def _unit(**kw):
  return GatedAttentionUnit(expansion_dim=E, qk_dim=S_QK, max_relative_distance=L, **kw)


@pytest.mark.parametrize("causal,length", [(False, None), (True, None), (True, 16)])
def test_unit_matches_the_papers_pseudo_code(causal, length):
  x = _x()
  unit = _unit(causal=causal, length=length)
  variables = inputs.perturbed(jax.jit(unit.init)(jax.random.PRNGKey(0), x))
  got = jax.jit(unit.apply)(variables, x)
  np.testing.assert_allclose(np.asarray(got), _gau_float64(x, variables["params"], causal=causal,
                                                           length=length), **F32)


def test_single_head_shut_by_its_gate():
  """One attention matrix for all e channels, multiplied by U: with the U columns of the dense layer
  zeroed, U = silu(0) = 0 and the unit gives exactly x + b_o (the output bias), whatever the
  attention computes."""
  x = _x()
  unit = _unit()
  variables = inputs.perturbed(jax.jit(unit.init)(jax.random.PRNGKey(0), x))
  p = variables["params"]
  assert p["gamma"].shape == (2, S_QK) and p["uvz"]["kernel"].shape == (D, 2 * E + S_QK)
  closed = jax.tree.map(lambda a: a, variables)
  closed["params"]["uvz"]["kernel"] = p["uvz"]["kernel"].at[:, :E].set(0.0)
  closed["params"]["uvz"]["bias"] = p["uvz"]["bias"].at[:E].set(0.0)
  apply = jax.jit(unit.apply)
  np.testing.assert_array_equal(np.asarray(apply(closed, x)), np.asarray(x + p["out"]["bias"]))
  assert float(jnp.max(jnp.abs(apply(variables, x) - x))) > tolerances.CHANGED_MAX_ABS


def test_causal_rows_ignore_the_future():
  x = _x()
  unit = _unit(causal=True, rope_base=10000.0)
  variables = inputs.perturbed(jax.jit(unit.init)(jax.random.PRNGKey(0), x))
  apply = jax.jit(unit.apply)
  changed = x.at[:, 6:].set(_x(seed=5)[:, 6:])
  y, y2 = apply(variables, x), apply(variables, changed)
  np.testing.assert_allclose(np.asarray(y2[:, :6]), np.asarray(y[:, :6]), **F32)
  assert float(jnp.max(jnp.abs(y2[:, 6:] - y[:, 6:]))) > tolerances.CHANGED_MAX_ABS


def test_decode_over_the_cache_equals_the_full_forward():
  x = _x()
  unit = _unit(causal=True, rope_base=10000.0)
  variables = inputs.perturbed(jax.jit(unit.init)(jax.random.PRNGKey(0), x))
  full = jax.jit(unit.apply)(variables, x)
  shapes = jax.eval_shape(lambda x: unit.init(jax.random.PRNGKey(0), x, decode=True), x)["cache"]
  assert shapes["cached_key"].shape == (B, T, 1, S_QK)
  assert shapes["cached_value"].shape == (B, T, 1, E)
  cache = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
  step = jax.jit(lambda cache, xs: unit.apply({**variables, "cache": cache}, xs, decode=True,
                                              mutable=["cache"]))
  out, mutated = step(cache, x[:, :4])
  outs, cache = [out], mutated["cache"]
  for t in range(4, T):
    out, mutated = step(cache, x[:, t:t + 1])
    outs.append(out)
    cache = mutated["cache"]
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, axis=1)), np.asarray(full), **F32)
  with pytest.raises(ValueError, match="overruns"):
    unit.apply({**variables, "cache": cache}, x[:, :1], decode=True, mutable=["cache"])


def _count(module, x):
  params = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x), x)["params"]
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.unbox(params)))


def test_two_units_have_the_weights_of_one_transformer_layer():
  """The paper replaces each Transformer layer (MHSA + FFN, 4D² + 8D² weights) by two GAUs with
  e = 2D: each has D(2e + s) + eD + 4s = 6D² + Ds + 4s weights (biases and norms aside), so the pair
  exceeds the layer by 2Ds + 8s only: 2.8% at the paper's base size D = 768, s = 128."""
  for width, s in ((64, 16), (768, 128)):
    x = jax.ShapeDtypeStruct((1, 4, width), jnp.float32)
    gau = _count(GatedAttentionUnit(qk_dim=s, norm=None, use_bias=False), x)
    assert gau == width * (4 * width + s) + 2 * width * width + 4 * s
    layer = (_count(MultiHeadAttention(num_heads=8, use_bias=False), x)
             + _count(MLP(4 * width, use_bias=False), x))
    assert layer == 12 * width * width
    assert 2 * gau - layer == 2 * width * s + 8 * s
  assert (2 * gau) / layer < 1.03


def _gca_float64(x, m, p, *, activation, lengths):
  """The authors' GatedCrossAttention.forward (prenorm, no suffix norm, no dropout) in float64."""
  f = lambda a: np.asarray(a, np.float64)
  out = []
  for xb, mb, n in zip(np.asarray(x, np.float64), np.asarray(m, np.float64), lengths, strict=True):
    base = _layernorm(xb, p["norm"]) @ f(p["query"]["kernel"]) + f(p["query"]["bias"])
    u, r, q = base[:, :D], base[:, D:2 * D], base[:, 2 * D:]
    u, r = 1.0 / (1.0 + np.exp(-u)), _silu(r)
    k = mb @ f(p["key"]["kernel"]) + f(p["key"]["bias"])
    v = _silu(mb @ f(p["value"]["kernel"]) + f(p["value"]["bias"]))
    keep = np.arange(mb.shape[0]) < n
    if activation == "softmax":
      qk = np.where(keep, (q * S_QK ** -0.5) @ k.T, -np.inf)
      w = np.exp(qk - qk.max(-1, keepdims=True))
      w = w / w.sum(-1, keepdims=True)
    else:
      w = np.maximum(q @ k.T / n, 0.0) ** 2 * keep
    h = _silu((w @ v * r) @ f(p["out"]["kernel"]) + f(p["out"]["bias"]))
    out.append(xb + u * (h - xb))
  return np.stack(out)


@pytest.mark.parametrize("activation", ["softmax", "relu2"])
def test_cross_unit_matches_the_authors_code(activation):
  x, m = _x(), _x((B, 7, 12), seed=3)
  lengths = np.array([7, 4])
  unit = GatedCrossAttentionUnit(qk_dim=S_QK, activation=activation)
  variables = inputs.perturbed(jax.jit(unit.init)(jax.random.PRNGKey(0), x, m))
  got = jax.jit(unit.apply)(variables, x, m, kv_lengths=jnp.asarray(lengths))
  want = _gca_float64(x, m, variables["params"], activation=activation, lengths=lengths)
  np.testing.assert_allclose(np.asarray(got), want, **F32)


def test_bad_settings_name_the_argument():
  x = _x()
  with pytest.raises(ValueError, match="norm"):
    GatedAttentionUnit(norm="batchnorm").init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="decode"):
    GatedAttentionUnit().init(jax.random.PRNGKey(0), x, decode=True)
  with pytest.raises(ValueError, match="activation"):
    GatedCrossAttentionUnit(activation="laplace").init(jax.random.PRNGKey(0), x, x)
