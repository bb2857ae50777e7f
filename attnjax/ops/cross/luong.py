"""Luong's global and local attention, and additive (Bahdanau / concat) attention.

Luong, Pham, Manning, "Effective Approaches to Attention-based Neural Machine Translation",
arXiv:1508.04025. A decoder state h_t (the query) attends to the encoder states h̄_s (keys and values)
with one of three scores

    dot      score(h_t, h̄_s) = h_tᵀ h̄_s                    (unscaled)
    general  score(h_t, h̄_s) = h_tᵀ W_a h̄_s                (W_a [H, H] per head: `w_a`)
    concat   score(h_t, h̄_s) = v_aᵀ tanh(W_a [h_t; h̄_s])  = v_aᵀ tanh(W_1 h_t + W_2 h̄_s)

and one of three alignments:

    global   a_t = softmax_s(score(h_t, h̄_s)) over every source position
    local-m  p_t = t: the softmax runs over the window [p_t − D, p_t + D] only
    local-p  p_t = S · sigmoid(v_pᵀ tanh(W_p h_t))       (S the source length, p_t ∈ [0, S])
             a_t(s) = softmax_{s' ∈ window}(score)(s) · exp(−(s − p_t)² / (2σ²)),   σ = D / 2

The Gaussian multiplies the window's softmax and is not renormalized (the paper's eq. 10), so the
local-p weights of a row sum to less than one; the context vector is c_t = Σ_s a_t(s) h̄_s. The
Gaussian is what makes p_t (and W_p, v_p) trainable. The paper's D is 10.

The concat score is Bahdanau's additive score (Bahdanau, Cho, Bengio, "Neural Machine Translation by
Jointly Learning to Align and Translate", arXiv:1409.0473: e_ij = v_aᵀ tanh(W_a s_{i-1} + U_a h_j)),
and the top-down attention of Anderson et al., "Bottom-Up and Top-Down Attention for Image Captioning
and Visual Question Answering", arXiv:1707.07998 (a_i = w_aᵀ tanh(W_va v_i + W_ha h_t) over detector
regions v_i, pooled as Σ softmax(a)_i v_i). `additive_attention` takes the projected states as q and
k (q = W_1 h_t, k = W_2 h̄_s: the attention layer's projections are those matrices) and the learned
vector `v_a`, and serves all three papers.

Registered: `luong_attention` (dot or general score, global or local-m), `luong_local_p_attention`
(the predictive window with its learned W_p, v_p) and `additive_attention`. In the Flax layer q and
k are already linear projections of the decoder and encoder states, so the general score's W_a is
part of them (qᵀ W_a k of projected states is again a bilinear form) and the layer runs the dot score;
`w_a` is for a caller who passes raw states. All are score/mask mods on flex attention.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `[B,T,N,h]`; `w_a [N,H,H]`, `w_p [N,H,H]`,
`v_p [N,H]`, `v_a [N,H]`.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core.contract import flex_with_contract, lengths_or_full, query_positions
from attnjax.registry import Mechanism, ParamSpec, example_params, register
from attnjax.typing import Array, Float, Key, Lengths, Output, Query, Value

__all__ = ["additive_attention", "luong_attention", "luong_local_p_attention",
           "predicted_positions"]

HeadMatrix = Float[Array, "N H H"]
HeadVector = Float[Array, "N H"]
Centres = Float[Array, "B T N"]

ALIGNMENTS = ("global", "local-m", "local-p")
# The paper's half window.
PAPER_WINDOW = 10


def predicted_positions(q: Query, w_p: HeadMatrix, v_p: HeadVector, source_lengths) -> Centres:
  """Local-p's centres `p_t = S_b · sigmoid(v_pᵀ tanh(W_p h_t))` per query head, float32 `[B,T,N]`;
  `source_lengths [B]` is each example's S (its `kv_lengths`, or S)."""
  z = jnp.tanh(jnp.einsum("btnh,nhd->btnd", q.astype(jnp.float32), w_p.astype(jnp.float32)))
  gate = jax.nn.sigmoid(jnp.einsum("btnd,nd->btn", z, v_p.astype(jnp.float32)))
  return jnp.asarray(source_lengths, jnp.float32)[:, None, None] * gate


def _general(op, q, w_a):
  """`q W_a` per head, so that (q W_a)·k is the general score h_tᵀ W_a h̄_s."""
  N, H = q.shape[2], q.shape[3]
  checks.check_shape(op, "w_a", w_a, (N, H, H), "[N, H, H]")
  return jnp.einsum("btnh,nhg->btng", q.astype(jnp.float32), w_a.astype(jnp.float32)).astype(q.dtype)


