"""Rectified linear attention (ReLA): ReLU scores in place of softmax, stabilized by a gated RMSNorm.

    a_ij = relu(scale · q_i·k_j)                              (no normalization over keys)
    u_i  = Σ_j a_ij v_j                                       [N, h] per token, heads concatenated
    o_i  = g ⊙ u_i / sqrt(mean(u_i²) + ε) ⊙ σ(w ⊙ u_i)       mean over all N·h channels of the token

A row whose scores are all ≤ 0 gets all-zero weights (the head attends to nothing, a sparsity softmax
cannot express) and its output is 0. The RMSNorm runs over the token's heads concatenated, as in the
authors' code (`modules/rela.py` of github.com/bzhangGo/zero: `combine_heads`, then `gated_rms_norm`
with ε = 1e-8 and the elementwise gate σ(w ⊙ u) of ReLA-g). `rms_gate=None` gives ReLA without the
gate. The ReLU weights are flex's unnormalized `relu` normalizer, so every `flex_attention` path serves
them; the norm is a per-token step after it, so decoding over a KV cache equals the full forward.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]`; `rms_scale`, `rms_gate` `[N, h]` → `[B,T,N,h]`.
Paper: Zhang, Titov and Sennrich, "Sparse Attention with Linear Units", arXiv:2104.07012.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import param_tables
from attnjax.core.contract import flex_with_contract
from attnjax.registry import Mechanism, example_params, register
from attnjax.typing import Key, Lengths, Output, Query, Value

__all__ = ["rectified_linear_attention", "RELA_TABLE"]

# The authors' code's epsilon (utils/dtype.py of bzhangGo/zero).
EPS = 1e-8

_init = jax.nn.initializers
# (name, shape(N, K, H, h), shape in letters, init): see `attnjax.core.param_tables`. The gate starts
# at w = 0 (σ = 1/2 everywhere); the authors' TensorFlow default draws small uniform values.
RELA_TABLE = (
    ("rms_scale", lambda N, K, H, h: (N, h), "[N, h]", _init.ones),
    ("rms_gate", lambda N, K, H, h: (N, h), "[N, h]", _init.zeros),
)


def rectified_linear_attention(q: Query, k: Key, v: Value, *, rms_scale: jax.Array,
                               rms_gate: Optional[jax.Array] = None, causal: bool = False,
                               segment_ids=None, q_offset=0, kv_lengths: Optional[Lengths] = None,
                               scale: Optional[float] = None, eps: float = EPS,
                               implementation: Optional[str] = None) -> Output:
  """ReLA (see the module docstring): ReLU attention, then the gated RMSNorm over each token's heads."""
  op = "rectified_linear_attention"
  _, _, _, N, K, H, h = checks.check_qkv(op, q, k, v)
  params = {"rms_scale": rms_scale} if rms_gate is None else {"rms_scale": rms_scale,
                                                               "rms_gate": rms_gate}
  param_tables.check_table(op, [row for row in RELA_TABLE if row[0] in params], params,
                           N=N, K=K, H=H, h=h)
  u = flex_with_contract(op, q, k, v, causal=causal, segment_ids=segment_ids, q_offset=q_offset,
                         kv_lengths=kv_lengths, scale=scale, implementation=implementation,
                         normalizer="relu").astype(jnp.float32)
  ms = jnp.mean(jnp.square(u), axis=(-2, -1), keepdims=True)
  out = rms_scale.astype(jnp.float32) * u * jax.lax.rsqrt(ms + eps)
  if rms_gate is not None:
    out = out * jax.nn.sigmoid(rms_gate.astype(jnp.float32) * u)
  return out.astype(q.dtype)


register(Mechanism(
    name="rectified_linear_attention", fn=rectified_linear_attention, family="softmax-variant",
    seeds=(210,), paper="Sparse Attention with Linear Units", arxiv="2104.07012",
    params=param_tables.param_specs(RELA_TABLE),
    example=lambda *, N, K, H, h: example_params(param_tables.param_specs(RELA_TABLE, h=h), N=N, K=K,
                                                 H=H, perturb=0.5)))
