"""Differential attention (DIFF Transformer) and OpAmp attention: two softmax maps, amplified.

Both read the same keys and values through two softmax maps and combine them as an amplifier does
its two inputs, a differential-mode and a common-mode term:

    M1 = softmax(scale · q1 k1ᵀ),   M2 = softmax(scale · q2 k2ᵀ)          [T, S] per head
    M̄  = A_d (M1 - M2) + (A_c / 2) (M1 + M2)  =  g1 M1 - g2 M2,   g1,2 = A_d ± A_c / 2
    o  = M̄ V                                                          (`two_map_attention`)

The common-mode rejection ratio is K = A_d / A_c. M1 V and M2 V are two calls of flex attention,
so every flex path (the `xla` one with block skipping) serves both mechanisms, and a row with no
visible key gives zeros.

DIFF Transformer (`differential_attention`): each head's q and k are split in halves, (q1 | q2) and
(k1 | k2) of H/2 features each (the authors' `q.view(..., 2 * num_heads, head_dim)`, pairs of
consecutive half-heads), the value keeps its whole width h, and

    λ  = exp(λ_q1 · λ_k1) - exp(λ_q2 · λ_k2) + λ_init,    λ_init = 0.8 - 0.6 exp(-0.3 (l - 1))
    o  = (1 - λ_init) · RMSNorm((M1 - λ M2) V)          per head over its h features, ε = 1e-5

with the logit scale (H/2)^-1/2 of a half head (layer l = `layer_index` + 1). That is M̄ with
g1 = 1, g2 = λ: A_d = (1 + λ)/2, A_c = 1 - λ, so K = (1 + λ) / (2(1 - λ)) → ∞ as λ → 1. As in the
authors' code (Diff-Transformer/multihead_diffattn.py of github.com/microsoft/unilm) the four λ
vectors [H/2] and the norm's scale [h] are one per layer, shared by the heads; the operator also
takes `[N, H/2]` λ vectors and an `[N, h]` norm scale (one per head). `head_norm=False` gives the
raw (M1 - λ M2) V, without the norm and the (1 - λ_init) factor.

OpAmp (`opamp_attention`): the two maps come from adapters on the pretrained queries and keys,
q_c = E_q^c(q), k_c = E_k^c(k) for c = 1, 2 with E(x) = φ(x W_1) W_2 + x over the heads'
concatenated features (N·H for q, K·H for k; bottleneck r), and

    o = [A_d (M1 - M2) + (A_c / 2)(M1 + M2)] V,    A_c = 1 (`common_mode_gain`),  A_d = K A_c

with K = `cmrr` (10, the paper's best). W_2 starts at zero, so M1 = M2 = M and o = M V: the
pretrained attention, unchanged until the adapters learn. Interpretations: φ is SiLU (the paper
names "a non-linear activation"; SiLU is the Houlsby adapter's default in AdapterHub), r = H by
default (any r is read from the arrays), and in a layer with RoPE the adapters see the rotated q, k
(the operator's inputs). The logit scale is the pretrained H^-1/2.

K → ∞ is the differential limit: o / A_d → (M1 - M2) V; and DIFF's λ corresponds to
K = (1 + λ)/(2(1 - λ)), the two differing by a per-head factor that DIFF's RMSNorm removes.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `[B,T,N,h]`; DIFF: `lambda_* [H/2]` (or
`[N, H/2]`), `norm_scale [h]` (or `[N, h]`); OpAmp: `adapter_q*_down [N·H, r]`, `adapter_q*_up
[r, N·H]`, `adapter_k*_down [K·H, r]`, `adapter_k*_up [r, K·H]`.
Papers: Ye, Dong, Xia, Sun, Zhu, Huang and Wei, "Differential Transformer", arXiv:2410.05258; Wu,
Ming, Zheng, He and Yu, "Efficient OpAmp Adaptation for Zoom Attention to Golden Contexts",
arXiv:2502.12502.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional, Union

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import param_tables
from attnjax.core.contract import flex_with_contract
from attnjax.registry import Mechanism, example_params, register
from attnjax.typing import Array, Float, Key, Lengths, Output, Query, Value

__all__ = ["differential_attention", "opamp_attention", "two_map_attention", "lambda_init_fn",
           "DIFF_TABLE", "OPAMP_TABLE"]

# Per-head or shared gains, λ vectors and norm scales (letters of `attnjax.typing`).
HeadGains = Float[Array, "N"]
Gain = Union[float, HeadGains]
SharedLambda = Float[Array, "Hh"]            # Hh = H/2
HeadLambdas = Float[Array, "N Hh"]
LambdaVector = Union[SharedLambda, HeadLambdas]
SharedNormScale = Float[Array, "h"]
HeadNormScales = Float[Array, "N h"]
NormScale = Union[SharedNormScale, HeadNormScales]
TwoMapOutput = Float[Array, "B T N h"]       # float32
QueryAdapterDown = Float[Array, "NH r"]
QueryAdapterUp = Float[Array, "r NH"]
KeyAdapterDown = Float[Array, "KH r"]
KeyAdapterUp = Float[Array, "r KH"]
# The authors' RMSNorm epsilon (`RMSNorm(2 * head_dim, eps=1e-5)`) and the OpAmp paper's best CMRR.
EPS = 1e-5
CMRR = 10.0


def lambda_init_fn(layer_index: int) -> float:
  """DIFF Transformer's λ_init = 0.8 - 0.6 exp(-0.3 (l - 1)) for layer l = `layer_index` + 1."""
  return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


