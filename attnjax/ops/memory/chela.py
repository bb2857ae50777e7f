"""CHELA (#218): short-long convolutions feed a tiled (divide-and-conquer) linear attention.

Paper: Liu et al., "Short-Long Convolutions Help Hardware-Efficient Linear Attention to Focus on
Long Sequences", arXiv:2406.08128. The convolutions are `attnjax.core.conv`; the linear attention
runs on `attnjax.core.linear.gated_linear_attention` (its chunked "xla" form is the paper's tiling).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core.conv import causal_conv, stabilized_long_kernel
from attnjax.core.feature_maps import elu_plus_one
from attnjax.core.linear import gated_linear_attention
from attnjax.registry import Mechanism, ParamSpec, example_params, register
from attnjax.typing import Key, Lengths, Output, Query, SegmentIds, Value

_F32 = jnp.float32
SHORT_KERNEL = 3     # taps of the short convolution
LONG_KERNEL = 64     # taps of the learned long convolution (its decay makes later taps negligible)


def chela_attention(q: Query, k: Key, v: Value, *, short_kernel, long_kernel, long_decay,
                    query_kappa, query_mu, key_kappa, key_mu, gate_weight, gate_bias,
                    causal: bool = False, segment_ids: Optional[SegmentIds] = None, q_offset=0,
                    kv_lengths: Optional[Lengths] = None, scale=None,
                    implementation: Optional[str] = None, chunk_size: int = 64) -> Output:
  """CHELA: short-long convolutions feed a tiled (divide-and-conquer) linear attention.

  Paper: Liu et al., "Short-Long Convolutions Help Hardware-Efficient Linear Attention to Focus on
  Long Sequences", arXiv:2406.08128 (section 4). Per key/value head, on the stream x = k (the
  layer's input X, projected):

      Z   = LongConv(SiLU(ShortConv(x)))     short: 3 taps; long: stabilized kernel (see
                                             `stabilized_long_kernel`); both causal, depthwise
      Q_t = φ(κ_q ⊙ Z_p + μ_q),  K_j = φ(κ_k ⊙ Z_j + μ_k),  V = v     φ = ELU + 1
      O_t = Σ_j Q_t·K_j v_j / Σ_j Q_t·K_j    (j ≤ p when causal)     gated_linear_attention
      Y_t = σ(w_g · x_p + b_g) ⊙ O_t         output gate from the token's own input

  (p = q_offset + t.) The linear attention runs as `gated_linear_attention`'s "xla" form:
  intra-chunk quadratic, inter-chunk recurrent state (the paper's tiling), O(T·C) time and memory.

  Adaptation to the contract (as Mega, whose structure CHELA keeps): the paper derives queries and
  keys from one shared stream, the convolution output Z of its single input X, and has no query
  projection. X is represented by the key stream, so Q_t is read from Z at the query's position p
  (self-attention only; decoding reads the cache) and the output gate, which the paper computes
  from X, from x_p. The operator therefore does not read `q` (registered `reads={"k", "v"}`: the
  layer creates no query projection and passes zeros; `q` gives only the shape [B, T, N, H] and
  the output dtype). V is v. The normalization by Q·ΣK keeps the output's scale independent of T,
  and it cancels any logit scale, so `scale` must be None. Output projections are the layer's.

  Args:
    q: `[B, T, N, H]` (not read); k: `[B, S, K, H]`; v: `[B, S, K, h]`.
    short_kernel: `[K, H, 3]`; long_kernel: `[K, H, L]` raw weights; long_decay: `[K, H]`.
    query_kappa, query_mu: `[N, H]`; key_kappa, key_mu: `[K, H]`.
    gate_weight: `[N, H]` (query head n reads key head n // (N/K)); gate_bias: `[N]`.
    causal, segment_ids, q_offset, kv_lengths: the common contract. scale: must be None.
    implementation: "xla" (FFT long convolution, chunked linear attention) or "reference" (direct
      convolution, scanned recurrence).
    chunk_size: C of the chunked linear attention.

  Returns:
    `[B, T, N, h]` in q's dtype.
  """
  op = "chela_attention"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  L = jnp.shape(long_kernel)[-1]
  checks.check_param_shapes(
      op, {"short_kernel": ((K, H, SHORT_KERNEL), f"[K, H, {SHORT_KERNEL}]"),
           "long_kernel": ((K, H, L), "[K, H, L]"), "long_decay": ((K, H), "[K, H]"),
           "query_kappa": ((N, H), "[N, H]"), "query_mu": ((N, H), "[N, H]"),
           "key_kappa": ((K, H), "[K, H]"), "key_mu": ((K, H), "[K, H]"),
           "gate_weight": ((N, H), "[N, H]"), "gate_bias": ((N,), "[N]")},
      dict(short_kernel=short_kernel, long_kernel=long_kernel, long_decay=long_decay,
           query_kappa=query_kappa, query_mu=query_mu, key_kappa=key_kappa, key_mu=key_mu,
           gate_weight=gate_weight, gate_bias=gate_bias))
  if scale is not None:
    raise ValueError(f"{op}: `scale` must be None: the normalized linear attention divides by "
                     f"Q·ΣK, which cancels any logit scale (got scale={scale!r})")
  impl = checks.check_implementation(op, implementation)
  full = contract.check_self_attention(op, T=T, S=S, q_offset=q_offset, kv_lengths=kv_lengths,
                                       segment_ids=segment_ids)
  pos = contract.query_positions(B, T, q_offset)
  at_queries = lambda x: x if full else contract.gather_positions(x, pos)
  f32 = lambda x: jnp.asarray(x, _F32)

  x = contract.zero_padded(k, kv_lengths)                # cache garbage must not enter the FFT
  method = "fft" if impl == "xla" and segment_ids is None else "direct"
  z = causal_conv(jax.nn.silu(causal_conv(x, short_kernel, segment_ids=segment_ids)),
                  stabilized_long_kernel(long_kernel, long_decay), method=method,
                  segment_ids=segment_ids)
  keys = elu_plus_one(f32(key_kappa) * z + f32(key_mu))
  queries = elu_plus_one(f32(query_kappa) * jnp.repeat(z, N // K, axis=2) + f32(query_mu))
  o = gated_linear_attention(queries, keys, v, normalize=True, causal=causal, scale=1.0,
                             segment_ids=segment_ids, kv_lengths=kv_lengths, chunk_size=chunk_size,
                             implementation=impl)
  # The gate of the token at p reads its own input x_p (query head n: key head n // (N/K)).
  x_q = at_queries(jnp.repeat(x, N // K, axis=2))
  gate = jax.nn.sigmoid(jnp.einsum("btnh,nh->btn", x_q, f32(gate_weight)) + f32(gate_bias))
  o = at_queries(o.astype(_F32))
  return (gate[..., None] * o).astype(q.dtype)


# --------------------------------------------------------------------------------------------------
# Registration

_init = jax.nn.initializers


def _gate_fan_in(key, shape, dtype=jnp.float32):
  # A gate weight `[N, H]` reads an H-vector: std H^-½ keeps its logit O(1).
  return (jax.random.normal(key, shape) * shape[-1] ** -0.5).astype(dtype)


def _short_identity(key, shape, dtype=jnp.float32):
  # The short convolution starts near the identity (tap 0 = 1) plus small noise.
  return (jnp.zeros(shape).at[..., 0].set(1.0) + 0.1 * jax.random.normal(key, shape)).astype(dtype)


CHELA_SPECS = (
    ParamSpec("short_kernel", lambda N, K, H: (K, H, SHORT_KERNEL), _short_identity),
    ParamSpec("long_kernel", lambda N, K, H: (K, H, LONG_KERNEL), _init.normal(1.0)),
    ParamSpec("long_decay", lambda N, K, H: (K, H), _init.constant(-2.0)),
    ParamSpec("query_kappa", lambda N, K, H: (N, H), _init.ones),
    ParamSpec("query_mu", lambda N, K, H: (N, H), _init.zeros),
    ParamSpec("key_kappa", lambda N, K, H: (K, H), _init.ones),
    ParamSpec("key_mu", lambda N, K, H: (K, H), _init.zeros),
    ParamSpec("gate_weight", lambda N, K, H: (N, H), _gate_fan_in),
    ParamSpec("gate_bias", lambda N, K, H: (N,), _init.zeros),
)

register(Mechanism(
    name="chela_attention", fn=chela_attention, family="linear", seeds=(218,),
    paper="Short-Long Convolutions Help Hardware-Efficient Linear Attention to Focus on Long "
          "Sequences", arxiv="2406.08128",
    patterns=frozenset({"self", "causal_self"}), gqa=True, decode=True, packed=True,
    complexity="O(T·(C + log T)) (chunk C)", implementations=("xla", "reference"),
    # Queries and keys come from one shared convolution stream of the keys: q is not read.
    reads=frozenset({"k", "v"}), params=CHELA_SPECS,
    # chunk_size: an example setting (several chunks at the suite's lengths).
    example=lambda *, N, K, H: dict(chunk_size=8, **example_params(CHELA_SPECS, N=N, K=K, H=H,
                                                                   perturb=0.3)),
    # The linear-attention state and normaliser per kv head, plus the convolutions' input buffers.
    state_size=lambda T, N, K, H, h, kw: K * H * (h + 1) + (LONG_KERNEL + SHORT_KERNEL) * K * H))

__all__ = ["chela_attention", "CHELA_SPECS", "SHORT_KERNEL", "LONG_KERNEL"]
