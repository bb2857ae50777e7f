"""The G query heads of a kv head as query rows (`attnjax.core.gqa_rows`): the layout round-trips, and
attention over the rows (N = K) is GQA attention over the heads."""

import jax.numpy as jnp
import numpy as np

from attnjax.core import flex
from attnjax.core import gqa_rows
from tests import inputs
from tests import tolerances


def test_rows_round_trip_and_attention_over_rows_is_gqa_attention():
  B, T, S, N, K, H, h = 2, 5, 7, 6, 2, 8, 3
  q, k, v = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=h, seed=0)
  rows = gqa_rows.heads_to_rows(q, K)
  assert rows.shape == (B, T * N // K, K, H)
  # Row t·G + g of kv head kh is query head kh·G + g at position t.
  np.testing.assert_array_equal(rows[:, 1 * 3 + 2, 1], q[:, 1, 1 * 3 + 2])
  np.testing.assert_array_equal(gqa_rows.rows_to_heads(rows, N), q)
  out, lse = flex.flex_attention(rows, k, v, return_residuals=True)
  want, want_lse = flex.flex_attention(q, k, v, return_residuals=True)
  np.testing.assert_allclose(gqa_rows.rows_to_heads(out, N), want, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(gqa_rows.rows_to_heads(lse, N), want_lse,
                             **tolerances.output(jnp.float32))
