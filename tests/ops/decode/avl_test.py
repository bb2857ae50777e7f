"""A-VL (#176): text keys through a local window, image keys through a core chosen by the head-averaged
attention of a refresh step, checked against a float64 rewrite; its claims: with the window covering
all text and every image token kept it is causal softmax attention; the chosen image tokens are the
top-k by attention score; the output does not depend on the image tokens left out of the core; and
decoding re-chooses the core every `update_interval` steps, attending to every image token on those
steps and to the carried core between them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.decode import (avl_decode_step, avl_modality_adaptive_attention,
                                select_core_image_tokens)
from tests import inputs
from tests import numpy_math
from tests import tolerances

F32 = tolerances.output(jnp.float32)
N, K, H, HV = 4, 2, 8, 6
WINDOW, TOP_K = 3, 2
# Two sequences: an image of 6 tokens after a short text prompt, then text (row 1's image later).
IMAGE = np.zeros((2, 14), bool)
IMAGE[0, 2:8] = True
IMAGE[1, 4:10] = True


def _weights_float64(q, k, keep):
  """Softmax weights `[B, N, T, S]` of `q [B,T,N,H]` against `k [B,S,K,H]` under `keep [B,T,S]`,
  float64 (GQA by repeating key heads; a query at position t = its row index)."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  return numpy_math.softmax(s, where=keep[:, None])


