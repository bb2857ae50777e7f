"""Linear attention mechanisms (attnjax/ops/linear_attention.py): each paper's defining property,
checked against an explicit evaluation of its formula written out here, plus every
`implementation=` against the `reference` form in outputs and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.core import feature_maps as fm
from attnjax.core import linear
from attnjax.ops import linear_attention as la
from tests import tolerances

IMPLS = ("xla", "parallel", "reference")


def _impls(name):
  """The implementations a mechanism lists (non-causal ones have two: linear and quadratic)."""
  return aj.get_mechanism(name).implementations


def _qkv(B=2, T=29, N=4, K=2, H=8, h=6, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(ks[0], (B, T, N, H)), jax.random.normal(ks[1], (B, T, K, H)),
          jax.random.normal(ks[2], (B, T, K, h)))


def _heads(x, N):
  """[B,S,K,*] -> [B,S,N,*] (GQA: each kv head serves N // K query heads)."""
  return jnp.repeat(x, N // x.shape[2], axis=2)


def _weighted(w, v):
  """`Σ_s w[b,n,t,s] v[b,s,n,:]` -> [B,T,N,h]."""
  return jnp.einsum("bnts,bsnh->btnh", w, v.astype(jnp.float32))


def _causal(T, S=None):
  return jnp.tril(jnp.ones((T, T if S is None else S), bool))


def _assert_rel(a, b, tol=tolerances.REL_RMS[jnp.float32]):
  err = tolerances.rel_rms(a, b)
  assert err < tol, err


# --- Cottention (#33): the recurrent and parallel forms give identical outputs --------------------

@pytest.mark.parametrize("causal", [True, False])
def test_cottention_recurrent_equals_parallel_cosine_form(causal):
  q, k, v = _qkv()
  N, T = q.shape[2], q.shape[1]
  exponent = jnp.linspace(-1.0, 1.0, N)
  sims = jnp.einsum("btnf,bsnf->bnts", fm.l2_normalize(q), fm.l2_normalize(_heads(k, N)))
  visible = _causal(T) if causal else jnp.ones((T, T), bool)
  n_t = jnp.sum(visible, axis=-1).astype(jnp.float32)                       # keys each query sees
  sigma = jax.nn.sigmoid(exponent)
  expected = _weighted(jnp.where(visible, sims, 0.0), _heads(v, N))
  expected = expected / n_t[None, :, None, None] ** sigma[None, None, :, None]
  for impl in IMPLS:
    out = la.cosine_linear_attention(q, k, v, causal=causal, length_exponent=exponent,
                                     implementation=impl)
    _assert_rel(out, expected)


# --- Efficient attention (#70): equals its quadratic evaluation -----------------------------------

def test_efficient_attention_equals_quadratic_evaluation():
  q, k, v = _qkv()
  N, H = q.shape[2], q.shape[3]
  s = H ** -0.25
  rho_q = jax.nn.softmax(q * s, axis=-1)                    # each query over its features
  rho_k = jax.nn.softmax(_heads(k, N) * s, axis=1)          # each key feature over positions
  expected = _weighted(jnp.einsum("btnf,bsnf->bnts", rho_q, rho_k), _heads(v, N))
  assert _impls("efficient_attention") == ("xla", "reference")
  for impl in _impls("efficient_attention"):
    _assert_rel(la.efficient_attention(q, k, v, implementation=impl), expected)


def test_efficient_attention_with_scaling_normalization_is_dot_product_attention():
  """The paper's equivalence: with ρ_q(Y) = ρ_k(Y) = Y / √n, `ρ_q(Q)(ρ_k(K)ᵀV) = (QKᵀ/n) V`, here
  against dot-product attention with scaling normalization in float64 (n: the real keys)."""
  q, k, v = _qkv()
  B, T, N, H = q.shape
  lengths = np.array([T, 17])
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
  kn, vn = np.repeat(kn, N // kn.shape[2], 2), np.repeat(vn, N // vn.shape[2], 2)
  expected = np.zeros(v.shape[:2] + (N, v.shape[-1]))
  for b in range(B):
    n = lengths[b]
    scores = H ** -0.5 * np.einsum("tnf,snf->nts", qn[b], kn[b, :n]) / n
    expected[b] = np.einsum("nts,snh->tnh", scores, vn[b, :n])
  garbage = k.at[1, 17:].set(1e4)                             # slots past the length are unused
  for impl in _impls("efficient_attention"):
    out = la.efficient_attention(q, garbage, v, normalization="scaling",
                                 kv_lengths=jnp.asarray(lengths), implementation=impl)
    _assert_rel(out, expected)


# --- Lightning Attention-2 (#79): the tiled form equals the plain recurrence ---------------------

@pytest.mark.parametrize("T,chunk", [(29, 8), (64, 16), (50, 64)])
def test_lightning_2_equals_plain_recurrence(T, chunk):
  q, k, v = _qkv(T=T, K=4)
  B, _, N, H = q.shape
  lam = np.exp(np.asarray(la.lightning_decay_rates(N)))
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
  expected = np.zeros(v.shape)
  state = np.zeros((B, N, H, v.shape[-1]))
  for t in range(T):   # S_t = λ S_{t-1} + k_t v_tᵀ, o_t = (q_t / √H) S_t
    state = lam[None, :, None, None] * state + np.einsum("bnf,bnh->bnfh", kn[:, t], vn[:, t])
    expected[:, t] = np.einsum("bnf,bnfh->bnh", qn[:, t] * H ** -0.5, state)
  out = la.lightning_attention_2(q, k, v, chunk_size=chunk, implementation="xla")
  _assert_rel(out, expected)


# --- Performer FAVOR+ (#152): an unbiased estimate of the softmax kernel --------------------------

FAVOR = aj.get_mechanism("favor_plus_attention")


def _layer_draws(key, count, m, H):
  """`count` independent draws of the random features, by the init the layer uses."""
  (spec,) = FAVOR.params
  return jax.jit(jax.vmap(lambda key: spec.init(key, (m, H))))(jax.random.split(key, count))


def test_favor_plus_features_are_fixed_orthogonal_draws():
  (spec,) = FAVOR.params
  assert not spec.trainable              # the layer keeps them in 'buffers', out of the optimizer
  H = 8
  w = spec.init(jax.random.PRNGKey(0), spec.shape(4, 2, H))
  assert w.shape == (4 * H, H)
  for block in np.split(np.asarray(w, np.float64), 4):
    gram = block @ block.T
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-4)
  assert np.std(np.linalg.norm(w, axis=-1)) > 0.1   # chi-distributed norms, not all √H


def test_favor_plus_kernel_estimate_is_unbiased_with_the_layers_draw():
  """Over independent draws of W by the layer's init (orthogonal blocks), the mean of φ(q)·φ(k) is
  exp(q·k) within its standard error."""
  H, m, draws = 8, 16, 4000
  kq, kk, kw = jax.random.split(jax.random.PRNGKey(0), 3)
  q = 0.4 * jax.random.normal(kq, (5, H))
  k = 0.4 * jax.random.normal(kk, (5, H))
  exact = jnp.exp(jnp.sum(q * k, axis=-1))
  ws = _layer_draws(kw, draws, m, H)
  samples = jax.vmap(lambda w: jnp.sum(fm.favor_plus(q, w) * fm.favor_plus(k, w), axis=-1))(ws)
  mean, stderr = jnp.mean(samples, 0), jnp.std(samples, 0) / draws ** 0.5
  z = np.asarray(jnp.abs(mean - exact) / stderr)
  assert np.all(z < 4.5), z     # 4.5 standard errors: a false alarm once in ~10^5 runs per pair
  assert np.all(samples > 0)    # positive features: every estimate is a valid (positive) weight


@pytest.mark.parametrize("causal", [False, True])
def test_favor_plus_attention_error_shrinks_with_the_number_of_features(causal):
  """The mechanism's output converges to softmax attention like the Monte-Carlo 1/√m."""
  B, T, N, H, h = 1, 16, 2, 8, 8
  q, k, v = _qkv(B=B, T=T, N=N, K=N, H=H, h=h, seed=3)
  q, k = 0.5 * q, 0.5 * k
  exact = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  ws = _layer_draws(jax.random.PRNGKey(1), 8, 256, H)
  run = jax.jit(jax.vmap(lambda w: la.favor_plus_attention(q, k, v, projection=w, causal=causal)))

  def mean_error(m):             # the first m rows of an orthogonal draw are an orthogonal draw
    out = run(ws[:, :m])
    return float(jnp.mean(jnp.sqrt(jnp.mean((out - exact) ** 2, axis=(1, 2, 3, 4))
                                   / jnp.mean(exact ** 2))))

  e4, e32, e256 = mean_error(4), mean_error(32), mean_error(256)
  # 1/√m predicts 2.8x for 8x the features and 8x for 64x; eight draws leave room for noise.
  assert e4 / e32 > 1.8 and e4 / e256 > 4.0 and e256 < 0.15, (e4, e32, e256)


def _favor_float64(q, k, v, w, *, causal):
  """FAVOR+ attention with the same features, unstabilized, in float64 log space:
  `A_ts = Σ_m exp(a_tm + b_sm)`, a, b the exponents `w·x - ‖x‖²/2` of x·scale^{1/2}."""
  q, k, v, w = (np.asarray(x, np.float64) for x in (q, k, v, w))
  N, H = q.shape[2], q.shape[3]
  exponents = lambda x: (np.einsum("...f,mf->...m", x * H ** -0.25, w)
                         - 0.5 * np.sum((x * H ** -0.25) ** 2, -1, keepdims=True))
  a, b = exponents(q), np.repeat(exponents(k), N // k.shape[2], 2)
  log_w = np.logaddexp.reduce(a[:, :, None] + b[:, None], axis=-1)            # [B,T,S,N]
  if causal:
    log_w = np.where(np.tril(np.ones(log_w.shape[1:3], bool))[None, :, :, None], log_w, -np.inf)
  p = np.exp(log_w - log_w.max(2, keepdims=True))
  return np.einsum("btsn,bsnh->btnh", p / p.sum(2, keepdims=True), np.repeat(v, N // v.shape[2], 2))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("factor", [10.0, 30.0])
def test_favor_plus_large_inputs_stay_exact(factor, causal):
  """q, k ×10 and ×30 (exponents in the hundreds): no row collapses to zero, and the stabilized
  float32 result equals the same estimate computed exactly (float64, log space)."""
  q, k, v = _qkv()
  w = FAVOR.example_kwargs["projection"]
  out = jax.jit(functools.partial(la.favor_plus_attention, projection=w, causal=causal))(
      factor * q, factor * k, v)
  assert not np.any(np.all(np.asarray(out) == 0, axis=-1))
  _assert_rel(out, _favor_float64(factor * q, factor * k, v, w, causal=causal))


def test_favor_plus_recurrent_decode_of_large_inputs_from_a_zero_state():
  """The carried running max keeps decoding exact at large scale; an all-zero state (as a layer
  initializes it) is the empty state."""
  q, k, v = _qkv(T=12)
  q, k = 30.0 * q, 30.0 * k
  w = FAVOR.example_kwargs["projection"]
  favor = jax.jit(functools.partial(la.favor_plus_attention, projection=w, causal=True))
  recurrent = jax.jit(functools.partial(la.favor_plus_attention, projection=w, causal=True,
                                        return_final_state=True))
  full = favor(q, k, v)
  state = jax.tree.map(jnp.zeros_like, jax.eval_shape(recurrent, q, k, v)[1])
  outs = []
  for part in (slice(0, 5), slice(5, 12)):                   # a prefill, then the rest
    out, state = recurrent(q[:, part], k[:, part], v[:, part], initial_state=state)
    outs.append(out)
  _assert_rel(jnp.concatenate(outs, axis=1), full)
  _assert_rel(full, _favor_float64(q, k, v, w, causal=True))


@pytest.mark.parametrize("causal", [False, True])
def test_favor_plus_packed_documents_of_different_scales(causal):
  """The key maxima are per document: a small-scale document packed after a large one is as exact
  as alone."""
  q, k, v = _qkv(T=20)
  boost = jnp.where(jnp.arange(20) < 9, 30.0, 1.0)[None, :, None, None]
  q, k = q * boost, k * boost
  w = FAVOR.example_kwargs["projection"]
  seg = jnp.broadcast_to((jnp.arange(20) >= 9).astype(jnp.int32), (2, 20))
  packed = jax.jit(functools.partial(la.favor_plus_attention, projection=w, causal=causal))(
      q, k, v, segment_ids=seg)
  for part in (slice(0, 9), slice(9, 20)):
    alone = _favor_float64(q[:, part], k[:, part], v[:, part], w, causal=causal)
    _assert_rel(packed[:, part], alone)


# --- Linear log-normal attention (#98): concentration that tracks softmax's ---------------------

def _entropy(weights):
  """Mean over queries of the entropy (nats) of attention rows."""
  return float(jnp.mean(-jnp.sum(weights * jnp.log(jnp.maximum(weights, 1e-30)), axis=-1)))


def _normalized(w):
  return w / jnp.sum(w, -1, keepdims=True)


def test_lognormal_attention_concentration_tracks_softmax_across_temperatures():
  """The paper's claim: with moment-matched α, β, LLN's attention entropy follows softmax's as the
  temperature varies (from near-uniform to concentrated), while elu+1 linear attention cannot
  concentrate (its entropy stays at log T whatever the temperature)."""
  B, T, N, H = 1, 128, 2, 16
  kq, kk = jax.random.split(jax.random.PRNGKey(0))
  q, k = jax.random.normal(kq, (B, T, N, H)), jax.random.normal(kk, (B, T, N, H))
  temps = jax.jit(lambda sc: fm.lognormal_temperatures(q, k, scale=sc))
  elu = _normalized(jnp.einsum("btnf,bsnf->bnts", fm.elu_plus_one(q), fm.elu_plus_one(k)))
  h_sm, h_lln = [], []
  for c in (0.5, 1.0, 2.0, 3.0):                              # scale = c / √H
    sc = c * H ** -0.5
    h_sm.append(_entropy(jax.nn.softmax(sc * jnp.einsum("btnf,bsnf->bnts", q, k), axis=-1)))
    alpha, beta = temps(sc)
    h_lln.append(_entropy(_normalized(jnp.einsum(
        "btnf,bsnf->bnts", jnp.exp(alpha[:, None, :, None] * q),
        jnp.exp(beta[:, None, :, None] * k)))))
  h_sm, h_lln = np.array(h_sm), np.array(h_lln)
  span = h_sm[0] - h_sm[-1]                                   # softmax: ~4.7 -> ~2.1 nats
  assert span > 0.4 * np.log(T) and np.all(np.diff(h_lln) < 0), (h_sm, h_lln)
  assert np.corrcoef(h_sm, h_lln)[0, 1] > 0.98, (h_sm, h_lln)
  assert np.max(np.abs(h_lln - h_sm)) < 0.4 * span, (h_sm, h_lln)
  assert _entropy(elu) > np.log(T) - 0.05 > h_sm[1]


def test_lognormal_temperatures_agree_with_the_authors_fitted_formula():
  """At the authors' head size (64), the bisection's σ̃ is close to their closed-form fit
  `σ̃² = (σ_sm² - b) / (2a)`, a = 0.1486, b = -0.3549 (α = σ̃/σ_q, β = σ̃/σ_k)."""
  B, T, N, H = 1, 128, 1, 64
  kq, kk = jax.random.split(jax.random.PRNGKey(1))
  q, k = jax.random.normal(kq, (B, T, N, H)), 1.5 * jax.random.normal(kk, (B, T, N, H))
  sig_q, sig_k = float(jnp.std(q)), float(jnp.std(k))
  for c in (1.0, 2.0, 3.0):
    alpha, beta = fm.lognormal_temperatures(q, k, scale=c * H ** -0.5)
    sig_sm2 = (c * sig_q * sig_k) ** 2                      # Var(scale · q·k) for Gaussian q, k
    fitted = ((sig_sm2 + 0.35487) / (2 * 0.148552)) ** 0.5
    np.testing.assert_allclose(float(alpha[0, 0]) * sig_q, fitted, rtol=0.15)
    np.testing.assert_allclose(float(beta[0, 0]) * sig_k, fitted, rtol=0.15)


def _lln_expected(q, k, v, alpha, beta):
  """Normalized `exp(α_n q)·exp(β_n k)` weights, α, β `[B,N]`, each query head with its own."""
  N = q.shape[2]
  kr, vr = _heads(k, N), _heads(v, N)
  w = jnp.einsum("btnf,bsnf->bnts", jnp.exp(alpha[:, None, :, None] * q),
                 jnp.exp(beta[:, None, :, None] * kr))
  return _weighted(_normalized(w), vr)


def test_lognormal_attention_uses_each_heads_temperatures_under_gqa():
  q, k, v = _qkv()                                            # N = 4 query heads share K = 2
  q = q * jnp.asarray([0.5, 1.0, 1.5, 2.0])[:, None]         # heads of different spread
  alpha, beta = jnp.asarray([0.3, 0.5, 0.7, 0.9]), jnp.asarray([0.8, 0.6, 0.4, 0.2])
  expected = _lln_expected(q, k, v, jnp.broadcast_to(alpha, (2, 4)), jnp.broadcast_to(beta, (2, 4)))
  assert _impls("linear_lognormal_attention") == ("xla", "reference")
  for impl in _impls("linear_lognormal_attention"):
    _assert_rel(la.linear_lognormal_attention(q, k, v, alpha=alpha, beta=beta,
                                              implementation=impl), expected)
  # Estimated: per example and per head, each query head applying its own β to the shared keys.
  a, b = fm.lognormal_temperatures(q, k, scale=q.shape[-1] ** -0.5)
  assert a.shape == (2, 4) and float(jnp.min(jnp.abs(jnp.diff(a, axis=1)))) > 1e-3
  _assert_rel(la.linear_lognormal_attention(q, k, v), _lln_expected(q, k, v, a, b))


def test_lognormal_estimated_temperatures_keep_examples_independent():
  q, k, v = _qkv()
  out = la.linear_lognormal_attention(q, k, v)
  other = [3.0 * x for x in _qkv(seed=5)]
  changed = [x.at[1].set(y[1]) for x, y in zip((q, k, v), other, strict=True)]
  out2 = la.linear_lognormal_attention(*changed)
  np.testing.assert_allclose(out2[0], out[0], **tolerances.output(jnp.float32))
  assert tolerances.rel_rms(out2[1], out[1]) > 1e-3


def test_lognormal_scale_with_explicit_alpha_is_an_error():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="linear_lognormal_attention: `scale`"):
    la.linear_lognormal_attention(q, k, v, alpha=jnp.ones(4), scale=0.5)


# --- TaylorShift (#177) and FAST (#87): the linear form equals the direct Taylor-softmax ----------

def _taylor_softmax(x, visible):
  w = jnp.where(visible, 1.0 + x + 0.5 * x * x, 0.0)
  return w / jnp.sum(w, -1, keepdims=True)


@pytest.mark.parametrize("causal", [True, False])
def test_taylor_shift_linear_form_equals_direct_taylor_softmax(causal):
  q, k, v = _qkv()
  N, T, H = q.shape[2], q.shape[1], q.shape[3]
  x = H ** -0.5 * jnp.einsum("btnf,bsnf->bnts", q, _heads(k, N))
  visible = _causal(T) if causal else jnp.ones((T, T), bool)
  expected = _weighted(_taylor_softmax(x, visible), _heads(v, N))
  for form in ("linear", "direct"):
    for impl in IMPLS:
      out = la.taylor_shift_attention(q, k, v, causal=causal, form=form, implementation=impl)
      _assert_rel(out, expected, 5e-5)   # the linear form sums H² features: a little more rounding


def test_taylor_shift_auto_switches_at_the_crossover_length():
  H, h = 8, 6
  crossover = la.taylor_crossover_length(H, h)
  # Cost model: linear T·(1+H+H²)·(h+1) against direct T²·(H+h).
  assert (crossover - 1) * (H + h) < (1 + H + H * H) * (h + 1) <= crossover * (H + h)
  seen = []
  original = la._taylor_direct

  def spy(*args, **kwargs):
    seen.append(args[0].shape[1])
    return original(*args, **kwargs)

  la._taylor_direct = spy
  try:
    for T in (crossover - 1, crossover):
      q, k, v = _qkv(B=1, T=T, H=H, h=h)
      la.taylor_shift_attention(q, k, v, form="auto")
  finally:
    la._taylor_direct = original
  assert seen == [crossover - 1]


def test_fastmax_equals_polynomial_weights_of_standardized_scores():
  q, k, v = _qkv()
  N, T, H = q.shape[2], q.shape[1], q.shape[3]

  def standardize(x):
    x = x - x.mean(-1, keepdims=True)
    return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)

  x = H ** -0.5 * jnp.einsum("btnf,bsnf->bnts", standardize(q), _heads(standardize(k), N))
  weights = _taylor_softmax(x, _causal(T))
  assert float(jnp.min(jnp.where(_causal(T), 1.0 + x + 0.5 * x * x, 1.0))) > 0   # never negative
  expected = _weighted(weights, _heads(v, N))
  for impl in IMPLS:
    _assert_rel(la.fastmax_attention(q, k, v, causal=True, implementation=impl), expected, 5e-5)


# --- ReGLA (#234): the refining gate, and recurrent = chunked ------------------------------------

def test_refining_gate_lies_between_its_bounds_and_reaches_both_ends():
  g = jnp.linspace(0.0, 1.0, 101)[:, None]
  r = jnp.linspace(0.0, 1.0, 11)[None, :]
  gated = la.refined_gate(g, r)
  assert bool(jnp.all(gated >= g * g - 1e-7)) and bool(jnp.all(gated <= 1 - (1 - g) ** 2 + 1e-7))
  np.testing.assert_allclose(la.refined_gate(g, 0.0), g * g, atol=1e-7)
  np.testing.assert_allclose(la.refined_gate(g, 1.0), 1 - (1 - g) ** 2, atol=1e-7)
  # The refined gate moves further than σ allows: d g'/d g at r=1, g→0 is 2 (twice the plain gate).
  grad = jax.grad(lambda g0: la.refined_gate(g0, 1.0))(0.0)
  assert abs(float(grad) - 2.0) < 1e-6


def _regla_params(N=4, H=8, seed=1):
  ks = jax.random.split(jax.random.PRNGKey(seed), 2)
  return dict(gate_kernel=0.3 * jax.random.normal(ks[0], (N, H, H)), gate_bias=jnp.ones((N, H)),
              refine_kernel=0.3 * jax.random.normal(ks[1], (N, H, H)),
              refine_bias=jnp.zeros((N, H)))


@pytest.mark.parametrize("T", [29, pytest.param(100, marks=pytest.mark.slow)])
def test_regla_recurrent_and_chunked_forms_agree_with_gradients(T):
  q, k, v = _qkv(T=T)
  params = _regla_params()

  def loss(impl, q, k, v, params):
    o = la.refined_gated_linear_attention(q, k, v, implementation=impl, **params)
    return jnp.sum(o * jnp.cos(jnp.arange(o.size).reshape(o.shape)))

  ref = jax.value_and_grad(loss, argnums=(1, 2, 3, 4))("reference", q, k, v, params)
  for impl in ("xla", "parallel"):
    got = jax.value_and_grad(loss, argnums=(1, 2, 3, 4))(impl, q, k, v, params)
    _assert_rel(got[0], ref[0])
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(ref[1]), strict=True):
      _assert_rel(a, b, tolerances.GRAD_REL_RMS[jnp.float32])


# --- RALA (#93): the rank augmentation lifts the output's rank above the feature dimension --------

def test_rank_augmented_output_has_higher_rank_than_plain_linear_attention():
  B, T, N, H, h = 1, 32, 1, 2, 16    # two features: plain linear attention outputs have rank <= 2
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  q, k = jax.random.normal(ks[0], (B, T, N, H)), jax.random.normal(ks[1], (B, T, N, H))
  v = jax.random.normal(ks[2], (B, T, N, h))
  plain = aj.gated_linear_attention(fm.elu_plus_one(q), fm.elu_plus_one(k), v, causal=False,
                                    normalize=True, scale=1.0)
  rala = la.rank_augmented_linear_attention(q, k, v)
  rank = lambda o: int(np.linalg.matrix_rank(np.asarray(o[0, :, 0], np.float64), tol=1e-4))
  assert rank(plain) <= H
  assert rank(rala) > 4 * H


def test_rank_augmented_equals_explicit_formula():
  q, k, v = _qkv(K=4)
  B, T, N, H = q.shape
  qbar = q.mean(1)                                                      # [B,N,H] global query
  alpha = T * jax.nn.softmax(H ** -0.5 * jnp.einsum("bnf,bsnf->bsn", qbar, k), axis=1)
  w = jnp.einsum("btnf,bsnf->bnts", fm.elu_plus_one(q), fm.elu_plus_one(k))
  w = w * jnp.transpose(alpha, (0, 2, 1))[:, :, None, :]
  expected = _weighted(w / jnp.sum(w, -1, keepdims=True), v) * v
  assert _impls("rank_augmented_linear_attention") == ("xla", "reference")
  for impl in _impls("rank_augmented_linear_attention"):
    _assert_rel(la.rank_augmented_linear_attention(q, k, v, implementation=impl), expected)


# --- Latte (#96): the latent factorization, and constant-size decoding ----------------------------

def _latte_params(N=4, K=2, H=8, L=5):
  ks = jax.random.split(jax.random.PRNGKey(3), 2)
  return (0.5 * jax.random.normal(ks[0], (N, H, L)), 0.5 * jax.random.normal(ks[1], (K, H, L)))


def test_latte_equals_explicit_latent_mixture():
  q, k, v = _qkv()
  wq, wk = _latte_params()
  N, T = q.shape[2], q.shape[1]
  p_l = jax.nn.softmax(jnp.einsum("btnf,nfl->btnl", q, wq), axis=-1)            # p(l | t)
  logits = jnp.einsum("bskf,kfl->bksl", k, wk)                                   # [B,K,S,L]
  logits = jnp.repeat(logits, N // k.shape[2], axis=1)                           # [B,N,S,L]
  causal = _causal(T)
  # p(s | l, t) = exp(k_s·w_l) / Σ_{s'≤t} exp(k_s'·w_l)
  e = jnp.where(causal[None, None, :, :, None], jnp.exp(logits)[:, :, None], 0.0)  # [B,N,T,S,L]
  p_s = e / jnp.sum(e, axis=3, keepdims=True)
  expected = jnp.einsum("btnl,bntsl,bsnh->btnh", p_l, p_s, _heads(v, N))
  for impl in IMPLS:
    _assert_rel(la.latte_attention(q, k, v, query_latents=wq, key_latents=wk, implementation=impl),
                expected)


def test_latte_decoding_state_is_constant_in_length():
  """A generated token reads `L·(h+1)` numbers per head however long the prefix: the step form."""
  q, k, v = _qkv(B=1, T=40)
  wq, wk = _latte_params()
  full = la.latte_attention(q, k, v, query_latents=wq, key_latents=wk)
  # Run the same mechanism token by token through the primitive's one-step decode.
  B, T, N, _ = q.shape
  K, L, h = k.shape[2], wq.shape[-1], v.shape[-1]
  state = linear.zero_state(B, N * L, 1, h, normalize=True)
  sizes, outs = set(), []
  for t in range(T):
    kf = jnp.exp(jnp.einsum("bkf,kfl->bkl", k[:, t], wk))
    kf = jnp.repeat(kf.reshape(B, K, 1, L), N // K, 2).reshape(B, N * L, 1)
    vl = jnp.repeat(jnp.broadcast_to(v[:, t, :, None, None], (B, K, 1, L, h)), N // K, 2)
    o, state = aj.gated_linear_attention_step(jnp.ones((B, N * L, 1)), kf, vl.reshape(B, N * L, h),
                                              state, normalize=True, scale=1.0)
    sizes.add(sum(x.size for x in jax.tree.leaves(state)))
    p_l = jax.nn.softmax(jnp.einsum("bnf,nfl->bnl", q[:, t], wq), axis=-1)
    outs.append(jnp.einsum("bnl,bnlh->bnh", p_l, o.reshape(B, N, L, h)))
  assert sizes == {B * N * L * (h + 1)}
  _assert_rel(jnp.stack(outs, 1), full, 1e-4)


# --- Recurrent decoding (Mechanism.recurrent): the carried state and its argument checks ----------


def test_cottention_recurrent_decode_with_per_row_offsets_and_padding():
  """Rows at different positions decode together; the `n_t^σ` count comes from each row's
  q_offset, and new tokens past kv_lengths leave the state alone."""
  q, k, v = _qkv(T=12)
  full = la.cosine_linear_attention(q, k, v, causal=True)
  # Row 0 has consumed 5 tokens, row 1 has consumed 8; each then reads its next 3.
  starts = (5, 8)
  _, s0 = la.cosine_linear_attention(q[:1, :5], k[:1, :5], v[:1, :5], causal=True,
                                     return_final_state=True)
  _, s1 = la.cosine_linear_attention(q[1:, :8], k[1:, :8], v[1:, :8], causal=True,
                                     return_final_state=True)
  take = lambda x: jnp.stack([x[0, 5:8], x[1, 8:11]])
  out, state = la.cosine_linear_attention(
      take(q), take(k), take(v), causal=True, q_offset=jnp.array(starts),
      initial_state=jnp.concatenate([s0, s1]), return_final_state=True,
      kv_lengths=jnp.array([3, 2]))
  _assert_rel(out[0], full[0, 5:8])
  _assert_rel(out[1, :2], full[1, 8:10])
  # Row 1's third token was padding: its state is the state after token 9.
  _, after = la.cosine_linear_attention(q[1:, :10], k[1:, :10], v[1:, :10], causal=True,
                                        return_final_state=True)
  _assert_rel(state[1:], after)


def test_recurrent_decode_argument_errors():
  q, k, v = _qkv(T=6)
  run = functools.partial(la.lightning_attention_2, q, k, v)
  with pytest.raises(ValueError, match="causal"):
    run(causal=False, return_final_state=True)
  with pytest.raises(ValueError, match="segment_ids"):
    run(segment_ids=jnp.zeros((2, 6), jnp.int32), return_final_state=True)
  with pytest.raises(ValueError, match="return_final_state"):
    run(initial_state=linear.zero_state(2, 4, 8, 6))
  with pytest.raises(ValueError, match=r"initial_state.*\[B,N,F,h\]"):
    run(initial_state=jnp.zeros((2, 4, 8, 5)), return_final_state=True)
  with pytest.raises(ValueError, match="same length"):
    la.lightning_attention_2(q[:, :2], k, v, return_final_state=True)
  with pytest.raises(ValueError, match="form='linear'"):
    la.taylor_shift_attention(q, k, v, causal=True, form="direct", return_final_state=True)


@pytest.mark.parametrize("name", ["cosine_linear_attention", "latte_attention"])
def test_mechanisms_without_a_scale_reject_one(name):
  mech = aj.get_mechanism(name)
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=f"{name}: the paper has no `scale`"):
    mech.fn(q, k, v, scale=0.5, **mech.example_kwargs)


def test_linear_mechanisms_document_the_recurrent_state_contract():
  for mech in aj.list_mechanisms():
    if mech.fn.__module__ == la.__name__ and mech.recurrent:
      doc = " ".join(mech.fn.__doc__.split())
      assert "`initial_state` needs `return_final_state=True`" in doc, mech.name
