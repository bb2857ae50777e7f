"""DiffuSSM block (#149, arXiv:2311.18257): the block against a float64 rewrite with the two SSM
recurrences as explicit loops over the expanded sequence, and bidirectionality: each output depends on
tokens on both sides of it (one direction's readout zeroed leaves only the past, or only the future)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from attnjax.vision import conv
from tests import tolerances

F32 = lambda a: jnp.asarray(a, jnp.float32)


def _gelu(a):
  return 0.5 * a * (1 + special.erf(a / np.sqrt(2)))


def _weights(rng, D, M, N):
  C = 2 * D
  g = lambda *s: rng.standard_normal(s) / np.sqrt(s[-2] if len(s) > 1 else 1)
  return dict(w0=g(D, D), w_up=g(M, D, C), w_down=g(M, C, C // M), w1=g(D, C), w2=g(C, C),
              w3=g(C, D), fwd_log_dt=rng.uniform(-3, -1, C), fwd_log_a=rng.standard_normal((C, N)),
              fwd_b=rng.standard_normal((C, N)), fwd_c=rng.standard_normal((C, N)),
              bwd_log_dt=rng.uniform(-3, -1, C), bwd_log_a=rng.standard_normal((C, N)),
              bwd_b=rng.standard_normal((C, N)), bwd_c=rng.standard_normal((C, N)),
              skip=rng.standard_normal(C))


def _ssm_loops(u, w):
  """u [L, C]: the forward and backward recurrences, step by step."""
  L, C = u.shape
  y = w["skip"] * u
  for side, steps in (("fwd", range(L)), ("bwd", range(L - 1, -1, -1))):
    A = -np.exp(w[f"{side}_log_a"])
    a = np.exp(np.exp(w[f"{side}_log_dt"])[:, None] * A)
    b = (a - 1) / A * w[f"{side}_b"]
    h = np.zeros_like(A)
    for l in steps:
      h = a * h + b * u[l][:, None]
      y[l] += (w[f"{side}_c"] * h).sum(-1)
  return y


def _block(x, w):
  B, H, W, D = x.shape
  M = w["w_up"].shape[0]
  out = np.zeros_like(x).reshape(B, H * W, D)
  for b in range(B):
    I = x[b].reshape(H * W, D)
    U = np.stack([_gelu(_gelu(I[j] @ w["w0"]) @ w["w_up"][k])
                  for j in range(H * W) for k in range(M)])           # l = jM + k
    Y = _ssm_loops(U, w)
    for j in range(H * W):
      folded = np.concatenate([_gelu(Y[j * M + k] @ w["w_down"][k]) for k in range(M)])
      out[b, j] = (_gelu(folded @ w["w2"]) * _gelu(I[j] @ w["w1"])) @ w["w3"]
  return out.reshape(B, H, W, D)


@pytest.mark.parametrize("M", [1, 2, 4])
def test_against_float64_loops(M):
  rng = np.random.default_rng(M)
  x = rng.standard_normal((2, 3, 4, 4))
  w = _weights(rng, 4, M, 3)
  got = conv.diffussm_block(F32(x), **{n: F32(a) for n, a in w.items()})
  np.testing.assert_allclose(got, _block(x, w), **tolerances.output(jnp.float32))


def test_each_output_depends_on_both_sides():
  rng = np.random.default_rng(0)
  H, W, D = 3, 5, 4
  x = F32(rng.standard_normal((1, H, W, D)))
  w = {n: F32(a) for n, a in _weights(rng, D, 2, 3).items()}
  j = 7                                                         # a middle token (row 1, column 2)

  @jax.jit
  def reach(w):
    grad = jax.grad(lambda x: jnp.sum(conv.diffussm_block(x, **w).reshape(-1, D)[j]))(x)
    return jnp.max(jnp.abs(grad.reshape(H * W, D)), axis=-1)

  both = np.asarray(reach(w))
  assert np.all(both > 0)                                       # every token, before and after
  past = np.asarray(reach({**w, "bwd_c": 0 * w["bwd_c"]}))
  future = np.asarray(reach({**w, "fwd_c": 0 * w["fwd_c"]}))
  assert np.all(past[:j] > 0) and np.all(past[j + 1:] == 0)
  assert np.all(future[j + 1:] > 0) and np.all(future[:j] == 0)


def test_the_layer_and_a_bad_ratio():
  x = jnp.ones((1, 3, 3, 4))
  params = conv.DiffuSSMBlock(expansion=4, state_size=2).init(jax.random.PRNGKey(0), x)["params"]
  assert params["w_up"].shape == (4, 4, 8) and params["w_down"].shape == (4, 8, 2)
  assert params["fwd_log_a"].shape == (8, 2)
  with pytest.raises(ValueError, match="diffussm_block: the expansion ratio M = 3"):
    conv.diffussm_block(x, **{**params, "w_up": jnp.ones((3, 4, 8))})
