"""Linear attention mechanisms (attnjax/ops/linear_attention.py): each paper's defining property, checked
against an explicit evaluation of its formula written out here, plus every `implementation=` against the
`reference` scan in outputs and gradients."""

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


# --- Cottention (#33): the recurrent and parallel forms give identical outputs ----------------------

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
  for impl in IMPLS:
    _assert_rel(la.efficient_attention(q, k, v, implementation=impl), expected)


def test_efficient_attention_with_scaling_normalization_is_dot_product_attention():
  """The paper's equivalence: with ρ_q(Y) = ρ_k(Y) = Y / √n, `ρ_q(Q)(ρ_k(K)ᵀV) = (QKᵀ/n) V`."""
  q, k, v = _qkv(K=4)
  T = q.shape[1]
  out = aj.gated_linear_attention(q / T ** 0.5, k / T ** 0.5, v, causal=False, scale=1.0)
  expected = _weighted(jnp.einsum("btnf,bsnf->bnts", q, k) / T, v)
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


# --- Performer FAVOR+ (#152): an unbiased estimate of the softmax kernel ---------------------------

def test_favor_plus_kernel_estimate_is_unbiased():
  """Over many independent draws of W, the mean of φ(q)·φ(k) is exp(q·k) within its standard error."""
  H, m, draws = 8, 16, 4000
  kq, kk, kw = jax.random.split(jax.random.PRNGKey(0), 3)
  q = 0.4 * jax.random.normal(kq, (5, H))
  k = 0.4 * jax.random.normal(kk, (5, H))
  exact = jnp.exp(jnp.sum(q * k, axis=-1))

  def estimate(key):
    w = jax.random.normal(key, (m, H))
    return jnp.sum(fm.favor_plus(q, w) * fm.favor_plus(k, w), axis=-1)

  samples = jax.vmap(estimate)(jax.random.split(kw, draws))
  mean, stderr = jnp.mean(samples, 0), jnp.std(samples, 0) / draws ** 0.5
  z = np.asarray(jnp.abs(mean - exact) / stderr)
  assert np.all(z < 4.5), z     # 4.5 standard errors: a false alarm once in ~10^5 runs per pair
  assert np.all(samples > 0)    # positive features: every estimate is a valid (positive) weight


@pytest.mark.slow
def test_favor_plus_attention_converges_to_softmax_attention_as_features_grow():
  q, k, v = _qkv(T=24, K=4, h=8, seed=3)
  q, k = 0.5 * q, 0.5 * k
  exact = jax.nn.dot_product_attention(q, k, v)

  def mean_error(m, draws=6):
    errs = []
    for i in range(draws):
      w = fm.orthogonal_random_features(jax.random.PRNGKey(100 + i), m, q.shape[-1])
      errs.append(tolerances.rel_rms(la.favor_plus_attention(q, k, v, projection=w), exact))
    return float(np.mean(errs))

  e16, e256, e2048 = mean_error(16), mean_error(256), mean_error(2048)
  # The Monte-Carlo error shrinks like 1/√m (4x for 16x the features, 11x for 128x); six draws
  # per size leave room for sampling noise, so ask for 2x and 4x.
  assert e16 / e256 > 2.0 and e16 / e2048 > 4.0 and e2048 < 0.1, (e16, e256, e2048)


def test_orthogonal_random_features_are_orthogonal_within_blocks():
  w = fm.orthogonal_random_features(jax.random.PRNGKey(0), 20, 8)
  assert w.shape == (20, 8)
  for block in (w[:8], w[8:16]):
    gram = block @ block.T
    np.testing.assert_allclose(gram - jnp.diag(jnp.diag(gram)), 0.0, atol=1e-4)


# --- Linear log-normal attention (#98): matches softmax attention's concentration ----------------

def _log_weight_variance(weights):
  """Mean over queries of the variance (over keys) of log attention weights."""
  return float(jnp.mean(jnp.var(jnp.log(weights), axis=-1)))


def test_lognormal_attention_matches_softmax_concentration():
  """With moment-matched α, the spread of LLN's log weights is close to softmax's; elu+1 linear
  attention is far flatter (the failure the paper fixes)."""
  B, T, N, H = 1, 256, 1, 32
  kq, kk = jax.random.split(jax.random.PRNGKey(0))
  q = 1.5 * jax.random.normal(kq, (B, T, N, H))
  k = 1.5 * jax.random.normal(kk, (B, T, N, H))
  scale = H ** -0.5
  softmax_w = jax.nn.softmax(scale * jnp.einsum("btnf,bsnf->bnts", q, k), axis=-1)
  alpha = la.lognormal_alpha(q, k, scale=scale)
  lln = jnp.einsum("btnf,bsnf->bnts", jnp.exp(alpha * q), jnp.exp(alpha * k))
  elu = jnp.einsum("btnf,bsnf->bnts", fm.elu_plus_one(q), fm.elu_plus_one(k))
  var_sm = _log_weight_variance(softmax_w)
  var_lln = _log_weight_variance(lln / jnp.sum(lln, -1, keepdims=True))
  var_elu = _log_weight_variance(elu / jnp.sum(elu, -1, keepdims=True))
  assert 0.8 < var_lln / var_sm < 1.25, (var_lln, var_sm)   # α fit on a 64x64 subsample
  assert var_elu / var_sm < 0.25, (var_elu, var_sm)


def test_lognormal_attention_equals_its_quadratic_form():
  q, k, v = _qkv(K=4)
  alpha = jnp.asarray([0.3, 0.5, 0.7, 0.9])
  w = jnp.einsum("btnf,bsnf->bnts", jnp.exp(alpha[:, None] * q), jnp.exp(alpha[:, None] * k))
  expected = _weighted(w / jnp.sum(w, -1, keepdims=True), v)
  for impl in IMPLS:
    _assert_rel(la.linear_lognormal_attention(q, k, v, alpha=alpha, implementation=impl), expected)


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


@pytest.mark.slow
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
              refine_kernel=0.3 * jax.random.normal(ks[1], (N, H, H)), refine_bias=jnp.zeros((N, H)))


@pytest.mark.slow
@pytest.mark.parametrize("T", [29, 100])
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
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(ref[1])):
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
  for impl in IMPLS:
    _assert_rel(la.rank_augmented_linear_attention(q, k, v, implementation=impl), expected)


# --- Latte (#96): the latent factorization, and constant-size decoding -----------------------------

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
