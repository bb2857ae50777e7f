"""Attention over several source sequences at once: flat (one distribution over every source's
states) and hierarchical (one context per source, then attention over the contexts).

Libovický, Helcl, "Attention Strategies for Multi-Source Sequence-to-Sequence Learning",
arXiv:1704.06567. A decoder state s_i [D] attends to K encoders' states h_j^(k) [S_k, D_k] (the
sources may differ in length and width: a caption and an image's grid, a source sentence and its
machine translation). Following the authors' Neural Monkey (`attention/combination.py`), with
additive (Bahdanau) energies:

  flat
    e_ij^(k) = v_aᵀ tanh(W_a s_i + b_a + U_a^(k) h_j^(k) + c^(k)) + b^(k)      W_a, v_a shared
    α_i      = softmax over the concatenation of every source's positions
    c_i      = Σ_k Σ_j α_ij^(k) (U_c^(k) h_j^(k) + d^(k))           projected to one space [A]

  hierarchical
    c_i^(k)  = Σ_j softmax_j(v_kᵀ tanh(W_k s_i + b_k + U_k h_j^(k) + c_k)) h_j^(k)   each source's
               own attention (its own weights), a context in that source's space [D_k]
    e_i^(k)  = v_bᵀ tanh(W_b s_i + b_b + U_b^(k) c_i^(k) + f^(k)) + b^(k)
    β_i      = softmax_k(e_i^(k))                                     a distribution over sources
    c_i      = Σ_k β_i^(k) (U_c^(k) c_i^(k) + d^(k))                    [A]

The per-source scalar b^(k) moves attention between sources (a bias inside one softmax over a single
source would cancel, so the inner attentions have none). The sentinel of the paper's best systems
(a gated copy of the decoder state as one more candidate) is not included. Padded source positions
(`masks`, True = real) get no weight; a source with no real position gives a zero context and, in
the hierarchical form, no weight. With one source, flat is plain additive attention with a context
projection.

Shapes: `x [B, T, D]` (decoder states; T steps at once), sources `[B, S_k, D_k]` → `[B, T, A]`;
`query_kernel [D, A]`, `query_bias [A]` (W_a, b_a), `energy [A]` (v_a or v_b), and per source
`source_k` (the module docstring's U, c, b, d and, hierarchical, the source's own attention weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from attnjax import modules
from attnjax.core import pooling
from attnjax.typing import Array, Bool, Float

__all__ = ["MultiSourceAttention", "multi_source_attention", "STRATEGIES"]

DecoderStates = Float[Array, "B T D"]
Context = Float[Array, "B T A"]
SourceMask = Bool[Array, "B S"]
STRATEGIES = ("flat", "hierarchical")
Params = dict


def _dense(x, p, prefix):
  return x @ jnp.asarray(p[f"{prefix}_kernel"], jnp.float32) + jnp.asarray(p[f"{prefix}_bias"],
                                                                            jnp.float32)



def _energies(query, keys, v):
  """`v · tanh(query_i + key_j)`: `[B, T, A]`, `[B, S, A]` → `[B, T, S]`."""
  return jnp.einsum("btsa,a->bts", jnp.tanh(query[:, :, None] + keys[:, None]), v)


def multi_source_attention(x: DecoderStates, *sources, query_kernel, query_bias, energy,
                           strategy: str = "flat",
                           masks: Optional[Sequence[Optional[SourceMask]]] = None,
                           **source_weights: Params) -> Context:
  """Flat or hierarchical attention of decoder states `x` over several sources (module docstring);
  the weights of source k are the keyword `source_k`."""
  op = "multi_source_attention"
  if strategy not in STRATEGIES:
    raise ValueError(f"{op}: `strategy` must be one of {STRATEGIES}, got {strategy!r}")
  if jnp.ndim(x) != 3:
    raise ValueError(f"{op}: `x` must be [B, T, D], got shape {jnp.shape(x)}")
  B = x.shape[0]
  if not sources:
    raise ValueError(f"{op}: give at least one source [B, S_k, D_k]")
  for k, src in enumerate(sources):
    if jnp.ndim(src) != 3 or src.shape[0] != B:
      raise ValueError(f"{op}: source {k} must be [B, S_k, D_k] with B = {B}, got shape "
                       f"{jnp.shape(src)}")
  wanted = {f"source_{k}" for k in range(len(sources))}
  if set(source_weights) != wanted:
    raise ValueError(f"{op}: expected the weights {sorted(wanted)} (one per source), got "
                     f"{sorted(source_weights)}")
  masks = list(masks) if masks is not None else [None] * len(sources)
  if len(masks) != len(sources):
    raise ValueError(f"{op}: `masks` must have one entry per source ({len(sources)}), got {len(masks)}")
  keeps = []
  for k, (src, m) in enumerate(zip(sources, masks, strict=True)):
    if m is not None and jnp.shape(m) != src.shape[:2]:
      raise ValueError(f"{op}: masks[{k}] must be [B, S_k] = {list(src.shape[:2])}, got shape "
                       f"{jnp.shape(m)}")
    keeps.append(jnp.ones(src.shape[:2], bool) if m is None else jnp.asarray(m, bool))
  xf = jnp.asarray(x, jnp.float32)
  srcs = [jnp.asarray(s, jnp.float32) for s in sources]
  weights = [source_weights[f"source_{k}"] for k in range(len(sources))]
  state = _dense(xf, {"query_kernel": query_kernel, "query_bias": query_bias}, "query")  # [B, T, A]
  v = jnp.asarray(energy, jnp.float32)

  if strategy == "flat":
    logits, values = [], []
    for src, p in zip(srcs, weights, strict=True):
      logits.append(_energies(state, _dense(src, p, "logit"), v) + jnp.asarray(p["energy_bias"],
                                                                                jnp.float32))
      values.append(_dense(src, p, "context"))                                 # [B, S_k, A]
    keep = jnp.concatenate(keeps, axis=1)[:, None, :]
    alpha = pooling.masked_softmax(jnp.concatenate(logits, axis=2), keep, axis=-1)
    out = jnp.einsum("bts,bsa->bta", alpha, jnp.concatenate(values, axis=1))
    return out.astype(x.dtype)

  contexts, logits, projected = [], [], []
  for src, keep, p in zip(srcs, keeps, weights, strict=True):
    inner = _energies(_dense(xf, p, "inner_query"), _dense(src, p, "inner_key"),
                      jnp.asarray(p["inner_energy"], jnp.float32))
    alpha = pooling.masked_softmax(inner, keep[:, None, :], axis=-1)
    ctx = jnp.einsum("bts,bsd->btd", alpha, src)                                # [B, T, D_k]
    e = jnp.einsum("bta,a->bt", jnp.tanh(state + _dense(ctx, p, "logit")), v)
    logits.append(e + jnp.asarray(p["energy_bias"], jnp.float32))
    projected.append(_dense(ctx, p, "context"))
    contexts.append(jnp.any(keep, axis=1))                                     # [B]: any real position
  present = jnp.stack(contexts, axis=1)[:, None, :]                             # [B, 1, K]
  beta = pooling.masked_softmax(jnp.stack(logits, axis=2), present, axis=-1)   # [B, T, K]
  out = jnp.einsum("btk,btka->bta", beta, jnp.stack(projected, axis=2))
  return out.astype(x.dtype)


class _SourceWeights(nn.Module):
  """One source's weights (module docstring), Xavier-uniform kernels and zero biases as Neural
  Monkey's projections (its normal(0.001) start would make every energy nearly equal)."""
  attention_dim: int
  hierarchical: bool

  @nn.compact
  def __call__(self, query_width: int, source_width: int):
    xavier, zeros = nn.initializers.xavier_uniform(), nn.initializers.zeros
    A = self.attention_dim
    p = {}
    # Flat: the source's states are projected for the energies; hierarchical: its context vector.
    for prefix in ("logit", "context"):
      p[f"{prefix}_kernel"] = self.param(f"{prefix}_kernel", xavier, (source_width, A))
      p[f"{prefix}_bias"] = self.param(f"{prefix}_bias", zeros, (A,))
    p["energy_bias"] = self.param("energy_bias", zeros, ())
    if self.hierarchical:
      p["inner_query_kernel"] = self.param("inner_query_kernel", xavier, (query_width, A))
      p["inner_query_bias"] = self.param("inner_query_bias", zeros, (A,))
      p["inner_key_kernel"] = self.param("inner_key_kernel", xavier, (source_width, A))
      p["inner_key_bias"] = self.param("inner_key_bias", zeros, (A,))
      p["inner_energy"] = self.param("inner_energy", nn.initializers.normal(A ** -0.5), (A,))
    return p


