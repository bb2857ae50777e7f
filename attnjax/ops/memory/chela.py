"""CHELA (#218): short-long convolutions feed a tiled (divide-and-conquer) linear attention.

Paper: Liu et al., "Short-Long Convolutions Help Hardware-Efficient Linear Attention to Focus on
Long Sequences", arXiv:2406.08128. The convolutions are `attnjax.core.conv`; the linear attention
runs on `attnjax.core.linear.gated_linear_attention` (its chunked "xla" form is the paper's tiling).
Recurrent decoding carries the linear attention's memory and the convolutions' input tails: a fixed
size whatever the number of tokens.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import memory_state
from attnjax.core.conv import causal_conv, stabilized_long_kernel
from attnjax.core.feature_maps import elu_plus_one
from attnjax.core.linear import gated_linear_attention, normalize_output
from attnjax.registry import Mechanism, ParamSpec, example_params, register
from attnjax.typing import Key, Lengths, Output, Query, SegmentIds, Value

_F32 = jnp.float32
SHORT_KERNEL = 3     # taps of the short convolution
LONG_KERNEL = 64     # taps of the learned long convolution (its decay makes later taps negligible)


def chela_attention(q: Query, k: Key, v: Value, *, short_kernel, long_kernel, long_decay,
                    query_kappa, query_mu, key_kappa, key_mu, gate_weight, gate_bias,
                    causal: bool = False, segment_ids: Optional[SegmentIds] = None, q_offset=0,
                    kv_lengths: Optional[Lengths] = None, scale=None,
                    implementation: Optional[str] = None, chunk_size: int = 64,
                    initial_state: Optional[dict] = None, return_final_state: bool = False
                    ) -> Output | tuple[Output, dict]:
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
    initial_state, return_final_state: recurrent decoding (`Mechanism.recurrent`, causal): q, k, v
      are the T new tokens; the state is the linear attention's memory and the convolutions'
      input tails, `{"memory": [B, K, H, h+1] = Σ_j K_j [v_j, 1]ᵀ, "short_inputs": [B, 2, K, H]
      (the last x), "long_inputs": [B, L-1, K, H] (the last SiLU(ShortConv(x)))}` float32 (None
      or zeros before the first token: zeros are the convolutions' own padding).

  Returns:
    `[B, T, N, h]` in q's dtype; with `return_final_state`, `(out, state after the new tokens)`.
  """
  op = "chela_attention"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  L = jnp.shape(long_kernel)[-1]
  params = dict(short_kernel=short_kernel, long_kernel=long_kernel, long_decay=long_decay,
                query_kappa=query_kappa, query_mu=query_mu, key_kappa=key_kappa, key_mu=key_mu,
                gate_weight=gate_weight, gate_bias=gate_bias)
  checks.check_param_shapes(
      op, {"short_kernel": ((K, H, SHORT_KERNEL), f"[K, H, {SHORT_KERNEL}]"),
           "long_kernel": ((K, H, L), "[K, H, L]"), "long_decay": ((K, H), "[K, H]"),
           "query_kappa": ((N, H), "[N, H]"), "query_mu": ((N, H), "[N, H]"),
           "key_kappa": ((K, H), "[K, H]"), "key_mu": ((K, H), "[K, H]"),
           "gate_weight": ((N, H), "[N, H]"), "gate_bias": ((N,), "[N]")}, params)
  if scale is not None:
    raise ValueError(f"{op}: `scale` must be None: the normalized linear attention divides by "
                     f"Q·ΣK, which cancels any logit scale (got scale={scale!r})")
  impl = checks.check_implementation(op, implementation)
  method = "fft" if impl == "xla" and segment_ids is None else "direct"
  if return_final_state:
    memory_state.check_recurrent_call(op, causal=causal, segment_ids=segment_ids,
                                      kv_lengths=kv_lengths, q_offset=q_offset, T=T, S=S)
    return _chela_recurrent(op, q, k, v, initial_state, params, method=method, impl=impl,
                            chunk_size=chunk_size)
  if initial_state is not None:
    raise ValueError(f"{op}: `initial_state` needs `return_final_state=True` (recurrent decoding)")
  full = contract.check_self_attention(op, T=T, S=S, q_offset=q_offset, kv_lengths=kv_lengths,
                                       segment_ids=segment_ids)
  pos = contract.query_positions(B, T, q_offset)
  at_queries = lambda x: x if full else contract.gather_positions(x, pos)

  x = contract.zero_padded(k, kv_lengths)                # cache garbage must not enter the FFT
  z = causal_conv(jax.nn.silu(causal_conv(x, short_kernel, segment_ids=segment_ids)),
                  stabilized_long_kernel(long_kernel, long_decay), method=method,
                  segment_ids=segment_ids)
  queries, keys = _features(z, params)
  o = gated_linear_attention(queries, keys, v, normalize=True, causal=causal, scale=1.0,
                             segment_ids=segment_ids, kv_lengths=kv_lengths, chunk_size=chunk_size,
                             implementation=impl)
  # The gate of the token at p reads its own input x_p.
  return _gated(at_queries(x), at_queries(o.astype(_F32)), params).astype(q.dtype)