def _attend_float64(q, k, v, keep):
  w = _weights_float64(q, k, keep)
  v = np.repeat(np.asarray(v, np.float64), q.shape[2] // v.shape[2], axis=2)
  return np.einsum("bnts,bsnh->btnh", w, v)


def _text_window(image, T, S, window, offset=0):
  """Text keys j with 0 <= p - j < window for a query at p = offset + t, by explicit loop."""
  keep = np.zeros((image.shape[0], T, S), bool)
  for b in range(image.shape[0]):
    for t in range(T):
      for j in range(S):
        keep[b, t, j] = not image[b, j] and 0 <= offset + t - j < window
  return keep


def _image_scores(q, k, image, window, offset=0):
  """The paper's refresh scores a_j = mean over heads of the softmax weight each query gives key j
  when it attends to its text window and every image token at or before it: `(a [B, T, S],
  candidates [B, T, S])`."""
  T, S = q.shape[1], k.shape[1]
  causal = (offset + np.arange(T))[:, None] >= np.arange(S)[None]
  candidates = image[:, None, :] & causal[None]
  seen = _text_window(image, T, S, window, offset) | candidates
  return _weights_float64(q, k, seen).mean(axis=1), candidates


def _top_k(scores, candidates, k):
  """Indices of the k largest scores among the candidates of one row (best first)."""
  order = [j for j in np.argsort(-scores, kind="stable") if candidates[j]]
  return order[:k]


def test_full_window_and_every_image_token_is_causal_attention():
  S = IMAGE.shape[1]
  q, k, v = inputs.qkv(B=2, T=S, N=N, K=K, H=H, h=HV, seed=0)
  out = avl_modality_adaptive_attention(q, k, v, is_image=IMAGE, text_window=S, image_top_k=S)
  want = _attend_float64(q, k, v, np.broadcast_to(np.tril(np.ones((S, S), bool)), (2, S, S)))
  np.testing.assert_allclose(np.asarray(out), want, **F32)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_each_query_keeps_its_top_k_image_tokens_by_attention(implementation):
  S = IMAGE.shape[1]
  q, k, v = inputs.qkv(B=2, T=S, N=N, K=K, H=H, h=HV, seed=1)
  out = inputs.jit_with(avl_modality_adaptive_attention, text_window=WINDOW, image_top_k=TOP_K,
                        implementation=implementation)(q, k, v, is_image=IMAGE)
  scores, candidates = _image_scores(q, k, IMAGE, WINDOW)
  keep = _text_window(IMAGE, S, S, WINDOW)
  for b in range(2):
    for t in range(S):
      keep[b, t, _top_k(scores[b, t], candidates[b, t], TOP_K)] = True
  np.testing.assert_allclose(np.asarray(out), _attend_float64(q, k, v, keep), **F32)


def test_select_core_image_tokens_is_the_top_k_of_the_last_query():
  S = IMAGE.shape[1]
  q, k, _ = inputs.qkv(B=2, T=S, N=N, K=K, H=H, h=HV, seed=2)
  chosen = np.asarray(select_core_image_tokens(q, k, IMAGE, image_top_k=4, text_window=WINDOW))
  scores, candidates = _image_scores(q, k, IMAGE, WINDOW)
  for b in range(2):
    assert chosen[b].tolist() == _top_k(scores[b, -1], candidates[b, -1], 4)
  # More than the image tokens: the rest are empty slots.
  many = np.asarray(select_core_image_tokens(q, k, IMAGE, image_top_k=8, text_window=WINDOW))
  assert (many[:, 6:] == -1).all() and (many[:, :6] >= 0).all()


def test_output_is_independent_of_the_image_tokens_left_out():
  S = IMAGE.shape[1]
  q, k, v = inputs.qkv(B=2, T=S, N=N, K=K, H=H, h=HV, seed=3)
  core = np.array([[3, 6], [4, 9]], np.int32)
  run = inputs.jit_with(avl_modality_adaptive_attention, text_window=WINDOW, image_top_k=TOP_K)
  base = np.asarray(run(q, k, v, is_image=IMAGE, core_image_tokens=core))
  left_out = IMAGE.copy()
  left_out[np.arange(2)[:, None], core] = False
  rng = np.random.default_rng(4)
  k2, v2 = np.array(k), np.array(v)
  k2[left_out] += 3.0 * rng.standard_normal(k2[left_out].shape)
  v2[left_out] += 3.0 * rng.standard_normal(v2[left_out].shape)
  out = np.asarray(run(q, jnp.asarray(k2), jnp.asarray(v2), is_image=IMAGE,
                       core_image_tokens=core))
  np.testing.assert_allclose(out, base, **F32)
  # A core token does reach the queries after it.
  v3 = np.array(v)
  v3[0, 6] += 3.0
  out = np.asarray(run(q, k, jnp.asarray(v3), is_image=IMAGE, core_image_tokens=core))
  assert np.abs(out[0, 6:] - base[0, 6:]).max() > tolerances.CHANGED_MAX_ABS
  # Choosing its own core, a query ignores the values of the image tokens it did not choose.
  scores, candidates = _image_scores(q, k, IMAGE, WINDOW)
  t = S - 1
  unchosen = [j for j in np.flatnonzero(candidates[0, t])
              if j not in _top_k(scores[0, t], candidates[0, t], TOP_K)]
  v4 = np.array(v)
  v4[0, unchosen] += 3.0
  own = inputs.jit_with(avl_modality_adaptive_attention, text_window=WINDOW, image_top_k=TOP_K)
  out = np.asarray(own(q, k, jnp.asarray(v4), is_image=IMAGE))
  np.testing.assert_allclose(out[0, t], np.asarray(own(q, k, v, is_image=IMAGE))[0, t], **F32)


_step = jax.jit(avl_decode_step, static_argnames=("update_interval", "text_window"))


def test_decode_refreshes_the_core_every_update_interval_steps():
  # A 7-token prompt (the image inside it), then 7 decode steps with a refresh every 3 steps.
  S, prompt, interval = IMAGE.shape[1], 7, 3
  image = IMAGE.copy()
  image[1, 7:] = False                  # row 1's image ends with the prompt too
  q, k, v = inputs.qkv(B=2, T=S, N=N, K=K, H=H, h=HV, seed=5)
  core = np.asarray(select_core_image_tokens(q[:, :prompt], k[:, :prompt], image[:, :prompt],
                                             image_top_k=TOP_K, text_window=WINDOW))
  scores, candidates = _image_scores(q[:, :prompt], k[:, :prompt], image[:, :prompt], WINDOW)
  for b in range(2):
    assert core[b].tolist() == _top_k(scores[b, -1], candidates[b, -1], TOP_K)
  for step, p in enumerate(range(prompt, S), start=1):
    out, new_core = _step(q[:, p:p + 1], k, v, is_image=image, core_image_tokens=core,
                          step=jnp.int32(step), update_interval=interval, text_window=WINDOW,
                          q_offset=p, kv_lengths=jnp.full((2,), p + 1, jnp.int32))
    keep = _text_window(image, 1, S, WINDOW, offset=p)
    if step % interval == 0:              # a refresh: every image token, and a new core
      keep |= image[:, None, :] & (np.arange(S) <= p)[None, None]
      scores, candidates = _image_scores(q[:, p:p + 1], k, image, WINDOW, offset=p)
      want_core = [_top_k(scores[b, 0], candidates[b, 0], TOP_K) for b in range(2)]
    else:                                 # the carried core
      keep[np.arange(2)[:, None], 0, core] = True
      want_core = core.tolist()
    np.testing.assert_allclose(np.asarray(out)[:, 0],
                               _attend_float64(q[:, p:p + 1], k, v, keep)[:, 0], **F32)
    assert np.asarray(new_core).tolist() == want_core
    core = np.asarray(new_core)


def test_bad_settings_are_clear_errors():
  q, k, v = inputs.qkv(B=2, T=14, N=N, K=K, H=H, h=HV)
  with pytest.raises(ValueError, match="avl_modality_adaptive_attention: .*causal=True"):
    avl_modality_adaptive_attention(q, k, v, is_image=IMAGE, text_window=2, image_top_k=2,
                                    causal=False)
  with pytest.raises(ValueError, match="`image_top_k` must be an int >= 1"):
    avl_modality_adaptive_attention(q, k, v, is_image=IMAGE, text_window=2, image_top_k=0)
  with pytest.raises(ValueError, match=r"`is_image` must have shape \[B, S\]"):
    avl_modality_adaptive_attention(q, k, v, is_image=IMAGE[:, :5], text_window=2, image_top_k=2)
  with pytest.raises(ValueError, match="avl_decode_step: `update_interval` must be an int >= 1"):
    avl_decode_step(q[:, :1], k, v, is_image=IMAGE, core_image_tokens=np.zeros((2, 2), np.int32),
                    step=1, update_interval=0, text_window=2, q_offset=13)
