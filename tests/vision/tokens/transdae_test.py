"""TransDAE's dual attention (#8, arXiv:2409.02018): efficient spatial attention then transposed
channel attention, against a float64 loop rewrite of the paper's equations; the channel affinity is
C_g x C_g whatever the image size, and the efficient attention equals softmax-normalized linear
attention computed pixel by pixel."""

import jax.numpy as jnp
import numpy as np

from attnjax.vision import tokens
from tests import tolerances


def _softmax(z, axis):
  e = np.exp(z - z.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _layer_norm(x, scale, bias):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * scale + bias


def _weights(rng, C, dk, dv, G):
  n = lambda *s: rng.standard_normal(s)
  return dict(ln1_scale=1 + 0.1 * n(C), ln1_bias=0.1 * n(C), ea_wq=n(C, dk) / np.sqrt(C),
              ea_bq=n(dk), ea_wk=n(C, dk) / np.sqrt(C), ea_wv=n(C, dv) / np.sqrt(C),
              ea_bv=n(dv), ea_wo=n(dv, C) / np.sqrt(dv), ea_bo=n(C), ln2_scale=1 + 0.1 * n(C),
              ln2_bias=0.1 * n(C), ca_w_qkv=n(C, 3 * C) / np.sqrt(C), ca_temperature=1 + n(G) ** 2,
              ca_w_proj=n(C, C) / np.sqrt(C), ca_b_proj=n(C))


def _reference(x, w, sh, G):
  B, H, W, C = x.shape
  P = H * W
  out = np.zeros((B, P, C))
  for b in range(B):
    X = x[b].reshape(P, C)
    Xn = _layer_norm(X, w["ln1_scale"], w["ln1_bias"])
    Q, K, V = Xn @ w["ea_wq"] + w["ea_bq"], Xn @ w["ea_wk"], Xn @ w["ea_wv"] + w["ea_bv"]
    dk, dv = Q.shape[1] // sh, V.shape[1] // sh
    E = np.zeros((P, V.shape[1]))
    for h in range(sh):
      q = _softmax(Q[:, h * dk:(h + 1) * dk], axis=1)
      k = _softmax(K[:, h * dk:(h + 1) * dk], axis=0)
      v = V[:, h * dv:(h + 1) * dv]
      for i in range(P):                                         # pixel by pixel
        for j in range(P):
          E[i, h * dv:(h + 1) * dv] += (q[i] @ k[j]) * v[j]
    X1 = X + E @ w["ea_wo"] + w["ea_bo"]
    qkv = _layer_norm(X1, w["ln2_scale"], w["ln2_bias"]) @ w["ca_w_qkv"]
    cg = C // G
    Z = np.zeros((P, C))
    for g in range(G):
      q, k, v = (qkv[:, s * C + g * cg: s * C + (g + 1) * cg] for s in range(3))
      q = q / np.linalg.norm(q, axis=0)
      k = k / np.linalg.norm(k, axis=0)
      A = _softmax(w["ca_temperature"][g] * q.T @ k, axis=1)      # [C_g, C_g]
      Z[:, g * cg:(g + 1) * cg] = (A @ v.T).T
    out[b] = X1 + Z @ w["ca_w_proj"] + w["ca_b_proj"]
  return out.reshape(B, H, W, C)


def test_dual_attention_against_float64_loops():
  rng = np.random.default_rng(0)
  B, H, W, C, dk, dv, sh, G = 2, 3, 4, 8, 6, 4, 2, 2
  x = rng.standard_normal((B, H, W, C))
  w = _weights(rng, C, dk, dv, G)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  y, (rho_q, rho_k, attn) = tokens.transdae_dual_attention(
      f32(x), **{k: f32(v) for k, v in w.items()}, spatial_heads=sh, channel_heads=G,
      return_gate=True)
  np.testing.assert_allclose(y, _reference(x, w, sh, G), **tolerances.output(jnp.float32))
  assert rho_q.shape == rho_k.shape == (B, H * W, dk)
  assert attn.shape == (B, G, C // G, C // G)


def test_channel_affinity_size_does_not_depend_on_the_image_size():
  rng = np.random.default_rng(1)
  C, G = 8, 4
  w = {k: jnp.asarray(v, jnp.float32) for k, v in _weights(rng, C, C, C, G).items()}
  for H, W in ((2, 3), (7, 5)):
    x = jnp.asarray(rng.standard_normal((1, H, W, C)), jnp.float32)
    _, (_, rho_k, attn) = tokens.transdae_dual_attention(x, **w, channel_heads=G, return_gate=True)
    assert attn.shape == (1, G, C // G, C // G)
    np.testing.assert_allclose(np.asarray(rho_k).sum(axis=1), 1.0, **tolerances.output(jnp.float32))