def _check_common(op, q, k, v, *, causal, segment_ids, window, align):
  checks.check_qkv(op, q, k, v)
  if causal:
    raise ValueError(f"{op}: the decoder attends to the whole source; `causal` does not apply")
  if align not in ALIGNMENTS:
    raise ValueError(f"{op}: `align` must be one of {ALIGNMENTS}, got {align!r}")
  if align != "global":
    if not isinstance(window, (int, float)) or window <= 0:
      raise ValueError(f"{op}: `window` (the half width D) must be a positive number, got {window!r}")
    if segment_ids is not None:
      raise ValueError(f"{op}: a local window is over source positions of one sentence; packed "
                       "`segment_ids` are not supported with align='local-m' or 'local-p'")


def _luong(op, q, k, v, *, align, window, w_a, w_p, v_p, segment_ids, q_offset, kv_lengths,
           scale, implementation):
  B, T, S = q.shape[0], q.shape[1], k.shape[1]
  if align == "local-p":  # from the decoder state h_t itself, before the general score's W_a
    centre = predicted_positions(q, w_p, v_p, lengths_or_full(op, kv_lengths, B, S))
  if w_a is not None:
    q = _general(op, q, w_a)
  scale = 1.0 if scale is None else scale
  run = lambda **mods: flex_with_contract(  # noqa: E731
      op, q, k, v, causal=False, segment_ids=segment_ids, q_offset=q_offset, kv_lengths=kv_lengths,
      scale=scale, implementation=implementation, **mods)
  if align == "global":
    return run()
  if align == "local-m":
    centre = query_positions(B, T, q_offset).astype(jnp.float32)[:, :, None]   # [B, T, 1]
    head = lambda n: 0  # noqa: E731  one centre for every head
  else:
    head = lambda n: n  # noqa: E731

  def inside(b, n, qi, ki):
    return jnp.abs(ki.astype(jnp.float32) - centre[b, qi, head(n)]) <= window

  if align == "local-m":
    return run(mask_mod=inside)
  sigma = window / 2.0

  def gaussian(s, b, n, qi, ki):
    return s - (ki.astype(jnp.float32) - centre[b, qi, n]) ** 2 / (2.0 * sigma * sigma)

  # Σ_s softmax(score)_s g_s v_s = [Σ_s e^{score+log g} v_s / Σ_s e^{score+log g}] · e^{lse_g − lse}:
  # the Gaussian-weighted softmax rescaled by its mass under the plain window softmax.
  out, lse_g = run(mask_mod=inside, score_mod=gaussian, return_residuals=True)
  _, lse = run(mask_mod=inside, return_residuals=True)
  mass = jnp.where(jnp.isfinite(lse), jnp.exp(lse_g - jnp.where(jnp.isfinite(lse), lse, 0.0)), 0.0)
  return (out.astype(jnp.float32) * mass[..., None]).astype(q.dtype)


def luong_attention(q: Query, k: Key, v: Value, *, align: str = "global",
                    window: Union[int, float] = PAPER_WINDOW,
                    w_a: Optional[HeadMatrix] = None, causal: bool = False, segment_ids=None,
                    q_offset=0, kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                    implementation: Optional[str] = None) -> Output:
  """Luong attention with the dot score (or the general score given `w_a [N,H,H]`), aligned
  globally or over the window [t − D, t + D] around the target position (local-m; D = `window`,
  t the absolute position `q_offset + t`). `scale` multiplies the score (default 1: unscaled)."""
  op = "luong_attention"
  if align == "local-p":
    raise ValueError(f"{op}: local-p needs the learned W_p, v_p: use luong_local_p_attention")
  _check_common(op, q, k, v, causal=causal, segment_ids=segment_ids, window=window, align=align)
  return _luong(op, q, k, v, align=align, window=window, w_a=w_a, w_p=None, v_p=None,
                segment_ids=segment_ids, q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                implementation=implementation)


