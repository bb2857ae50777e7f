"""CrossLMM's dual cross-attention layer (arXiv:2505.17020): against a numpy loop of eqs. 4-10; closed
gates (α = 0, the start) leave only the self-attention block, so the original visual tokens do not
matter; with open gates they do, through both the visual and the text tokens; the causal form keeps
each token independent of the text after it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.cross import crosslmm
from tests import tolerances

B, LV, LT, S, D, HEADS = 2, 3, 5, 11, 8, 2


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((B, LV + LT, D)).astype(np.float32),
          rng.standard_normal((B, S, D)).astype(np.float32))


def _params(seed=1, open_gates=True):
  x, o = _inputs()
  layer = crosslmm.DualCrossAttentionLayer(num_visual=LV, num_heads=HEADS)
  params = dict(layer.init(jax.random.PRNGKey(seed), x, o)["params"])
  if open_gates:
    params.update(alpha_v=jnp.asarray(0.7), alpha_t=jnp.asarray(-1.2))
  return params


def _run(params, x, o, causal=True):
  return crosslmm.dual_cross_attention_layer(jnp.asarray(x), jnp.asarray(o), num_visual=LV,
                                             num_heads=HEADS, causal=causal, **params)


def _np_attention(q, k, v, causal):
  d = D // HEADS
  out = np.zeros((q.shape[0], D))
  for h in range(HEADS):
    c = slice(h * d, (h + 1) * d)
    s = q[:, c] @ k[:, c].T / np.sqrt(d)
    if causal:
      s = np.where(np.tril(np.ones(s.shape, bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    out[:, c] = a / a.sum(-1, keepdims=True) @ v[:, c]
  return out


@pytest.mark.parametrize("causal", [True, False])
def test_matches_a_numpy_loop_of_the_equations(causal):
  x, o = _inputs(2)
  p = {k: np.asarray(v, np.float64) for k, v in _params().items()}
  want = np.zeros(x.shape)
  for b in range(B):
    i = x[b].astype(np.float64)
    z = _np_attention(i @ p["self_q"], i @ p["self_k"], i @ p["self_v"], causal) @ p["self_o"] + i
    z = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-5)
    z = z * p["norm_scale"] + p["norm_bias"]
    for part, name, alpha in ((slice(0, LV), "v2v", p["alpha_v"]), (slice(LV, None), "t2v",
                                                                     p["alpha_t"])):
      ctx = _np_attention(z[part] @ p[f"{name}_q"], o[b] @ p[f"{name}_k"], o[b] @ p[f"{name}_v"],
                          False)
      want[b, part] = z[part] + np.tanh(alpha) * ctx
  np.testing.assert_allclose(np.asarray(_run(_params(), x, o, causal)), want,
                             **tolerances.output(jnp.float32))


def test_closed_gates_ignore_the_visual_tokens_and_open_ones_read_them_everywhere():
  x, o = _inputs(3)
  o2 = _inputs(4)[1]
  closed = _params(open_gates=False)
  np.testing.assert_array_equal(np.asarray(_run(closed, x, o)), np.asarray(_run(closed, x, o2)))
  opened = _params()
  a, b = np.asarray(_run(opened, x, o)), np.asarray(_run(opened, x, o2))
  for part in (slice(0, LV), slice(LV, None)):
    assert tolerances.rel_rms(a[:, part], b[:, part]) > tolerances.CHANGED_REL_RMS


def test_causal_tokens_do_not_see_later_text():
  x, o = _inputs(5)
  p = _params()
  later = x.copy()
  later[:, -2:] += 3.0
  a, b = np.asarray(_run(p, x, o)), np.asarray(_run(p, later, o))
  np.testing.assert_allclose(a[:, :-2], b[:, :-2], **tolerances.output(jnp.float32))
  assert tolerances.rel_rms(a[:, -2:], b[:, -2:]) > tolerances.CHANGED_REL_RMS
  # The bidirectional form lets the pooled visual tokens read the text.
  a, b = np.asarray(_run(p, x, o, causal=False)), np.asarray(_run(p, later, o, causal=False))
  assert tolerances.rel_rms(a[:, :LV], b[:, :LV]) > tolerances.CHANGED_REL_RMS


def test_bad_inputs_are_clear_errors():
  x, o = _inputs()
  p = _params()
  with pytest.raises(ValueError, match="visual_tokens"):
    _run(p, x, o[..., :4])
  with pytest.raises(ValueError, match="num_visual"):
    crosslmm.dual_cross_attention_layer(jnp.asarray(x), jnp.asarray(o), num_visual=LV + LT, **p)
