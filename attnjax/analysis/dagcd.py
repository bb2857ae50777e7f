"""DAGCD: dynamic attention-guided context decoding.

Huang et al., "Dynamic Attention-Guided Context Decoding for Mitigating Context Faithfulness
Hallucinations in Large Language Models", arXiv:2501.01059 (rule checked against the authors' code,
github.com/uestc-huangyw/DAGCD, src/2_DAGCD.py). At each greedy step, with p the model's next-token
distribution over V ids and a^m `[S_ctx]` the last position's attention of selected head m over the
context tokens c_1..c_S:

  1. per head, a token id's attention is the mean over the context positions holding it, and is
     normalized over the context's distinct ids:  r^m(i) = mean_{s: c_s = i} a^m_s / Σ_j (...)
  2. the utilized ids: those a detector marks as used (the paper's trained classifier over the heads'
     ratios; every context id when no detector is given) whose rank in p is at most `top_rank`
  3. the utilization distribution u(i) ∝ Σ_m w_m r^m(i) over the utilized ids (0 elsewhere; all 0
     when none is utilized), w_m the heads' weights (the detector's coefficients in the paper)
  4. the decoding distribution  p'(i) = p(i) + α · H(p) / log V · u(i),  next token = argmax p'

so an uncertain model (high entropy) leans on the context it attends to and a confident one does not.
The authors use α = 2 (4 for chat models), top_rank = 10, and skip the boost when p's argmax is an end
token. Selecting the heads (their probe) is left to the caller: `heads` and `head_weights`.

  utilization_distribution(attention, context_ids, probs, ...)   [B, V]
  dagcd_distribution(logits, utilization, alpha)                 [B, V] (p', not normalized)
  dagcd_generate(model, variables, prompt, context_span, ...)    greedy decoding with DAGCD
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import catalog

__all__ = ["dagcd_distribution", "dagcd_generate", "utilization_distribution"]

# A detector: per-id features `[B, V, M]` (the heads' normalized attention ratios) -> bool `[B, V]`.
Detector = Callable[[jax.Array], jax.Array]


def utilization_distribution(attention: jax.Array, context_ids: jax.Array, probs: jax.Array,
                             head_weights: Optional[jax.Array] = None, top_rank: int = 10,
                             detector: Optional[Detector] = None) -> jax.Array:
  """u `[B, V]` of steps 1-3 (module docstring).

  Args:
    attention: `[B, M, S_ctx]` the selected heads' attention from the last position to the context.
    context_ids: `[B, S_ctx]` int, the context's token ids.
    probs: `[B, V]` the model's next-token distribution (for the rank constraint).
    head_weights: `[M]` (default: equal weights).
    top_rank: only ids ranked at most this high in `probs` count (1 = the argmax).
    detector: optional `features [B, V, M] -> bool [B, V]` marking the utilized ids.
  """
  attention, probs = jnp.asarray(attention, jnp.float32), jnp.asarray(probs, jnp.float32)
  context_ids = jnp.asarray(context_ids)
  if attention.ndim != 3 or context_ids.shape != (attention.shape[0], attention.shape[2]):
    raise ValueError(f"utilization_distribution: attention must be [B, M, S_ctx] and context_ids "
                     f"[B, S_ctx]; got {attention.shape} and {context_ids.shape}")
  B, M, _ = attention.shape
  V = probs.shape[-1]
  if probs.shape != (B, V):
    raise ValueError(f"utilization_distribution: probs must be [B, V] = [{B}, V], got {probs.shape}")
  w = jnp.full((M,), 1.0 / M) if head_weights is None else jnp.asarray(head_weights, jnp.float32)
  if w.shape != (M,):
    raise ValueError(f"utilization_distribution: head_weights must be [M] = [{M}], got {w.shape}")

  def one(att, ids, p):
    total = jnp.zeros((M, V)).at[:, ids].add(att)                      # per head, per id
    count = jnp.zeros((V,)).at[ids].add(1.0)
    present = count > 0
    mean = jnp.where(present, total / jnp.maximum(count, 1.0), 0.0)
    ratio = mean / jnp.maximum(mean.sum(-1, keepdims=True), 1e-8)    # over the distinct ids
    rank = 1 + jnp.sum(p[None, :] > p[:, None], axis=-1)              # 1 = the most probable id
    return ratio, present & (rank <= top_rank)

  ratio, keep = jax.vmap(one)(attention, context_ids, probs)           # [B, M, V], [B, V]
  if detector is not None:
    keep = keep & jnp.asarray(detector(jnp.swapaxes(ratio, 1, 2)), bool)
  informative = jnp.einsum("bmv,m->bv", ratio, w) * keep
  return informative / jnp.maximum(informative.sum(-1, keepdims=True), 1e-8)


@catalog.serves(72, kind="analysis", name="attnjax.analysis.dagcd.dagcd_distribution")
def dagcd_distribution(logits: jax.Array, utilization: jax.Array, alpha: float = 2.0) -> jax.Array:
  """p' = p + α · H(p) / log V · u `[B, V]` (step 4); the next token is its argmax."""
  logits = jnp.asarray(logits, jnp.float32)
  if logits.ndim != 2 or jnp.shape(utilization) != logits.shape:
    raise ValueError(f"dagcd_distribution: logits and utilization must both be [B, V]; got "
                     f"{logits.shape} and {jnp.shape(utilization)}")
  p = jax.nn.softmax(logits, -1)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1)
  weight = alpha * entropy / jnp.log(logits.shape[-1])
  return p + weight[:, None] * utilization


