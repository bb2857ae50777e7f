"""Differential attention (DIFF Transformer) and OpAmp attention (#172): two softmax maps combined as
an amplifier's differential-mode and common-mode terms.

Checked against float64 rewrites of the papers' equations (DIFF: half-head maps, λ = exp(λq1·λk1) -
exp(λq2·λk2) + λ_init, the per-head RMSNorm times 1 - λ_init; OpAmp: residual adapters on q and k,
A_d (M1 - M2) + (A_c/2)(M1 + M2) with A_c = 1, A_d = CMRR), gradients against a dense form, and the
defining relations: λ = 0 without the norm is softmax over the first half-heads; zero-initialized
adapters leave the pretrained softmax attention unchanged; OpAmp's output over A_d tends to the
differential attention (M1 - M2) V as the CMRR grows (error exactly the common-mode term over K); and
DIFF is OpAmp's combination with CMRR K = (1 + λ)/(2(1 - λ)) once its RMSNorm removes the gain.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import param_tables
from attnjax.ops.softmax import differential_attention, opamp_attention, softmax_attention
from attnjax.ops.softmax.differential import OPAMP_TABLE, lambda_init_fn, two_map_attention
from attnjax.registry import example_params
from tests import inputs
from tests import tolerances

F32 = tolerances.output(jnp.float32)
B, T, S, N, K, H, h = 2, 11, 13, 4, 2, 8, 6


def _softmax_maps64(q, k, *, causal, scale, q_offset=0):
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) * scale
  Tq, Sk = s.shape[-2:]
  visible = (np.arange(Sk)[None] <= np.arange(Tq)[:, None] + q_offset) if causal else \
      np.ones((Tq, Sk), bool)
  s = np.where(visible, s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  return w / w.sum(-1, keepdims=True)


def _diff64(q, k, v, p, *, causal, lambda_init, eps=1e-5):
  """DIFF Transformer per the paper and the authors' multihead_flashdiff_1.py, in float64."""
  d = q.shape[-1] // 2
  m1 = _softmax_maps64(q[..., :d], k[..., :d], causal=causal, scale=d ** -0.5)
  m2 = _softmax_maps64(q[..., d:], k[..., d:], causal=causal, scale=d ** -0.5)
  f = {name: np.asarray(x, np.float64) for name, x in p.items()}
  lam = (np.exp(np.sum(f["lambda_q1"] * f["lambda_k1"], -1))
         - np.exp(np.sum(f["lambda_q2"] * f["lambda_k2"], -1)) + lambda_init)
  lam = np.broadcast_to(lam, (q.shape[2],))[None, :, None, None]
  vf = np.repeat(np.asarray(v, np.float64), q.shape[2] // v.shape[2], axis=2)
  attn = np.einsum("bnts,bsnh->btnh", m1 - lam * m2, vf)
  normed = attn / np.sqrt(np.mean(attn ** 2, -1, keepdims=True) + eps) * f["norm_scale"]
  return normed * (1 - lambda_init)


def _diff_params(seed, *, per_head=False):
  rng = np.random.default_rng(seed)
  shape = (N, H // 2) if per_head else (H // 2,)
  p = {name: (0.3 * rng.standard_normal(shape)).astype(np.float32)
       for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")}
  p["norm_scale"] = (1 + 0.3 * rng.standard_normal((N, h) if per_head else (h,))).astype(np.float32)
  return p


def _opamp_params(seed, perturb=0.2):
  specs = param_tables.param_specs(OPAMP_TABLE, h=h)
  return example_params(specs, N=N, K=K, H=H, seed=seed, perturb=perturb)


def _opamp64(q, k, v, p, *, causal, cmrr, common_mode_gain=1.0):
  """OpAmp per the paper: E(x) = silu(x W1) W2 + x on the concatenated heads, then
  A_d (M1 - M2) + (A_c/2)(M1 + M2) with A_d = K A_c, in float64."""
  silu = lambda x: x / (1 + np.exp(-x))

  def adapt(x, name):
    x = np.asarray(x, np.float64)
    flat = x.reshape(x.shape[:2] + (-1,))
    down, up = (np.asarray(p[f"adapter_{name}_{part}"], np.float64) for part in ("down", "up"))
    return (silu(flat @ down) @ up + flat).reshape(x.shape)

  scale = q.shape[-1] ** -0.5
  m1 = _softmax_maps64(adapt(q, "q1"), adapt(k, "k1"), causal=causal, scale=scale)
  m2 = _softmax_maps64(adapt(q, "q2"), adapt(k, "k2"), causal=causal, scale=scale)
  a_c = common_mode_gain
  a_d = cmrr * a_c
  vf = np.repeat(np.asarray(v, np.float64), q.shape[2] // v.shape[2], axis=2)
  return np.einsum("bnts,bsnh->btnh", a_d * (m1 - m2) + a_c / 2 * (m1 + m2), vf)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
@pytest.mark.parametrize("per_head", [False, True])
def test_differential_equals_the_papers_equations(implementation, per_head):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=1)
  p = _diff_params(2, per_head=per_head)
  out = inputs.jit_with(differential_attention, causal=True, layer_index=3,
                        implementation=implementation)(q, k, v, **p)
  want = _diff64(q, k, v, p, causal=True, lambda_init=lambda_init_fn(3))
  np.testing.assert_allclose(np.asarray(out), want, **F32)


def test_lambda_init_follows_the_layer_depth():
  # λ_init = 0.8 - 0.6 exp(-0.3 (l - 1)), layer l = layer_index + 1.
  np.testing.assert_allclose([lambda_init_fn(i) for i in (0, 1, 5)],
                             [0.2, 0.8 - 0.6 * np.exp(-0.3), 0.8 - 0.6 * np.exp(-1.5)],
                             **tolerances.ELEMENTWISE[jnp.float32])


def test_lambda_zero_without_norm_is_softmax_of_the_first_half_heads():
  # Zero λ vectors give λ = e^0 - e^0 + λ_init; with λ_init = 0 the second map drops out.
  q, k, v = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=h, seed=3)
  zeros = {name: np.zeros((H // 2,), np.float32)
           for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")}
  fn = inputs.jit_with(differential_attention, lambda_init=0.0, head_norm=False)
  out = fn(q, k, v, **zeros)
  d = H // 2
  want = inputs.jit_with(softmax_attention, scale=d ** -0.5)(q[..., :d], k[..., :d], v)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), **F32)
  # The second half of q and k then does not matter at all.
  other = fn(q.at[..., d:].set(5.0), k.at[..., d:].set(-3.0), v, **zeros)
  np.testing.assert_array_equal(np.asarray(other), np.asarray(out))


def test_differential_gradients_match_a_dense_form():
  q, k, v = inputs.qkv(B=1, T=7, S=7, N=2, K=1, H=4, h=3, seed=4)
  dout = inputs.qkv(B=1, T=7, S=7, N=2, K=1, H=3, h=3, seed=5)[0]
  rng = np.random.default_rng(6)
  p = {name: jnp.asarray(0.3 * rng.standard_normal((2,)), jnp.float32)
       for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")}
  p["norm_scale"] = jnp.asarray(1 + 0.3 * rng.standard_normal((3,)), jnp.float32)
  lam_init = lambda_init_fn(0)

  def dense(q, k, v, p):
    visible = jnp.tril(jnp.ones((7, 7), bool))
    kr, vr = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    maps = [jax.nn.softmax(jnp.where(visible, jnp.einsum("btnh,bsnh->bnts", q[..., sl],
                                                         kr[..., sl]) / np.sqrt(2), -jnp.inf), -1)
            for sl in (slice(0, 2), slice(2, 4))]
    lam = (jnp.exp(p["lambda_q1"] @ p["lambda_k1"]) - jnp.exp(p["lambda_q2"] @ p["lambda_k2"])
           + lam_init)
    attn = jnp.einsum("bnts,bsnh->btnh", maps[0] - lam * maps[1], vr)
    return attn * jax.lax.rsqrt(jnp.mean(attn ** 2, -1, keepdims=True) + 1e-5) * \
        p["norm_scale"] * (1 - lam_init)

  op = lambda q, k, v, p: differential_attention(q, k, v, **p, causal=True, implementation="xla")
  inputs.assert_same_gradients(op, dense, (q, k, v, p), dout, ("dq", "dk", "dv", "dparams"),
                               tol=tolerances.grad(jnp.float32))


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_opamp_equals_the_papers_equations(implementation):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=7)
  p = _opamp_params(8)
  out = inputs.jit_with(opamp_attention, causal=True, cmrr=5.0,
                        implementation=implementation)(q, k, v, **p)
  want = _opamp64(q, k, v, p, causal=True, cmrr=5.0)
  # The gains (5.5 and 4.5) amplify each map's float32 rounding: compare relative to the output.
  assert tolerances.rel_rms(out, want) < tolerances.REL_RMS[jnp.float32]


def test_zero_initialized_adapters_leave_the_pretrained_attention_unchanged():
  # W2 = 0: both maps are the pretrained one, and A_d (M - M) + (A_c/2)(2 M) = M with A_c = 1.
  q, k, v = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=h, seed=9)
  p = _opamp_params(10, perturb=0.0)
  assert all(not np.any(x) for name, x in p.items() if name.endswith("_up"))
  out = opamp_attention(q, k, v, **p, causal=False)
  np.testing.assert_allclose(np.asarray(out), np.asarray(softmax_attention(q, k, v)), **F32)


def test_opamp_tends_to_differential_attention_as_the_cmrr_grows():
  # o / A_d = (M1 - M2) V + (M1 + M2) V / (2K): the common-mode residue falls exactly as 1/K.
  q1, k1, v = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=h, seed=11)
  q2, k2, _ = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=h, seed=12)
  diff = two_map_attention(q1, k1, q2, k2, v, differential_gain=1.0, common_mode_gain=0.0)
  m1 = _softmax_maps64(q1, k1, causal=False, scale=H ** -0.5)
  m2 = _softmax_maps64(q2, k2, causal=False, scale=H ** -0.5)
  vf = np.repeat(np.asarray(v, np.float64), N // K, axis=2)
  np.testing.assert_allclose(np.asarray(diff), np.einsum("bnts,bsnh->btnh", m1 - m2, vf), **F32)
  gaps = []
  for cmrr in (10.0, 100.0, 1000.0):
    out = two_map_attention(q1, k1, q2, k2, v, differential_gain=cmrr, common_mode_gain=1.0)
    gaps.append(float(jnp.max(jnp.abs(out / cmrr - diff))))
  common = np.max(np.abs(np.einsum("bnts,bsnh->btnh", m1 + m2, vf))) / 2
  np.testing.assert_allclose(gaps, [common / 10, common / 100, common / 1000],
                             **tolerances.AMPLIFIED_DIFFERENCE)


def test_differential_is_opamp_with_cmrr_set_by_lambda_after_its_norm():
  # M1 - λ M2 = (1/A_d')·[A_d (M1 - M2) + (1/2)(M1 + M2)] with A_d = K = (1 + λ)/(2(1 - λ)) (A_c = 1):
  # a positive per-head gain, which DIFF's RMSNorm removes.
  q, k, v = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=h, seed=13)
  p = _diff_params(14)
  lam_init = lambda_init_fn(2)
  out = differential_attention(q, k, v, **p, layer_index=2)
  dot = lambda a, b: np.sum(p[a] * p[b])
  lam = np.exp(dot("lambda_q1", "lambda_k1")) - np.exp(dot("lambda_q2", "lambda_k2")) + lam_init
  assert 0 < lam < 1
  cmrr = (1 + lam) / (2 * (1 - lam))
  d = H // 2
  amp = two_map_attention(q[..., :d], k[..., :d], q[..., d:], k[..., d:], v, differential_gain=cmrr,
                          common_mode_gain=1.0, scale=d ** -0.5)
  normed = amp * jax.lax.rsqrt(jnp.mean(amp ** 2, -1, keepdims=True) + 1e-5 * (cmrr + 0.5) ** 2)
  np.testing.assert_allclose(np.asarray(out), np.asarray(normed * p["norm_scale"] * (1 - lam_init)),
                             **F32)


