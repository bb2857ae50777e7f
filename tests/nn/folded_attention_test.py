"""Optimised / Efficient / Super attention (#123): folded projections of multi-head attention.

The paper's claims: at equal width, Optimised attention has 3/4 and Efficient attention 1/2 of the
parameters of standard multi-head attention, while computing the same function class: W_V W_O is one
matrix that W_O learns alone, and W_Q W_Kᵀ one that W_Q learns alone. Checked: exact parameter
counts against `MultiHeadAttention` of the same width (with and without biases: a dropped projection
takes its bias with it); outputs against float64 numpy rewrites of each variant; the folds as
identities (a one-head standard layer equals the Optimised layer whose W_O is W_V W_O, and the
Efficient layer whose W_Q is W_Q W_Kᵀ, biases folded too; a multi-head standard layer with value
projections selecting the head slices equals the Optimised layer); Super attention with W_A = I is
Efficient attention, and its W_A mixes value tokens as W_A X.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.nn import FoldedProjectionAttention, MultiHeadAttention
from tests import tolerances

B, T, D, N = 2, 7, 12, 3
F32 = tolerances.output(jnp.float32)


def _x(shape=(B, T, D), seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _init(layer, *args):
  variables = jax.jit(layer.init)(jax.random.PRNGKey(0), *args)
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  # Move every array (zero biases, the identity W_A) so that each one takes part.
  return jax.tree.unflatten(tree, [a + 0.3 * jax.random.normal(k, a.shape)
                                   for a, k in zip(leaves, keys, strict=True)])


def _count(layer, x):
  params = jax.eval_shape(lambda x: layer.init(jax.random.PRNGKey(0), x), x)["params"]
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))


@pytest.mark.parametrize("use_bias", [True, False])
def test_parameter_counts_are_three_quarters_and_one_half(use_bias):
  x = jax.ShapeDtypeStruct((1, 16, 64), jnp.float32)
  standard = _count(MultiHeadAttention(num_heads=8, use_bias=use_bias), x)
  assert standard == 4 * (64 * 64 + 64 * use_bias)
  count = lambda variant, **kw: _count(
      FoldedProjectionAttention(num_heads=8, variant=variant, use_bias=use_bias, **kw), x)
  assert 4 * count("optimised") == 3 * standard
  assert 2 * count("efficient") == standard
  assert count("super", max_length=16) == standard // 2 + 16 * 16


def _softmax(s):
  e = np.exp(s - s.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _folded_float64(x, p, variant, *, causal=False):
  """The variants' equations per head, in float64: softmax(q_n k_nᵀ / sqrt(H)) v_n, then W_O."""
  f = lambda a: np.asarray(a, np.float64)
  x = f(x)
  H = D // N
  q = np.einsum("btd,dnh->btnh", x, f(p["query"]["kernel"])) + f(p["query"]["bias"])
  slices = x.reshape(B, T, N, H)
  if variant == "optimised":
    k = np.einsum("btd,dnh->btnh", x, f(p["key"]["kernel"])) + f(p["key"]["bias"])
  else:
    k = slices
  v = slices
  if variant == "super":
    v = np.einsum("ij,bjd->bid", f(p["alignment"]), x).reshape(B, T, N, H)
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
  if causal:
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
  o = np.einsum("bnts,bsnh->btnh", _softmax(s), v)
  return np.einsum("btnh,nhf->btf", o, f(p["out"]["kernel"])) + f(p["out"]["bias"])


@pytest.mark.parametrize("variant,causal", [("optimised", True), ("efficient", False),
                                            ("super", False)])
def test_outputs_match_the_equations(variant, causal):
  x = _x()
  layer = FoldedProjectionAttention(num_heads=N, variant=variant, causal=causal, max_length=T)
  variables = _init(layer, x)
  got = jax.jit(layer.apply)(variables, x)
  want = _folded_float64(x, variables["params"], variant, causal=causal)
  np.testing.assert_allclose(np.asarray(got), want, **F32)


