"""HiLo attention (LITv2, arXiv:2205.13213).

Defining property (the catalog's claim is a speed figure; the computation behind it): the Hi-Fi heads
are self-attention inside s x s windows and the Lo-Fi heads are attention from every query to the
s x s average-pooled keys and values. A float64 numpy rewrite of the authors' `hifi` / `lofi` steps
(window partition; AvgPool over each window) is compared per head group, on a 2-D map with sides that
are multiples of s (exactly the authors' AvgPool2d) and on a ragged 1-D sequence, with GQA, for both
implementations, and the gradients of the xla path against the reference. The head split follows
alpha, and a 1 x 1 window is plain attention in every head (the authors' ws == 1 case).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.local import hilo
from tests import inputs
from tests import numpy_math
from tests import tolerances

F32 = jnp.float32


def _attend(q, k, v, keep=None):
  logits = np.einsum("bqnh,bknh->bnqk", q, k) * q.shape[-1] ** -0.5
  return np.einsum("bnqk,bknh->bqnh", numpy_math.softmax(logits, where=keep), v)


def _windows(shape, s):
  """Lists of flat token indices, one per s x s window (a smaller one at a ragged edge)."""
  shape = tuple(shape) if len(shape) == 2 else (1,) + tuple(shape)
  s = (s, s) if len(shape) == 2 and shape[0] > 1 else (1, s)
  idx = np.arange(np.prod(shape)).reshape(shape)
  return [idx[i:i + s[0], j:j + s[1]].ravel() for i in range(0, shape[0], s[0])
          for j in range(0, shape[1], s[1])]


def _hilo_numpy(q, k, v, shape, s, alpha):
  q = np.asarray(q, np.float64)
  B, L, N, H = q.shape
  k = np.repeat(np.asarray(k, np.float64), N // k.shape[2], axis=2)
  v = np.repeat(np.asarray(v, np.float64), N // v.shape[2], axis=2)
  n_lo = int(N * alpha)
  n_hi = N - n_lo
  wins = _windows(shape, s)
  out = np.zeros((B, L, N, v.shape[-1]))
  for w in wins:  # Hi-Fi: attention inside each window
    out[:, w, :n_hi] = _attend(q[:, w, :n_hi], k[:, w, :n_hi], v[:, w, :n_hi])
  # Lo-Fi: every query against the window means of keys and values
  pooled_k = np.stack([k[:, w, n_hi:].mean(1) for w in wins], axis=1)
  pooled_v = np.stack([v[:, w, n_hi:].mean(1) for w in wins], axis=1)
  out[:, :, n_hi:] = _attend(q[:, :, n_hi:], pooled_k, pooled_v)
  return out


@pytest.mark.parametrize("shape,s,alpha", [((6, 8), 2, 0.5), ((19,), 4, 0.75)])
def test_hifi_windows_and_lofi_pooled_keys(shape, s, alpha):
  L = int(np.prod(shape))
  q, k, v = inputs.qkv(B=2, T=L, N=4, K=2, H=8, h=6, seed=1)
  want = _hilo_numpy(q, k, v, shape, s, alpha)
  for impl in ("xla", "reference"):
    fn = inputs.jit_with(hilo.hilo_attention, window_size=s, alpha=alpha, spatial_shape=shape,
                         implementation=impl)
    np.testing.assert_allclose(fn(q, k, v), want, **tolerances.output(F32))


def test_xla_gradients_equal_the_reference():
  q, k, v = inputs.qkv(B=1, T=30, N=4, K=2, H=8, h=6, seed=2)
  dout = jax.random.normal(jax.random.PRNGKey(3), (1, 30, 4, 6))
  fn = lambda impl: lambda q, k, v: hilo.hilo_attention(q, k, v, window_size=(2, 3),
                                                        spatial_shape=(5, 6), implementation=impl)
  inputs.assert_same_gradients(fn("xla"), fn("reference"), (q, k, v), dout, ("dq", "dk", "dv"),
                               tol=tolerances.grad(F32))


def test_lofi_heads_see_pooled_keys_only():
  # Moving two keys and values of one window in opposite directions keeps the window's means: the
  # Lo-Fi heads do not change, the Hi-Fi heads do.
  q, k, v = inputs.qkv(B=1, T=16, N=4, K=4, H=8, h=6, seed=4)
  fn = inputs.jit_with(hilo.hilo_attention, window_size=4, alpha=0.5)
  base = fn(q, k, v)
  move = lambda x: x.at[:, 0].add(1.0).at[:, 1].add(-1.0)
  moved = fn(q, move(k), move(v))
  np.testing.assert_allclose(moved[:, :, 2:], base[:, :, 2:], **tolerances.output(F32))
  assert float(jnp.max(jnp.abs(moved[:, :, :2] - base[:, :, :2]))) > tolerances.CHANGED_MAX_ABS


def test_head_split_and_unit_window():
  assert hilo.lofi_heads(8, 0.5, (2, 2)) == 4 and hilo.lofi_heads(8, 0.9, (2,)) == 7
  assert hilo.lofi_heads(8, 0.5, (1, 1)) == 8
  q, k, v = inputs.qkv(B=1, T=12, N=4, K=2, H=8, h=6, seed=5)
  full = _attend(np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), 2, axis=2),
                 np.repeat(np.asarray(v, np.float64), 2, axis=2))
  np.testing.assert_allclose(hilo.hilo_attention(q, k, v, window_size=1), full,
                             **tolerances.output(F32))
  with pytest.raises(ValueError, match="hilo_attention: causal"):
    hilo.hilo_attention(q, k, v, causal=True)
