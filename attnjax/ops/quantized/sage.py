"""SageAttention: 8-bit attention with smoothed keys (INT8 QKᵀ, fp16 or FP8 P̃V), emulated in jnp.

    K ← K - mean_j K_j                      per channel, head and packed document (softmax-invariant)
    Q̂ = int8(Q · scale · log₂e) per block of `q_block` queries, K̂ = int8(K) per block of `k_block`
        keys (symmetric, s = max|x| / 127, halves rounded away from zero)
    S = (Q̂ K̂ᵀ) · s_Q · s_K                  the integer product, exact in float32 for H ≤ 1040
    P̃ = 2^{S - m_τ}                         online softmax over tiles of `k_block` keys
    O = Σ_τ e^{…} P̂_τ V̂_τ / Σ P̃            fp16 P̂ = fp16(P̃), V̂ = fp16(V) (pv="fp16"), or
                                            P̂ = e4m3(448 P̃)/448, V̂ = e4m3(V / s_c)·s_c with
                                            s_c = max_j |V_jc| / 448 per channel (pv="fp8")

The softmax scale and log₂e are folded into Q's scale as in the authors' kernel (scores in base 2);
the P̃V products accumulate in float32 (the authors' default accumulator for fp16 and FP8 P̃V; their
fp16-accumulator variant is not emulated). Key statistics (the mean, the block maxima, V's channel
maxima) are taken over the keys of the call that are not padding (`kv_lengths`) and lie in the
query's packed document (`segment_ids`): a key hidden by `causal` still enters them, as in the
authors' causal kernel, so a causal row depends on later keys through the quantization (below the
quantization error, never through attention weights). Masked keys get no weight; a row with no
visible key gives zeros. Gradients: straight-through, the gradients of exact softmax attention at
the unquantized inputs (the paper is inference-only).

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `[B,T,N,h]` (GQA when K divides N).
Paper: Zhang et al., "SageAttention: Accurate 8-Bit Attention for Plug-and-play Inference
Acceleration", arXiv:2410.02367 (code: github.com/thu-ml/SageAttention).
"""

from __future__ import annotations

from typing import Optional

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import quantize
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, Value

__all__ = ["sage_attention"]

_OP = "sage_attention"
_PV = ("fp16", "fp8")


def _forward(q, k, v, *, causal, segment_ids, q_offset, kv_lengths, scale, implementation,
             smooth_k, q_block, k_block, pv):
  B, T, S, _, _, _, _ = checks.check_qkv(_OP, q, k, v)
  mask_mod = contract.contract_mask(B=B, T=T, S=S, causal=causal, q_offset=q_offset,
                                    segment_ids=segment_ids, kv_lengths=kv_lengths, op=_OP)
  q_seg, kv_seg = quantize.segment_pair(segment_ids)
  if smooth_k:
    ks = quantize.smooth(k, segment_ids=kv_seg, lengths=kv_lengths)
  else:
    ks = contract.zero_padded(k, kv_lengths)
  v = contract.zero_padded(v, kv_lengths)
  if pv == "fp16":
    vd, p_quant = quantize.to_fp16(v), quantize.quantize_p_fp16
  else:
    vd = quantize.quantize_fp8_channels(v, quantize.block_groups(B, S, S, kv_seg))
    p_quant = quantize.quantize_p_fp8
  ops = quantize.int8_score_operands(q, ks, vd, scale=scale,
                                     q_groups=quantize.block_groups(B, T, q_block, q_seg),
                                     k_groups=quantize.block_groups(B, S, k_block, kv_seg))
  first = None if q_seg is None else quantize.first_key_positions(q_seg, kv_seg)
  out, _ = quantize.blocked_attention(_OP, ops, mask_mod=mask_mod, first=first, tile=k_block,
                                      p_quant=p_quant, implementation=implementation)
  return out.astype(q.dtype)


def sage_attention(q: Query, k: Key, v: Value, *, causal: bool = False, segment_ids=None,
                   q_offset=0, kv_lengths: Optional[Lengths] = None,
                   scale: Optional[float] = None, implementation: Optional[str] = None,
                   smooth_k: bool = True, q_block: int = 128, k_block: int = 64,
                   pv: str = "fp16") -> Output:
  """SageAttention (INT8 QKᵀ with smoothed keys, fp16 or FP8 P̃V), emulated; see the module
  docstring. `q_block` / `k_block`: quantization blocks of queries / keys (the authors' 128 / 64;
  `k_block` is also the online softmax's tile); `pv`: "fp16" or "fp8"; `smooth_k`: subtract the
  keys' mean first (the paper's smoothing)."""
  B, T, S, _, _, H, _ = checks.check_qkv(_OP, q, k, v)
  checks.check_implementation(_OP, implementation, ("xla", "reference"))
  quantize.check_blocks(_OP, q_block=q_block, k_block=k_block)
  if pv not in _PV:
    raise ValueError(f"{_OP}: `pv` must be one of {_PV}, got {pv!r}")
  quantize.check_int8_head_dim(_OP, H)
  scale = H ** -0.5 if scale is None else float(scale)
  masks = dict(causal=causal, segment_ids=segment_ids, q_offset=q_offset, kv_lengths=kv_lengths,
               scale=scale, implementation=implementation)
  return quantize.straight_through(
      lambda q, k, v: _forward(q, k, v, **masks, smooth_k=smooth_k, q_block=q_block,
                               k_block=k_block, pv=pv),
      lambda q, k, v: quantize.exact_attention(_OP, q, k, v, **masks), q, k, v)


register(Mechanism(
    name="sage_attention", fn=sage_attention, family="quantized", seeds=(148,),
    paper="SageAttention: Accurate 8-Bit Attention for Plug-and-play Inference Acceleration",
    arxiv="2410.02367", decode=False, implementations=("xla", "reference"),
    # Not causal: the paper's smoothing mean and block scales are taken over the call's keys, so a
    # causal row would depend on later keys through the quantization (the authors' causal kernels
    # do so); the function takes `causal=True` for that use, the registry does not offer it.
    patterns=frozenset({"self", "cross"}),
    # Blocks and tiles shorter than the test sequences, so that several are exercised.
    example={"q_block": 8, "k_block": 16}))