class MultiSourceAttention(nn.Module):
  """Creates the shared query projection and energy vector and each source's weights, and calls
  `multi_source_attention(x, *sources, masks=masks)` with `strategy`; the output width is
  `attention_dim`."""
  attention_dim: int = 32
  strategy: str = "flat"

  @nn.compact
  def __call__(self, x: DecoderStates, *sources, masks=None) -> Context:
    A = self.attention_dim
    query_kernel = self.param("query_kernel", nn.initializers.xavier_uniform(), (x.shape[-1], A))
    query_bias = self.param("query_bias", nn.initializers.zeros, (A,))
    energy = self.param("energy", nn.initializers.normal(A ** -0.5), (A,))
    per_source = {
        f"source_{k}": _SourceWeights(A, self.strategy == "hierarchical", name=f"source_{k}")(
            x.shape[-1], src.shape[-1]) for k, src in enumerate(sources)}
    return multi_source_attention(x, *sources, query_kernel=query_kernel, query_bias=query_bias,
                                  energy=energy, strategy=self.strategy, masks=masks, **per_source)


modules.register_module(modules.Module(
    name="multi_source_attention", fn=multi_source_attention, linen=MultiSourceAttention,
    kind="signal", family="cross-attention", seeds=(131,),
    paper="Attention Strategies for Multi-Source Sequence-to-Sequence Learning", arxiv="1704.06567",
    # Two sources of their own lengths and widths (a caption and an image grid, say).
    extra_inputs=(modules.ExtraInput("source_a", lambda s: (s[0], 7, 12)),
                  modules.ExtraInput("source_b", lambda s: (s[0], 5, 10))),
    keeps_shape=False, out_shape=lambda s, st: (s[0], s[1], st.get("attention_dim", 32)),
    example={"attention_dim": 8, "strategy": "hierarchical"}))
