"""SageAttention3 (#117): the FP4 operator against a float64 rewrite of the paper's Algorithm 1
(NVFP4 Q, K, V with E4M3 block scales, two-level P̃ scaling, smoothing), the 8-bit trainable form
against a rewrite of SageBwd's forward and backward (six int8 matmuls, dP = dO Vᵀ in fp16), and the
accuracy claims: FP4's error is measurably above int8's and below a bound derived from the format;
SageBwd's gradients stay close to exact attention's. Also: packed documents quantize as alone, and
the FP4 form's gradients are straight-through."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.quantized import sage_attention, sage_attention3
from attnjax.ops.softmax import softmax_attention
from tests import inputs
from tests import tolerances
from tests.ops import quantized as np_ref

F32 = tolerances.output(jnp.float32)
GRAD = tolerances.grad(jnp.float32)


def _cosine(a, b):
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _qkv():
  # Several query blocks (4) and key tiles (16, of 37 keys), GQA, a padded row, offset key channels.
  q, k, v = inputs.qkv(B=2, T=13, S=37, N=4, K=2, H=8, h=6, seed=1)
  return q, k + 3.0 * (jnp.arange(8) < 2), v, np.array([37, 29], np.int32)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
@pytest.mark.parametrize("causal", [False, True])
def test_fp4_equals_a_float64_rewrite_of_the_papers_algorithm(implementation, causal):
  q, k, v, lengths = _qkv()
  out = inputs.jit_with(sage_attention3, causal=causal, q_block=4, k_block=16,
                        implementation=implementation)(q, k, v, kv_lengths=jnp.asarray(lengths))
  want = np_ref.sage3_fp4(q, k, v, causal=causal, kv_lengths=lengths, q_block=4, k_block=16)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
@pytest.mark.parametrize("causal", [False, True])
def test_int8_training_form_equals_a_float64_rewrite_of_sagebwd(implementation, causal):
  q, k, v, lengths = _qkv()
  dout = jax.random.normal(jax.random.PRNGKey(5), (2, 13, 4, 6))
  fn = lambda q, k, v: sage_attention3(q, k, v, causal=causal, kv_lengths=jnp.asarray(lengths),
                                       precision="int8", q_block=4, k_block=8,
                                       implementation=implementation)
  out, grads = jax.jit(lambda q, k, v: (lambda o, vjp: (o, vjp(dout)))(*jax.vjp(fn, q, k, v)))(
      q, k, v)
  want_out, *want_grads = np_ref.sagebwd(q, k, v, dout, causal=causal, kv_lengths=lengths,
                                         q_block=4, k_block=8)
  np.testing.assert_allclose(np.asarray(out), want_out, **F32)
  for name, got, want in zip(("dq", "dk", "dv"), grads, want_grads, strict=True):
    np.testing.assert_allclose(np.asarray(got), want, err_msg=name, **GRAD)


def _fp4_error_bound_rms(q, k, v):
  """The RMS output error SageAttention3's format predicts (no smoothing, one tile), float64.

  First order in the rounding errors, taken independent and zero-mean, each at most half the E2M1
  spacing at the element's magnitude times its block's E4M3 scale (or the saturation loss past 6),
  so each variance is at most that square: the errors of Q (shared by a query's scores), of K, of V
  and of the two-level P̃ propagate through o = Σ_j p_j v_j, dp_j = p_j (ds_j - Σ p ds).
  """
  def rounding(x):                    # largest rounding error of NVFP4 along the last axis
    amax = np.zeros_like(x)
    for start in range(0, x.shape[-1], 16):
      amax[..., start:start + 16] = np.max(np.abs(x[..., start:start + 16]), -1, keepdims=True)
    s = np_ref.e4m3(amax / 6.0)
    a = np.abs(x) / np.where(s > 0, s, 1.0)
    return np.where(a <= 6, np.where(a < 2, 0.25, np.where(a < 4, 0.5, 1.0)) * s, np.abs(x) - 6 * s)

  q, k, v = (np.asarray(x, np.float64)[0] for x in (q, k, v))        # [T, N, H], one batch row
  scale = q.shape[-1] ** -0.5
  total, count = 0.0, 0
  for n in range(q.shape[1]):
    qn, kn, vn = q[:, n], k[:, n], v[:, n]
    p = np.exp(scale * qn @ kn.T - np.max(scale * qn @ kn.T, axis=1, keepdims=True))
    w = p / p.sum(1, keepdims=True)
    o = w @ vn
    centred = vn[None] - o[:, None]                                   # [T, S, h]: v_j - o_i
    var = scale ** 2 * np.einsum("ih,ihc->ic", rounding(qn) ** 2,
                                 np.einsum("ij,jh,ijc->ihc", w, kn, centred) ** 2)
    var += scale ** 2 * np.einsum("ij,ijc->ic", w ** 2 * (qn ** 2 @ rounding(kn).T ** 2),
                                  centred ** 2)
    var += w ** 2 @ rounding(vn.T).T ** 2
    s1 = 1.0 / (448.0 * 6.0)                                          # the row maximum p̃ is 1
    var += (rounding(p / s1) * s1 / p.sum(1, keepdims=True)) ** 2 @ vn ** 2
    total, count = total + var.sum(), count + var.size
  return float(np.sqrt(total / count))


def test_fp4_error_is_above_int8s_and_below_the_formats_bound():
  q, k, v = inputs.qkv(B=1, T=128, N=2, K=2, H=64, h=64, seed=4)
  want = np.asarray(inputs.jit_with(softmax_attention)(q, k, v), np.float64)
  rms = lambda x: float(np.sqrt(np.mean((np.asarray(x, np.float64) - want) ** 2)))
  fp4 = rms(inputs.jit_with(sage_attention3, smooth_k=False, smooth_q=False)(q, k, v))
  int8 = rms(inputs.jit_with(sage_attention)(q, k, v))
  assert fp4 > tolerances.FP4_OVER_INT8_ERROR_RATIO_MIN * int8
  assert fp4 < _fp4_error_bound_rms(q, k, v)


def test_sagebwd_gradients_stay_close_to_exact_attention():
  q, k, v = inputs.qkv(B=1, T=64, N=2, K=2, H=32, h=32, seed=8)
  dout = jax.random.normal(jax.random.PRNGKey(9), v.shape)
  grad = lambda f: jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * dout),
                                    argnums=(0, 1, 2)))(q, k, v)
  got = grad(lambda q, k, v: sage_attention3(q, k, v, causal=True, precision="int8"))
  want = grad(lambda q, k, v: softmax_attention(q, k, v, causal=True))
  for g, w in zip(got, want, strict=True):
    assert _cosine(g, w) >= tolerances.SAGEBWD_GRAD_COSINE_MIN


@pytest.mark.parametrize("precision", ["fp4", "int8"])
def test_packed_documents_quantize_as_they_would_alone(precision):
  # Documents of 9 and 23 tokens: the 16-token V blocks, 16-key tiles and 4-query blocks restart at
  # each document (as a varlen kernel's), so each packed document equals its own call.
  lengths = (9, 23)
  q, k, v = inputs.qkv(B=2, T=32, N=2, K=1, H=8, h=6, seed=4)
  seg = jnp.asarray(np.broadcast_to(np.repeat([0, 1], lengths), (2, 32)))
  fn = inputs.jit_with(sage_attention3, causal=True, q_block=4, k_block=16, precision=precision)
  packed = np.asarray(fn(q, k, v, segment_ids=seg))
  start = 0
  for n in lengths:
    part = slice(start, start + n)
    np.testing.assert_allclose(packed[:, part], np.asarray(fn(q[:, part], k[:, part], v[:, part])),
                               **F32)
    start += n


def test_fp4_gradients_are_straight_through():
  """The FP4 form is for inference; its gradients are those of exact softmax attention at the
  unquantized inputs (a straight-through estimator)."""
  q, k, v = inputs.qkv(B=1, T=9, N=2, K=1, H=8, h=6, seed=6)
  dout = jax.random.normal(jax.random.PRNGKey(7), (1, 9, 2, 6))
  inputs.assert_same_gradients(
      lambda q, k, v: sage_attention3(q, k, v, causal=True),
      lambda q, k, v: softmax_attention(q, k, v, causal=True), (q, k, v), dout,
      ("dq", "dk", "dv"), tol=GRAD)


def test_settings_are_checked():
  q, k, v = inputs.qkv(B=1, T=4, N=2, K=1, H=8, h=6)
  with pytest.raises(ValueError, match="sage_attention3: `k_block` must be a multiple of 16"):
    sage_attention3(q, k, v, k_block=24)
  with pytest.raises(ValueError, match="sage_attention3: `smooth_q` is for precision='fp4'"):
    sage_attention3(q, k, v, precision="int8", smooth_q=True)
  with pytest.raises(ValueError, match="sage_attention3: `precision` must be one of"):
    sage_attention3(q, k, v, precision="fp8")
