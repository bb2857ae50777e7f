"""DiffuSSM block: a gated bidirectional state-space model over the flattened tokens, inside an
hourglass of dense layers that expands the sequence M-fold around the SSM and contracts it back:

    U_l = σ(W↑_k σ(W⁰ I_j))                       ∈ R^{L×2D},  l = jM + k, k ∈ [0, M)
    Y = BiSSM(U)                                   ∈ R^{L×2D}   (over all L = M·J tokens)
    I'_j[D_m k : D_m (k + 1)] = σ(W↓_k Y_{jM+k})   ∈ R^{J×2D},  D_m = 2D / M
    O_j = W³ (σ(W² I'_j) ⊙ σ(W¹ I_j))              ∈ R^{J×D}

with σ = GELU. I `[J, D]` is the feature map flattened row-major (J = H·W tokens); each token is
expanded to M by its own up-projection `W↑_k`, the SSM mixes the whole length-L sequence in both
directions, and `W↓_k` folds the M tokens of a group back into one (each into its slice of the 2D
channels); the gate `σ(W¹ I)` multiplies the SSM branch. The bidirectional SSM is diagonal (S4D-Real,
zero-order hold) per channel c and state n, one recurrence each way plus a skip:

    ā = exp(Δ_c A_cn),  b̄ = (ā - 1) / A_cn · B_cn,  A = -exp(log_a),  Δ = exp(log_dt)
    h→_l = ā h→_{l-1} + b̄ u_l,   h←_l = ā' h←_{l+1} + b̄' u_l
    y_l = Σ_n C_cn h→_ln + Σ_n C'_cn h←_ln + d_c u_l

so every output depends on tokens on both sides (a causal scan alone sees only the past). The scans
run as `jax.lax.associative_scan` (O(L log L) depth, O(L) work). Shapes: `x [B, H, W, D] -> [B, H, W,
D]`; `w0 [D, D]`, `w_up [M, D, 2D]`, `w_down [M, 2D, 2D/M]`, `w1 [D, 2D]`, `w2 [2D, 2D]`,
`w3 [2D, D]`; per direction (`fwd_`, `bwd_`) `log_dt [2D]`, `log_a [2D, N]`, `b [2D, N]`,
`c [2D, N]`; `skip [2D]`.
Paper: Yan, Gu and Rush, "Diffusion Models Without Attention", arXiv:2311.18257.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import conv2d
from attnjax.typing import Array, Float

__all__ = ["DiffuSSMBlock", "bidirectional_ssm", "diffussm_block"]

FeatureMap = Float[Array, "B H W D"]
Sequence = Float[Array, "B L C"]
ChannelStates = Float[Array, "C N"]
Channels = Float[Array, "C"]


# Compiled once per shape: the scan's tree of slices would otherwise dispatch op by op when eager.
@functools.partial(jax.jit, static_argnames="reverse")
def _scan(a, bu, reverse):
  """`h_l = a ⊙ h_{l∓1} + bu_l` over axis 1 (a `[C, N]` constant, bu `[B, L, C, N]`)."""
  combine = lambda p, q: (p[0] * q[0], q[0] * p[1] + q[1])
  decay = jnp.broadcast_to(a, bu.shape)
  return jax.lax.associative_scan(combine, (decay, bu), axis=1, reverse=reverse)[1]


def bidirectional_ssm(u: Sequence, *, fwd_log_dt: Channels, fwd_log_a: ChannelStates,
                      fwd_b: ChannelStates, fwd_c: ChannelStates, bwd_log_dt: Channels,
                      bwd_log_a: ChannelStates, bwd_b: ChannelStates, bwd_c: ChannelStates,
                      skip: Channels) -> Sequence:
  """The diagonal S4D-Real SSM run forward and backward over `u [B, L, C]`, summed with the skip
  `d ⊙ u` (module docstring); float32."""
  u = jnp.asarray(u, jnp.float32)
  y = jnp.asarray(skip, jnp.float32) * u
  for log_dt, log_a, b, c, reverse in ((fwd_log_dt, fwd_log_a, fwd_b, fwd_c, False),
                                       (bwd_log_dt, bwd_log_a, bwd_b, bwd_c, True)):
    A = -jnp.exp(jnp.asarray(log_a, jnp.float32))
    a = jnp.exp(jnp.exp(jnp.asarray(log_dt, jnp.float32))[:, None] * A)
    b_bar = (a - 1.0) / A * jnp.asarray(b, jnp.float32)
    h = _scan(a, u[..., None] * b_bar, reverse)                # [B, L, C, N]
    y = y + jnp.einsum("blcn,cn->blc", h, jnp.asarray(c, jnp.float32))
  return y


def diffussm_block(x: FeatureMap, *, w0, w_up, w_down, w1, w2, w3, fwd_log_dt, fwd_log_a, fwd_b,
                   fwd_c, bwd_log_dt, bwd_log_a, bwd_b, bwd_c, skip) -> FeatureMap:
  """DiffuSSM: `O = W³(σ(W² I') ⊙ σ(W¹ I))`, `I'` the hourglass-folded bidirectional SSM of the
  M-fold expansion of the flattened tokens I (module docstring).

  Args:
    x: `[B, H, W, D]`, flattened row-major to J = H·W tokens.
    w0: `[D, D]`; w_up: `[M, D, 2D]`; w_down: `[M, 2D, 2D/M]`; w1: `[D, 2D]`; w2: `[2D, 2D]`;
      w3: `[2D, D]` (M, the expansion ratio, from w_up).
    fwd_log_dt, bwd_log_dt: `[2D]`; fwd_log_a, fwd_b, fwd_c, bwd_log_a, bwd_b, bwd_c: `[2D, N]`;
      skip: `[2D]` (the bidirectional SSM's parameters).

  Returns:
    `[B, H, W, D]` in x's dtype.
  """
  op = "diffussm_block"
  B, H, W, D = conv2d.check_feature_map(op, x)
  if jnp.ndim(w_up) != 3:
    raise ValueError(f"{op}: `w_up` must have shape [M, D, 2D] (D = {D}), got {jnp.shape(w_up)}")
  M = w_up.shape[0]
  if (2 * D) % M:
    raise ValueError(f"{op}: the expansion ratio M = {M} (from `w_up`) must divide 2D = {2 * D}")
  N = jnp.shape(fwd_log_a)[-1] if jnp.ndim(fwd_log_a) == 2 else -1
  want = {"w0": (D, D), "w_up": (M, D, 2 * D), "w_down": (M, 2 * D, 2 * D // M), "w1": (D, 2 * D),
          "w2": (2 * D, 2 * D), "w3": (2 * D, D), "fwd_log_dt": (2 * D,), "bwd_log_dt": (2 * D,),
          "fwd_log_a": (2 * D, N), "fwd_b": (2 * D, N), "fwd_c": (2 * D, N),
          "bwd_log_a": (2 * D, N), "bwd_b": (2 * D, N), "bwd_c": (2 * D, N), "skip": (2 * D,)}
  given = dict(w0=w0, w_up=w_up, w_down=w_down, w1=w1, w2=w2, w3=w3, fwd_log_dt=fwd_log_dt,
               bwd_log_dt=bwd_log_dt, fwd_log_a=fwd_log_a, fwd_b=fwd_b, fwd_c=fwd_c,
               bwd_log_a=bwd_log_a, bwd_b=bwd_b, bwd_c=bwd_c, skip=skip)
  for name, shape in want.items():
    if N < 1 or jnp.shape(given[name]) != shape:
      raise ValueError(f"{op}: `{name}` must have shape {list(shape)} (D = {D}, M = {M}, N = state "
                       f"size from `fwd_log_a`), got {jnp.shape(given[name])}")
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  gelu = lambda a: jax.nn.gelu(a, approximate=False)
  I = f32(x).reshape(B, H * W, D)                                # [B, J, D]
  U = gelu(jnp.einsum("bjd,kde->bjke", gelu(I @ f32(w0)), f32(w_up)))        # [B, J, M, 2D]
  Y = bidirectional_ssm(U.reshape(B, H * W * M, 2 * D), fwd_log_dt=fwd_log_dt, fwd_log_a=fwd_log_a,
                        fwd_b=fwd_b, fwd_c=fwd_c, bwd_log_dt=bwd_log_dt, bwd_log_a=bwd_log_a,
                        bwd_b=bwd_b, bwd_c=bwd_c, skip=skip)
  folded = gelu(jnp.einsum("bjke,kef->bjkf", Y.reshape(B, H * W, M, 2 * D), f32(w_down)))
  I2 = folded.reshape(B, H * W, 2 * D)                           # slices k·D_m ... (k+1)·D_m
  O = (gelu(I2 @ f32(w2)) * gelu(I @ f32(w1))) @ f32(w3)
  return O.reshape(B, H, W, D).astype(x.dtype)


def _s4d_real_log_a(key, shape, dtype):
  """S4D-Real: A_n = -(n + 1), stored as log(n + 1) (the same for every channel)."""
  del key
  return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[-1] + 1, dtype=dtype)), shape)


class DiffuSSMBlock(nn.Module):
  """Creates the DiffuSSM block's weights (expansion ratio `expansion`, `state_size` SSM states per
  channel; dense layers lecun normal, S4D-Real A, Δ log-uniform in [dt_min, dt_max], B = 1,
  C normal / sqrt(N), skip 1) and calls `diffussm_block`."""
  expansion: int = 2
  state_size: int = 8
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    D, M, N = x.shape[-1], self.expansion, self.state_size
    C = 2 * D
    if C % M:
      raise ValueError(f"DiffuSSMBlock: `expansion` {M} must divide 2 · channels = {C}")
    dense = nn.initializers.lecun_normal()
    stack = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=2)
    lo, hi = np.log(self.dt_min), np.log(self.dt_max)
    log_dt = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, lo, hi)
    c_init = nn.initializers.normal(1.0 / np.sqrt(N))
    p = lambda name, init, shape: self.param(name, init, shape, self.param_dtype)
    return diffussm_block(
        x, w0=p("w0", dense, (D, D)), w_up=p("w_up", stack, (M, D, C)),
        w_down=p("w_down", stack, (M, C, C // M)), w1=p("w1", dense, (D, C)),
        w2=p("w2", dense, (C, C)), w3=p("w3", dense, (C, D)),
        fwd_log_dt=p("fwd_log_dt", log_dt, (C,)), fwd_log_a=p("fwd_log_a", _s4d_real_log_a, (C, N)),
        fwd_b=p("fwd_b", nn.initializers.ones, (C, N)), fwd_c=p("fwd_c", c_init, (C, N)),
        bwd_log_dt=p("bwd_log_dt", log_dt, (C,)), bwd_log_a=p("bwd_log_a", _s4d_real_log_a, (C, N)),
        bwd_b=p("bwd_b", nn.initializers.ones, (C, N)), bwd_c=p("bwd_c", c_init, (C, N)),
        skip=p("skip", nn.initializers.ones, (C,)))


# Not registered (catalog row 149's note): the block follows the paper's equations as recalled
# (U, BiSSM, I', O), but neither the paper's Section 4 nor official code could be read to confirm how
# its hourglass lengths (J = L / M contracted tokens, L full-resolution tokens) map onto a feature
# map's H·W tokens; here each of the H·W tokens is expanded M-fold around the SSM.
