"""SeerAttention: a learned gate (AttnGate) picks the key blocks each query block attends to.

    Q̃_u = avgpool_u(q) W_q[n]                    query block u (block_size queries), W_q [N, H, D]
    K̃_β = [maxpool_β(k) ‖ minpool_β(k) ‖ avgpool_β(k)] W_k[κ]     key block β, W_k [K, 3H, D]
    P_uβ = softmax_β(Q̃_u · K̃_β / √D)             over the candidate blocks (causal: β ≤ u)
    keep(u, β) = β in top_k(P_u·)  or  P_uβ > threshold
    o_t = softmax attention of query t over the keys of the blocks its block u keeps (and the contract)

The block-sparse attention is `flex_attention` on a traced `BlockMask` that visits only the kept tiles
(`attnjax.core.sparse.selection_mask`); keeping every candidate is exactly full attention.

The gate is trained by self-distillation (`seer_gate_loss`), not through the attention: the target
(`seer_gate_target`) is the model's own softmax attention map max-pooled over each block_size ×
block_size tile and normalized per query block, and the loss is KL(target ‖ softmax(gate logits)),
averaged over all entries (the authors' `torch.nn.KLDivLoss()`; they drop the first quarter of the
query blocks for stability: slice the arrays to do the same). Selection is a top-k/threshold, so the
attention output carries no gradient to W_q, W_k.

Interpretations (authors' code github.com/microsoft/SeerAttention, `seer_attn/attn_gate.py`, default
gate "Qavg_Kmaxminavg"): pooling order max, min, avg; per-head projections for q and k (the
`force_double` form: one per query head, one per key/value head, repeated over its GQA group); gate
width D = H; scale 1/√D. The authors apply RoPE to the pooled block vectors at block positions; here
the gate pools the q, k it is given (the layer's positions are already applied), so it adds none.
Query blocks are the call's queries from t = 0 (ceil mode: the last one may be partial), so a decode
step over a cache is its own one-query block: no `decode` (the authors decode densely too).

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]`, `gate_q [N,H,D]`, `gate_k [K,3H,D]` →
`[B,T,N,h]`. Paper: Gao et al., "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs",
arXiv:2410.13276.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax import catalog
from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import dense
from attnjax.core import flex
from attnjax.core import param_tables
from attnjax.core import sparse
from attnjax.registry import Mechanism, example_params, register
from attnjax.typing import Array, Float, Key, Lengths, Output, Query, Value

__all__ = ["seer_attention", "seer_gate_logits", "seer_gate_target", "seer_gate_loss", "SEER_TABLE"]

OP = "seer_attention"
# The gate's projections (D its width) and a block-level map over (query block, key block).
GateQ = Float[Array, "N H D"]
GateK = Float[Array, "K H3 D"]
BlockMap = Float[Array, "B N U nb"]
# (name, shape(N, K, H, h), letters, init): the gate's per-head projections (D = H).
SEER_TABLE = (
    ("gate_q", lambda N, K, H, h: (N, H, H), "[N, H, D=H]", param_tables.fan_in_normal),
    ("gate_k", lambda N, K, H, h: (K, 3 * H, H), "[K, 3H, D=H]", param_tables.fan_in_normal),
)


def _check(op, q, k, gate_q, gate_k, block_size):
  B, T, S, N, K, H, _ = checks.check_qkv(op, q, k, k)
  if not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"{op}: `block_size` must be a positive int, got {block_size!r}")
  D = gate_q.shape[-1] if jnp.ndim(gate_q) == 3 else H
  checks.check_shape(op, "gate_q", gate_q, (N, H, D), "[N, H, D]")
  checks.check_shape(op, "gate_k", gate_k, (K, 3 * H, D), "[K, 3H, D]")
  return B, T, S, N, K, H, D


def seer_gate_logits(q: Query, k: Key, *, gate_q: GateQ,
                     gate_k: GateK, block_size: int, causal: bool = False,
                     q_offset=0, kv_lengths: Optional[Lengths] = None):
  """The AttnGate's block scores: `(logits [B, N, U, nb] float32, candidates [B, 1, U, nb] bool)`,
  U = ceil(T / block_size) query blocks, nb = ceil(S / block_size) key blocks; logits of blocks a
  query block may not select (causal, padding) are -inf. `softmax(logits, -1)` is the gate's P."""
  B, T, S, N, K, H, D = _check("seer_gate_logits", q, k, gate_q, gate_k, block_size)
  qp = sparse.pool_blocks(q, block_size)                                        # [B, U, N, H]
  kmax = sparse.pool_blocks(k, block_size, pool="max", lengths=kv_lengths)
  kmin = -sparse.pool_blocks(-k, block_size, pool="max", lengths=kv_lengths)
  kavg = sparse.pool_blocks(k, block_size, pool="mean", lengths=kv_lengths)
  kp = jnp.concatenate([kmax, kmin, kavg], axis=-1)                             # [B, nb, K, 3H]
  qg = jnp.einsum("bunh,nhd->bund", qp, gate_q.astype(jnp.float32))
  kg = jnp.einsum("bjkh,khd->bjkd", kp, gate_k.astype(jnp.float32))
  qg = qg.reshape(B, qg.shape[1], K, N // K, D)
  logits = jnp.einsum("bukgd,bjkd->bkguj", qg, kg).reshape(B, N, qg.shape[1], kg.shape[1])
  candidates = sparse.candidate_blocks(B=B, T=T, S=S, q_block=block_size, block_size=block_size,
                                       causal=causal, q_offset=q_offset, kv_lengths=kv_lengths)
  return jnp.where(candidates, logits * D ** -0.5, -jnp.inf), candidates


def seer_attention(q: Query, k: Key, v: Value, *, gate_q: GateQ,
                   gate_k: GateK, causal: bool = False, segment_ids=None,
                   q_offset=0, kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                   implementation: Optional[str] = None, block_size: int = 64,
                   top_k: Optional[int] = None, threshold: Optional[float] = None) -> Output:
  """SeerAttention (see the module docstring): AttnGate block selection, then block-sparse softmax."""
  B, T, S, *_ = checks.check_qkv(OP, q, k, v)
  if segment_ids is not None:
    raise ValueError(f"{OP}: packed sequences (`segment_ids`) are not supported (a pooled block "
                     "mixes the documents it spans)")
  if top_k is None and threshold is None:
    raise ValueError(f"{OP}: give `top_k` (blocks per query block) and/or `threshold` (on the "
                     "gate's softmax)")
  logits, candidates = seer_gate_logits(q, k, gate_q=gate_q, gate_k=gate_k, block_size=block_size,
                                        causal=causal, q_offset=q_offset, kv_lengths=kv_lengths)
  probs = jax.nn.softmax(jnp.where(candidates, logits, -1e30), axis=-1)
  selected = sparse.top_k_blocks(probs, top_k or 0, candidates=candidates)
  if threshold is not None:
    selected = selected | (candidates & (probs > threshold))
  base = contract.contract_mask(B=B, T=T, S=S, causal=causal, q_offset=q_offset,
                                kv_lengths=kv_lengths, op=OP)
  block_mask, mask_mod = sparse.selection_mask(selected, T=T, S=S, q_block=block_size,
                                               block_size=block_size, base_mask=base)
  if checks.check_implementation(OP, implementation) == "reference":
    return flex.flex_attention(q, k, v, mask_mod=mask_mod, scale=scale, implementation="reference")
  return flex.flex_attention(q, k, v, block_mask=block_mask, scale=scale, implementation="xla")


@catalog.serves(78, kind="function", name="attnjax.ops.sparse.seer_gate_target")
def seer_gate_target(q: Query, k: Key, *, block_size: int, causal: bool = False, q_offset=0,
                     kv_lengths: Optional[Lengths] = None,
                     scale: Optional[float] = None) -> BlockMap:
  """The AttnGate's distillation target `[B, N, U, nb]` float32: the softmax attention map (under
  the contract's masks) max-pooled over each block_size × block_size tile, each query block's row
  divided by its sum (a row with nothing visible is 0). Dense: materializes `[B, N, T, S]`."""
  B, T, S, N, _, _, _ = checks.check_qkv("seer_gate_target", q, k, k)
  s, visible = dense.contract_scores("seer_gate_target", q, k, k, causal=causal, q_offset=q_offset,
                                     kv_lengths=kv_lengths, scale=scale)
  lse = dense.masked_logsumexp(s, visible)
  w = jnp.where(visible, jnp.exp(jnp.where(visible, s - lse, 0.0)), 0.0)
  U, nb = sparse.num_blocks(T, block_size), sparse.num_blocks(S, block_size)
  w = jnp.pad(w, ((0, 0), (0, 0), (0, U * block_size - T), (0, nb * block_size - S)))
  pooled = jnp.max(w.reshape(B, N, U, block_size, nb, block_size), axis=(3, 5))
  total = jnp.sum(pooled, axis=-1, keepdims=True)
  return jax.lax.stop_gradient(pooled / jnp.where(total > 0, total, 1.0))


@catalog.serves(78, kind="loss", name="attnjax.ops.sparse.seer_gate_loss")
def seer_gate_loss(q: Query, k: Key, *, gate_q: GateQ,
                   gate_k: GateK, block_size: int, causal: bool = False,
                   q_offset=0, kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                   target: Optional[jax.Array] = None) -> jax.Array:
  """The AttnGate's self-distillation loss: `mean over [B, N, U, nb] of target · (log target −
  log_softmax(gate logits))` (0 where target = 0), with `target` = `seer_gate_target` (computed,
  without gradient, when not given). Differentiable in `gate_q`, `gate_k` (and q, k)."""
  logits, candidates = seer_gate_logits(q, k, gate_q=gate_q, gate_k=gate_k, block_size=block_size,
                                        causal=causal, q_offset=q_offset, kv_lengths=kv_lengths)
  if target is None:
    target = seer_gate_target(q, k, block_size=block_size, causal=causal, q_offset=q_offset,
                              kv_lengths=kv_lengths, scale=scale)
  checks.check_shape("seer_gate_loss", "target", target, logits.shape, "[B, N, U, nb]")
  candidates = jnp.broadcast_to(candidates, logits.shape)
  logp = logits - dense.masked_logsumexp(logits, candidates)
  target = jax.lax.stop_gradient(target.astype(jnp.float32))
  keep = candidates & (target > 0)
  terms = jnp.where(keep, target * (jnp.log(jnp.where(keep, target, 1.0))
                                    - jnp.where(keep, logp, 0.0)), 0.0)
  return jnp.mean(terms)


register(Mechanism(
    name=OP, fn=seer_attention, family="sparse-trainable", seeds=(78,),
    paper="SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs", arxiv="2410.13276",
    patterns=frozenset({"self", "causal_self", "cross"}), decode=False, packed=False,
    complexity="O(T·S/block_size + T·kept)", params=param_tables.param_specs(SEER_TABLE),
    defaults=dict(block_size=64, threshold=2e-3),
    example=lambda *, N, K, H, h: dict(
        example_params(param_tables.param_specs(SEER_TABLE), N=N, K=K, H=H),
        block_size=4, top_k=2, threshold=None)))
