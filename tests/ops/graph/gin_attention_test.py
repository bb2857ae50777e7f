"""GIN-Attention (arXiv:2501.02393): against a per-token numpy loop of MLP((1 + ε) v_i + Σ_j A_ij v_j)
with the authors' Linear-RMSNorm-SiLU-Linear MLP, causal and not, with GQA; and its defining
difference from attention: when every query attends the same way (equal keys) attention's rows are
all equal, while GIN-Attention's still tell the tokens apart through their own values."""

import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.ops.graph import gin_attention as gin
from tests import tolerances

B, T, N, K, H, h = 2, 7, 4, 2, 8, 6


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((B, T, N, H)).astype(np.float32),
          rng.standard_normal((B, T, K, H)).astype(np.float32),
          rng.standard_normal((B, T, K, h)).astype(np.float32))


def _np_gin(q, k, v, p, causal):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  p = {n: np.asarray(a, np.float64) for n, a in p.items()}
  out = np.zeros((B, T, N, h))
  for b in range(B):
    for n in range(N):
      kv = n // (N // K)
      for i in range(T):
        s = k[b, :, kv] @ q[b, i, n] / np.sqrt(H)
        if causal:
          s[i + 1:] = -np.inf
        a = np.exp(s - s.max())
        a /= a.sum()
        x = (1 + p["eps"][n]) * v[b, i, kv] + a @ v[b, :, kv]
        y = x @ p["w1"][n] + p["b1"][n]
        y = y / np.sqrt(np.mean(y * y) + 1e-6) * p["norm"][n]
        out[b, i, n] = (y / (1 + np.exp(-y))) @ p["w2"][n] + p["b2"][n]
  return out


@pytest.mark.parametrize("causal", [False, True])
def test_matches_numpy_loop(causal):
  q, k, v = _inputs()
  p = gin._example(N=N, K=K, H=H, h=h)
  got = aj.attention("gin_attention", q, k, v, causal=causal, **p)
  np.testing.assert_allclose(got, _np_gin(q, k, v, p, causal), **tolerances.OUTPUT[jnp.float32])


def test_own_value_separates_tokens_that_attend_alike():
  q, _, v = _inputs(1)
  k = np.zeros((B, T, K, H), np.float32)   # equal keys: every query's weights are uniform
  p = gin._example(N=N, K=K, H=H, h=h)
  plain = np.asarray(aj.attention("softmax", q, k, v))
  np.testing.assert_allclose(plain, np.broadcast_to(plain[:, :1], plain.shape),
                             **tolerances.OUTPUT[jnp.float32])
  out = np.asarray(aj.attention("gin_attention", q, k, v, **p))
  assert tolerances.rel_rms(out[:, 1:], np.broadcast_to(out[:, :1], out[:, 1:].shape)) > (
      tolerances.CHANGED_REL_RMS)


def test_errors_name_the_argument():
  q, k, v = _inputs()
  p = gin._example(N=N, K=K, H=H, h=h)
  with pytest.raises(ValueError, match="`w1` must be"):
    gin.gin_attention(q, k, v, **{**p, "w1": p["w1"][:, :3]})
  with pytest.raises(ValueError, match="self-attention only"):
    gin.gin_attention(np.concatenate([q, q], 1), k, v, **p)