def luong_local_p_attention(q: Query, k: Key, v: Value, *, w_p: HeadMatrix, v_p: HeadVector,
                            window: Union[int, float] = PAPER_WINDOW, w_a: Optional[HeadMatrix] = None,
                            causal: bool = False, segment_ids=None, q_offset=0,
                            kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                            implementation: Optional[str] = None) -> Output:
  """Luong local-p attention: the window [p_t − D, p_t + D] around the predicted centre
  `p_t = S · sigmoid(v_pᵀ tanh(W_p h_t))` (S per example from `kv_lengths`), the window's softmax
  times the Gaussian exp(−(s − p_t)² / (2 (D/2)²)), not renormalized. `w_p [N,H,H]`, `v_p [N,H]`;
  dot score, or general with `w_a`."""
  op = "luong_local_p_attention"
  _check_common(op, q, k, v, causal=causal, segment_ids=segment_ids, window=window, align="local-p")
  N, H = q.shape[2], q.shape[3]
  checks.check_shape(op, "w_p", w_p, (N, H, H), "[N, H, H]")
  checks.check_shape(op, "v_p", v_p, (N, H), "[N, H]")
  return _luong(op, q, k, v, align="local-p", window=window, w_a=w_a, w_p=w_p, v_p=v_p,
                segment_ids=segment_ids, q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                implementation=implementation)


def additive_attention(q: Query, k: Key, v: Value, *, v_a: HeadVector, causal: bool = False,
                       segment_ids=None, q_offset=0, kv_lengths: Optional[Lengths] = None,
                       scale: Optional[float] = None, implementation: Optional[str] = None) -> Output:
  """Additive (Bahdanau / Luong concat / top-down) attention: `e_ij = v_aᵀ tanh(q_i + k_j)` per
  head, `o_i = Σ_j softmax_j(e_ij) v_j`. q, k: the projected query and key states; `v_a [N,H]`;
  `scale` (default 1) multiplies e. Forms a `[T, S, H]` tensor per head (the score is not a dot
  product), so memory grows as T·S·H."""
  op = "additive_attention"
  _, _, _, N, K, H, _ = checks.check_qkv(op, q, k, v)
  checks.check_shape(op, "v_a", v_a, (N, H), "[N, H]")
  G = N // K
  qf, kf, vaf = (jnp.asarray(x, jnp.float32) for x in (q, k, v_a))
  temperature = 1.0 if scale is None else scale

  def energy(s, b, n, qi, ki):
    del s  # the flex score is q·k; this mechanism's score is additive
    # Indices broadcast as [B, K, G, T, S]; the gathers add the head dim last.
    hidden = jnp.tanh(qf[b, qi, n] + kf[b, ki, n // G])
    return temperature * jnp.sum(hidden * vaf[n], axis=-1)

  return flex_with_contract(op, q, k, v, causal=causal, segment_ids=segment_ids, q_offset=q_offset,
                            kv_lengths=kv_lengths, scale=1.0, implementation=implementation,
                            score_mod=energy)


_CITE = dict(paper="Effective Approaches to Attention-based Neural Machine Translation",
             arxiv="1508.04025")
# Fan-in scaling over the head dim (the last axis): a [.., H] projection keeps O(1) outputs.
_FAN_IN_LAST = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=-1, out_axis=-2)
_FAN_IN_MIDDLE = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=-2,
                                                      out_axis=-1, batch_axis=(0,))
_LOCAL_P_PARAMS = (ParamSpec("w_p", lambda N, K, H: (N, H, H), _FAN_IN_MIDDLE),
                   ParamSpec("v_p", lambda N, K, H: (N, H), _FAN_IN_LAST))
_ADDITIVE_PARAMS = (ParamSpec("v_a", lambda N, K, H: (N, H), _FAN_IN_LAST),)

register(Mechanism(
    name="luong_attention", fn=luong_attention, family="cross-attention", seeds=(150,), **_CITE,
    # Encoder-decoder attention: the decoder state attends to the whole source sentence.
    patterns=frozenset({"cross"}), decode=False, packed=False,
    # A window narrower than the conformance suite's sources, so the local-m mask matters.
    example={"align": "local-m", "window": 3}))

register(Mechanism(
    name="luong_local_p_attention", fn=luong_local_p_attention, family="cross-attention",
    seeds=(150,), **_CITE, patterns=frozenset({"cross"}), decode=False, packed=False,
    params=_LOCAL_P_PARAMS,
    example=lambda N, K, H: {"window": 3, **example_params(_LOCAL_P_PARAMS, N=N, K=K, H=H, seed=3,
                                                           perturb=0.3)}))

register(Mechanism(
    name="additive_attention", fn=additive_attention, family="cross-attention", seeds=(150, 129),
    **_CITE, complexity="O(T·S·H)", params=_ADDITIVE_PARAMS,
    example=lambda N, K, H: example_params(_ADDITIVE_PARAMS, N=N, K=K, H=H, seed=4)))
