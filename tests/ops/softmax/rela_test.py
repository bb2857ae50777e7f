"""ReLA (#210): ReLU attention with the gated RMSNorm over each token's heads, checked against a float64
rewrite of the authors' computation, and the paper's claim that a head can attend to nothing (rows of
all-zero weights, which softmax cannot give)."""

import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.softmax import rectified_linear_attention
from tests import inputs
from tests import numpy_math
from tests import tolerances

F32 = tolerances.output(jnp.float32)
B, T, N, K, H, h = 2, 9, 4, 2, 8, 6


def _rela_float64(q, k, v, scale_g, gate_w, *, causal):
  """relu(q·k/√H) v per head (GQA by repeating heads), then g ⊙ u / sqrt(mean(u²) + 1e-8) ⊙ σ(w ⊙ u)
  with the mean over the token's N·h channels (heads concatenated, as `combine_heads` then the norm)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  if causal:
    s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, 0.0)   # the authors zero masked logits
  u = np.einsum("bnts,bsnh->btnh", np.maximum(s, 0.0), v)
  flat = u.reshape(u.shape[0], u.shape[1], -1)
  normed = flat / np.sqrt((flat ** 2).mean(-1, keepdims=True) + 1e-8)
  out = np.asarray(scale_g, np.float64).reshape(-1) * normed
  if gate_w is not None:
    out = out * numpy_math.sigmoid(np.asarray(gate_w, np.float64).reshape(-1) * flat)
  return out.reshape(u.shape)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_equals_the_authors_computation(gated, implementation):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=11)
  rng = np.random.default_rng(0)
  g = (1.0 + 0.3 * rng.standard_normal((N, h))).astype(np.float32)
  w = rng.standard_normal((N, h)).astype(np.float32) if gated else None
  out = rectified_linear_attention(q, k, v, rms_scale=g, rms_gate=w, causal=True,
                                   implementation=implementation)
  np.testing.assert_allclose(np.asarray(out), _rela_float64(q, k, v, g, w, causal=True), **F32)


def test_a_head_can_attend_to_nothing():
  # Head 0's query is the negative of every key direction it sees: all its scores are < 0, so its
  # ReLU weights are all zero and its output is exactly 0, while the other heads still attend.
  q, k, v = inputs.qkv(B=1, T=T, N=2, K=1, H=H, h=h, seed=4)
  k = jnp.abs(k)
  q = q.at[:, :, 0].set(-jnp.abs(q[:, :, 0]) - 0.1)
  out = np.asarray(rectified_linear_attention(q, k, v, rms_scale=jnp.ones((2, h)),
                                              rms_gate=jnp.zeros((2, h))))
  np.testing.assert_array_equal(out[:, :, 0], 0.0)
  assert np.abs(out[:, :, 1]).min(axis=-1).max() > 0.0


def test_fully_masked_row_gives_zeros_and_bad_params_name_the_argument():
  q, k, v = inputs.qkv(B=2, T=5, N=N, K=K, H=H, h=h)
  out = rectified_linear_attention(q, k, v, rms_scale=jnp.ones((N, h)),
                                   kv_lengths=jnp.array([0, 5]))
  np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
  assert np.isfinite(np.asarray(out)).all()
  with pytest.raises(ValueError, match="rms_scale"):
    rectified_linear_attention(q, k, v, rms_scale=jnp.ones((N, H + 1)))
