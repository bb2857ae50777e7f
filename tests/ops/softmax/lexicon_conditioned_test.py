"""Lexicon-conditioned attention (#69): scores conditioned on per-key lexicon features by
concatenation, feature-based gating or FiLM; the values unconditioned.

Checked against a float64 numpy rewrite of each method, against the authors' sentence-level
`AffectiveAttention` (one learned query w, keys = values = the RNN states h: the paper's energies
w·c_j and representation Σ a_j h_j), and the identities the formulas imply: a gate with zero weights is
the constant gate σ(b), i.e. unconditioned attention at scale·σ(b) (so at b = 0 it is *not* softmax
attention; it approaches it as b grows), FiLM at its identity and concat with u = 0 are softmax.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.softmax import lexicon_conditioned_attention, softmax_attention
from tests import inputs
from tests import tolerances

F32 = tolerances.output(jnp.float32)
B, T, S, N, K, H, h, F = 2, 9, 11, 4, 2, 8, 6, 5


def _params(seed, method):
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 4))
  normal = lambda shape, std=1.0: std * jax.random.normal(next(keys), shape)
  if method == "concat":
    return {"lexicon_query": normal((N, F))}
  if method == "gate":
    return {"lexicon_gate_kernel": normal((F, K, H)), "lexicon_gate_bias": normal((K, H))}
  return {"lexicon_scale_kernel": normal((F, K, H), 0.5), "lexicon_scale_bias": 1 + normal((K, H)),
          "lexicon_shift_kernel": normal((F, K, H), 0.5)}


def _lexicon(seed, shape=(B, S, F)):
  # Lexicon scores in [0, 1] (e.g. affect ratings), some tokens with none.
  x = jax.random.uniform(jax.random.PRNGKey(seed), shape)
  return jnp.where(x > 0.3, x, 0.0)


def _conditioned_float64(q, k, v, lex, method, params, *, causal=False, scale):
  q, k, v, f = (np.asarray(x, np.float64) for x in (q, k, v, lex))
  p = {name: np.asarray(x, np.float64) for name, x in params.items()}
  sig = lambda x: 1 / (1 + np.exp(-x))
  bias = 0.0
  if method == "gate":
    k = sig(np.einsum("bsf,fkh->bskh", f, p["lexicon_gate_kernel"]) + p["lexicon_gate_bias"]) * k
  elif method == "film":
    k = ((np.einsum("bsf,fkh->bskh", f, p["lexicon_scale_kernel"]) + p["lexicon_scale_bias"]) * k
         + np.einsum("bsf,fkh->bskh", f, p["lexicon_shift_kernel"]))
  else:
    bias = np.einsum("bsf,nf->bns", f, p["lexicon_query"])[:, :, None, :]     # [B, N, 1, S]
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  s = scale * (np.einsum("btnh,bsnh->bnts", q, k) + bias)
  if causal:
    s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", w, v)


@pytest.mark.parametrize("method", ["concat", "gate", "film"])
@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_equals_the_float64_formula(method, implementation):
  causal = method != "film"
  s_len = T if causal else S
  q, k, v = inputs.qkv(B=B, T=T, S=s_len, N=N, K=K, H=H, h=h, seed=1)
  lex, params = _lexicon(2, (B, s_len, F)), _params(3, method)
  fn = inputs.jit_with(lexicon_conditioned_attention, method=method, causal=causal,
                       implementation=implementation)
  out = fn(q, k, v, lexicon=lex, **params)
  want = _conditioned_float64(q, k, v, lex, method, params, causal=causal, scale=H ** -0.5)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


def _affective_attention_float64(hs, lex, w, method, params):
  """The authors' AffectiveAttention energies and representation (one sentence-level query w)."""
  hs, f, w = (np.asarray(x, np.float64) for x in (hs, lex, w))
  p = {name: np.asarray(x, np.float64)[:, 0] if x.ndim == 3 else np.asarray(x, np.float64)[0]
       for name, x in params.items() if name != "lexicon_query"}
  if method == "concat":
    energies = hs @ w + f @ np.asarray(params["lexicon_query"], np.float64)[0]
  elif method == "gate":
    c = 1 / (1 + np.exp(-(f @ p["lexicon_gate_kernel"] + p["lexicon_gate_bias"]))) * hs
    energies = c @ w
  else:
    # With the code's shift bias b_t (nn.Linear's bias), which the operator leaves out: it adds w·b_t
    # to every energy and so cannot change the weights.
    shift_bias = np.random.default_rng(0).standard_normal(hs.shape[-1])
    c = ((f @ p["lexicon_scale_kernel"] + p["lexicon_scale_bias"]) * hs
         + f @ p["lexicon_shift_kernel"] + shift_bias)
    energies = c @ w
  a = np.exp(energies - energies.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  return np.einsum("bs,bsd->bd", a, hs)


@pytest.mark.parametrize("method", ["concat", "gate", "film"])
def test_one_learned_query_over_the_states_is_the_authors_sentence_attention(method):
  # q = w (one query, one head), k = v = h, scale 1: the paper's e_j = w·c_j and r = Σ a_j h_j.
  hs = jax.random.normal(jax.random.PRNGKey(4), (B, S, H))
  w = jax.random.normal(jax.random.PRNGKey(5), (H,))
  lex = _lexicon(6)
  # One head: the kernels' [F, 1, H], the biases' [1, H], the query's [1, F].
  params = {name: x[:, :1] if x.ndim == 3 else x[:1] for name, x in _params(7, method).items()}
  q = jnp.broadcast_to(w, (B, 1, 1, H))
  out = inputs.jit_with(lexicon_conditioned_attention, method=method, scale=1.0)(
      q, hs[:, :, None], hs[:, :, None], lexicon=lex, **params)
  np.testing.assert_allclose(np.asarray(out)[:, 0, 0],
                             _affective_attention_float64(hs, lex, w, method, params), **F32)


def test_gate_with_zero_weights_is_a_constant_gate():
  q, k, v = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=h, seed=8)
  lex = _lexicon(9)
  zero = jnp.zeros((F, K, H))
  fn = inputs.jit_with(lexicon_conditioned_attention, method="gate")
  plain = inputs.jit_with(softmax_attention)
  # b = 0: every key halved, i.e. softmax at half the scale, which is not softmax attention.
  out = fn(q, k, v, lexicon=lex, lexicon_gate_kernel=zero, lexicon_gate_bias=jnp.zeros((K, H)))
  half = inputs.jit_with(softmax_attention, scale=0.5 * H ** -0.5)(q, k, v)
  np.testing.assert_allclose(np.asarray(out), np.asarray(half), **F32)
  assert tolerances.rel_rms(out, plain(q, k, v)) > tolerances.OTHER_FORMULA_REL_RMS
  # A saturated gate (σ(30) = 1 in float32) passes the keys unchanged: softmax attention.
  out = fn(q, k, v, lexicon=lex, lexicon_gate_kernel=zero,
           lexicon_gate_bias=jnp.full((K, H), 30.0))
  np.testing.assert_allclose(np.asarray(out), np.asarray(plain(q, k, v)), **F32)


