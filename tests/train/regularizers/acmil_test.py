"""ACMIL stochastic top-K masking (#202): masked instances are among each branch's top K and get
weight 0, the others' weights are the float64 softmax renormalized over the unmasked instances
(summing to 1), the masking rate follows p, and evaluation masks nothing."""

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.train.regularizers import acmil
from tests import tolerances

B, N_INST, D, M, K = 2, 9, 6, 3, 4


def _setup():
  layer = acmil.ACMILPooling(num_branches=M, hidden=8, top_k=K, mask_prob=0.5)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((B, N_INST, D)), jnp.float32)
  return layer, x, layer.init(jax.random.PRNGKey(0), x)


def test_training_masks_only_top_k_and_renormalizes_the_rest():
  layer, x, variables = _setup()
  _, clean = layer.apply(variables, x)
  z, alpha = layer.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  clean, alpha = np.asarray(clean, np.float64), np.asarray(alpha, np.float64)
  masked = alpha == 0
  assert masked.any() and not masked.all(-1).any()
  top = np.argsort(-clean, axis=-1)[..., :K]
  for b in range(B):
    for m in range(M):
      dropped = set(np.flatnonzero(masked[b, m]))
      assert dropped <= set(top[b, m]), (dropped, top[b, m])
      keep = ~masked[b, m]
      want = np.where(keep, clean[b, m], 0.0) / clean[b, m][keep].sum()
      np.testing.assert_allclose(alpha[b, m], want, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(alpha.sum(-1), 1.0, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(z, np.einsum("bmn,bnd->bmd", alpha, np.asarray(x, np.float64)),
                             **tolerances.output(jnp.float32))


def test_masking_rate_and_evaluation():
  scores = jnp.asarray(np.random.default_rng(2).standard_normal((50, 4, N_INST)), jnp.float32)
  masked = np.asarray(acmil.stochastic_topk_mask(scores, jax.random.PRNGKey(3), top_k=K,
                                                 mask_prob=0.3))
  assert masked.sum(-1).max() <= K
  assert abs(masked.sum() / (50 * 4 * K) - 0.3) < 0.05
  assert not acmil.stochastic_topk_mask(scores, jax.random.PRNGKey(3), top_k=K,
                                        mask_prob=0.0).any()
  everything = acmil.stochastic_topk_mask(scores, jax.random.PRNGKey(3), top_k=N_INST,
                                          mask_prob=1.0)
  assert np.all(np.asarray(everything).sum(-1) == N_INST - 1)   # the top one stays
  layer, x, variables = _setup()
  _, a = layer.apply(variables, x)
  _, again = layer.apply(variables, x, train=False)
  np.testing.assert_array_equal(a, again)
  assert np.all(np.asarray(a) > 0)
