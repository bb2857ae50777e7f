"""RIPO attention (#20): logits q_i·(k_j + E_{clip(j-i)} + W_p FMS(p_i - p_j) + W_o FMS(o_i - o_j)).
The catalog's claim is that the relative FME depends only on the interval: shifting every pitch
(transposition) or every onset by a constant leaves the output unchanged, while changing the
intervals changes it. Checked against a float64 rewrite of the authors' computation (FMS of the
[T, S] interval matrices, the dense map into the heads, the dot with each query; the implementation
instead factors the sinusoids into query and key features), both implementations, causal or not,
GQA, and a query block over a cache reading its own pitch at its absolute position."""

import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.positional import ripo_attention
from attnjax.ops.positional.ripo import ONSET_BASE, PITCH_BASE, fme_frequencies
from tests import inputs
from tests import numpy_math
from tests import tolerances

F32 = tolerances.output(jnp.float32)
B, T, N, K, H, h = 2, 13, 4, 2, 8, 6
C, F = 3, 16                     # relative-index clipping and FME width


def _params(seed):
  rng = np.random.default_rng(seed)
  normal = lambda *shape, std=1.0: jnp.asarray(std * rng.standard_normal(shape), jnp.float32)
  # Frequencies off their initial geometric ladder (they are learned), some near 1 rad per unit.
  return dict(rel_index=normal(2 * C + 1, H, std=0.5),
              pitch_freq=jnp.asarray(fme_frequencies(F, PITCH_BASE)) * (1 + normal(F, std=0.1)),
              pitch_kernel=normal(F, N, H, std=F ** -0.5),
              onset_freq=jnp.asarray(fme_frequencies(F, ONSET_BASE)) * (1 + normal(F, std=0.1)),
              onset_kernel=normal(F, N, H, std=F ** -0.5))


def _music(seed, S):
  # MIDI-like pitches and onsets (cumulative durations in beats), as floats.
  rng = np.random.default_rng(seed)
  pitch = rng.integers(48, 84, (B, S)).astype(np.float32)
  onset = np.cumsum(rng.choice([0.25, 0.5, 1.0, 1.5], (B, S)), axis=1).astype(np.float32)
  return jnp.asarray(pitch), jnp.asarray(onset)


def _fms(delta, freq):
  """The authors' `FMS`: angles Δ·ω, sine on even dims, cosine on odd dims (no translation bias)."""
  angle = delta[..., None] * freq
  return np.where(np.arange(freq.shape[0]) % 2 == 0, np.sin(angle), np.cos(angle))


def _ripo_float64(q, k, v, pitch, onset, params, *, causal, q_offset=0):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  p = {name: np.asarray(x, np.float64) for name, x in params.items()}
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  T_, S_, H_ = q.shape[1], k.shape[1], q.shape[3]
  i, j = q_offset + np.arange(T_), np.arange(S_)
  logits = np.einsum("btnh,bsnh->bnts", q, k)
  r = np.clip(j[None] - i[:, None], -C, C) + C
  logits += np.einsum("btnh,tsh->bnts", q, p["rel_index"][r])               # Music Transformer
  for values, name in ((pitch, "pitch"), (onset, "onset")):
    x = np.asarray(values, np.float64)
    delta = x[:, i][:, :, None] - x[:, None, :]                             # x_i - x_j  [B, T, S]
    rel = np.einsum("btsf,fnh->btsnh", _fms(delta, p[f"{name}_freq"]), p[f"{name}_kernel"])
    logits += np.einsum("btnh,btsnh->bnts", q, rel)
  logits /= np.sqrt(H_)
  visible = j[None] <= i[:, None] if causal else None
  return np.einsum("bnts,bsnh->btnh", numpy_math.softmax(logits, where=visible), v)


def _run(q, k, v, pitch, onset, params, **kw):
  return inputs.jit_with(ripo_attention, **kw)(q, k, v, pitch=pitch, onset=onset, **params)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
@pytest.mark.parametrize("causal", [False, True])
def test_equals_the_authors_computation(implementation, causal):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=1)
  pitch, onset = _music(2, T)
  params = _params(3)
  out = _run(q, k, v, pitch, onset, params, causal=causal, implementation=implementation)
  want = _ripo_float64(q, k, v, pitch, onset, params, causal=causal)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


def test_query_block_reads_its_own_pitch_at_its_absolute_position():
  q, k, v = inputs.qkv(B=B, T=4, S=11, N=N, K=K, H=H, h=h, seed=4)
  pitch, onset = _music(5, 11)
  params = _params(6)
  out = _run(q, k, v, pitch, onset, params, causal=True, q_offset=7)
  want = _ripo_float64(q, k, v, pitch, onset, params, causal=True, q_offset=7)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


def test_translation_invariance_of_pitch_and_onset():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=7)
  pitch, onset = _music(8, T)
  params = _params(9)
  fn = inputs.jit_with(ripo_attention)
  out = fn(q, k, v, pitch=pitch, onset=onset, **params)
  # Transposed up a fifth and started 4 beats later: the same intervals, the same output.
  shifted = fn(q, k, v, pitch=pitch + 7.0, onset=onset + 4.0, **params)
  np.testing.assert_allclose(np.asarray(shifted), np.asarray(out), **F32)
  # Other intervals (one note moved by a semitone, or every onset stretched) change the output.
  moved = fn(q, k, v, pitch=pitch.at[:, 5].add(1.0), onset=onset, **params)
  assert tolerances.rel_rms(moved, out) > tolerances.CHANGED_REL_RMS
  stretched = fn(q, k, v, pitch=pitch, onset=1.5 * onset, **params)
  assert tolerances.rel_rms(stretched, out) > tolerances.CHANGED_REL_RMS


def test_bad_input_is_a_clear_error():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h)
  pitch, onset = _music(0, T)
  params = _params(0)
  with pytest.raises(ValueError, match=r"ripo_attention.*pitch.*\[B, S\]"):
    ripo_attention(q, k, v, pitch=pitch[:, :5], onset=onset, **params)
  with pytest.raises(ValueError, match=r"ripo_attention.*onset_kernel.*\[F, N, H\]"):
    ripo_attention(q, k, v, pitch=pitch, onset=onset,
                   **{**params, "onset_kernel": params["onset_kernel"][:4]})
  with pytest.raises(ValueError, match="self-attention"):
    ripo_attention(q, k[:, :7], v[:, :7], pitch=pitch[:, :7], onset=onset[:, :7], **params)
