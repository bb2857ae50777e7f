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
