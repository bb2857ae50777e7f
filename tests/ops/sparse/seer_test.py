"""SeerAttention (arXiv:2410.13276): a learned AttnGate (avg-pooled queries, max/min/avg-pooled keys per
block, per-head projections, softmax over key blocks) keeps top-k / thresholded key blocks per query
block, and attention runs over the kept blocks only; the gate is distilled towards the block-max-pooled
attention map.

Checked against a float64 numpy rewrite of the authors' AttnGate (`seer_attn/attn_gate.py`) and
block-sparse attention, per head with GQA and padding, for top-k and threshold selection on both
implementations; the claims: keeping every block is full attention, and the distillation target is
the numpy block-max-pool of the softmax map, row-normalized; the loss against a numpy KL with its
gradient in the gate arrays checked by finite differences; the fast path's gradients against the
reference's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import param_tables
from attnjax.ops.sparse import seer
from attnjax.registry import example_params
from tests import inputs
from tests import numpy_math
from tests import tolerances

B, T, N, K, H, HV = 2, 13, 4, 2, 8, 6
BLOCK = 3
NB = -(-T // BLOCK)
LENGTHS = np.array([T, 10])


def _gates(seed=0):
  return example_params(param_tables.param_specs(seer.SEER_TABLE), N=N, K=K, H=H, seed=seed)


def _pool(x, block, how, length=None):
  """x [L, H] float64 → [nb, H]: each block's mean / max / min over its tokens below `length`."""
  length = x.shape[0] if length is None else length
  fn = {"avg": np.mean, "max": np.max, "min": np.min}[how]
  return np.stack([fn(x[i:min(i + block, length)], axis=0) if i < length else np.zeros(x.shape[1])
                   for i in range(0, x.shape[0], block)])


def _gate_numpy(q, k, gq, gk, *, causal, lengths):
  """float64 AttnGate: (P [B, N, U, nb] softmax over candidate blocks, candidates [B, U, nb])."""
  q, k, gq, gk = (np.asarray(x, np.float64) for x in (q, k, gq, gk))
  D = gq.shape[-1]
  U, nb = -(-q.shape[1] // BLOCK), -(-k.shape[1] // BLOCK)
  probs = np.zeros((B, N, U, nb))
  cand = np.zeros((B, U, nb), bool)
  for b in range(B):
    for u in range(U):
      for j in range(nb):
        cand[b, u, j] = j * BLOCK < lengths[b] and (not causal or j * BLOCK <= min(
            (u + 1) * BLOCK, q.shape[1]) - 1)
    for n in range(N):
      kh = n // (N // K)
      qg = _pool(q[b, :, n], BLOCK, "avg") @ gq[n]
      kp = np.concatenate([_pool(k[b, :, kh], BLOCK, how, lengths[b]) for how in ("max", "min", "avg")],
                          axis=-1)
      logits = qg @ (kp @ gk[kh]).T / np.sqrt(D)
      probs[b, n] = numpy_math.softmax(logits, where=cand[b])
  return probs, cand


def _seer_numpy(q, k, v, gq, gk, *, causal, lengths, top_k=None, threshold=None):
  probs, cand = _gate_numpy(q, k, gq, gk, causal=causal, lengths=lengths)
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  out = np.zeros((B, T, N, HV))
  for b in range(B):
    for n in range(N):
      kh = n // (N // K)
      for t in range(T):
        u = t // BLOCK
        p = np.where(cand[b, u], probs[b, n, u], -np.inf)
        keep = np.zeros(NB, bool)
        if top_k:
          keep[np.argsort(-p, kind="stable")[:top_k]] = True
        if threshold is not None:
          keep |= p > threshold
        keep &= cand[b, u]
        keys = np.repeat(keep, BLOCK)[:T] & (np.arange(T) < lengths[b])
        if causal:
          keys &= np.arange(T) <= t
        if keys.any():
          w = numpy_math.softmax(k[b, :, kh] @ q[b, t, n] * H ** -0.5, where=keys)
          out[b, t, n] = w @ v[b, :, kh]
  return out


@pytest.mark.parametrize("causal,top_k,threshold", [(True, 2, None), (False, None, 0.2)])
def test_matches_numpy_rewrite_of_the_authors_gate(causal, top_k, threshold):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=1)
  gates = _gates()
  want = _seer_numpy(q, k, v, gates["gate_q"], gates["gate_k"], causal=causal, lengths=LENGTHS,
                     top_k=top_k, threshold=threshold)
  for impl in ("xla", "reference"):
    fn = inputs.jit_with(seer.seer_attention, causal=causal, block_size=BLOCK, top_k=top_k,
                         threshold=threshold, implementation=impl)
    got = np.asarray(fn(q, k, v, kv_lengths=jnp.asarray(LENGTHS), **gates))
    np.testing.assert_allclose(got, want, err_msg=impl, **tolerances.output(jnp.float32))


