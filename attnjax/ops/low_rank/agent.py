"""Agent attention: pooled agent tokens mediate softmax attention (arXiv:2312.08874)."""

from __future__ import annotations


import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core.contract import lengths_or_full
from attnjax.core.contract import reject_causal_or_packing
from attnjax.ops.softmax import dot_product_attention
from attnjax.typing import Key, Output, Query, Value
from attnjax.registry import Mechanism, ParamSpec, example_arrays, register

_F32 = jnp.float32
_LINEAR = dict(family="linear", decode=False, packed=False)

__all__ = ["agent_attention", "adaptive_pool_weights"]

AGENT_NUM = 49                 # the paper's default number of agent tokens (7 x 7)
AGENT_BIAS_LENGTH = 7          # low-resolution agent bias, interpolated to the sequence length
AGENT_DWC_KERNEL = 3           # depthwise-conv kernel on the values (3 x 3 in the paper's 2-D form)


# --------------------------------------------------------------------------------------------------
# Agent attention


def adaptive_pool_weights(lengths, n: int, T: int):
  """`[B, n, T]` weights of 1-D adaptive average pooling of the first `lengths[b]` positions.

  Bin i covers `[floor(i L / n), ceil((i + 1) L / n))` (PyTorch's `AdaptiveAvgPool1d`); each row
  averages its bin. Bins are empty only when L = 0.
  """
  i = jnp.arange(n)[None, :]
  L = jnp.asarray(lengths, jnp.int32)[:, None]
  start = (i * L) // n
  end = -((-(i + 1) * L) // n)
  t = jnp.arange(T)[None, None, :]
  inside = (t >= start[..., None]) & (t < end[..., None])
  return inside / jnp.maximum(end - start, 1)[..., None].astype(_F32)


def _resize_last(x, size: int):
  # Linear interpolation with half-pixel centres (PyTorch `interpolate(align_corners=False)`).
  return jax.image.resize(x, x.shape[:-1] + (size,), method="linear", antialias=False)


def agent_attention(q: Query, k: Key, v: Value, *, agent_bias_k, agent_bias_q, dwc_kernel, dwc_bias,
                    causal=False, segment_ids=None, q_offset=0, kv_lengths=None, scale=None,
                    implementation=None) -> Output:
  """Agent attention: n agent tokens pooled from Q aggregate the keys, then broadcast to queries.

      A   = pool(Q)                                   [n, H]  adaptive average pooling over tokens
      V_A = softmax(s · A Kᵀ + B_1) V                 agent aggregation      [n, h]
      O   = softmax(s · Q Aᵀ + B_2) V_A + DWC(V)       agent broadcast + depthwise conv on values

  equal to the generalized linear attention `φ_q(Q) φ_k(K)ᵀ V` with `φ_q(Q) = softmax(Q Aᵀ)`,
  `φ_k(K)ᵀ = softmax(A Kᵀ)` (rows of the `[T, S]` product sum to 1), at O(T·n) cost.

  What is included from the paper (its 2-D vision form, here on a 1-D sequence): agent pooling,
  both softmaxes, the agent biases as learned low-resolution tables `[N, n, L0]` / `[N, L0, n]`
  linearly interpolated to the key / query length (the paper's block bias interpolated from 7 x 7;
  its per-row/column bias terms have no 1-D counterpart of fixed size and are left out), and the
  depthwise convolution over the value sequence with bias ("same" zero padding). Agents pool over
  the whole sequence, so the mechanism is non-causal, self-attention only (the DWC term needs
  T = S) and cannot separate packed sequences. With `kv_lengths` the agents pool and the keys and
  values count only the valid prefix (padded values are zeroed before the convolution); a row
  whose batch element has no valid key returns zeros. `q_offset` is unused.

  Paper: Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention",
  arXiv:2312.08874.

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, h]`, K dividing N, T = S.
    agent_bias_k: B_1 table `[N, n, L0]` (n agents); agent_bias_q: B_2 table `[N, L0, n]`.
    dwc_kernel: `[K, w, h]` depthwise kernel over w positions; dwc_bias: `[K, h]`.
    scale: defaults to `H ** -0.5` (both softmaxes). implementation: for `dot_product_attention`.

  Returns:
    `[B, T, N, h]` in q's dtype.
  """
  op = "agent_attention"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  reject_causal_or_packing(op, causal=causal, segment_ids=segment_ids,
                           why="agents pool every query of the sequence")
  if T != S:
    raise ValueError(f"{op}: self-attention only (the value convolution needs T == S), got "
                     f"T={T}, S={S}")
  if jnp.ndim(agent_bias_k) != 3 or agent_bias_k.shape[0] != N:
    raise ValueError(f"{op}: `agent_bias_k` must have shape [N={N}, n, L0], got "
                     f"{jnp.shape(agent_bias_k)}")
  n, L0 = agent_bias_k.shape[1:]
  checks.check_shape(op, "agent_bias_q", agent_bias_q, (N, L0, n), "[N, L0, n]")
  if jnp.ndim(dwc_kernel) != 3 or dwc_kernel.shape[0] != K or dwc_kernel.shape[2] != h:
    raise ValueError(f"{op}: `dwc_kernel` must have shape [K={K}, w, h={h}], got "
                     f"{jnp.shape(dwc_kernel)}")
  checks.check_shape(op, "dwc_bias", dwc_bias, (K, h), "[K, h]")
  lengths = lengths_or_full(op, kv_lengths, B, S)
  qf, kf = q.astype(_F32), k.astype(_F32)
  valid = (jnp.arange(S) < lengths[:, None])[:, :, None, None]
  vf = jnp.where(valid, v.astype(_F32), 0.0)

  agents = jnp.einsum("bit,btnh->binh", adaptive_pool_weights(lengths, n, T), qf)
  bias_k = _resize_last(agent_bias_k.astype(_F32), S)[None]                       # [1, N, n, S]
  bias_q = _resize_last(jnp.swapaxes(agent_bias_q.astype(_F32), 1, 2), T)         # [N, n, T]
  bias_q = jnp.swapaxes(bias_q, 1, 2)[None]                                        # [1, N, T, n]
  agent_v = dot_product_attention(agents, kf, vf, bias=bias_k, kv_lengths=kv_lengths, scale=scale,
                                  implementation=implementation)
  out = dot_product_attention(qf, agents, agent_v, bias=bias_q, scale=scale,
                              implementation=implementation)
  out = out + jnp.repeat(_depthwise_conv(vf, dwc_kernel, dwc_bias), N // K, axis=2)
  # A batch element with no valid key has empty rows: zeros (the conv bias would leak otherwise).
  out = jnp.where((lengths > 0)[:, None, None, None], out, 0.0)
  return out.astype(q.dtype)


def _depthwise_conv(x, kernel, bias):
  """Per-channel convolution over the sequence axis of `x [B, S, K, h]`, "same" zero padding."""
  width = kernel.shape[1]
  left = width // 2
  xp = jnp.pad(x, ((0, 0), (left, width - 1 - left), (0, 0), (0, 0)))
  S = x.shape[1]
  kernel = kernel.astype(_F32)
  out = sum(xp[:, j:j + S] * kernel[:, j] for j in range(width))
  return out + bias.astype(_F32)



_EXAMPLE_AGENTS, _EXAMPLE_BIAS_LENGTH = 5, 7   # example agent count n and agent-bias length


def _agent_example(*, N=4, K=2, H=8, h=6):
  del H  # only the value head dim h enters the learned arrays
  n, b = _EXAMPLE_AGENTS, _EXAMPLE_BIAS_LENGTH
  return {**example_arrays(3, {"agent_bias_k": ((N, n, b), 0.0, 0.1)}),
          **example_arrays(4, {"agent_bias_q": ((N, b, n), 0.0, 0.1)}),
          **example_arrays(5, {"dwc_kernel": ((K, AGENT_DWC_KERNEL, h), 0.0, 0.5)}),
          **example_arrays(6, {"dwc_bias": ((K, h), 0.0, 0.1)})}


register(Mechanism(
    name="agent_attention", fn=agent_attention, seeds=(59,), **_LINEAR,
    paper="Agent Attention: On the Integration of Softmax and Linear Attention",
    arxiv="2312.08874", patterns=frozenset({"self"}), complexity="O(T·n)",
    params=(ParamSpec("agent_bias_k", lambda N, K, H: (N, AGENT_NUM, AGENT_BIAS_LENGTH),
                      jax.nn.initializers.truncated_normal(0.02)),
            ParamSpec("agent_bias_q", lambda N, K, H: (N, AGENT_BIAS_LENGTH, AGENT_NUM),
                      jax.nn.initializers.truncated_normal(0.02)),
            # The layer's value head dim is H, so h = H here.
            ParamSpec("dwc_kernel", lambda N, K, H: (K, AGENT_DWC_KERNEL, H),
                      jax.nn.initializers.normal(AGENT_DWC_KERNEL ** -0.5)),
            ParamSpec("dwc_bias", lambda N, K, H: (K, H), jax.nn.initializers.zeros)),
    example=_agent_example))
