"""Live2Diff (#213): temporal attention where frame p sees the warm-up frames (which see each other both
ways) and the `window` frames up to itself, checked against a float64 rewrite of the paper's mask;
its claim: a frame's output is independent of future frames and of the frames between the warm-up
and its window (while the warm-up frames and its window do reach it); packed documents each get
their own warm-up."""

import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.decode import warmup_window_temporal_attention
from tests import inputs
from tests import numpy_math
from tests import tolerances

F32 = tolerances.output(jnp.float32)
WARMUP, WINDOW = 3, 4


def _live2diff_float64(q, k, v, *, warmup, window):
  """The paper's attention per row, float64: frame p sees j < warmup, and j with 0 <= p - j < window
  (an explicit loop over frame pairs), softmax over those; GQA by repeating key/value heads."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  T, S = q.shape[1], k.shape[1]
  keep = np.zeros((T, S), bool)
  for p in range(T):
    for j in range(S):
      keep[p, j] = j < warmup or 0 <= p - j < window
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  s = np.einsum("bpnh,bjnh->bnpj", q, k) / np.sqrt(q.shape[-1])
  w = numpy_math.softmax(s, where=keep[None, None])
  return np.einsum("bnpj,bjnh->bpnh", w, v)


_live2diff = inputs.jit_with(warmup_window_temporal_attention, warmup=WARMUP, window=WINDOW)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_equals_the_papers_warmup_and_window_mask(implementation):
  q, k, v = inputs.qkv(B=2, T=13, N=4, K=2, H=8, h=6, seed=0)
  out = inputs.jit_with(warmup_window_temporal_attention, warmup=WARMUP, window=WINDOW,
                        implementation=implementation)(q, k, v)
  want = _live2diff_float64(q, k, v, warmup=WARMUP, window=WINDOW)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


def _with_frames_changed(x, frames, seed):
  x = np.array(x)
  x[:, frames] = 5.0 * np.random.default_rng(seed).standard_normal(x[:, frames].shape)
  return jnp.asarray(x)


def test_a_frame_ignores_future_frames_and_those_between_the_warmup_and_its_window():
  T, p = 13, 9                       # frame 9 sees frames 0, 1, 2 (warm-up) and 6..9 (window)
  q, k, v = inputs.qkv(B=2, T=T, N=4, K=2, H=8, h=6, seed=1)
  base = np.asarray(_live2diff(q, k, v))
  unseen = [3, 4, 5, 10, 11, 12]
  out = np.asarray(_live2diff(q, _with_frames_changed(k, unseen, 2),
                              _with_frames_changed(v, unseen, 3)))
  np.testing.assert_allclose(out[:, p], base[:, p], **F32)
  # Every frame past the warm-up ignores every later frame (a stream never waits for the future).
  for cut in range(WARMUP - 1, T - 1):
    later = list(range(cut + 1, T))
    out = np.asarray(_live2diff(q, _with_frames_changed(k, later, cut), v))
    np.testing.assert_allclose(out[:, :cut + 1], base[:, :cut + 1], **F32)
  # The warm-up frames and the window do reach it.
  for frame in (1, 7):
    out = np.asarray(_live2diff(q, k, _with_frames_changed(v, [frame], 4)))
    assert np.abs(out[:, p] - base[:, p]).max() > tolerances.CHANGED_MAX_ABS


def test_warmup_frames_see_each_other_both_ways():
  q, k, v = inputs.qkv(B=1, T=8, N=2, K=2, H=8, h=6, seed=5)
  base = np.asarray(_live2diff(q, k, v))
  # Frame 0 reads the later warm-up frame 2, but no frame past the warm-up.
  out = np.asarray(_live2diff(q, k, _with_frames_changed(v, [WARMUP - 1], 6)))
  assert np.abs(out[:, 0] - base[:, 0]).max() > tolerances.CHANGED_MAX_ABS
  out = np.asarray(_live2diff(q, k, _with_frames_changed(v, [WARMUP, WARMUP + 1], 7)))
  np.testing.assert_allclose(out[:, :WARMUP], base[:, :WARMUP], **F32)


def test_packed_documents_each_have_their_own_warmup():
  # Two documents of 6 and 11 frames in one row, each with its warm-up at its own start.
  lengths = (6, 11)
  q, k, v = inputs.qkv(B=1, T=sum(lengths), N=4, K=2, H=8, h=6, seed=8)
  seg = jnp.asarray(np.repeat(np.arange(2), lengths)[None], jnp.int32)
  packed = np.asarray(warmup_window_temporal_attention(q, k, v, warmup=WARMUP, window=WINDOW,
                                                       segment_ids=seg))
  start = 0
  for n in lengths:
    part = slice(start, start + n)
    want = _live2diff_float64(q[:, part], k[:, part], v[:, part], warmup=WARMUP, window=WINDOW)
    np.testing.assert_allclose(packed[:, part], want, **F32)
    start += n


def test_bad_settings_are_clear_errors():
  q, k, v = inputs.qkv(B=1, T=5, N=2, K=2, H=8, h=6)
  with pytest.raises(ValueError, match="warmup_window_temporal_attention: .*causal=True"):
    warmup_window_temporal_attention(q, k, v, warmup=2, window=2, causal=False)
  with pytest.raises(ValueError, match="`window` must be an int >= 1"):
    warmup_window_temporal_attention(q, k, v, warmup=2, window=0)
  with pytest.raises(ValueError, match="`warmup` must be an int >= 0"):
    warmup_window_temporal_attention(q, k, v, warmup=-1, window=2)
