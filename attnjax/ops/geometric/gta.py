"""Geometric transform attention (GTA): queries, keys, values and outputs moved by the representation
of each token's camera pose and patch position, so attention sees only relative transforms.

Miyato, Jaeger, Welling, Geiger, "GTA: A Geometry-Aware Attention Mechanism for Multi-View
Transformers", arXiv:2310.10375. Each token carries a group element g; with a representation ρ acting
block-diagonally on the head dim, the paper's attention is

    O_i = ρ(g_i) Σ_j softmax_j(scale · ⟨ρ(g_i)ᵀ q_i, ρ(g_j)⁻¹ k_j⟩) ρ(g_j)⁻¹ v_j

so the logits are q_iᵀ ρ(g_i g_j⁻¹) k_j. Here the tokens carry camera-to-world poses P (the usual
meaning of a camera pose; g = P⁻¹ in the paper's formula, as the authors' code uses its camera
matrices: autonomousvision/gta, `source/utils/gta.py`), and with M = ρ(P):

    q̃_i = M_i⁻ᵀ q_i,   k̃_j = M_j k_j,   ṽ_j = M_j v_j,   O_i = M_i⁻¹ · softmax attention(q̃, k̃, ṽ)_i

so the logits are q_iᵀ ρ(P_i⁻¹ P_j) k_j and a change of world frame (P_i → W P_i for every token)
leaves the output unchanged. Plain softmax attention runs between the transforms (every flex path,
masks, packing and decoding keep working). The head dim is split as the authors' code splits it:

    [ se3_blocks × 4 | so2_freqs × 2 coordinates × 2 | trivial ]

  SE(3)  ρ(P) = [[R, s·t], [0, 1]] on each 4-dim block (s = `translation_scale`, the code's trans_coeff)
  SO(2)  for a patch position x ∈ [0, 1)² and frequencies f_m = 2^m / 2^F (m = 1..F), each pair of
         dims turns by θ = 2π · max_freq · x_d · f_m (as RoPE, but values and outputs turn too)
  trivial  dims left as they are

The value head dim h may differ from H: the values use the same blocks in the same order, as many as
fit in h (a block that does not fit is left trivial; any representation of the values keeps the
invariance, because the output is mapped back by the same one).

Per-token inputs (side "kv": a query of a self-attention reads the entries at its absolute position
`q_offset + t`, so a KV cache carries them): `poses [B, S, 6]` (rotation vector ω and translation t:
R = exp(ω×)) or `[B, S, 4, 4]` rigid matrices; `patch_positions [B, S, 2]` (unused when
so2_freqs = 0).
Cross-attention (queries with their own poses) passes `query_poses` and
`query_patch_positions` `[B, T, ...]`.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `[B,T,N,h]`.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.registry import Mechanism, TokenInput, register
from attnjax.typing import Array, Float, Key, Lengths, Output, Query, Value

__all__ = ["geometric_transform_attention", "rigid_matrices", "so2_angles", "transform_tokens"]

PoseVectors = Float[Array, "B L 6"]
PoseMatrices = Float[Array, "B L 4 4"]
Poses = Union[PoseVectors, PoseMatrices]
Positions = Float[Array, "B L 2"]
Rigid = Float[Array, "B L 4 4"]
Angles = Float[Array, "B L P"]
Tokens = Float[Array, "B L M D"]
# Below this rotation angle exp(ω×) uses its Taylor coefficients (sin θ / θ and (1 − cos θ) / θ²
# lose their digits as θ → 0).
_SMALL_ANGLE = 1e-4


def rigid_matrices(poses: Poses, translation_scale: float = 1.0) -> Rigid:
  """`[B, L, 4, 4]` float32 matrices [[R, s·t], [0, 1]] from 6-vectors (ω, t), R = exp(ω×) by
  Rodrigues' formula, or from given 4x4 rigid matrices (their translation scaled by s)."""
  p = jnp.asarray(poses, jnp.float32)
  if p.shape[-2:] == (4, 4):
    rot, trans = p[..., :3, :3], p[..., :3, 3]
  else:
    w, trans = p[..., :3], p[..., 3:]
    theta2 = jnp.sum(w * w, axis=-1)[..., None, None]
    small = theta2 < _SMALL_ANGLE ** 2
    theta = jnp.sqrt(jnp.where(small, 1.0, theta2))
    a = jnp.where(small, 1.0 - theta2 / 6.0, jnp.sin(theta) / theta)
    b = jnp.where(small, 0.5 - theta2 / 24.0, (1.0 - jnp.cos(theta)) / (theta * theta))
    zero = jnp.zeros_like(w[..., 0])
    cross = jnp.stack([jnp.stack([zero, -w[..., 2], w[..., 1]], -1),
                       jnp.stack([w[..., 2], zero, -w[..., 0]], -1),
                       jnp.stack([-w[..., 1], w[..., 0], zero], -1)], -2)
    rot = jnp.eye(3) + a * cross + b * (cross @ cross)
  top = jnp.concatenate([rot, translation_scale * trans[..., None]], axis=-1)
  bottom = jnp.broadcast_to(jnp.asarray([0.0, 0.0, 0.0, 1.0]), top.shape[:-2] + (1, 4))
  return jnp.concatenate([top, bottom], axis=-2)