def test_one_head_standard_attention_folds_exactly():
  """softmax(q kᵀ/√D)(X W_V + b_V) W_O + b_O = softmax(...) X (W_V W_O) + (b_V W_O + b_O), since
  each row of weights sums to 1; and (x W_Q + b_Q)(m W_K + b_K)ᵀ differs from x (W_Q W_Kᵀ) mᵀ +
  b_Q W_Kᵀ mᵀ only by terms constant along the row, which softmax ignores."""
  x = _x()
  standard = MultiHeadAttention(num_heads=1)
  sp = _init(standard, x)["params"]
  want = jax.jit(standard.apply)({"params": sp}, x)
  wq, wk = sp["query"]["kernel"][:, 0], sp["key"]["kernel"][:, 0]              # [D, D]
  wv, wo = sp["value"]["kernel"][:, 0], sp["out"]["kernel"][0]                  # [D, D]
  out = {"kernel": (wv @ wo)[None], "bias": sp["value"]["bias"][0] @ wo + sp["out"]["bias"]}
  optimised = {"query": sp["query"], "key": sp["key"], "out": out}
  efficient = {"query": {"kernel": (wq @ wk.T)[:, None], "bias": (sp["query"]["bias"][0] @ wk.T)[None]},
               "out": out}
  for variant, params in (("optimised", optimised), ("efficient", efficient)):
    layer = FoldedProjectionAttention(num_heads=1, variant=variant)
    np.testing.assert_allclose(np.asarray(jax.jit(layer.apply)({"params": params}, x)),
                               np.asarray(want), **F32)


def test_multi_head_optimised_is_standard_with_slice_values():
  x = _x()
  layer = FoldedProjectionAttention(num_heads=N, variant="optimised", causal=True)
  p = _init(layer, x)["params"]
  H = D // N
  select = jnp.eye(D).reshape(D, N, H)                   # value head n = the n-th feature slice
  standard = {"query": p["query"], "key": p["key"], "out": p["out"],
              "value": {"kernel": select, "bias": jnp.zeros((N, H))}}
  got = jax.jit(layer.apply)({"params": p}, x)
  want = jax.jit(MultiHeadAttention(num_heads=N, causal=True).apply)({"params": standard}, x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), **F32)


def test_super_with_identity_alignment_is_efficient_and_pads_are_not_mixed_in():
  x = _x()
  sup = FoldedProjectionAttention(num_heads=N, variant="super", max_length=T)
  p = _init(sup, x)["params"]
  eff = FoldedProjectionAttention(num_heads=N, variant="efficient")
  identity = {**p, "alignment": jnp.eye(T)}
  np.testing.assert_allclose(
      np.asarray(jax.jit(sup.apply)({"params": identity}, x)),
      np.asarray(jax.jit(eff.apply)({"params": {k: p[k] for k in ("query", "out")}}, x)), **F32)
  lengths = jnp.array([T, 4])
  garbage = x.at[1, 4:].set(1e3)
  apply = jax.jit(sup.apply)
  got, want = (apply({"params": p}, a, kv_lengths=lengths) for a in (garbage, x))
  # The real queries of the padded example (rows 0-3) see neither the pads nor W_A's mix of them.
  np.testing.assert_allclose(np.asarray(got[1, :4]), np.asarray(want[1, :4]), **F32)


def test_bad_settings_name_the_argument():
  x = _x()
  init = lambda layer, *a: layer.init(jax.random.PRNGKey(0), x, *a)
  with pytest.raises(ValueError, match="variant"):
    init(FoldedProjectionAttention(num_heads=N, variant="standard"))
  with pytest.raises(ValueError, match="max_length"):
    init(FoldedProjectionAttention(num_heads=N, variant="super", max_length=T + 1))
  with pytest.raises(ValueError, match="causal"):
    init(FoldedProjectionAttention(num_heads=N, variant="super", max_length=T, causal=True))
  with pytest.raises(ValueError, match="width"):
    init(FoldedProjectionAttention(num_heads=N, variant="efficient"), _x((B, 5, 6)))
  with pytest.raises(ValueError, match="num_heads"):
    init(FoldedProjectionAttention(num_heads=5))