@pytest.mark.parametrize("method", ["concat", "film"])
def test_identity_conditioning_is_softmax_attention(method):
  q, k, v = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=h, seed=10)
  if method == "concat":
    params = {"lexicon_query": jnp.zeros((N, F))}
  else:
    params = {"lexicon_scale_kernel": jnp.zeros((F, K, H)), "lexicon_scale_bias": jnp.ones((K, H)),
              "lexicon_shift_kernel": jnp.zeros((F, K, H))}
  out = inputs.jit_with(lexicon_conditioned_attention, method=method)(q, k, v, lexicon=_lexicon(11),
                                                                      **params)
  np.testing.assert_allclose(np.asarray(out), np.asarray(inputs.jit_with(softmax_attention)(q, k, v)),
                             **F32)


def test_bad_input_is_a_clear_error():
  q, k, v = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=h)
  lex, params = _lexicon(0), _params(0, "gate")
  with pytest.raises(ValueError, match=r"lexicon_conditioned_attention.*lexicon.*\[B, S, F\]"):
    lexicon_conditioned_attention(q, k, v, lexicon=lex[:, :3], **params)
  with pytest.raises(ValueError, match="method"):
    lexicon_conditioned_attention(q, k, v, lexicon=lex, method="sum", **params)
  with pytest.raises(ValueError, match="lexicon_scale_kernel"):
    lexicon_conditioned_attention(q, k, v, lexicon=lex, method="film", **params)
  with pytest.raises(ValueError, match=r"lexicon_gate_kernel.*\[F, K, H\]"):
    lexicon_conditioned_attention(q, k, v, lexicon=lex[..., :3], **params)