def test_gate_probabilities_match_numpy():
  q, k, _ = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=2)
  gates = _gates(1)
  logits, cand = seer.seer_gate_logits(q, k, block_size=BLOCK, causal=True,
                                       kv_lengths=jnp.asarray(LENGTHS), **gates)
  want, want_cand = _gate_numpy(q, k, gates["gate_q"], gates["gate_k"], causal=True, lengths=LENGTHS)
  np.testing.assert_array_equal(np.asarray(cand)[:, 0], want_cand)
  np.testing.assert_allclose(jax.nn.softmax(logits, axis=-1), want, **tolerances.output(jnp.float32))


@pytest.mark.parametrize("causal", [True, False])
def test_keeping_every_block_is_full_attention(causal):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=3)
  got = inputs.jit_with(seer.seer_attention, causal=causal, block_size=BLOCK, top_k=NB)(
      q, k, v, kv_lengths=jnp.asarray(LENGTHS), **_gates())
  keep = numpy_math.visible(B, T, T, causal=causal, kv_lengths=LENGTHS)
  qf, kf, vf = (np.asarray(x, np.float64) for x in (q, k, v))
  kr, vr = np.repeat(kf, N // K, axis=2), np.repeat(vf, N // K, axis=2)
  w = numpy_math.softmax(np.einsum("btnh,bsnh->bnts", qf, kr) * H ** -0.5, where=keep)
  np.testing.assert_allclose(got, np.einsum("bnts,bsnh->btnh", w, vr), **tolerances.output(jnp.float32))
  sparse_out = inputs.jit_with(seer.seer_attention, causal=causal, block_size=BLOCK, top_k=1)(
      q, k, v, kv_lengths=jnp.asarray(LENGTHS), **_gates())
  assert tolerances.rel_rms(sparse_out, got) > tolerances.CHANGED_REL_RMS  # top_k < nb is sparse


def _target_numpy(q, k, *, causal, lengths):
  qf, kf = np.asarray(q, np.float64), np.repeat(np.asarray(k, np.float64), N // K, axis=2)
  keep = numpy_math.visible(B, T, T, causal=causal, kv_lengths=lengths)
  w = np.nan_to_num(numpy_math.softmax(np.einsum("btnh,bsnh->bnts", qf, kf) * H ** -0.5, where=keep))
  pooled = np.zeros((B, N, NB, NB))
  for u in range(NB):
    for j in range(NB):
      pooled[:, :, u, j] = w[:, :, u * BLOCK:(u + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK].max(axis=(2, 3))
  return pooled / pooled.sum(-1, keepdims=True)


def test_target_is_the_block_max_pooled_attention_map():
  q, k, _ = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=4)
  got = seer.seer_gate_target(q, k, block_size=BLOCK, causal=True, kv_lengths=jnp.asarray(LENGTHS))
  want = _target_numpy(q, k, causal=True, lengths=LENGTHS)
  np.testing.assert_allclose(got, want, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(np.sum(got, -1), 1.0, **tolerances.output(jnp.float32))


def test_distillation_loss_and_its_gate_gradient_match_numpy():
  q, k, _ = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=5)
  gates = _gates(2)
  lengths = jnp.asarray(LENGTHS)
  target = _target_numpy(q, k, causal=True, lengths=LENGTHS)

  def loss64(gq, gk):
    p, cand = _gate_numpy(q, k, gq, gk, causal=True, lengths=LENGTHS)
    c = np.broadcast_to(cand[:, None], p.shape) & (target > 0)
    return np.sum(np.where(c, target * (np.log(np.where(c, target, 1)) - np.log(np.where(c, p, 1))),
                           0)) / p.size

  def loss(gq, gk):
    return seer.seer_gate_loss(q, k, gate_q=gq, gate_k=gk, block_size=BLOCK, causal=True,
                               kv_lengths=lengths)

  args = (gates["gate_q"], gates["gate_k"])
  np.testing.assert_allclose(jax.jit(loss)(*args), loss64(*args), **tolerances.output(jnp.float32))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(*args)
  numpy_math.check_directional_derivatives(grads, args, loss64, ("gate_q", "gate_k"),
                                           rng=np.random.default_rng(0),
                                           tol=tolerances.grad(jnp.float32))


def test_fast_path_gradients_match_the_reference():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=6)
  dout = np.random.default_rng(4).standard_normal((B, T, N, HV)).astype(np.float32)
  kw = dict(causal=True, block_size=BLOCK, top_k=2, **_gates())
  inputs.assert_same_gradients(
      lambda *a: seer.seer_attention(*a, **kw, implementation="xla"),
      lambda *a: seer.seer_attention(*a, **kw, implementation="reference"),
      (q, k, v), dout, ("dq", "dk", "dv"), tol=tolerances.grad(jnp.float32))


def test_rejects_packed_sequences_and_a_missing_rule():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV)
  with pytest.raises(ValueError, match="seer_attention.*segment_ids"):
    seer.seer_attention(q, k, v, segment_ids=jnp.zeros((B, T), jnp.int32), block_size=BLOCK,
                        top_k=1, **_gates())
  with pytest.raises(ValueError, match="seer_attention.*top_k"):
    seer.seer_attention(q, k, v, block_size=BLOCK, **_gates())
