"""NumPy formulas shared by the tests' float64 rewrites of the papers (written once, not per file)."""

import numpy as np


def sigmoid(x):
  """`1 / (1 + e^{-x})` in float64."""
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def softmax(x, axis=-1, where=None):
  """Softmax along `axis`; with `where`, hidden entries get weight 0 (a row with nothing visible is
  NaN, as the formula is undefined there)."""
  x = np.asarray(x)
  if where is not None:
    x = np.where(where, x, -np.inf)
  e = np.exp(x - x.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def visible(B, T, S, *, causal=False, kv_lengths=None, segments=None):
  """The call contract's mask in numpy: bool `[B, 1, T, S]` (True keeps the pair) for queries at
  positions 0..T-1 against keys 0..S-1, `kv_lengths [B]` and self-attention `segments [B, T]`."""
  keep = np.ones((B, 1, T, S), bool)
  if causal:
    keep = keep & np.tril(np.ones((T, S), bool))
  if kv_lengths is not None:
    keep = keep & (np.arange(S) < np.asarray(kv_lengths)[:, None])[:, None, None, :]
  if segments is not None:
    seg = np.asarray(segments)
    keep = keep & (seg[:, :, None] == seg[:, None, :])[:, None]
  return keep


def check_directional_derivatives(grads, args, loss64, names, *, rng, tol, step=1e-6):
  """Each gradient `grads[i]` (of a float32 loss, for argument `args[i]`) against the central
  difference of the float64 loss `loss64(*args)` along a random direction: checks a whole gradient
  with two evaluations per argument. `tol`: keywords of `np.testing.assert_allclose`."""
  args = [np.asarray(a, np.float64) for a in args]
  for i, name in enumerate(names):
    d = rng.standard_normal(args[i].shape)
    plus, minus = list(args), list(args)
    plus[i], minus[i] = args[i] + step * d, args[i] - step * d
    fd = (loss64(*plus) - loss64(*minus)) / (2 * step)
    np.testing.assert_allclose(float(np.sum(np.asarray(grads[i], np.float64) * d)), float(fd),
                               err_msg=name, **tol)
