"""Video-CCAM's causal cross-attention mask (arXiv:2408.14023): lower-triangular over (query, frame)
when there are as many queries as frames, query groups sharing a horizon with more queries, the last
query seeing every frame with more frames (long videos); against a numpy masked softmax; a query's
output does not move when frames after its horizon change."""

import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.ops.cross import video_ccam
from tests import tolerances

B, N, K, H, h = 2, 2, 1, 8, 6


def _mask(Q, F):
  return np.asarray(video_ccam.query_sees_frame(np.arange(Q)[:, None], np.arange(F)[None], Q, F))


def test_mask_shapes_of_time():
  np.testing.assert_array_equal(_mask(4, 4), np.tril(np.ones((4, 4), bool)))
  np.testing.assert_array_equal(_mask(8, 4), np.repeat(np.tril(np.ones((4, 4), bool)), 2, axis=0))
  long = _mask(4, 12)   # 3 frames per query slot: query i sees the frames of slots 0..i
  np.testing.assert_array_equal(long.sum(axis=1), [3, 6, 9, 12])


def _np_attention(q, k, v, Q, F):
  S = k.shape[1]
  frame = (np.arange(S) * F) // S
  out = np.zeros((B, Q, N, h))
  for b in range(B):
    for n in range(N):
      for i in range(Q):
        s = k[b, :, n // (N // K)] @ q[b, i, n] / np.sqrt(H)
        s = np.where(frame * Q < (i + 1) * F, s, -np.inf)
        a = np.exp(s - s.max())
        out[b, i, n] = (a / a.sum()) @ v[b, :, n // (N // K)]
  return out


@pytest.mark.parametrize("Q, F, P", [(4, 4, 3), (6, 3, 2), (3, 12, 1)])
def test_matches_numpy_and_later_frames_do_not_leak(Q, F, P):
  rng = np.random.default_rng(0)
  q = rng.standard_normal((B, Q, N, H)).astype(np.float32)
  k = rng.standard_normal((B, F * P, K, H)).astype(np.float32)
  v = rng.standard_normal((B, F * P, K, h)).astype(np.float32)
  out = np.asarray(aj.attention("causal_cross_attention", q, k, v, frames=F, cross=True))
  np.testing.assert_allclose(out, _np_attention(q, k, v, Q, F), **tolerances.OUTPUT[jnp.float32])
  # Change the last frame's tokens: only the queries whose horizon includes it move.
  k2, v2 = k.copy(), v.copy()
  k2[:, -P:] += 3.0
  v2[:, -P:] -= 3.0
  out2 = np.asarray(aj.attention("causal_cross_attention", q, k2, v2, frames=F, cross=True))
  sees_last = _mask(Q, F)[:, -1]
  np.testing.assert_allclose(out2[:, ~sees_last], out[:, ~sees_last],
                             **tolerances.OUTPUT[jnp.float32])
  assert tolerances.rel_rms(out2[:, sees_last], out[:, sees_last]) > tolerances.CHANGED_REL_RMS


def test_errors_name_the_argument():
  x = np.zeros((1, 4, 1, 8), np.float32)
  with pytest.raises(ValueError, match="`frames`"):
    video_ccam.causal_cross_attention(x, x, x[..., :6], frames=5)
  with pytest.raises(ValueError, match="causal"):
    video_ccam.causal_cross_attention(x, x, x[..., :6], frames=2, causal=True)