def dagcd_generate(model, variables, prompt: jax.Array, context_span: tuple[int, int], steps: int,
                   heads: Sequence[tuple[int, int]], head_weights: Optional[jax.Array] = None, *,
                   alpha: float = 2.0, top_rank: int = 10, end_ids: Sequence[int] = (),
                   detector: Optional[Detector] = None) -> np.ndarray:
  """Greedy DAGCD decoding of `steps` tokens after `prompt [B, T]` whose positions
  `context_span = (start, stop)` hold the context; `heads` are (layer, head) pairs of the model's
  captured maps. A row whose plain argmax is in `end_ids` takes it unboosted (the authors' rule).
  Each step runs the full forward (no cache) with the attention capture. Returns `[B, T + steps]`."""
  from attnjax.analysis.capture import CAPTURE, from_state  # pylint: disable=import-outside-toplevel
  prompt = np.asarray(prompt)
  a, b = context_span
  if prompt.ndim != 2 or not 0 <= a < b <= prompt.shape[1]:
    raise ValueError(f"dagcd_generate: prompt must be [B, T] and context_span inside [0, T]; got "
                     f"{prompt.shape} and {context_span}")
  forward = jax.jit(lambda v, x: model.apply(v, x, mutable=[CAPTURE]))
  tokens = prompt
  layers = np.array([l for l, _ in heads])
  heads_ = np.array([h for _, h in heads])
  for _ in range(steps):
    logits, state = forward(variables, jnp.asarray(tokens))
    weights = from_state(state).weights                                  # [L, B, N, T, S]
    attention = np.moveaxis(weights[layers, :, heads_, -1, a:b], 0, 1)   # [B, M, S_ctx]
    last = logits[:, -1]
    u = utilization_distribution(attention, tokens[:, a:b], jax.nn.softmax(last, -1),
                                 head_weights, top_rank, detector)
    boosted = np.asarray(jnp.argmax(dagcd_distribution(last, u, alpha), -1))
    plain = np.asarray(jnp.argmax(last, -1))
    nxt = np.where(np.isin(plain, list(end_ids)), plain, boosted)
    tokens = np.concatenate([tokens, nxt[:, None].astype(tokens.dtype)], 1)
  return tokens