def two_map_attention(q1: Query, k1: Key, q2: Query, k2: Key, v: Value, *, differential_gain: Gain,
                      common_mode_gain: Gain, causal: bool = False, segment_ids=None, q_offset=0,
                      kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                      implementation: Optional[str] = None,
                      op: str = "two_map_attention") -> TwoMapOutput:
  """[A_d (M1 - M2) + (A_c/2)(M1 + M2)] V for the softmax maps M_c of (q_c, k_c), in float32.

  Gains are scalars or `[N]` (one per query head). Two flex calls under the contract's masks.
  """
  N = q1.shape[2]
  for name, gain in (("differential_gain", differential_gain), ("common_mode_gain", common_mode_gain)):
    if jnp.ndim(gain) not in (0, 1) or (jnp.ndim(gain) == 1 and jnp.shape(gain) != (N,)):
      raise ValueError(f"{op}: `{name}` must be a scalar or have shape [N] = [{N}], "
                       f"got shape {jnp.shape(gain)}")
  call = lambda q, k: flex_with_contract(
      op, q, k, v, causal=causal, segment_ids=segment_ids, q_offset=q_offset,
      kv_lengths=kv_lengths, scale=scale, implementation=implementation).astype(jnp.float32)
  a_d = jnp.asarray(differential_gain, jnp.float32)
  a_c = jnp.asarray(common_mode_gain, jnp.float32)
  g1, g2 = (a_d + a_c / 2)[..., None], (a_d - a_c / 2)[..., None]        # [N, 1] or scalars
  return g1 * call(q1, k1) - g2 * call(q2, k2)


# ----------------------------------------------------------------------------------------------------
# DIFF Transformer