def _rigid_inverse(m):
  rt = jnp.swapaxes(m[..., :3, :3], -1, -2)
  top = jnp.concatenate([rt, -(rt @ m[..., :3, 3:])], axis=-1)
  return jnp.concatenate([top, m[..., 3:, :]], axis=-2)


def so2_angles(positions: Positions, freqs: int, max_freq: float = 1.0) -> Angles:
  """`[B, L, 2F]` angles 2π · max_freq · x_d · 2^m / 2^F, coordinate-major (x's F, then y's F)."""
  f = 2.0 ** jnp.arange(1, freqs + 1, dtype=jnp.float32) / 2.0 ** freqs
  x = jnp.asarray(positions, jnp.float32)
  return (2 * math.pi * max_freq * x[..., :, None] * f).reshape(x.shape[:-1] + (2 * freqs,))


def _layout(width: int, se3_blocks: int, pairs: int):
  """How many whole SE(3) blocks and SO(2) pairs fit in `width` dims, in the layout's order."""
  blocks = min(se3_blocks, width // 4)
  return blocks, min(pairs, (width - 4 * blocks) // 2)


def transform_tokens(x: Tokens, mats: Optional[Rigid], angles: Optional[Angles], *, se3_blocks: int,
                     sign: float = 1.0) -> Tokens:
  """Applies the block-diagonal representation to `x [B, L, M, D]` (M heads): `mats [B, L, 4, 4]` on
  each of the leading SE(3) blocks, rotations by `sign · angles` on the following pairs, the rest
  unchanged; blocks that do not fit in D are left trivial. float32."""
  x = jnp.asarray(x, jnp.float32)
  D = x.shape[-1]
  pairs = 0 if angles is None else angles.shape[-1]
  blocks, pairs = _layout(D, se3_blocks if mats is not None else 0, pairs)
  parts, used = [], 0
  if blocks:
    chunk = x[..., :4 * blocks].reshape(x.shape[:-1] + (blocks, 4))
    parts.append(jnp.einsum("blij,blmcj->blmci", mats, chunk).reshape(x.shape[:-1] + (4 * blocks,)))
    used = 4 * blocks
  if pairs:
    chunk = x[..., used:used + 2 * pairs].reshape(x.shape[:-1] + (pairs, 2))
    theta = sign * angles[..., :pairs][:, :, None, :]
    c, s = jnp.cos(theta), jnp.sin(theta)
    a, b = chunk[..., 0], chunk[..., 1]
    parts.append(jnp.stack([a * c - b * s, a * s + b * c], -1).reshape(x.shape[:-1] + (2 * pairs,)))
    used += 2 * pairs
  parts.append(x[..., used:])
  return jnp.concatenate(parts, axis=-1)


def _at_queries(op, name, arr, given, B, T, S, q_offset):
  """The per-token array of the queries: `given` (cross-attention), or `arr` read at the absolute
  query positions (self-attention)."""
  if given is not None:
    if jnp.shape(given)[:2] != (B, T):
      raise ValueError(f"{op}: `{name}` must be [B, T, ...] = [{B}, {T}, ...], got shape "
                       f"{jnp.shape(given)}")
    return jnp.asarray(given, jnp.float32)
  if T > S:
    raise ValueError(f"{op}: queries read their {name[6:]} from the keys' (self-attention); with "
                     f"T={T} > S={S} pass `{name}` [B, T, ...]")
  pos = jnp.clip(contract.query_positions(B, T, q_offset), 0, S - 1)
  arr = jnp.asarray(arr, jnp.float32)
  return jnp.take_along_axis(arr, pos.reshape((B, T) + (1,) * (arr.ndim - 2)), axis=1)


def geometric_transform_attention(q: Query, k: Key, v: Value, *, poses: Poses,
                                  patch_positions: Positions,
                                  se3_blocks: Optional[int] = None, so2_freqs: Optional[int] = None,
                                  translation_scale: float = 1.0, max_freq: float = 1.0,
                                  query_poses: Optional[Poses] = None,
                                  query_patch_positions: Optional[Positions] = None,
                                  causal: bool = False, segment_ids=None, q_offset=0,
                                  kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                                  implementation: Optional[str] = None) -> Output:
  """GTA (module docstring): softmax attention between tokens moved by ρ(pose, position), the output
  moved back. `se3_blocks`, `so2_freqs` default to H // 8 each (a quarter of the head dim under the
  poses, a quarter under the positions, half trivial)."""
  op = "geometric_transform_attention"
  B, T, S, _, _, H, _ = checks.check_qkv(op, q, k, v)
  se3_blocks = H // 8 if se3_blocks is None else se3_blocks
  so2_freqs = H // 8 if so2_freqs is None else so2_freqs
  if se3_blocks < 0 or so2_freqs < 0 or 4 * (se3_blocks + so2_freqs) > H:
    raise ValueError(f"{op}: the layout needs 4·(se3_blocks + so2_freqs) <= H = {H} dims, got "
                     f"se3_blocks={se3_blocks}, so2_freqs={so2_freqs}")
  if jnp.shape(poses) not in ((B, S, 6), (B, S, 4, 4)):
    raise ValueError(f"{op}: `poses` must be [B, S, 6] (rotation vector, translation) or [B, S, 4, 4]"
                     f" = [{B}, {S}, ...], got shape {jnp.shape(poses)}")
  checks.check_shape(op, "patch_positions", patch_positions, (B, S, 2), "[B, S, 2]")
  pq = _at_queries(op, "query_poses", poses, query_poses, B, T, S, q_offset)
  mk, mq = rigid_matrices(poses, translation_scale), rigid_matrices(pq, translation_scale)
  mq_inv = _rigid_inverse(mq)
  ak = aq = None
  if so2_freqs:
    xq = _at_queries(op, "query_patch_positions", patch_positions, query_patch_positions, B, T,
                    S, q_offset)
    ak, aq = so2_angles(patch_positions, so2_freqs, max_freq), so2_angles(xq, so2_freqs, max_freq)
  # Rotations are orthogonal (R⁻ᵀ = R), so the queries' pairs turn by +θ_i like the keys'.
  qt = transform_tokens(q, jnp.swapaxes(mq_inv, -1, -2), aq, se3_blocks=se3_blocks)
  kt = transform_tokens(k, mk, ak, se3_blocks=se3_blocks)
  vt = transform_tokens(v, mk, ak, se3_blocks=se3_blocks)
  out = contract.flex_with_contract(op, qt.astype(q.dtype), kt.astype(k.dtype), vt.astype(v.dtype),
                                    causal=causal, segment_ids=segment_ids, q_offset=q_offset,
                                    kv_lengths=kv_lengths,
                                    scale=H ** -0.5 if scale is None else scale,
                                    implementation=implementation)
  return transform_tokens(out, mq_inv, aq, se3_blocks=se3_blocks, sign=-1.0).astype(q.dtype)


register(Mechanism(
    name="geometric_transform_attention", fn=geometric_transform_attention, family="geometric",
    seeds=(10,),
    paper="GTA: A Geometry-Aware Attention Mechanism for Multi-View Transformers",
    arxiv="2310.10375",
    # Queries read their poses from the key side (the same tokens); cross-attention needs the
    # queries' own poses, which the function takes (`query_poses`) but the layer does not create.
    patterns=frozenset({"self", "causal_self"}),
    token_inputs=(TokenInput("poses", side="kv", kind="given", shape=lambda N, K, H: (6,)),
                  TokenInput("patch_positions", side="kv", kind="given", shape=lambda N, K, H: (2,)))))
