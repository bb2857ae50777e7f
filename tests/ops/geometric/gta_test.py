"""GTA (arXiv:2310.10375): invariant to a change of world frame applied to every camera pose and to a
shift of every patch position; identity poses and zero positions give plain softmax attention;
against a numpy loop of O_i = ρ(P_i)⁻¹ Σ_j softmax(q_iᵀ ρ(P_i)⁻¹ ρ(P_j) k_j) ρ(P_j) v_j with the full
block-diagonal matrices (GQA, a value width that fits fewer blocks); 4x4 poses equal their 6-vectors;
cross-attention with the queries' own poses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.linalg import block_diag
from scipy.spatial.transform import Rotation

import attnjax as aj
from attnjax.ops.geometric import gta
from tests import tolerances

B, T, N, K, H = 2, 7, 4, 2, 16
G = N // K


def _qkv(h=H, seed=0, S=T):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal(s), jnp.float32)
               for s in ((B, T, N, H), (B, S, K, H), (B, S, K, h)))


def _poses(seed=1, L=T):
  rng = np.random.default_rng(seed)
  rotations, translations = rng.standard_normal((B, L, 3)), 2 * rng.standard_normal((B, L, 3))
  return (jnp.asarray(np.concatenate([rotations, translations], -1), jnp.float32),
          jnp.asarray(rng.random((B, L, 2)), jnp.float32))


def _matrix(vec):
  m = np.eye(4)
  m[:3, :3] = Rotation.from_rotvec(np.array(vec[:3])).as_matrix()
  m[:3, 3] = vec[3:]
  return m


def test_invariant_to_a_change_of_world_frame_and_a_shift_of_positions():
  q, k, v = _qkv()
  poses, positions = _poses()
  base = gta.geometric_transform_attention(q, k, v, poses=poses, patch_positions=positions, causal=True)
  world = _matrix(np.array([0.3, -1.2, 0.7, 4.0, -2.0, 1.5]))
  moved = np.einsum("ij,bljk->blik", world, np.vectorize(_matrix, signature="(6)->(4,4)")(
      np.asarray(poses, np.float64)))
  got = gta.geometric_transform_attention(q, k, v, poses=jnp.asarray(moved, jnp.float32),
                                          patch_positions=positions + 0.37, causal=True)
  np.testing.assert_allclose(np.asarray(got), np.asarray(base), **tolerances.output(jnp.float32))
  # The poses do matter: another set changes the output.
  other = gta.geometric_transform_attention(q, k, v, poses=_poses(7)[0], patch_positions=positions,
                                            causal=True)
  assert tolerances.rel_rms(other, base) > tolerances.STRONG_CHANGE_REL_RMS


def test_identity_poses_give_plain_softmax_attention():
  q, k, v = _qkv()
  got = aj.attention("geometric_transform_attention", q, k, v, poses=jnp.zeros((B, T, 6)),
                     patch_positions=jnp.zeros((B, T, 2)))
  want = aj.attention("softmax", q, k, v)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), **tolerances.output(jnp.float32))


def _np_rho(vec, xy, width, se3_blocks, freqs, sign=1.0):
  """The block-diagonal representation on `width` dims: whole SE(3) blocks, then SO(2) pairs."""
  m = _matrix(vec)
  angles = [2 * np.pi * xy[d] * 2.0 ** f / 2.0 ** freqs for d in range(2) for f in range(1, freqs + 1)]
  blocks, used = [], 0
  for _ in range(min(se3_blocks, width // 4)):
    blocks.append(m)
    used += 4
  for a in angles[:(width - used) // 2]:
    a = sign * a
    blocks.append(np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]))
    used += 2
  return block_diag(*blocks, np.eye(width - used))


@pytest.mark.parametrize("h", [H, 10])
def test_matches_a_numpy_loop_of_the_formula(h):
  q, k, v = _qkv(h=h, seed=2)
  poses, positions = _poses(3)
  got = gta.geometric_transform_attention(q, k, v, poses=poses, patch_positions=positions, se3_blocks=2,
                                          so2_freqs=1)
  qn, kn, vn, pn, xn = (np.asarray(a, np.float64) for a in (q, k, v, poses, positions))
  want = np.zeros((B, T, N, h))
  for b in range(B):
    rho = [_np_rho(pn[b, j], xn[b, j], H, 2, 1) for j in range(T)]
    rho_v = [_np_rho(pn[b, j], xn[b, j], h, 2, 1) for j in range(T)]
    for n in range(N):
      for i in range(T):
        s = np.array([qn[b, i, n] @ np.linalg.inv(rho[i]) @ rho[j] @ kn[b, j, n // G]
                      for j in range(T)]) / np.sqrt(H)
        a = np.exp(s - s.max())
        a /= a.sum()
        ctx = sum(a[j] * rho_v[j] @ vn[b, j, n // G] for j in range(T))
        want[b, i, n] = np.linalg.inv(rho_v[i]) @ ctx
  np.testing.assert_allclose(np.asarray(got), want, **tolerances.output(jnp.float32))


def test_rigid_matrices_equal_their_six_vectors():
  q, k, v = _qkv(seed=4)
  poses, positions = _poses(5)
  mats = np.vectorize(_matrix, signature="(6)->(4,4)")(np.asarray(poses, np.float64))
  np.testing.assert_allclose(np.asarray(gta.rigid_matrices(poses)), mats,
                             **tolerances.output(jnp.float32))
  a = gta.geometric_transform_attention(q, k, v, poses=poses, patch_positions=positions)
  b = gta.geometric_transform_attention(q, k, v, poses=jnp.asarray(mats, jnp.float32),
                                        patch_positions=positions)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), **tolerances.output(jnp.float32))


def test_cross_attention_with_the_queries_own_poses_and_gradients():
  S = 5
  q, k, v = _qkv(seed=6, S=S)
  poses, positions = _poses(8, L=S)
  qp, qx = _poses(9)

  def run(k, poses):
    return gta.geometric_transform_attention(q, k, v, poses=poses, patch_positions=positions,
                                             query_poses=qp, query_patch_positions=qx)

  out = run(k, poses)
  assert out.shape == (B, T, N, H)
  grads = jax.grad(lambda k, p: jnp.sum(jnp.sin(run(k, p))), argnums=(0, 1))(k, poses)
  for g in grads:
    assert np.all(np.isfinite(g)) and float(jnp.max(jnp.abs(g))) > 0
  with pytest.raises(ValueError, match="query_poses"):
    gta.geometric_transform_attention(q, k, v, poses=poses, patch_positions=positions)


def test_bad_inputs_are_clear_errors():
  q, k, v = _qkv()
  poses, positions = _poses()
  with pytest.raises(ValueError, match=r"poses.*\[B, S, 6\]"):
    gta.geometric_transform_attention(q, k, v, poses=poses[..., :5], patch_positions=positions)
  with pytest.raises(ValueError, match="se3_blocks"):
    gta.geometric_transform_attention(q, k, v, poses=poses, patch_positions=positions, se3_blocks=4)
