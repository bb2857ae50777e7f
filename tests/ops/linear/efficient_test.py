"""Efficient Attention (attnjax/ops/linear/efficient.py): equal to its quadratic evaluation, and
to dot-product attention under scaling normalization.

Each property is checked against an explicit evaluation of the formula written out here."""


import jax
import jax.numpy as jnp
import numpy as np

from attnjax.ops import linear as lin
from tests.inputs import qkv
from tests.ops.linear.helpers import assert_rel, heads, impls, weighted


def test_efficient_attention_equals_quadratic_evaluation():
  q, k, v = qkv(T=29)
  N, H = q.shape[2], q.shape[3]
  s = H ** -0.25
  rho_q = jax.nn.softmax(q * s, axis=-1)                    # each query over its features
  rho_k = jax.nn.softmax(heads(k, N) * s, axis=1)          # each key feature over positions
  expected = weighted(jnp.einsum("btnf,bsnf->bnts", rho_q, rho_k), heads(v, N))
  assert impls("efficient_attention") == ("xla", "reference")
  for impl in impls("efficient_attention"):
    assert_rel(lin.efficient_attention(q, k, v, implementation=impl), expected)


def test_efficient_attention_with_scaling_normalization_is_dot_product_attention():
  """The paper's equivalence: with ρ_q(Y) = ρ_k(Y) = Y / √n, `ρ_q(Q)(ρ_k(K)ᵀV) = (QKᵀ/n) V`, here
  against dot-product attention with scaling normalization in float64 (n: the real keys)."""
  q, k, v = qkv(T=29)
  B, T, N, H = q.shape
  lengths = np.array([T, 17])
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
  kn, vn = np.repeat(kn, N // kn.shape[2], 2), np.repeat(vn, N // vn.shape[2], 2)
  expected = np.zeros(v.shape[:2] + (N, v.shape[-1]))
  for b in range(B):
    n = lengths[b]
    scores = H ** -0.5 * np.einsum("tnf,snf->nts", qn[b], kn[b, :n]) / n
    expected[b] = np.einsum("nts,snh->tnh", scores, vn[b, :n])
  garbage = k.at[1, 17:].set(1e4)                             # slots past the length are unused
  for impl in impls("efficient_attention"):
    out = lin.efficient_attention(q, garbage, v, normalization="scaling",
                                 kv_lengths=jnp.asarray(lengths), implementation=impl)
    assert_rel(out, expected)
