"""Inside-Outside Attention (Shape-Guided Diffusion): a silhouette mask splits tokens into inside (the
object) and outside (the background), and attention weights that cross the split are removed.

    A_ij  = softmax_j(scale · q_i·k_j)                           over the visible keys
    M_ij  = 1 if inside_i == inside_j else 1 - γ                 (γ = `strength`)
    o_i   = Σ_j A_ij M_ij a_j v_j                                (a_j = `kv_attended`, default 1)

Self-attention: `q_inside`, `kv_inside` mark the pixels inside the silhouette, so an inside pixel reads
only inside pixels and an outside one only outside pixels. Cross-attention: `q_inside` marks the
pixels, `kv_inside` the prompt's object tokens (inside) against its background tokens (outside), and
`kv_attended = False` marks tokens no pixel reads (the prompt's start and padding tokens, which the
authors zero). As in the authors' code (github.com/shape-guided-diffusion/shape-guided-diffusion,
`utils.py`, `init_attention_func`), the mask multiplies the softmax weights *after* normalization,
without renormalizing: a row keeps only the mass of its own region, and a row with no key in its
region gives zeros. γ = 1 (their default, and at every inversion step) removes cross-region weights;
γ < 1 scales them by 1 - γ (their `self_attn_schedule`). `renormalize=True` gives the masked-softmax
alternative instead: weights renormalized over the kept keys (cross-region logits + log(1 - γ)).
Not included: the code's extra gain on the edited prompt's cross-attention weights
(`cross_attn_schedule`), a prompt-editing reweighting rather than the inside-outside constraint.

Streamable: pass 1 gets the row's log-sum-exp L_i over the visible keys (flex's residual); pass 2
sums e^{s_ij - L_i} v_j over the same-region keys only (flex's unnormalized `exp` normalizer with the
region mask as a mask_mod, so the `xla` path skips tiles with no same-region key); for γ < 1 a third
pass adds (1 - γ) times the cross-region sum. `renormalize=True` is one masked flex softmax.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]`, `q_inside [B,T]`, `kv_inside [B,S]`,
`kv_attended [B,S]` (bool) → `[B,T,N,h]`.
Paper: Park, Luo, Toste, Azadi, Liu, Karalashvili, Rohrbach and Darrell, "Shape-Guided Diffusion with
Inside-Outside Attention", arXiv:2212.00210 (WACV 2024).
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core.contract import flex_with_contract
from attnjax.registry import Mechanism, TokenInput, register
from attnjax.typing import Key, Lengths, Output, PerKeyToken, PerQueryToken, Query, Value

__all__ = ["inside_outside_attention"]


def inside_outside_attention(q: Query, k: Key, v: Value, *, q_inside: PerQueryToken,
                             kv_inside: PerKeyToken, kv_attended: Optional[PerKeyToken] = None,
                             causal: bool = False, segment_ids=None, q_offset=0,
                             kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                             implementation: Optional[str] = None, strength: float = 1.0,
                             renormalize: bool = False) -> Output:
  """Inside-Outside Attention (see the module docstring): softmax weights that cross the silhouette
  (inside vs outside) removed after normalization."""
  op = "inside_outside_attention"
  B, T, S, _, _, _, _ = checks.check_qkv(op, q, k, v)
  checks.check_shape(op, "q_inside", q_inside, (B, T), "[B, T]")
  checks.check_shape(op, "kv_inside", kv_inside, (B, S), "[B, S]")
  if kv_attended is not None:
    checks.check_shape(op, "kv_attended", kv_attended, (B, S), "[B, S]")
  if not 0.0 <= strength <= 1.0:
    raise ValueError(f"{op}: `strength` must be in [0, 1] (1 removes cross-region weights), got "
                     f"{strength}")
  q_in = jnp.asarray(q_inside, bool)
  kv_in = jnp.asarray(kv_inside, bool)
  attended = None if kv_attended is None else jnp.asarray(kv_attended, bool)

  def region(same: bool):
    def mask_mod(b, n, qi, ki):
      del n
      # Tiles may run past T and S (padding): clip; flex masks those slots anyway.
      qc, kc = jnp.clip(qi, 0, T - 1), jnp.clip(ki, 0, S - 1)
      keep = (q_in[b, qc] == kv_in[b, kc]) == same
      return keep if attended is None else jnp.logical_and(keep, attended[b, kc])
    return mask_mod

  call = lambda **kw: flex_with_contract(op, q, k, v, causal=causal, segment_ids=segment_ids,
                                         q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                                         implementation=implementation, **kw)
  if renormalize:
    if strength == 1.0:
      return call(mask_mod=region(True))
    penalty = jnp.log1p(-jnp.float32(strength))

    def score_mod(s, b, n, qi, ki):
      qc, kc = jnp.clip(qi, 0, T - 1), jnp.clip(ki, 0, S - 1)
      return jnp.where(q_in[b, qc] == kv_in[b, kc], s, s + penalty)

    keep = None if attended is None else (lambda b, n, qi, ki: attended[b, jnp.clip(ki, 0, S - 1)])
    return call(score_mod=score_mod, mask_mod=keep)

  _, lse = call(return_residuals=True)
  # A row with no visible key has L = -inf; a finite stand-in keeps its exponents -inf (masked).
  lse = jnp.where(jnp.isfinite(lse), lse, 0.0)

  def weighted_sum(same: bool):
    def score_mod(s, b, n, qi, ki):
      # lse is [B, T, N]; the indices broadcast as [B, ., ., T, .] with n the query head.
      return s - lse[b, jnp.clip(qi, 0, T - 1), n]
    return call(score_mod=score_mod, mask_mod=region(same), normalizer="exp").astype(jnp.float32)

  out = weighted_sum(True)
  if strength != 1.0:
    out = out + (1.0 - strength) * weighted_sum(False)
  return out.astype(q.dtype)


register(Mechanism(
    name="inside_outside_attention", fn=inside_outside_attention, family="softmax-variant",
    seeds=(181,), paper="Shape-Guided Diffusion with Inside-Outside Attention", arxiv="2212.00210",
    token_inputs=(TokenInput("q_inside", side="q", kind="given", dtype="bool"),
                  TokenInput("kv_inside", side="kv", kind="given", dtype="bool"))))