def test_fully_masked_rows_give_zeros_and_finite_gradients():
  q, k, v = inputs.qkv(B=2, T=5, S=5, N=N, K=K, H=H, h=h, seed=15)
  lengths = jnp.array([0, 5])
  for fn, p in ((differential_attention, _diff_params(16)), (opamp_attention, _opamp_params(17))):
    run = jax.jit(jax.value_and_grad(
        lambda q, k, v, p, fn=fn: jnp.sum(fn(q, k, v, **p, kv_lengths=lengths)[0] ** 2),
        argnums=(0, 1, 2)))
    out = jax.jit(lambda q, k, v, p, fn=fn: fn(q, k, v, **p, kv_lengths=lengths))(q, k, v, p)
    np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
    _, grads = run(q, k, v, p)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_bad_input_is_a_clear_error():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h)
  p = _diff_params(18)
  with pytest.raises(ValueError, match=r"differential_attention.*even"):
    differential_attention(q[..., :7], k[..., :7], v, **p)
  with pytest.raises(ValueError, match=r"differential_attention.*lambda_q1.*\[H/2\]"):
    differential_attention(q, k, v, **{**p, "lambda_q1": np.zeros((H,), np.float32)})
  with pytest.raises(ValueError, match=r"opamp_attention.*cmrr"):
    opamp_attention(q, k, v, **_opamp_params(19), cmrr=float("inf"))
  bad = {**_opamp_params(19), "adapter_k1_down": np.zeros((N * H, H), np.float32)}
  with pytest.raises(ValueError, match=r"opamp_attention.*adapter_k1_down.*\[K·H, r\]"):
    opamp_attention(q, k, v, **bad)
