"""Recurrent Attention Network (RAN, catalog #65): window-by-window self-attention in which a Global
Perception Cell (GPC) token, carried from window to window, joins each window's tokens.

Paper: Li et al., "Recurrent Attention Networks for Long-text Modeling", ACL Findings 2023,
arXiv:2306.06843; authors' reference: github.com/4AI/RAN, `rannet/ran.py` (function `ran`). Per
window i, in the model dimension D, the reference computes

    Z_i      = LayerNorm([c_{i-1}; X_i])                 the GPC is token 0 of the window
    O_i      = pMHSA(Z_i)                                 shared q/k/v projections (+ RoPE)
    ĉ_i, Y_i = stdnorm(O_i[0]), stdnorm(O_i[1:])          stdnorm(x) = (x - x̄) / √(mean x² + ε)
    c_0      = ĉ_0,   c_i = LayerNorm(ĉ_i + GLU(ĉ_{i-1}))  the cell's GLU residual (i >= 1)
    GLU(x)   = (x W_t + b_t) ⊙ σ(x W_g + b_g)

with c_{-1} a learned vector and Y_i the tokens' outputs; the last c represents the document.
`recurrent_attention_network` is this computation in the head space of the operator contract; a
causal one also decodes from a fixed-size state (the cell, the last read-out ĉ and the current
window's tokens, `attnjax.core.memory_state`).
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import flex
from attnjax.core import implementations
from attnjax.core import masks
from attnjax.core import memory_state
from attnjax.core import param_tables
from attnjax.core.merge import merge_attention_states
from attnjax.ops.softmax import dot_product_attention
from attnjax.registry import Mechanism, ParamSpec, example_params, register
from attnjax.typing import Array, Float, Key, Lengths, Output, Query, SegmentIds, Value

_OP = "recurrent_attention_network"
_LN_EPS = 1e-5
_STDNORM_EPS = 1e-7   # the reference's `standard_normalize` epsilon
DocumentCell = Float[Array, "B K h"]   # the final cell per key/value head


def _stdnorm(x):
  """The reference's `standard_normalize`: `(x - mean x) / sqrt(mean x² + ε)` over the last axis."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + _STDNORM_EPS)


def _layer_norm(x):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + _LN_EPS)


def _affine(x, kernel, bias):
  """Per key/value head `x W + b`: x `[B, K, d]`, kernel `[K, d, e]`, bias `[K, e]`."""
  return jnp.einsum("bkd,kde->bke", x, kernel) + bias


def _cell_update(m, prev, started, k_win, v_win, valid_win, p, scale):
  """One window of the Global Perception Cell: the cell token's key and value `(k_c, v_c)` (what
  the window's tokens read), its normalized read-out ĉ of the window and the next cell.

  Args:
    m: the cell `[B, K, h]`; prev: the previous window's ĉ `[B, K, h]` (read when `started`, `[B]`
      bool); k_win `[B, W, K, H]`, v_win `[B, W, K, h]`, valid_win `[B, W]`: the window's tokens.

  Returns:
    `(next cell, ĉ, (k_c [B, K, H], v_c [B, K, h]))`, float32.
  """
  # The cell token: its own projections of its state.
  q_c = _affine(m, p["cell_query_kernel"], p["cell_query_bias"])
  k_c = _affine(m, p["cell_key_kernel"], p["cell_key_bias"])
  v_c = _affine(m, p["cell_value_kernel"], p["cell_value_bias"])
  # Its row attends to itself and to every valid token of its window, also when causal: only
  # later windows read the result.
  logit_c = scale * jnp.sum(q_c * k_c, axis=-1)                              # [B, K]
  logit_w = scale * jnp.einsum("bkh,bwkh->bwk", q_c, k_win)                   # [B, W, K]
  logit_w = jnp.where(valid_win[..., None], logit_w, -jnp.inf)
  top = jnp.maximum(logit_c, jnp.max(logit_w, axis=1))
  e_c, e_w = jnp.exp(logit_c - top), jnp.exp(logit_w - top[:, None])
  denom = e_c + jnp.sum(e_w, axis=1)
  read = (e_c[..., None] * v_c + jnp.einsum("bwk,bwkh->bkh", e_w, v_win)) / denom[..., None]
  out_c = _stdnorm(read)
  # The GLU residual on the previous window's cell output (none for the first window).
  glu = (_affine(prev, p["cell_glu_kernel"][:, 0], p["cell_glu_bias"][:, 0])
         * jax.nn.sigmoid(_affine(prev, p["cell_glu_kernel"][:, 1], p["cell_glu_bias"][:, 1])))
  new = jnp.where(started[:, None, None], _layer_norm(out_c + glu), out_c)
  return new, out_c, (k_c, v_c)


