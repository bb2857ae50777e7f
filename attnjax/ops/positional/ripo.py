"""RIPO attention: relative index, pitch and onset terms on the logits of symbolic-music attention.

    s_ij = scale · q_i·(k_j + E_{r(i,j)} + W_p FMS_p(p_i - p_j) + W_o FMS_o(o_i - o_j))
    o_i  = Σ_j softmax_j(s_ij) v_j                               r(i,j) = clip(j - i, -c, c)

`p` (pitch) and `o` (onset: the cumulative duration before the note, in beats) are per-token data.
FMS is the Fundamental Music Embedding of an interval without its translation bias (the authors'
`Fundamental_Music_Embedding.FMS`): `FMS(Δ)_m = sin(ω_m Δ)` for even m, `cos(ω_m Δ)` for odd m, with
learned frequencies ω initialized to `base^(-2⌊m/2⌋/F)` (F the embedding width, base 9919 for pitch
and 7920 for onset as in the authors' configuration). The relative embedding depends on the interval
only, so shifting every pitch (transposition) or every onset by a constant leaves the output unchanged.
`W_p, W_o: [F, N, H]` map it into each head: the authors apply two dense layers (`pitch_senn`, then
the attention's `pitch_relnn`), whose composition is one affine map; its bias adds q_i·b, constant
over keys, which softmax removes, so only the linear part is a parameter here. E: `[2c+1, H]` is Music
Transformer's relative-index embedding shared by the heads (the authors' `E`, initialized uniform in
[0, 1)); distances beyond c share its edge rows (the authors' table covers their maximum length).

How it is computed: E is a `[B, T, N, 2c+1]` table of q_i·E_r gathered by a score_mod. The pitch and
onset terms are rank-2F in (i, j): with angles a = ωp_i, b = ωp_j, sin(a - b) = sin a cos b - cos a sin b
and cos(a - b) = cos a cos b + sin a sin b, so u_i·FMS(p_i - p_j) (u_i = W^T q_i) is a dot product of
query features [u sin a, -u cos a | u cos a, u sin a] with key features [cos b, sin b]. They are
appended to the heads of q and k, so one `flex_attention` call serves the whole logit (`xla`: tiles,
block skipping, memory linear in length) instead of the authors' [T, T, F] interval embeddings. A query
reads its own pitch and onset at its absolute position `q_offset + t` of the key stream, so decode
over a KV cache (pitches cached beside the keys) equals the full forward.

Not included: the authors' substitute embedding for intervals that involve a token without a pitch
(rest, sustain, padding), which is a property of their tokenization; give such tokens any pitch and
mask them, or keep them out of the sequence. The features use float32 angles: an onset of 1e3 beats
at ω = 1 rounds the phase by ~1e-4.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]`, `pitch`, `onset` `[B,S]` (floats), `rel_index
[2c+1,H]`, `pitch_freq`, `onset_freq` `[F]`, `pitch_kernel`, `onset_kernel` `[F,N,H]` → `[B,T,N,h]`.
Self-attention only (relative attributes of tokens of one sequence).
Paper: Guo, Kang and Herremans, "A Domain-Knowledge-Inspired Music Embedding Space and a Novel
Attention Mechanism for Symbolic Music Modeling", AAAI 2023, arXiv:2212.00973 (code:
github.com/guozixunnicolas/FundamentalMusicEmbedding, `model/layers.py`,
`RelativeGlobalAttention_relative_index_pitch_onset`).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import param_tables
from attnjax.core.relative import (clipped_relative_index, relative_key_score_mod,
                                   relative_query_table)
from attnjax.registry import Mechanism, TokenInput, example_arrays, register
from attnjax.typing import Array, Float, Key, Lengths, Output, PerKeyToken, Query, Value

__all__ = ["ripo_attention", "fme_frequencies", "RIPO_TABLE", "PITCH_BASE", "ONSET_BASE",
           "DEFAULT_INDEX_DISTANCE"]

# The authors' configuration (training/config/ripo_transformer.yaml): FME bases, and sequences of at
# most 246 notes (relative-index distances 0..245).
PITCH_BASE = 9919.0
ONSET_BASE = 7920.0
DEFAULT_INDEX_DISTANCE = 245


def fme_frequencies(width: int, base: float) -> np.ndarray:
  """FME's angle rates `base^(-2⌊m/2⌋/width)`, m < width (float32 `[width]`): dims 2i and 2i+1 (sine
  and cosine) start at the same frequency."""
  m = np.arange(width)
  return (1.0 / np.power(base, 2 * (m // 2) / width)).astype(np.float32)


def _frequency_init(base):
  return lambda key, shape, dtype=jnp.float32: jnp.asarray(fme_frequencies(shape[0], base), dtype)


# Shapes in the signature (jaxtyping; letters of `attnjax.typing`, R = 2c + 1 rows, F the FME width).
IndexTable = Float[Array, "R H"]
Frequencies = Float[Array, "F"]
Projection = Float[Array, "F N H"]

_W = lambda N, H, F: (N * H if F is None else F, N, H)
# The FME width F defaults to the model width N·H, as the authors embed intervals at d_model.
_F = lambda N, H, F: (N * H if F is None else F,)
_proj_init = jax.nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))
# (name, shape(N, K, H, h, c, F), shape in letters, init): see `attnjax.core.param_tables`.
RIPO_TABLE = (
    ("rel_index", lambda N, K, H, h, c=DEFAULT_INDEX_DISTANCE, F=None: (2 * c + 1, H), "[2c+1, H]",
     jax.nn.initializers.uniform(1.0)),
    ("pitch_freq", lambda N, K, H, h, c=None, F=None: _F(N, H, F), "[F]", _frequency_init(PITCH_BASE)),
    ("pitch_kernel", lambda N, K, H, h, c=None, F=None: _W(N, H, F), "[F, N, H]", _proj_init),
    ("onset_freq", lambda N, K, H, h, c=None, F=None: _F(N, H, F), "[F]", _frequency_init(ONSET_BASE)),
    ("onset_kernel", lambda N, K, H, h, c=None, F=None: _W(N, H, F), "[F, N, H]", _proj_init),
)


def _interval_features(q32, values, pos, freq, proj):
  """(query features `[B, T, N, 2F]`, key features `[B, S, 2F]`) whose dot product is
  u_i·FMS(x_i - x_j), u_i = W^T q_i, for the per-token values x `[B, S]`."""
  x = values.astype(jnp.float32)
  freq = freq.astype(jnp.float32)
  key_angle = x[..., None] * freq                                             # [B, S, F]
  query_angle = contract.gather_positions(x, pos)[..., None] * freq           # [B, T, F]
  sq, cq = jnp.sin(query_angle)[:, :, None], jnp.cos(query_angle)[:, :, None]
  u = jnp.einsum("btnh,fnh->btnf", q32, proj.astype(jnp.float32))            # [B, T, N, F]
  sine = (jnp.arange(freq.shape[0]) % 2) == 0                                 # even dims: sin
  with_cos = u * jnp.where(sine, sq, cq)          # sin(a-b) = sin a·cos b - cos a·sin b
  with_sin = u * jnp.where(sine, -cq, sq)         # cos(a-b) = cos a·cos b + sin a·sin b
  return (jnp.concatenate([with_cos, with_sin], -1),
          jnp.concatenate([jnp.cos(key_angle), jnp.sin(key_angle)], -1))


def ripo_attention(q: Query, k: Key, v: Value, *, pitch: PerKeyToken, onset: PerKeyToken,
                   rel_index: IndexTable, pitch_freq: Frequencies, pitch_kernel: Projection,
                   onset_freq: Frequencies, onset_kernel: Projection, causal: bool = False,
                   segment_ids=None,
                   q_offset=0, kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                   implementation: Optional[str] = None) -> Output:
  """RIPO attention: logits plus relative index, pitch and onset terms (see the module docstring)."""
  op = "ripo_attention"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  for name, x in (("pitch", pitch), ("onset", onset)):
    checks.check_shape(op, name, x, (B, S), "[B, S]")
  if jnp.ndim(rel_index) != 2 or jnp.shape(rel_index)[0] % 2 != 1:
    raise ValueError(f"{op}: `rel_index` must have shape [2c+1, H] = [odd, {H}], got "
                     f"{jnp.shape(rel_index)}")
  if jnp.ndim(pitch_freq) != 1:
    raise ValueError(f"{op}: `pitch_freq` must have shape [F], got {jnp.shape(pitch_freq)}")
  c, F = (rel_index.shape[0] - 1) // 2, pitch_freq.shape[0]
  params = dict(rel_index=rel_index, pitch_freq=pitch_freq, pitch_kernel=pitch_kernel,
                onset_freq=onset_freq, onset_kernel=onset_kernel)
  param_tables.check_table(op, RIPO_TABLE, params, N=N, K=K, H=H, h=h, c=c, F=F)
  contract.check_self_attention(op, T=T, S=S, q_offset=q_offset, kv_lengths=kv_lengths,
                                segment_ids=segment_ids)
  scale = H ** -0.5 if scale is None else scale
  q32, k32 = q.astype(jnp.float32), k.astype(jnp.float32)
  pos = contract.query_positions(B, T, q_offset)
  q_parts, k_parts = [q32], [k32]
  for values, freq, proj in ((pitch, pitch_freq, pitch_kernel), (onset, onset_freq, onset_kernel)):
    qf, kf = _interval_features(q32, values, pos, freq, proj)
    q_parts.append(qf)
    k_parts.append(jnp.broadcast_to(kf[:, :, None], (B, S, K, kf.shape[-1])))
  score_mod = relative_key_score_mod(relative_query_table(q, rel_index),
                                     lambda p, j: clipped_relative_index(p, j, c),
                                     q_offset=q_offset, scale=scale)
  out = contract.flex_with_contract(op, jnp.concatenate(q_parts, -1), jnp.concatenate(k_parts, -1),
                                    v.astype(jnp.float32), causal=causal, segment_ids=segment_ids,
                                    q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                                    implementation=implementation, score_mod=score_mod)
  return out.astype(q.dtype)


def _example(*, N, K, H, h):
  # c = 5 (the conformance lengths reach the clipped edges) and an FME width of 8.
  del K, h
  F = 8
  arrays = example_arrays(20, {"rel_index": ((11, H), 0.5, 0.3), "pitch_kernel": ((F, N, H), 0.0, 0.5),
                               "onset_kernel": ((F, N, H), 0.0, 0.5)})
  return {**arrays, "pitch_freq": fme_frequencies(F, PITCH_BASE),
          "onset_freq": fme_frequencies(F, ONSET_BASE)}


register(Mechanism(
    name="ripo_attention", fn=ripo_attention, family="positional", seeds=(20,),
    paper="A Domain-Knowledge-Inspired Music Embedding Space and a Novel Attention Mechanism for "
          "Symbolic Music Modeling", arxiv="2212.00973",
    patterns=frozenset({"self", "causal_self"}), params=param_tables.param_specs(RIPO_TABLE),
    token_inputs=(TokenInput("pitch", side="kv", kind="given"),
                  TokenInput("onset", side="kv", kind="given")),
    example=_example))
