"""gated_linear_attention(implementation="pallas_triton") on a CPU (Pallas interpret mode: the kernels'
own arithmetic) against the float32 recurrence: outputs, final state and gradients (q, k, v, log decay,
initial state) without decay, with a scalar and a per-channel decay, GQA, the normalizer column, packed
documents, fp32 and bf16; each configuration also lowered for CUDA (forward and gradient). Tiny shapes:
interpret mode is slow, and every compiled function is shared between the checks of a case.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.core import implementations
from attnjax.kernels import gla_triton, platform
from tests import tolerances

B, T = 2, 37          # T: two whole chunks of 16 and a ragged third
TRITON_CALL = "xla.gpu.triton"


@dataclasses.dataclass(frozen=True)
class Case:
  decay: str = "none"          # "none", "scalar" ([B,T,N]) or "channel" ([B,T,N,F])
  N: int = 2
  K: int = 2
  F: int = 8
  h: int = 6
  normalize: bool = False
  initial_state: bool = True
  packed: bool = False
  dtype: type = jnp.float32


# The CPU tile row (`platform.BLOCK_SIZES`) has 16 value columns per program: h = 20 with normalize
# (21 columns) takes two value tiles, whose partial dq, dk are summed outside the kernel.
CASES = {
    "none_gqa": Case(N=4, K=2),
    "scalar_normalized": Case(decay="scalar", F=16, normalize=True),
    "channel_gqa_two_value_tiles": Case(decay="channel", N=4, K=2, h=20, normalize=True),
    "channel_strong_decay": Case(decay="channel", F=16, h=6),
    "scalar_bf16": Case(decay="scalar", dtype=jnp.bfloat16, initial_state=False),
    "channel_bf16": Case(decay="channel", dtype=jnp.bfloat16),
    "none_packed": Case(packed=True),
    "scalar_packed": Case(decay="scalar", packed=True),
    "channel_packed_normalized": Case(decay="channel", packed=True, normalize=True),
}
# Documents of packed rows: row 0 changes run inside chunk 0 (step 9), exactly at the start of chunk 1
# (step 16), and inside the last, ragged chunk (step 34); row 1 inside chunk 1 (step 20).
SEGMENTS = np.zeros((B, T), np.int32)
SEGMENTS[0, 9:], SEGMENTS[0, 16:], SEGMENTS[0, 34:] = 1, 2, 3
SEGMENTS[1, 20:] = 5


@functools.cache
def _inputs(name):
  c = CASES[name]
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  q, k = normal(B, T, c.N, c.F), normal(B, T, c.K, c.F)
  if c.normalize:   # the normalizer needs positive features
    q, k = np.exp(q / 2), np.exp(k / 2)
  v = normal(B, T, c.K, c.h)
  g = None
  if c.decay == "scalar":
    g = -np.log1p(np.exp(normal(B, T, c.N)))
  elif c.decay == "channel":
    g = -np.log1p(np.exp(normal(B, T, c.N, c.F)))
    if name == "channel_strong_decay":
      # Channels whose decay is near total within a chunk (Λ down to about -500): a kernel that
      # factored exp(Λ_t - Λ_s) as exp(Λ_t) · exp(-Λ_s) would overflow.
      g[..., ::3] *= 30.0
  s0 = normal(B, c.N, c.F, c.h + c.normalize) if c.initial_state else None
  cast = lambda x: None if x is None else jnp.asarray(x, c.dtype)
  return tuple(map(cast, (q, k, v, g, s0)))


def _forward(name, implementation, q, k, v, g, s0):
  c = CASES[name]
  return aj.gated_linear_attention(q, k, v, log_decay=g, initial_state=s0, normalize=c.normalize,
                                   segment_ids=jnp.asarray(SEGMENTS) if c.packed else None,
                                   return_final_state=True, chunk_size=16,
                                   implementation=implementation)


def _loss(name, implementation, *args):
  out, state = _forward(name, implementation, *args)
  # Fixed weights on every output and state entry: each gradient sees all of them.
  w_out = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
  w_state = jnp.sin(jnp.arange(state.size, dtype=jnp.float32)).reshape(state.shape)
  return jnp.sum(out.astype(jnp.float32) * w_out) + jnp.sum(state * w_state)


def _grad_fn(name, implementation):
  """Gradient of `_loss` in q, k, v and, where given, the log decay and the initial state."""
  q, k, v, g, s0 = _inputs(name)
  argnums = tuple(i for i, x in enumerate((q, k, v, g, s0)) if x is not None)
  grad = jax.grad(lambda *a: _loss(name, implementation, *a), argnums=tuple(i for i in argnums))
  return grad, argnums


@functools.cache
def _results(name, implementation):
  """(out, state, grads) of one case and implementation: one compiled program."""
  grad, _ = _grad_fn(name, implementation)
  both = jax.jit(lambda *a: (_forward(name, implementation, *a), grad(*a)))
  (out, state), grads = both(*_inputs(name))
  return jax.tree.map(np.asarray, (out, state, grads))


def _close(actual, expected, tol):
  np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32), **tol)


@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_and_final_state_equal_reference(name):
  c = CASES[name]
  out, state, _ = _results(name, "pallas_triton")
  ref_out, ref_state, _ = _results(name, "reference")
  assert out.shape == (B, T, c.N, c.h) and out.dtype == c.dtype
  assert state.shape == (B, c.N, c.F, c.h + c.normalize) and state.dtype == np.float32
  assert np.isfinite(out.astype(np.float32)).all() and np.isfinite(state).all()
  _close(out, ref_out, tolerances.output(c.dtype))
  _close(state, ref_state, tolerances.output(jnp.float32))


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_equal_reference(name):
  c = CASES[name]
  _, argnums = _grad_fn(name, "reference")
  grads = _results(name, "pallas_triton")[2]
  ref = _results(name, "reference")[2]
  assert len(grads) == len(argnums) == 3 + (c.decay != "none") + c.initial_state
  for i, a, b in zip(argnums, grads, ref, strict=True):
    assert a.shape == b.shape and np.isfinite(a.astype(np.float32)).all(), i
    # The initial state and the outputs' statistics are float32 whatever the input dtype.
    _close(a, b, tolerances.grad(c.dtype if i < 4 else jnp.float32))


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_and_gradient_lower_for_cuda(name):
  args = _inputs(name)
  assert TRITON_CALL in platform.lower_for_cuda(functools.partial(_forward, name, "pallas_triton"),
                                                *args)
  grad, _ = _grad_fn(name, "pallas_triton")
  text = platform.lower_for_cuda(grad, *args)
  assert text.count(TRITON_CALL) >= 2          # the forward that saves states and the backward


def test_automatic_dispatch_on_cpu_never_takes_the_kernel():
  jaxpr = str(jax.make_jaxpr(functools.partial(_forward, "channel_bf16", None))(
      *_inputs("channel_bf16")))
  assert "pallas_call" not in jaxpr
  assert "pallas_call" in str(jax.make_jaxpr(functools.partial(_forward, "channel_bf16",
                                                               "pallas_triton"))(
      *_inputs("channel_bf16")))


def test_noncausal_is_not_served_by_the_kernel():
  q, k, v, _, _ = _inputs("none_gqa")
  with pytest.raises(NotImplementedError, match="pallas_triton.*causal"):
    aj.gated_linear_attention(q, k, v, causal=False, implementation="pallas_triton")


def test_chunk_lengths():
  assert gla_triton.chunk_length(64, 37, "scalar") == 64
  assert gla_triton.chunk_length(8, 1000, "none") == 16        # Triton's smallest dot
  assert gla_triton.chunk_length(1024, 4096, "scalar") == gla_triton.MAX_CHUNK
  assert gla_triton.chunk_length(64, 4096, "channel") == gla_triton.CHANNEL_CHUNK


def test_forward_mode_autodiff_falls_back_to_xla(monkeypatch):
  # The kernel's custom VJP is reverse mode only: on a GPU, automatic dispatch must fall through to
  # `xla` under jax.jvp, and the named kernel must say what to use instead.
  monkeypatch.setattr(implementations, "current_platform", lambda: "gpu")
  ks = jax.random.split(jax.random.PRNGKey(3), 4)
  q, k = (jax.nn.elu(jax.random.normal(key, (1, 9, 2, 8))) + 1 for key in ks[:2])
  v = jax.random.normal(ks[2], (1, 9, 2, 4))
  g = -jax.nn.softplus(jax.random.normal(ks[3], (1, 9, 2, 8)))
  f = lambda impl: (lambda q, k, v, g: aj.gated_linear_attention(q, k, v, log_decay=g,
                                                                 implementation=impl))
  args, tangents = (q, k, v, g), (q, k, v, g)
  _, auto = jax.jvp(f(None), args, tangents)
  _, ref = jax.jvp(f("reference"), args, tangents)
  assert tolerances.rel_rms(auto, ref) < tolerances.GRAD_REL_RMS[jnp.float32]
  with pytest.raises(NotImplementedError, match="forward-mode"):
    jax.jvp(f("pallas_triton"), args, tangents)


def test_feature_width_past_the_kernel_falls_back():
  q = jnp.ones((1, 3, 1, 2 * gla_triton.MAX_FEATURES))
  with pytest.raises(NotImplementedError, match="feature width"):
    aj.gated_linear_attention(q, q, q[..., :4], implementation="pallas_triton")