def gpc_states(k: Key, v: Value, params: dict, *, window: int,
               kv_lengths: Optional[Lengths] = None, scale: float):
  """Runs the Global Perception Cell over the windows of the key/value stream (a `lax.scan`, each
  step bounded by the window): the cell token each window sees, and the final cell.

  Args:
    k: `[B, S, K, H]`; v: `[B, S, K, h]`; params: the learned arrays of
      `recurrent_attention_network`, float32.

  Returns:
    `((k_c [B, nW, K, H], v_c [B, nW, K, h]), m [B, K, h])`: the cell token's key and value as
    window i sees them (projected from the cell after windows 0..i-1), nW = ⌈S / window⌉, and the
    cell after the last window holding a valid key (the document representation). float32. A window
    with no valid key (past `kv_lengths`) leaves the cell unchanged.
  """
  B, S, K, H = k.shape
  h = v.shape[-1]
  W = window
  nw = -(-S // W)
  pad = nw * W - S
  valid = jnp.pad(contract.valid_slots(B, S, kv_lengths), ((0, 0), (0, pad)))
  # Slots past kv_lengths may hold garbage (an unfilled cache): zero them before they are read.
  zero_invalid = lambda x: jnp.where(valid[:, :S, None, None], x.astype(jnp.float32), 0.0)
  per_window = lambda x: jnp.moveaxis(
      jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape((B, nw, W) + x.shape[2:]), 1, 0)
  kw, vw = per_window(zero_invalid(k)), per_window(zero_invalid(v))
  validw = jnp.moveaxis(valid.reshape(B, nw, W), 1, 0)

  def step(carry, inputs):
    m, prev, started = carry
    k_win, v_win, valid_win = inputs
    new, out_c, cell_kv = _cell_update(m, prev, started, k_win, v_win, valid_win, params, scale)
    any_valid = jnp.any(valid_win, axis=1)
    keep = lambda new, old: jnp.where(any_valid[:, None, None], new, old)
    return (keep(new, m), keep(out_c, prev), started | any_valid), cell_kv

  init = jnp.broadcast_to(params["gpc_init"], (B, K, h))
  (m, *_), (k_c, v_c) = jax.lax.scan(step, (init, init, jnp.zeros((B,), bool)), (kw, vw, validw))
  return (jnp.moveaxis(k_c, 0, 1), jnp.moveaxis(v_c, 0, 1)), m


def _windows_full(q, k, v, k_c, v_c, *, window, causal, kv_lengths, scale):
  """Full forward (T == S, q_offset 0): each window is one attention over [cell; its tokens], a
  batch of `[W, W + 1]` problems."""
  B, T, N, H = q.shape
  K, h = k.shape[2], v.shape[-1]
  W = window
  nw = k_c.shape[1]
  pad = nw * W - T
  fold = lambda x: jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(
      (B, nw, W) + x.shape[2:])
  keys = jnp.concatenate([k_c[:, :, None], fold(k)], axis=2).reshape(B * nw, W + 1, K, H)
  values = jnp.concatenate([v_c[:, :, None], fold(v)], axis=2).reshape(B * nw, W + 1, K, h)
  lengths = contract.lengths_or_full(_OP, kv_lengths, B, T)
  starts = jnp.arange(nw, dtype=jnp.int32) * W
  win_lengths = (1 + jnp.clip(lengths[:, None] - starts[None], 0, W)).reshape(B * nw)
  # q_offset = 1: the cell sits at slot 0, before the window's first token, visible to all of them.
  out = dot_product_attention(fold(q).reshape(B * nw, W, N, H), keys, values, causal=causal,
                              q_offset=1, kv_lengths=win_lengths, scale=scale,
                              implementation="xla")
  return out.reshape(B, nw * W, N, h)[:, :T]


def _windows_masked(q, k, v, k_c, v_c, *, window, causal, q_offset, kv_lengths, scale,
                    implementation):
  """Any query positions (a block over a KV cache): masked attention over the query's window of the
  key stream, merged with its window's cell token as one extra key (`merge_attention_states`)."""
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  pos = contract.query_positions(B, T, q_offset)
  mask = masks.combine_masks(
      contract.contract_mask(B=B, T=T, S=S, causal=causal, q_offset=q_offset,
                             kv_lengths=kv_lengths, op=_OP),
      masks.chunked(window, offset=pos[:, 0]))
  kf, vf = contract.zero_padded(k, kv_lengths), contract.zero_padded(v, kv_lengths)
  qf = q.astype(jnp.float32)
  o_tok, lse_tok = flex.flex_attention(qf, kf, vf, mask_mod=mask, scale=scale,
                                       return_residuals=True, implementation=implementation)
  win = jnp.clip(pos // window, 0, k_c.shape[1] - 1)
  at_window = lambda x: jnp.repeat(jax.vmap(lambda xb, wb: xb[wb])(x, win), N // K, axis=2)
  kc, vc = at_window(k_c), at_window(v_c)                      # [B, T, N, ·]
  lse_cell = scale * jnp.sum(qf * kc, axis=-1)
  out, _ = merge_attention_states([o_tok, vc], [lse_tok, lse_cell])
  return out


def _windows_xla(q, k, v, k_c, v_c, *, full, q_offset, **call):
  """A full forward as a batch of `[W, W + 1]` problems; any other call as the masked form."""
  if full:
    return _windows_full(q, k, v, k_c, v_c, **call)
  return _windows_masked(q, k, v, k_c, v_c, q_offset=q_offset, implementation="xla", **call)


def _windows_reference(q, k, v, k_c, v_c, *, full, **call):
  """Masked flex attention (dense) merged with the cell slot."""
  del full
  return _windows_masked(q, k, v, k_c, v_c, implementation="reference", **call)


_WINDOW_IMPLEMENTATIONS = (("xla", _windows_xla, ()), ("reference", _windows_reference, ()))


def _ran_recurrent(q, k, v, params, state, *, window, q_offset, scale, implementation):
  """The T new tokens of a causal RAN from the carried state (see `recurrent_attention_network`):
  a scan over the windows they touch advances the cell past each window that ends among them."""
  B, T, N, H = q.shape
  K, h = k.shape[2], v.shape[-1]
  W, R = window, window - 1   # a window's tokens before its last one: at most W - 1
  state = memory_state.checked_state(
      _OP, state, {"cell": (B, K, h), "previous": (B, K, h), "keys": (B, R, K, H),
                   "values": (B, R, K, h)},
      {"cell": "[B, K, h]", "previous": "[B, K, h]", "keys": "[B, W - 1, K, H]",
       "values": "[B, W - 1, K, h]"})
  n = memory_state.tokens_before(B, q_offset)
  keys, kept_keys = memory_state.shift_in(state["keys"], k)
  values, kept_values = memory_state.shift_in(state["values"], v)
  first = n // W                       # the window of the first new token
  # Before the first window ends the cell is the learned initial one (a zero state: no tokens yet).
  init = jnp.broadcast_to(params["gpc_init"], (B, K, h))
  cell = jnp.where((first == 0)[:, None, None], init, state["cell"])
  window_of = jax.vmap(lambda x, start: jax.lax.dynamic_slice_in_dim(x, start, W, axis=0))

  def step(carry, j):
    m, prev = carry
    i = first + j
    # Slot of the window's first position in [buffer; new] (clamped, and unused, for a window
    # that does not end in this call).
    start = i * W - n + R
    new, out_c, cell_kv = _cell_update(m, prev, i > 0, window_of(keys, start),
                                       window_of(values, start), jnp.ones((B, W), bool), params,
                                       scale)
    ends = ((i + 1) * W <= n + T)[:, None, None]
    return (jnp.where(ends, new, m), jnp.where(ends, out_c, prev)), cell_kv

  touched = (T + W - 2) // W + 1       # windows T consecutive positions can touch
  (cell, prev), (k_c, v_c) = jax.lax.scan(step, (cell, state["previous"]),
                                          jnp.arange(touched, dtype=jnp.int32))
  # Each token reads its own window's cell token: [touched, B, K, ·] -> [B, T, N, ·].
  slot = contract.query_positions(B, T, n) // W - first[:, None]
  at_token = lambda x: jnp.repeat(jnp.take_along_axis(
      jnp.moveaxis(x, 0, 1), slot[:, :, None, None], axis=1), N // K, axis=2)
  qf = q.astype(jnp.float32)
  o_tok, lse_tok = flex.flex_attention(qf, keys, values,
                                       mask_mod=memory_state.recent_mask(n, R, block=W),
                                       scale=scale, return_residuals=True,
                                       implementation=implementation)
  kc, vc = at_token(k_c), at_token(v_c)
  out, _ = merge_attention_states([o_tok, vc], [lse_tok, scale * jnp.sum(qf * kc, axis=-1)])
  new_state = {"cell": cell, "previous": prev, "keys": kept_keys, "values": kept_values}
  return out.astype(q.dtype), new_state


def recurrent_attention_network(
    q: Query, k: Key, v: Value, *, gpc_init, cell_query_kernel, cell_query_bias, cell_key_kernel,
    cell_key_bias, cell_value_kernel, cell_value_bias, cell_glu_kernel, cell_glu_bias,
    window: int = 64, causal: bool = False, segment_ids: Optional[SegmentIds] = None, q_offset=0,
    kv_lengths: Optional[Lengths] = None, scale=None, implementation: Optional[str] = None,
    return_document: bool = False, initial_state: Optional[dict] = None,
    return_final_state: bool = False) -> Union[Output, tuple[Output, DocumentCell],
                                               tuple[Output, dict]]:
  """Recurrent Attention Network: window-by-window attention with a Global Perception Cell token.

  Paper: Li et al., "Recurrent Attention Networks for Long-text Modeling", arXiv:2306.06843, and
  the authors' reference code (github.com/4AI/RAN). The sequence is cut into windows of W positions
  (the last may be shorter). Per key/value head g there is one cell, a vector m ∈ R^h starting at
  `gpc_init`; window i's cell token is its own projection of the cell after windows 0..i-1,

      q_c = m W_q + b_q,   k_c = m W_k + b_k,   v_c = m W_v + b_v

  and a token at position p of window i (query head n reads key/value head n // (N/K)) gets

      o_p = softmax(scale · q_p [k_c; k_win(i)]ᵀ, causal among the tokens) [v_c; v_win(i)]

  The cell token's own row reads the whole window; its normalized output updates the cell through
  the reference's GLU residual on the previous window's cell output:

      ĉ_i = stdnorm(softmax(scale · q_c [k_c; k_win(i)]ᵀ) [v_c; v_win(i)])
      m_0 = ĉ_0,   m_i = LayerNorm(ĉ_i + GLU(ĉ_{i-1})),   GLU(x) = (x W_t + b_t) ⊙ σ(x W_g + b_g)

  with stdnorm(x) = (x - x̄) / √(mean x² + ε) as in the module docstring. Cost O(T·W) plus a scan
  over the ⌈S/W⌉ windows of O(W) each; memory bounded by the window.

  Adaptations to the contract: the reference's cell is a model-dimension vector that the window
  attention's shared projections map to q, k, v; here it lives in the head's value space (its
  attention output, before the layer's output projection) with its own linear projections, one
  cell per key/value head. LayerNorms carry no affine (the projections that follow absorb it).
  Causal: tokens are causal within their window, as under the reference's triangular mask; the
  cell's row reads its whole window (under the triangular mask the cell, slot 0, would see only
  itself, so no token could reach the next window), which stays causal since only later windows
  read it. Left to the layer / model: RoPE, the output projection, the attention's own GLU residual
  and the tokens' normalization (block-level), the reference's merging of a short last window into
  the previous one, and its memory review (a second attention of the tokens over all windows'
  cells). Packed sequences are not supported.

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, h]`; self-attention (T == S), or a query
      block over a KV cache (`q_offset`, `kv_lengths`: exact, the cell is rebuilt from the cache).
    gpc_init: `[K, h]` the initial cell (the reference's learned initial cell).
    cell_query_kernel, cell_key_kernel: `[K, h, H]`; cell_query_bias, cell_key_bias: `[K, H]`;
      cell_value_kernel: `[K, h, h]`; cell_value_bias: `[K, h]`: the cell token's projections.
    cell_glu_kernel: `[K, 2, h, h]` (W_t, W_g); cell_glu_bias: `[K, 2, h]` (b_t, b_g).
    window: window length W.
    causal, q_offset, kv_lengths, scale: the common contract (scale defaults to H^-½; it scales the
      cell's logits too). segment_ids must be None.
    implementation: "xla" (windows as a batch of `[W, W + 1]` problems in a full forward) or
      "reference" (masked flex attention merged with the cell slot); both share the cell's scan.
    return_document: also return the document representation, the final cell `[B, K, h]` (after
      the last window holding a valid key).
    initial_state, return_final_state: recurrent decoding, causal only: q, k, v are the T new
      tokens at positions n, ..., n + T - 1 (n = `q_offset`), any number of window boundaries
      among them. The state is the cell after the completed windows, the last completed window's
      ĉ (the GLU residual's input) and the current window's tokens: `{"cell": [B, K, h],
      "previous": [B, K, h], "keys": [B, W - 1, K, H], "values": [B, W - 1, K, h]}` float32, the
      last W - 1 positions oldest first (`attnjax.core.memory_state`; zeros or None: no tokens
      yet). Returns the full forward's rows and the state after n + T tokens.

  Returns:
    `[B, T, N, h]` in q's dtype (and the document representation when asked); with
    `return_final_state`, `(out, state)`.
  """
  B, T, S, N, K, H, h = checks.check_qkv(_OP, q, k, v)
  impl = checks.check_implementation(_OP, implementation)
  if window < 1:
    raise ValueError(f"{_OP}: `window` must be >= 1, got {window}")
  if segment_ids is not None:
    raise ValueError(f"{_OP}: packed sequences (`segment_ids`) are not supported: the cell carries "
                     "across windows; run documents as separate batch rows")
  if initial_state is not None and not return_final_state:
    raise ValueError(f"{_OP}: `initial_state` needs `return_final_state=True` (recurrent decoding)")
  if return_final_state:
    memory_state.check_recurrent_call(_OP, causal=causal, segment_ids=segment_ids,
                                       kv_lengths=kv_lengths, T=T, S=S)
    if return_document:
      raise ValueError(f"{_OP}: `return_document` is for a whole sequence, not with "
                       "`return_final_state` (the state carries the cell of the completed windows)")
  else:
    full = contract.check_self_attention(_OP, T=T, S=S, q_offset=q_offset, kv_lengths=kv_lengths)
  given = dict(gpc_init=gpc_init, cell_query_kernel=cell_query_kernel,
               cell_query_bias=cell_query_bias, cell_key_kernel=cell_key_kernel,
               cell_key_bias=cell_key_bias, cell_value_kernel=cell_value_kernel,
               cell_value_bias=cell_value_bias, cell_glu_kernel=cell_glu_kernel,
               cell_glu_bias=cell_glu_bias)
  param_tables.check_table(_OP, RAN_TABLE, given, N=N, K=K, H=H, h=h)
  params = {name: jnp.asarray(x, jnp.float32) for name, x in given.items()}
  scale = H ** -0.5 if scale is None else scale
  if return_final_state:
    return _ran_recurrent(q, k, v, params, initial_state, window=window, q_offset=q_offset,
                          scale=scale, implementation=impl)

  (k_c, v_c), m = gpc_states(k, v, params, window=window, kv_lengths=kv_lengths, scale=scale)
  out = implementations.dispatch(_OP, _WINDOW_IMPLEMENTATIONS, impl, q, k, v, k_c, v_c,
                                 window=window, causal=causal, q_offset=q_offset,
                                 kv_lengths=kv_lengths, scale=scale, full=full)
  out = out.astype(q.dtype)
  return (out, m.astype(q.dtype)) if return_document else out


# ------------------------------------------------------------------------------------------------
# Registration


_init = jax.nn.initializers
_fan_in = param_tables.fan_in_normal
# (name, shape(N, K, H, h), shape in letters, init): see `attnjax.core.param_tables`.
RAN_TABLE = (
    # The reference's initial cell is a LayerNorm's β applied to a zero input: zeros at init.
    ("gpc_init", lambda N, K, H, h: (K, h), "[K, h]", _init.zeros),
    ("cell_query_kernel", lambda N, K, H, h: (K, h, H), "[K, h, H]", _fan_in),
    ("cell_query_bias", lambda N, K, H, h: (K, H), "[K, H]", _init.zeros),
    ("cell_key_kernel", lambda N, K, H, h: (K, h, H), "[K, h, H]", _fan_in),
    ("cell_key_bias", lambda N, K, H, h: (K, H), "[K, H]", _init.zeros),
    ("cell_value_kernel", lambda N, K, H, h: (K, h, h), "[K, h, h]", _fan_in),
    ("cell_value_bias", lambda N, K, H, h: (K, h), "[K, h]", _init.zeros),
    ("cell_glu_kernel", lambda N, K, H, h: (K, 2, h, h), "[K, 2, h, h]", _fan_in),
    ("cell_glu_bias", lambda N, K, H, h: (K, 2, h), "[K, 2, h]", _init.zeros),
)


def ran_param_specs(h: Optional[int] = None) -> tuple[ParamSpec, ...]:
  """The learned arrays as ParamSpecs, for value width `h` (None: h = H, as in the Flax layer)."""
  return param_tables.param_specs(RAN_TABLE, h=h)


RAN_SPECS = ran_param_specs()

register(Mechanism(
    name=_OP, fn=recurrent_attention_network, family="recurrent-memory", seeds=(65,),
    paper="Recurrent Attention Networks for Long-text Modeling", arxiv="2306.06843",
    patterns=frozenset({"self", "causal_self"}), gqa=True, decode=True, recurrent=True,
    packed=False,
    reads=frozenset({"q", "k", "v"}), complexity="O(T·W)", implementations=("xla", "reference"),
    params=RAN_SPECS,
    # window: an example setting (several windows, the last one short, at the suite's lengths).
    example=lambda *, N, K, H, h: dict(window=5, **example_params(ran_param_specs(h=h), N=N, K=K,
                                                                  H=H, perturb=0.5)),
    defaults=dict(window=64),
    # The cell and the previous window's cell output (the GLU residual's input), plus the keys
    # and values of the current window's W - 1 positions before its last.
    state_size=lambda T, N, K, H, h, kw: K * (2 * h + (kw["window"] - 1) * (H + h))))

__all__ = ["recurrent_attention_network", "gpc_states", "ran_param_specs", "RAN_SPECS", "RAN_TABLE"]
