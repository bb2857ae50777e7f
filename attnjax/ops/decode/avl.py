"""A-VL: modality-adaptive attention for vision-language decoding: text tokens through a recent local
window, image tokens through a small critical ("core") subset chosen by attention.

LVLMs attend to remote image tokens throughout generation but to text mostly locally, and the image
attention is sparse and drifts slowly. A-VL keeps the image KV cache (its "secondary" tokens: the
paper first evicts the least attended, the "minor" ones, at prefill, which `select_core_image_tokens`
with a larger k chooses) but computes attention over only its core subset, and over text tokens
within a window of the query:

    V(p) = {j <= p : j text, p - j < text_window}  ∪  {j <= p : j image, j ∈ C}
    o_p  = Σ_{j ∈ V(p)} softmax_j(scale · q_p·k_j) v_j

The core C is the `image_top_k` image tokens with the largest attention score

    a_j = (1/N) Σ_n softmax_j(scale · q_{p,n}·k_{j,n'})           (n' = n // (N/K), GQA)

that the query gives them when it attends to its text window and *every* image token (the paper's
refresh step; one set per sequence, the score averaged over the heads of the layer). The paper
re-chooses C every `update_interval` decode steps: that step attends to all image tokens, chooses
the new C from its own scores, and the steps until the next refresh attend to C alone
(`avl_decode_step`; the prefill's last token chooses the first C: `select_core_image_tokens`).

`avl_modality_adaptive_attention` is the attention over a given core (`core_image_tokens`, chosen at
an earlier refresh step) or, without one, the stateless form a full forward can compute for every
query: each query chooses its own core from its own refresh scores (an update every step, used in
the same step), so a query depends only on keys it may see and decoding over a KV cache equals the
full forward. With `text_window` covering all text and `image_top_k` every image token it is
causal softmax attention. Selection is a top-k (ties to the lower index) without gradient. (The
paper's text cache also keeps a few heavily attended remote text tokens, an H2O-style eviction; the
catalog's operator, and this one, keep the local window.)

Modality per key token: `is_image [B, S]` bool (side "kv", given by the caller, cached beside the
keys when decoding). Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `[B,T,N,h]`.
Paper: Zhang, Yuan, Zhong, Luo, Zhan, Zhang, Hu and Li, "A-VL: Adaptive Attention for Large
Vision-Language Models", arXiv:2409.14846 (AAAI 2025).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import dense
from attnjax.core import sparse
from attnjax.registry import Mechanism, TokenInput, register
from attnjax.typing import Array, Int, Key, Lengths, Output, PerKeyToken, Query, Value

__all__ = ["avl_modality_adaptive_attention", "avl_decode_step", "select_core_image_tokens"]

# Core image tokens: key indices per sequence `[B, k]` or per query `[B, T, k]` (negative: empty).
CoreTokens = Int[Array, "B ..."]
CoreChoice = Int[Array, "B k"]
StepIndex = Int[Array, ""]


def _check_settings(op: str, text_window, image_top_k) -> None:
  for name, value in (("text_window", text_window), ("image_top_k", image_top_k)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{op}: `{name}` must be an int >= 1, got {value!r}")


def _checked_inputs(op, q, k, v, is_image, *, causal, segment_ids, q_offset, kv_lengths):
  """`(B, T, S, is_image as bool [B, S])` after validating the call."""
  if not causal:
    raise ValueError(f"{op}: A-VL is decode-time attention of a causal LVLM; call with causal=True")
  B, T, S, _, _, _, _ = checks.check_qkv(op, q, k, v)
  checks.check_shape(op, "is_image", is_image, (B, S), "[B, S]")
  contract.check_self_attention(op, T=T, S=S, q_offset=q_offset, kv_lengths=kv_lengths,
                                segment_ids=segment_ids)
  return B, T, S, jnp.asarray(is_image).astype(bool)


def _text_window(is_image, B, T, S, q_offset, text_window):
  """bool `[B, T, S]`: text keys within `text_window` positions up to each query (causality comes
  from the contract's mask)."""
  q_pos = contract.query_positions(B, T, q_offset)
  near = q_pos[:, :, None] - jnp.arange(S, dtype=jnp.int32)[None, None, :] < text_window
  return near & ~is_image[:, None, :]


def _refresh_scores(op, q, k, is_image, *, text_window, segment_ids, q_offset, kv_lengths, scale):
  """`(a [B, T, S], candidates [B, T, S])`: the head-averaged softmax weight each query gives each
  key when attending to its text window and every image token (module docstring), and the image
  tokens it may choose (those the contract lets it see)."""
  B, T, S = q.shape[0], q.shape[1], k.shape[1]
  s, visible = dense.contract_scores(op, q, k, k, causal=True, segment_ids=segment_ids,
                                     q_offset=q_offset, kv_lengths=kv_lengths, scale=scale)
  near = _text_window(is_image, B, T, S, q_offset, text_window)
  seen = visible & (near | is_image[:, None, :])[:, None]
  # Selection is discrete: the scores that rank image tokens carry no gradient.
  s = jax.lax.stop_gradient(s)
  m = jnp.max(jnp.where(seen, s, -jnp.inf), axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.where(seen, jnp.exp(jnp.where(seen, s - m, 0.0)), 0.0)
  den = jnp.sum(e, axis=-1, keepdims=True)
  a = jnp.mean(e / jnp.where(den > 0, den, 1.0), axis=1)
  return a, jnp.any(visible, axis=1) & is_image[:, None, :]


def _table(indices, valid, S):
  """bool `[B, T, S]`: True at the key indices `indices [B, T, k]` where `valid`."""
  B, T, _ = indices.shape
  rows = jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None]
  slots = jnp.where(valid, indices, S)
  return jnp.zeros((B, T, S), bool).at[rows[0], rows[1], slots].set(True, mode="drop")


def _attend(op, q, k, v, is_image, kept_image, *, text_window, segment_ids, q_offset, kv_lengths,
            scale, implementation):
  """Softmax attention over each query's text window and its kept image tokens `[B, T, S]`."""
  B, T, S = q.shape[0], q.shape[1], k.shape[1]
  keep = jax.lax.stop_gradient(_text_window(is_image, B, T, S, q_offset, text_window)
                               | (kept_image & is_image[:, None, :]))

  def mask_mod(b, n, q_idx, kv_idx):
    del n
    return keep[b, q_idx, kv_idx]

  return contract.flex_with_contract(op, q, k, v, causal=True, segment_ids=segment_ids,
                                     q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                                     implementation=implementation, mask_mod=mask_mod)


def _core_table(op, core_image_tokens, B, T, S):
  """A given core `[B, k]` / `[B, T, k]` (negative ids empty) as a `[B, T, S]` table."""
  core = jnp.asarray(core_image_tokens, jnp.int32)
  if core.ndim == 2 and core.shape[0] == B:
    core = jnp.broadcast_to(core[:, None, :], (B, T, core.shape[1]))
  checks.check_shape(op, "core_image_tokens", core, (B, T, None), "[B, k] or [B, T, k]")
  return _table(core, core >= 0, S)


def avl_modality_adaptive_attention(q: Query, k: Key, v: Value, *, is_image: PerKeyToken,
                                    text_window: int, image_top_k: int,
                                    core_image_tokens: Optional[CoreTokens] = None,
                                    causal: bool = True, segment_ids=None, q_offset=0,
                                    kv_lengths: Optional[Lengths] = None,
                                    scale: Optional[float] = None,
                                    implementation: Optional[str] = None) -> Output:
  """A-VL: text keys through a local window, image keys through a core chosen by attention.

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, h]`, K dividing N (self-attention: T == S,
      or new tokens over a KV cache with `q_offset` and `kv_lengths`).
    is_image: `[B, S]` bool, True for image tokens (the others are text).
    text_window: text positions each query sees up to itself, its own included.
    image_top_k: the core's size when each query chooses its own (without `core_image_tokens`).
    core_image_tokens: a core chosen at a refresh step (`select_core_image_tokens`,
      `avl_decode_step`): key indices `[B, k]` or `[B, T, k]`, negative entries empty.
    causal: must be True.
    segment_ids, q_offset, kv_lengths, scale, implementation: the common contract
      (`attnjax.registry`).

  Returns:
    `[B, T, N, h]` in q's dtype.
  """
  op = "avl_modality_adaptive_attention"
  _check_settings(op, text_window, image_top_k)
  B, T, S, is_image = _checked_inputs(op, q, k, v, is_image, causal=causal,
                                      segment_ids=segment_ids, q_offset=q_offset,
                                      kv_lengths=kv_lengths)
  contract_kw = dict(segment_ids=segment_ids, q_offset=q_offset, kv_lengths=kv_lengths, scale=scale)
  if core_image_tokens is None:
    a, candidates = _refresh_scores(op, q, k, is_image, text_window=text_window, **contract_kw)
    indices, valid = sparse.token_top_k(a, image_top_k, visible=candidates)
    kept = _table(indices, valid, S)
  else:
    kept = _core_table(op, core_image_tokens, B, T, S)
  return _attend(op, q, k, v, is_image, kept, text_window=text_window,
                 implementation=implementation, **contract_kw)


def select_core_image_tokens(q: Query, k: Key, is_image: PerKeyToken, *, image_top_k: int,
                             text_window: int, segment_ids=None, q_offset=0,
                             kv_lengths: Optional[Lengths] = None,
                             scale: Optional[float] = None) -> CoreChoice:
  """The core of a refresh step: the `image_top_k` image tokens with the largest head-averaged
  attention (module docstring) from the call's last query (the prefill's last token, or the
  current decode step), `[B, image_top_k]` int32 key indices, best first, -1 where a sequence has
  fewer visible image tokens. With a larger k it picks the secondary set kept at prefill."""
  op = "select_core_image_tokens"
  _check_settings(op, text_window, image_top_k)
  _, _, S, is_image = _checked_inputs(op, q, k, k, is_image, causal=True, segment_ids=segment_ids,
                                      q_offset=q_offset, kv_lengths=kv_lengths)
  a, candidates = _refresh_scores(op, q, k, is_image, text_window=text_window,
                                  segment_ids=segment_ids, q_offset=q_offset,
                                  kv_lengths=kv_lengths, scale=scale)
  indices, valid = sparse.token_top_k(a[:, -1], image_top_k, visible=candidates[:, -1])
  chosen = jnp.where(valid, indices, -1)
  if image_top_k > S:   # fewer keys than asked: empty slots
    chosen = jnp.pad(chosen, ((0, 0), (0, image_top_k - S)), constant_values=-1)
  return chosen


def avl_decode_step(q: Query, k: Key, v: Value, *, is_image: PerKeyToken,
                    core_image_tokens: CoreChoice, step, update_interval: int, text_window: int,
                    q_offset=0, kv_lengths: Optional[Lengths] = None,
                    scale: Optional[float] = None,
                    implementation: Optional[str] = None) -> tuple[Output, CoreChoice]:
  """One A-VL decode step with the paper's core refresh: `(out, core)`.

  When `step % update_interval == 0` (a refresh step) the query attends to its text window and
  every image token of the cache, and the new core is the `k` image tokens it attends to most
  (`select_core_image_tokens`); otherwise it attends to its text window and `core_image_tokens`,
  which is carried over. `step` counts decode steps after the prefill (whose last token chose the
  first core), so with `update_interval = 3` steps 3, 6, ... refresh. It may be traced.

  Args:
    q: `[B, T, N, H]` (T = 1 when decoding; a refresh reads the last query) over the KV cache
      k: `[B, S, K, H]`, v: `[B, S, K, h]`, at `q_offset` with `kv_lengths` filled slots.
    is_image: `[B, S]` bool. core_image_tokens: `[B, k]` int32, the current core (k = its size).
    step: int or scalar int array. update_interval: steps between refreshes (>= 1).
    text_window, scale, implementation: as `avl_modality_adaptive_attention`.
  """
  op = "avl_decode_step"
  if isinstance(update_interval, bool) or not isinstance(update_interval, (int, np.integer)) or (
      update_interval < 1):
    raise ValueError(f"{op}: `update_interval` must be an int >= 1, got {update_interval!r}")
  B, T, S, is_image = _checked_inputs(op, q, k, v, is_image, causal=True, segment_ids=None,
                                      q_offset=q_offset, kv_lengths=kv_lengths)
  core = jnp.asarray(core_image_tokens, jnp.int32)
  checks.check_shape(op, "core_image_tokens", core, (B, None), "[B, k]")
  _check_settings(op, text_window, core.shape[1])
  contract_kw = dict(segment_ids=None, q_offset=q_offset, kv_lengths=kv_lengths, scale=scale)
  every_image = jnp.broadcast_to(is_image[:, None, :], (B, T, S))
  refreshed = _attend(op, q, k, v, is_image, every_image, text_window=text_window,
                      implementation=implementation, **contract_kw)
  new_core = select_core_image_tokens(q, k, is_image, image_top_k=core.shape[1],
                                      text_window=text_window, **contract_kw)
  kept = _attend(op, q, k, v, is_image, _core_table(op, core, B, T, S), text_window=text_window,
                 implementation=implementation, **contract_kw)
  refresh = jnp.asarray(step, jnp.int32) % update_interval == 0
  return jnp.where(refresh, refreshed, kept), jnp.where(refresh, new_core, core)


register(Mechanism(
    name="avl_modality_adaptive_attention", fn=avl_modality_adaptive_attention,
    family="decode-kvcache", seeds=(176,),
    paper="A-VL: Adaptive Attention for Large Vision-Language Models", arxiv="2409.14846",
    patterns=frozenset({"causal_self"}),
    token_inputs=(TokenInput("is_image", side="kv", kind="given", dtype="bool"),),
    # About half of the suite's tokens are images: a core of 3 of them and a text window of 4.
    example={"text_window": 4, "image_top_k": 3}))