def _features(z, params):
  """Shared-stream feature maps `(Q [B, S, N, H], K [B, S, K, H])` of the convolution output z."""
  f32 = lambda name: jnp.asarray(params[name], _F32)
  groups = f32("query_kappa").shape[0] // z.shape[2]
  keys = elu_plus_one(f32("key_kappa") * z + f32("key_mu"))
  queries = elu_plus_one(f32("query_kappa") * jnp.repeat(z, groups, axis=2) + f32("query_mu"))
  return queries, keys


def _gated(x, o, params):
  """`σ(w_g · x_p + b_g) ⊙ O_t`: x `[B, T, K, H]`, o `[B, T, N, h]` (query head n reads key head
  n // (N/K)), float32."""
  x = jnp.repeat(x.astype(_F32), o.shape[2] // x.shape[2], axis=2)
  logit = jnp.einsum("btnh,nh->btn", x, jnp.asarray(params["gate_weight"], _F32))
  return jax.nn.sigmoid(logit + jnp.asarray(params["gate_bias"], _F32))[..., None] * o


def _chela_recurrent(op, q, k, v, state, params, *, method, impl, chunk_size):
  """The new tokens of a causal sequence from the carried state (see `chela_attention`):
  `(out, state)`. Each convolution runs over (its carried input tail, the new inputs), whose last
  T outputs are the full forward's (the tail holds exactly the taps that reach them); the linear
  attention starts from the carried memory (`memory_state.linear_with_state`)."""
  B, T, N, _ = q.shape
  K, H, h = k.shape[2], k.shape[3], v.shape[3]
  L = jnp.shape(params["long_kernel"])[-1]
  state = memory_state.checked_state(
      op, state, {"memory": (B, K, H, h + 1), "short_inputs": (B, SHORT_KERNEL - 1, K, H),
                  "long_inputs": (B, L - 1, K, H)},
      {"memory": "[B, K, H, h+1]", "short_inputs": f"[B, {SHORT_KERNEL - 1}, K, H]",
       "long_inputs": "[B, L-1, K, H]"})
  xs, short_inputs = memory_state.shift_in(state["short_inputs"], k)
  u = jax.nn.silu(causal_conv(xs, params["short_kernel"])[:, SHORT_KERNEL - 1:])
  us, long_inputs = memory_state.shift_in(state["long_inputs"], u)
  z = causal_conv(us, stabilized_long_kernel(params["long_kernel"], params["long_decay"]),
                  method=method)[:, L - 1:]
  queries, keys = _features(z, params)
  values = jnp.concatenate([v.astype(_F32), jnp.ones((B, T, K, 1), _F32)], axis=-1)
  o, memory = memory_state.linear_with_state(queries, keys, values, state["memory"], scale=1.0,
                                             chunk_size=chunk_size, implementation=impl)
  out = _gated(k, normalize_output(o), params)
  new_state = {"memory": memory, "short_inputs": short_inputs, "long_inputs": long_inputs}
  return out.astype(q.dtype), new_state


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


def _long_taps(kwargs) -> int:
  """Taps of the long kernel: its array's when given, else the layer's `LONG_KERNEL`."""
  return np.shape(kwargs["long_kernel"])[-1] if "long_kernel" in kwargs else LONG_KERNEL


def _example(*, N: int, K: int, H: int) -> dict:
  # chunk_size and a long kernel of 8 taps: example settings that cross chunk ends and let the
  # decoding state's convolution tail roll over at the suite's lengths.
  params = example_params(CHELA_SPECS, N=N, K=K, H=H, perturb=0.3)
  return dict(chunk_size=8, **{**params, "long_kernel": params["long_kernel"][..., :8]})


register(Mechanism(
    name="chela_attention", fn=chela_attention, family="linear", seeds=(218,),
    paper="Short-Long Convolutions Help Hardware-Efficient Linear Attention to Focus on Long "
          "Sequences", arxiv="2406.08128",
    patterns=frozenset({"self", "causal_self"}), gqa=True, decode=True, recurrent=True,
    packed=True, complexity="O(T·(C + log T)) (chunk C)", implementations=("xla", "reference"),
    # Queries and keys come from one shared convolution stream of the keys: q is not read.
    reads=frozenset({"k", "v"}), params=CHELA_SPECS,
    example=_example,
    # The linear-attention state and normaliser per kv head, plus the convolutions' input tails
    # (taps - 1 earlier inputs each; the long kernel's taps from its array when given).
    state_size=lambda T, N, K, H, h, kw: K * H * (h + 1) + (
        _long_taps(kw) - 1 + SHORT_KERNEL - 1) * K * H))

__all__ = ["chela_attention", "CHELA_SPECS", "SHORT_KERNEL", "LONG_KERNEL"]
