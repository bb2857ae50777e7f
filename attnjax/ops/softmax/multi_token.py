"""Multi-Token Attention (MTA): attention weights convolved over queries, keys and heads.

    Â      = scale · q_i·k_j                                                  [B, N, T, S]
    A      = Softmax(Mask_-∞(MixHeads_pre(Conv_θ(Mask_0(Â)))))               pre-softmax part
    A'     = MixHeads_post(Mask_0(Conv_θ'(A)))                               post-softmax part
    o_i    = Σ_j A'_ij v_j

    Conv_θ(X)[n, i, j] = Σ_{a<c_q} Σ_{b<c_k} θ[n, a, b] · X[n, i - (c_q - 1) + a, j - (c_k - 1)/2 + b]
    MixHeads(X)[g·G + o] = Σ_{h < G} W[g, h, o] · X[g·G + h]             heads in groups of G

Each weight then depends on the logits of the c_q - 1 previous queries and of c_k neighbouring keys
(a depthwise 2-D convolution per head over the (query, key) plane, causal in the query axis, centred
in the key axis) and on the other heads of its group, so a query can find a key by several tokens
at once ("Alice" near "rabbit"). Mask_0 zeroes the pairs the contract hides before a convolution and
Mask_-∞ / the final Mask_0 hide them again after it, so no hidden key leaks in: a query at i reads
rows i' <= i only at the keys those rows see (with causal masking, keys <= i' <= i). Outside the
sequence, and across packed documents (rows of another document), the convolution sees zeros, as in
the authors' code, which pads with zeros and cuts packed sequences apart.

The layout is the released models' (github.com/facebookresearch/RAM, projects/mta: `configs/*_mta.yaml`
and `mta_transformer.py`): key-query convolutions of c_q = 6 queries by c_k = 11 keys both before
(`qk_kernel`) and after (`post_qk_kernel`) the softmax, head mixing before the softmax over all heads
(`pre_head_mix`, their `pre_sm_linear_head`) and after it in groups (`head_mix`, their head
convolution; the configs use one group of all heads). Every array starts at the identity (their
`init_method: identity`: a 1 at the current query and centre key; identity head mixing), where MTA
is exactly softmax attention. `post_qk_kernel=None` / `pre_head_mix=None` drop those parts (the
operator takes kernels of any c_q and odd c_k, and head mixing of any group size G dividing N, read
from the arrays' shapes). Not included: the per-head RMSNorm and sigmoid gate the released models
apply to the attention output (layer parts after the attention).

Reference-only: the convolution needs whole `[T, S]` score planes, so this is a dense float32 form.
Decoding over a KV cache is not supported (`decode=False`): each row needs the logits of the
previous c_q - 1 queries, which a cache of keys does not keep; calls take `q_offset = 0`.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]`, `qk_kernel`, `post_qk_kernel [N, c_q, c_k]`,
`pre_head_mix`, `head_mix [N/G, G, G]` → `[B,T,N,h]`.
Paper: Golovneva, Wang, Weston and Sukhbaatar, "Multi-Token Attention", arXiv:2504.00927.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import param_tables
from attnjax.registry import Mechanism, example_params, register
from attnjax.typing import Array, Float, Key, Lengths, Output, Query, Value

__all__ = ["multi_token_attention", "MTA_TABLE", "identity_qk_kernel", "identity_head_mix"]

# The released models' kernel sizes (configs/*_mta.yaml: query_kernel_size 6, key_kernel_size 11).
QUERY_KERNEL = 6
KEY_KERNEL = 11
# Shapes in the signature (letters of `attnjax.typing`; Cq x Ck kernels, M groups of Gh heads; the
# pre- and post-softmax parts may differ in size).
QueryKeyKernel = Float[Array, "N Cq Ck"]
PostQueryKeyKernel = Float[Array, "N Cq2 Ck2"]
HeadMix = Float[Array, "M Gh Gh"]
PreHeadMix = Float[Array, "M2 Gh2 Gh2"]
_HIGHEST = jax.lax.Precision.HIGHEST


def identity_qk_kernel(key, shape, dtype=jnp.float32):
  """Initializer `[N, c_q, c_k]`: 1 at the current query (last row) and the centre key, else 0."""
  del key
  return jnp.zeros(shape, dtype).at[:, -1, shape[2] // 2].set(1)


def identity_head_mix(key, shape, dtype=jnp.float32):
  """Initializer `[M, G, G]`: the identity in each group of heads."""
  del key
  return jnp.broadcast_to(jnp.eye(shape[1], dtype=dtype), shape)


# (name, shape(N, K, H, h), shape in letters, init): see `attnjax.core.param_tables`.
MTA_TABLE = (
    ("qk_kernel", lambda N, K, H, h: (N, QUERY_KERNEL, KEY_KERNEL), "[N, c_q, c_k]",
     identity_qk_kernel),
    ("pre_head_mix", lambda N, K, H, h: (1, N, N), "[1, N, N]", identity_head_mix),
    ("post_qk_kernel", lambda N, K, H, h: (N, QUERY_KERNEL, KEY_KERNEL), "[N, c_q, c_k]",
     identity_qk_kernel),
    ("head_mix", lambda N, K, H, h: (1, N, N), "[1, N, N]", identity_head_mix),
)


def _check_arrays(op: str, N: int, kernels: dict, mixes: dict):
  for name, kernel in kernels.items():
    if jnp.ndim(kernel) != 3 or kernel.shape[0] != N or kernel.shape[2] % 2 == 0:
      raise ValueError(f"{op}: `{name}` must have shape [N, c_q, c_k] = [{N}, c_q, c_k] with an odd "
                       f"c_k (keys centred on j), got {jnp.shape(kernel)}")
  for name, mix in mixes.items():
    if (jnp.ndim(mix) != 3 or mix.shape[1] != mix.shape[2]
        or mix.shape[0] * mix.shape[1] != N):
      raise ValueError(f"{op}: `{name}` must have shape [N/G, G, G] (groups of G heads, N = {N}), "
                       f"got {jnp.shape(mix)}")


def _query_key_conv(x, kernel, rows_ok):
  """Conv_θ of the module docstring on `x [B, N, T, S]` with `kernel [N, c_q, c_k]`; `rows_ok
  [B, c_q, T]` says whether row i - a' (a' = c_q - 1 - a queries back) is in row i's sequence."""
  B, N, T, S = x.shape
  cq, ck = kernel.shape[1], kernel.shape[2]
  padded = jnp.pad(x, ((0, 0), (0, 0), (cq - 1, 0), (0, 0)))
  # back[b, n, d, i, j] = x[b, n, i - d, j] (zero before the sequence or its document).
  back = jnp.stack([padded[:, :, cq - 1 - d:cq - 1 - d + T] for d in range(cq)], axis=2)
  back = back * rows_ok[:, None, :, :, None]
  # The key axis as a grouped 1-D convolution over (b, i) rows: channels (n, d), width S.
  lhs = jnp.transpose(back, (0, 3, 1, 2, 4)).reshape(B * T, N * cq, S)
  rhs = kernel[:, ::-1, :].astype(jnp.float32)           # row d of `back` meets kernel row c_q-1-d
  out = jax.lax.conv_general_dilated(lhs, rhs, window_strides=(1,),
                                     padding=[((ck - 1) // 2, (ck - 1) // 2)],
                                     dimension_numbers=("NCH", "OIH", "NCH"),
                                     feature_group_count=N, precision=_HIGHEST)
  return jnp.transpose(out.reshape(B, T, N, S), (0, 2, 1, 3))


def _mix_heads(x, mix):
  """MixHeads of the module docstring: `x [B, N, T, S]`, `mix [M, G, G]`."""
  B, N, T, S = x.shape
  M, G, _ = mix.shape
  out = jnp.einsum("bmhts,mho->bmots", x.reshape(B, M, G, T, S), mix.astype(jnp.float32),
                   precision=_HIGHEST)
  return out.reshape(B, N, T, S)


def multi_token_attention(q: Query, k: Key, v: Value, *, qk_kernel: QueryKeyKernel,
                          head_mix: HeadMix, post_qk_kernel: Optional[PostQueryKeyKernel] = None,
                          pre_head_mix: Optional[PreHeadMix] = None, causal: bool = False,
                          segment_ids=None, q_offset=0, kv_lengths: Optional[Lengths] = None,
                          scale: Optional[float] = None,
                          implementation: Optional[str] = None) -> Output:
  """Multi-Token Attention: key-query convolutions and head mixing around softmax (see module)."""
  op = "multi_token_attention"
  B, T, S, N, K, H, _ = checks.check_qkv(op, q, k, v)
  checks.check_implementation(op, implementation, ("reference",))
  kernels = {name: x for name, x in (("qk_kernel", qk_kernel), ("post_qk_kernel", post_qk_kernel))
             if x is not None}
  mixes = {name: x for name, x in (("head_mix", head_mix), ("pre_head_mix", pre_head_mix))
           if x is not None}
  _check_arrays(op, N, kernels, mixes)
  if not checks.is_static_zero(q_offset):
    raise ValueError(f"{op}: needs the logits of every earlier query (its query-axis convolution), "
                     f"which a KV cache does not keep; call it on whole sequences (q_offset = 0)")
  mask_mod = contract.contract_mask(B=B, T=T, S=S, causal=causal, segment_ids=segment_ids,
                                    kv_lengths=kv_lengths, op=op)
  visible = jnp.ones((B, 1, T, S), bool)
  if mask_mod is not None:
    idx = lambda n, axis: jnp.arange(n, dtype=jnp.int32).reshape([-1 if a == axis else 1
                                                                  for a in range(4)])
    visible = jnp.broadcast_to(mask_mod(idx(B, 0), jnp.zeros((1, 1, 1, 1), jnp.int32),
                                        idx(T, 2), idx(S, 3)), (B, 1, T, S))
  # Rows i - d that belong to row i's sequence: inside it, and in the same packed document.
  q_seg = segment_ids[0] if isinstance(segment_ids, (tuple, list)) else segment_ids
  i = jnp.arange(T, dtype=jnp.int32)
  max_cq = max(x.shape[1] for x in kernels.values())
  rows_ok = jnp.stack([jnp.broadcast_to(i >= d, (B, T)) for d in range(max_cq)], axis=1)
  if q_seg is not None:
    q_seg = jnp.asarray(q_seg)
    rows_ok &= jnp.stack([q_seg == jnp.roll(q_seg, d, axis=1) for d in range(max_cq)], axis=1)
  rows_ok = rows_ok.astype(jnp.float32)

  scale = H ** -0.5 if scale is None else scale
  kf = jnp.repeat(k.astype(jnp.float32), N // K, axis=2)
  vf = jnp.repeat(v.astype(jnp.float32), N // K, axis=2)
  logits = scale * jnp.einsum("btnh,bsnh->bnts", q.astype(jnp.float32), kf)
  x = _query_key_conv(jnp.where(visible, logits, 0.0), qk_kernel,
                      rows_ok[:, :qk_kernel.shape[1]])
  if pre_head_mix is not None:
    x = _mix_heads(x, pre_head_mix)
  # Softmax over the visible keys (an empty row gives zeros; the shift carries no gradient).
  shift = jax.lax.stop_gradient(jnp.max(jnp.where(visible, x, -jnp.inf), axis=-1, keepdims=True))
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  e = jnp.where(visible, jnp.exp(jnp.where(visible, x, shift) - shift), 0.0)
  den = jnp.sum(e, axis=-1, keepdims=True)
  w = e / jnp.where(den == 0.0, 1.0, den)
  if post_qk_kernel is not None:
    w = jnp.where(visible, _query_key_conv(w, post_qk_kernel, rows_ok[:, :post_qk_kernel.shape[1]]),
                  0.0)
  w = _mix_heads(w, head_mix)
  return jnp.einsum("bnts,bsnh->btnh", w, vf, precision=_HIGHEST).astype(q.dtype)


register(Mechanism(
    name="multi_token_attention", fn=multi_token_attention, family="softmax-variant", seeds=(76,),
    paper="Multi-Token Attention", arxiv="2504.00927", decode=False,
    implementations=("reference",), complexity="O(T·S·c_q·c_k)",
    params=param_tables.param_specs(MTA_TABLE),
    # Identity arrays moved by small noise: every tap and every head mix matters at test sizes.
    example=lambda *, N, K, H, h: example_params(param_tables.param_specs(MTA_TABLE, h=h), N=N, K=K,
                                                 H=H, perturb=0.2)))
