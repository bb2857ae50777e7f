"""RALA (attnjax/ops/linear/rala.py): the rank augmentation lifts the output's rank.

Each property is checked against an explicit evaluation of the formula written out here."""


import jax
import jax.numpy as jnp
import numpy as np

import attnjax as aj
from attnjax.core import feature_maps as fm
from attnjax.ops import linear as lin
from tests import tolerances
from tests.inputs import qkv
from tests.ops.linear.helpers import assert_rel, impls, weighted


def test_rank_augmented_output_has_higher_rank_than_plain_linear_attention():
  B, T, N, H, h = 1, 32, 1, 2, 16    # two features: plain linear attention outputs have rank <= 2
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  q, k = jax.random.normal(ks[0], (B, T, N, H)), jax.random.normal(ks[1], (B, T, N, H))
  v = jax.random.normal(ks[2], (B, T, N, h))
  plain = aj.gated_linear_attention(fm.elu_plus_one(q), fm.elu_plus_one(k), v, causal=False,
                                    normalize=True, scale=1.0)
  rala = lin.rank_augmented_linear_attention(q, k, v)
  rank = lambda o: int(np.linalg.matrix_rank(np.asarray(o[0, :, 0], np.float64),
                                                    tol=tolerances.RANK_SINGULAR_VALUE_MIN))
  assert rank(plain) <= H
  assert rank(rala) > 4 * H


def test_rank_augmented_equals_explicit_formula():
  q, k, v = qkv(T=29, K=4)
  B, T, N, H = q.shape
  qbar = q.mean(1)                                                      # [B,N,H] global query
  alpha = T * jax.nn.softmax(H ** -0.5 * jnp.einsum("bnf,bsnf->bsn", qbar, k), axis=1)
  w = jnp.einsum("btnf,bsnf->bnts", fm.elu_plus_one(q), fm.elu_plus_one(k))
  w = w * jnp.transpose(alpha, (0, 2, 1))[:, :, None, :]
  expected = weighted(w / jnp.sum(w, -1, keepdims=True), v) * v
  assert impls("rank_augmented_linear_attention") == ("xla", "reference")
  for impl in impls("rank_augmented_linear_attention"):
    assert_rel(lin.rank_augmented_linear_attention(q, k, v, implementation=impl), expected)
