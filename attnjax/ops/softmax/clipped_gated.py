"""Clipped softmax and gated attention: two ways to let an attention head do nothing.

    p_ij = softmax_j(scale · q_i·k_j)                               (over the visible keys)
    w_ij = clip((ζ - γ) · p_ij + γ, 0, 1)                           clipped softmax, ζ ≥ 1, γ ≤ 0
    o_i  = σ(G_i) · Σ_j w_ij v_j                                    gated attention, per head

Softmax can only give a key a weight of exactly 0 (or a row's total weight of exactly 1) at infinite
logits, so a head that should leave the residual stream unchanged learns huge logit gaps, and those
are the activation outliers that break INT8 quantization. With γ < 0 every probability below
-γ/(ζ - γ) becomes an exact 0 (with ζ > 1, every one above (1 - γ)/(ζ - γ) an exact 1) at finite
logits: a row of n nearly uniform weights with 1/n < -γ/(ζ - γ) outputs exactly 0. The gate
σ(G_i) ∈ (0, 1), one per query token and head, lets a head switch its update off without touching
the weights. The paper proposes the two as alternatives; here both are one operator: ζ = 1, γ = 0 is
plain softmax (one flex pass), `gate_logits=None` no gate.

`gate_logits` `[B, T, N]` holds G(x_i): in a `MultiHeadAttention` layer a projection of the layer
input to one logit per head (the `TokenInput`, with a bias initialized to 0, so σ = 0.5 at the start:
the authors' default `attn_gate_init`), i.e. their `attn_gate_linear_all_features` gate Linear(d_model
→ heads); their default feeds each head's own slice of x to its own Linear(d_head → 1), which is the
same map with a block-diagonal weight. The operator applies the sigmoid (`Mechanism.token_inputs`
declares no activation), so a caller passes logits and `gate_logits=None` means ungated.
`clipped_softmax_attention` is the same operator registered without the gate.

γ is a fixed setting: the authors use γ = -α/T with T the training sequence length (α = 12 at T = 512
for OPT: γ ≈ -0.023; γ = -0.025 at T = 128 for BERT, the default here) and ζ = 1 (their
`clipped_softmax(..., eta=1.0)`). It does not follow the number of keys a row sees, so decoding over a
KV cache equals the full forward.

Streamable in two flex passes (as `cog.py`): the row's log-sum-exp L_i (flex's residual), then the
unnormalized weights clip((ζ - γ) e^{s_ij - L_i} + γ, 0, 1) as a normalizer of flex with a score_mod
that subtracts L_i: each clipped weight is exact per element, and the `xla` path with block skipping
serves both passes. A row with no visible key gives zeros.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]`, `gate_logits [B,T,N]` → `[B,T,N,h]`.
Paper: Bondarenko, Nagel and Blankevoort, "Quantizable Transformers: Removing Outliers by Helping
Attention Heads Do Nothing", arXiv:2306.12929 (authors' code: github.com/Qualcomm-AI-research/
outlier-free-transformers, `transformers_language/models/{softmax,opt_attention}.py`).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core.contract import flex_with_contract
from attnjax.core.normalizers import Normalizer
from attnjax.registry import Mechanism, TokenInput, register
from attnjax.typing import Key, Lengths, Output, Query, QueryHeadScalars, Value

__all__ = ["clipped_softmax_gated_attention", "clipped_softmax_attention", "clipped_normalizer"]

# γ of the authors' BERT-base run (`--attn_softmax "clipped(-.025:1)"`, T = 128); ζ = 1 throughout.
DEFAULT_ZETA = 1.0
DEFAULT_GAMMA = -0.025


@functools.lru_cache(maxsize=None)
def clipped_normalizer(zeta: float, gamma: float) -> Normalizer:
  """The unnormalized weights clip((ζ - γ)·e^s + γ, 0, 1) of a score s = logit - L (L the row's
  log-sum-exp, so e^s is the softmax probability). One object per (ζ, γ), so compiled programs that
  close over it are shared."""
  stretch = zeta - gamma
  return Normalizer(f"clipped_softmax(zeta={zeta}, gamma={gamma})",
                    weight=lambda s, m: jnp.clip(stretch * jnp.exp(s) + gamma, 0.0, 1.0),
                    normalized=False)


def _check_settings(op: str, zeta, gamma):
  if not isinstance(zeta, (int, float)) or not zeta >= 1.0:
    raise ValueError(f"{op}: `zeta` (the stretch ζ) must be a float >= 1, got {zeta!r}")
  if not isinstance(gamma, (int, float)) or not gamma <= 0.0:
    raise ValueError(f"{op}: `gamma` (the stretch γ) must be a float <= 0, got {gamma!r}")


def clipped_softmax_gated_attention(q: Query, k: Key, v: Value, *,
                                    gate_logits: Optional[QueryHeadScalars] = None,
                                    causal: bool = False, segment_ids=None, q_offset=0,
                                    kv_lengths: Optional[Lengths] = None,
                                    scale: Optional[float] = None,
                                    implementation: Optional[str] = None,
                                    zeta: float = DEFAULT_ZETA,
                                    gamma: float = DEFAULT_GAMMA) -> Output:
  """Clipped softmax clip((ζ-γ)·softmax + γ, 0, 1) with a per-token head gate σ(gate_logits)."""
  op = "clipped_softmax_gated_attention"
  B, T, _, N, _, _, _ = checks.check_qkv(op, q, k, v)
  _check_settings(op, zeta, gamma)
  if gate_logits is not None:
    checks.check_shape(op, "gate_logits", gate_logits, (B, T, N), "[B, T, N]")
  call = lambda **kw: flex_with_contract(op, q, k, v, causal=causal, segment_ids=segment_ids,
                                         q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                                         implementation=implementation, **kw)
  if zeta == 1.0 and gamma == 0.0:
    out = call().astype(jnp.float32)                      # clip(p, 0, 1) = p: plain softmax
  else:
    _, lse = call(return_residuals=True)
    # An empty row (L = -inf) has no visible key; a finite stand-in keeps its scores finite.
    lse = jnp.where(jnp.isfinite(lse), lse, 0.0)

    def score_mod(s, b, n, qi, ki):
      # lse is [B, T, N]; the indices broadcast as [B, ., ., T, .] with n the query head.
      return s - lse[b, qi, n]

    out = call(score_mod=score_mod, normalizer=clipped_normalizer(float(zeta), float(gamma)))
    out = out.astype(jnp.float32)
  if gate_logits is not None:
    out = out * jax.nn.sigmoid(gate_logits.astype(jnp.float32))[..., None]
  return out.astype(q.dtype)


def clipped_softmax_attention(q: Query, k: Key, v: Value, *, causal: bool = False,
                              segment_ids=None, q_offset=0, kv_lengths: Optional[Lengths] = None,
                              scale: Optional[float] = None, implementation: Optional[str] = None,
                              zeta: float = DEFAULT_ZETA, gamma: float = DEFAULT_GAMMA) -> Output:
  """Clipped softmax clip((ζ-γ)·softmax + γ, 0, 1) alone (the ungated operator, see module)."""
  return clipped_softmax_gated_attention(q, k, v, causal=causal, segment_ids=segment_ids,
                                         q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                                         implementation=implementation, zeta=zeta, gamma=gamma)


_PAPER = "Quantizable Transformers: Removing Outliers by Helping Attention Heads Do Nothing"

register(Mechanism(
    name="clipped_softmax_gated_attention", fn=clipped_softmax_gated_attention,
    family="softmax-variant", seeds=(81,), paper=_PAPER, arxiv="2306.12929",
    # G(x): one logit per query head, projected from the layer input; the operator applies σ.
    token_inputs=(TokenInput("gate_logits", side="q", shape=lambda N, K, H: (N,)),),
    # A stronger γ than the default, so the test sizes (rows of up to 23 keys) clip many weights.
    example={"gamma": -0.05}))

register(Mechanism(
    name="clipped_softmax_attention", fn=clipped_softmax_attention, family="softmax-variant",
    seeds=(81,), paper=_PAPER, arxiv="2306.12929", example={"gamma": -0.05}))
