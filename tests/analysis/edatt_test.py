"""Tests of attnjax.analysis.edatt: threshold behaviour and the streaming loop."""

import numpy as np
import pytest

from attnjax.analysis import edatt


def _explicit(a, lam, alpha):
  """Float64 loop rewrite of the paper's rule."""
  heads, m, n = a.shape
  out = []
  for i in range(m):
    s = sum(sum(a[h, i, j] for h in range(heads)) / heads for j in range(max(n - lam, 0), n))
    if s >= alpha:
      break
    out.append(i)
  return [i in out for i in range(m)]


def test_threshold_and_prefix_rule():
  a = np.zeros((2, 3, 5))
  a[:, 0, 0] = 1.0            # token 0 looks at old frames: emit
  a[0, 1, 4], a[1, 1, 0] = 1.0, 1.0  # token 1: head mean on last frame = 0.5
  a[:, 2, 0] = 1.0            # token 2 would pass but comes after a failing token
  assert edatt.emission_mask(a, lam=1, alpha=0.6).tolist() == [True, True, True]
  assert edatt.emission_mask(a, lam=1, alpha=0.5).tolist() == [True, False, False]
  assert edatt.emission_mask(a, lam=5, alpha=0.9).tolist() == [False, False, False]


def test_against_explicit_loop_and_layer_axis():
  rng = np.random.default_rng(0)
  a = rng.dirichlet(np.ones(7), size=(3, 2, 4))  # [L=3, heads=2, m=4, n=7]
  for lam, alpha in [(1, 0.2), (2, 0.3), (3, 0.5)]:
    got = edatt.emission_mask(a, lam, alpha, layer=1).tolist()
    assert got == _explicit(a[1], lam, alpha)
  with pytest.raises(ValueError, match="layer"):
    edatt.emission_mask(a, 1, 0.5)


def test_streaming_loop():
  target = ["a", "b", "c"]
  source = np.arange(6)

  def decode(prefix, emitted):
    # Toy model: token k is aligned with frame 2k; it attends to that frame if received,
    # else to the newest frame (it needs more audio).
    n = len(prefix)
    cands = target[len(emitted):]
    att = np.zeros((1, len(cands), n))
    for i, tok in enumerate(cands):
      f = 2 * target.index(tok)
      att[0, i, f if f < n - 1 else n - 1] = 1.0
    return cands, att

  log = edatt.simultaneous_decode(decode, source, chunk=2, lam=1, alpha=0.5)
  assert log == [(2, ["a"]), (4, ["b"]), (6, ["c"])]
  assert sum((t for _, t in log), []) == target