_init = jax.nn.initializers
# (name, shape(N, K, H, h), shape in letters, init): see `attnjax.core.param_tables`. The authors draw
# the λ vectors from N(0, 0.1²) and start the norm's scale at 1.
DIFF_TABLE = (
    ("lambda_q1", lambda N, K, H, h: (H // 2,), "[H/2]", _init.normal(0.1)),
    ("lambda_k1", lambda N, K, H, h: (H // 2,), "[H/2]", _init.normal(0.1)),
    ("lambda_q2", lambda N, K, H, h: (H // 2,), "[H/2]", _init.normal(0.1)),
    ("lambda_k2", lambda N, K, H, h: (H // 2,), "[H/2]", _init.normal(0.1)),
    ("norm_scale", lambda N, K, H, h: (h,), "[h]", _init.ones),
)


def differential_attention(q: Query, k: Key, v: Value, *, lambda_q1: LambdaVector,
                           lambda_k1: LambdaVector, lambda_q2: LambdaVector,
                           lambda_k2: LambdaVector, norm_scale: Optional[NormScale] = None,
                           causal: bool = False, segment_ids=None, q_offset=0,
                           kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                           implementation: Optional[str] = None, layer_index: int = 0,
                           lambda_init: Optional[float] = None, head_norm: bool = True,
                           eps: float = EPS) -> Output:
  """Differential attention: (1 - λ_init) RMSNorm((M1 - λ M2) V) of the half-head maps (see module)."""
  op = "differential_attention"
  _, _, _, N, _, H, h = checks.check_qkv(op, q, k, v)
  if H % 2:
    raise ValueError(f"{op}: the head dim H of `q` and `k` must be even (two halves per head), "
                     f"got H={H}")
  d = H // 2
  lambdas = {"lambda_q1": lambda_q1, "lambda_k1": lambda_k1, "lambda_q2": lambda_q2,
             "lambda_k2": lambda_k2}
  for name, x in lambdas.items():
    if jnp.shape(x) not in ((d,), (N, d)):
      raise ValueError(f"{op}: `{name}` must have shape [H/2] = [{d}] (shared by the heads) or "
                       f"[N, H/2] = [{N}, {d}], got shape {jnp.shape(x)}")
  if norm_scale is not None and jnp.shape(norm_scale) not in ((h,), (N, h)):
    raise ValueError(f"{op}: `norm_scale` must have shape [h] = [{h}] or [N, h] = [{N}, {h}], got "
                     f"shape {jnp.shape(norm_scale)}")
  lam_init = lambda_init_fn(layer_index) if lambda_init is None else float(lambda_init)
  dot = lambda a, b: jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32), axis=-1)
  lam = jnp.exp(dot(lambda_q1, lambda_k1)) - jnp.exp(dot(lambda_q2, lambda_k2)) + lam_init
  lam = jnp.broadcast_to(lam, (N,))
  out = two_map_attention(
      q[..., :d], k[..., :d], q[..., d:], k[..., d:], v,
      # g1 = A_d + A_c/2 = 1 and g2 = A_d - A_c/2 = λ.
      differential_gain=(1.0 + lam) / 2, common_mode_gain=1.0 - lam, causal=causal,
      segment_ids=segment_ids, q_offset=q_offset, kv_lengths=kv_lengths,
      scale=d ** -0.5 if scale is None else scale, implementation=implementation, op=op)
  if head_norm:
    out = out * jax.lax.rsqrt(jnp.mean(jnp.square(out), axis=-1, keepdims=True) + eps)
    if norm_scale is not None:
      out = out * norm_scale.astype(jnp.float32)
    out = out * (1.0 - lam_init)
  return out.astype(q.dtype)


# ----------------------------------------------------------------------------------------------------
# OpAmp

_ADAPTERS = ("q1", "q2", "k1", "k2")


def _adapter_rows():
  rows = []
  for name in _ADAPTERS:
    width = (lambda N, K, H: N * H) if name[0] == "q" else (lambda N, K, H: K * H)
    letters = "N·H" if name[0] == "q" else "K·H"
    # W_1 ~ N(0, 1/in) (fan-in); W_2 = 0, the paper's zero initialization: the adapters start as
    # the identity. The bottleneck r defaults to H.
    rows.append((f"adapter_{name}_down", lambda N, K, H, h, w=width: (w(N, K, H), H),
                 f"[{letters}, r]", param_tables.fan_in_normal))
    rows.append((f"adapter_{name}_up", lambda N, K, H, h, w=width: (H, w(N, K, H)),
                 f"[r, {letters}]", _init.zeros))
  return tuple(rows)


OPAMP_TABLE = _adapter_rows()


def _adapter(x, down, up, activation):
  """E(x) = φ(x W_1) W_2 + x over the heads' concatenated features of `x [B, L, heads, H]`."""
  flat = x.astype(jnp.float32).reshape(x.shape[:2] + (-1,))
  hidden = activation(flat @ down.astype(jnp.float32))
  return (hidden @ up.astype(jnp.float32) + flat).reshape(x.shape).astype(x.dtype)


def opamp_attention(q: Query, k: Key, v: Value, *, adapter_q1_down: QueryAdapterDown,
                    adapter_q1_up: QueryAdapterUp, adapter_q2_down: QueryAdapterDown,
                    adapter_q2_up: QueryAdapterUp, adapter_k1_down: KeyAdapterDown,
                    adapter_k1_up: KeyAdapterUp, adapter_k2_down: KeyAdapterDown,
                    adapter_k2_up: KeyAdapterUp, causal: bool = False, segment_ids=None, q_offset=0,
                    kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                    implementation: Optional[str] = None, cmrr: float = CMRR,
                    common_mode_gain: float = 1.0,
                    activation: Callable[[jax.Array], jax.Array] = jax.nn.silu) -> Output:
  """OpAmp attention: [K A_c (M1 - M2) + (A_c/2)(M1 + M2)] V of adapted q, k (see module)."""
  op = "opamp_attention"
  _, _, _, N, K, H, _ = checks.check_qkv(op, q, k, v)
  if not (math.isfinite(cmrr) and cmrr > 0):
    raise ValueError(f"{op}: `cmrr` must be a finite positive number (K = A_d / A_c), got {cmrr}")
  arrays = {"q1": (adapter_q1_down, adapter_q1_up), "q2": (adapter_q2_down, adapter_q2_up),
            "k1": (adapter_k1_down, adapter_k1_up), "k2": (adapter_k2_down, adapter_k2_up)}
  for name, (down, up) in arrays.items():
    width, letters = (N * H, "N·H") if name[0] == "q" else (K * H, "K·H")
    r = jnp.shape(down)[-1] if jnp.ndim(down) == 2 else None
    checks.check_shape(op, f"adapter_{name}_down", down, (width, None), f"[{letters}, r]")
    checks.check_shape(op, f"adapter_{name}_up", up, (r, width), f"[r, {letters}]")
  adapted = {name: _adapter(q if name[0] == "q" else k, down, up, activation)
             for name, (down, up) in arrays.items()}
  out = two_map_attention(adapted["q1"], adapted["k1"], adapted["q2"], adapted["k2"], v,
                          differential_gain=cmrr * common_mode_gain,
                          common_mode_gain=common_mode_gain, causal=causal,
                          segment_ids=segment_ids, q_offset=q_offset, kv_lengths=kv_lengths,
                          scale=scale, implementation=implementation, op=op)
  return out.astype(q.dtype)


def _opamp_example(*, N, K, H, h):
  # The up-projections start at zero (OpAmp = softmax then): moved a little, so the two maps differ
  # as after some training (K = 10 amplifies their difference, and with it float32 rounding).
  specs = param_tables.param_specs(OPAMP_TABLE, h=h)
  down = example_params([s for s in specs if s.name.endswith("_down")], N=N, K=K, H=H)
  up = example_params([s for s in specs if s.name.endswith("_up")], N=N, K=K, H=H, seed=1,
                      perturb=0.1)
  return {**down, **up}


register(Mechanism(
    name="differential_attention", fn=differential_attention, family="softmax-variant",
    # No catalog row is DIFF Transformer itself: it is the special case row 172 (OpAmp) generalizes.
    seeds=(172,), paper="Differential Transformer", arxiv="2410.05258",
    params=param_tables.param_specs(DIFF_TABLE),
    example=lambda *, N, K, H, h: example_params(param_tables.param_specs(DIFF_TABLE, h=h), N=N,
                                                 K=K, H=H, perturb=0.2)))

register(Mechanism(
    name="opamp_attention", fn=opamp_attention, family="softmax-variant", seeds=(172,),
    paper="Efficient OpAmp Adaptation for Zoom Attention to Golden Contexts", arxiv="2502.12502",
    params=param_tables.param_specs(OPAMP_TABLE),
    example=_opamp_example))
