"""Continuous batching over a paged KV cache: prompts of any lengths, rows that stop on their own EOS,
new prompts joining as others finish.

    slots b = 0 … B-1, each serving one request at a time; every layer keeps a `PagedKVCache`
    join:    a free slot takes the next prompt; one call appends every joining prompt (ragged:
             `num_new[b]` = its length, 0 for the other rows) and samples its first token
    step:    every busy row appends its last token (`num_new[b]` = 1) and samples the next one
    finish:  a row that sampled `eos_id` or reached `max_new_tokens` returns its pages to the pool

The host schedules (which prompt goes where, when a row ends) and two compiled programs do the work
(a `[B, P_max]` join call and a `[B, 1]` step), so the shapes never change. A prompt is admitted only
when the pool has the pages its whole generation may need (vLLM's conservative admission), so no row
ever runs out of pages mid-generation. With `share_prefixes`, a prompt that begins with a running
request's prompt reuses that request's pages for the common part (copy-on-write, `PagedKVCache.
share_prefix`) and only its own suffix is computed (prefix caching).

Greedy decoding gives, token for token, what `attnjax.models.generate.generate` gives each prompt alone
(cut after its first EOS). Sampling draws row r's n-th token with `fold_in(fold_in(rng, r), n)` (r: the
prompt's index), so a request's tokens do not depend on which others share its batch.

Papers: Kwon et al., "Efficient Memory Management for Large Language Model Serving with
PagedAttention", arXiv:2309.06180 (paged KV, continuous batching); Ye et al., "FlashInfer: Efficient and
Customizable Attention Engine for LLM Inference Serving", arXiv:2501.01005; Yu et al., "Orca: A
Distributed Serving System for Transformer-Based Generative Models" (OSDI 2022: iteration-level
scheduling).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attnjax import catalog
from attnjax import registry
from attnjax.core.paged_kvcache import PagedKVCache
from attnjax.models.generate import check_sampling, sample_categorical, sample_logits

__all__ = ["generate_paged", "to_paged", "free_rows", "share_prefix"]


def to_paged(cache: Mapping[str, Any], *, num_pages: int, page_size: int,
             max_pages: int) -> dict[str, Any]:
  """A model's contiguous decode cache (from `init(..., decode=True)`) turned paged: each layer's
  `cached_key`/`cached_value`/`cache_index` become one empty `paged_kv` (`PagedKVCache`) and a learned
  `position_index` becomes one per row.

  Raises:
    ValueError: for a layer that keeps anything else (a recurrent state, cached per-token arrays).
  """
  if "cached_key" in cache:         # one layer's cache
    extra = set(cache) - {"cached_key", "cached_value", "cache_index"}
    if extra:
      raise ValueError(f"to_paged: a layer caches {sorted(extra)} besides keys and values; a paged "
                       "cache holds keys and values only")
    k, v = cache["cached_key"], cache["cached_value"]
    return {"paged_kv": PagedKVCache.create(k.shape[0], num_pages, page_size, max_pages,
                                            k.shape[2], k.shape[3], v.shape[3], dtype=k.dtype)}
  out = {}
  for name, value in cache.items():
    if isinstance(value, Mapping):
      out[name] = to_paged(value, num_pages=num_pages, page_size=page_size, max_pages=max_pages)
    elif name == "position_index":
      out[name] = value           # made per row below, once the batch is known
    else:
      raise ValueError(f"to_paged: cache entry {name!r} is not a KV cache (a recurrent state?); "
                       "paged generation needs softmax layers")
  return out


def _rows(cache, batch: int):
  """Per-row learned position indices (a scalar index becomes `[B]` zeros)."""
  return {name: (_rows(value, batch) if isinstance(value, Mapping)
                 else jnp.zeros((batch,), jnp.int32) if name == "position_index" else value)
          for name, value in cache.items()}


def free_rows(cache: Mapping[str, Any], rows) -> dict[str, Any]:
  """Every layer's pages of the rows where `rows [B]` (bool) is True returned to the pool; those rows'
  learned position indices reset."""
  out = {}
  for name, value in cache.items():
    if isinstance(value, PagedKVCache):
      out[name] = value.free(rows)
    elif isinstance(value, Mapping):
      out[name] = free_rows(value, rows)
    else:         # position_index [B]
      out[name] = jnp.where(rows, 0, value)
  return out


def share_prefix(cache: Mapping[str, Any], src, dst, length) -> dict[str, Any]:
  """Row `dst` (empty) starts as the first `length` tokens of row `src` in every layer, sharing their
  pages (`PagedKVCache.share_prefix`); its learned position index becomes `length`."""
  out = {}
  for name, value in cache.items():
    if isinstance(value, PagedKVCache):
      out[name] = value.share_prefix(src, dst, length)
    elif isinstance(value, Mapping):
      out[name] = share_prefix(value, src, dst, length)
    else:
      out[name] = value.at[dst].set(length)
  return out


def _overflowed(cache) -> jax.Array:
  flags = [c.overflow for c in jax.tree.leaves(cache, is_leaf=lambda x: isinstance(x, PagedKVCache))
           if isinstance(c, PagedKVCache)]
  return jnp.any(jnp.stack(flags), axis=0)


def _check(model, prompts, max_new_tokens, temperature, top_k, max_batch, page_size):
  if not prompts or any(len(p) < 1 for p in prompts):
    raise ValueError("generate_paged: `prompts` must be a non-empty list of non-empty token lists")
  for name, value in (("max_batch", max_batch), ("page_size", page_size),
                      ("max_new_tokens", max_new_tokens)):
    if value < 1:
      raise ValueError(f"generate_paged: `{name}` must be >= 1, got {value}")
  names = getattr(getattr(model, "config", None), "mechanisms", None) or ()
  for n in names:
    name = n.name if isinstance(n, registry.Mechanism) else n
    if name != "softmax":
      raise ValueError(f"generate_paged: a paged KV cache serves softmax layers; the model has "
                       f"{name!r} (use attnjax.models.generate.generate)")
  check_sampling(model, temperature, top_k)


@catalog.serves(194, kind="generation")
def generate_paged(model: nn.Module, variables: Any, prompts: Sequence[Sequence[int]],
                   max_new_tokens: int, *, rng: jax.Array, eos_id: Optional[int] = None,
                   max_batch: int = 8, page_size: int = 16, num_pages: Optional[int] = None,
                   temperature: float = 0.0, top_k: Optional[int] = None,
                   share_prefixes: bool = False) -> list[np.ndarray]:
  """Generates a continuation of every prompt by continuous batching over a paged KV cache.

  Args:
    model: a `DecoderLM` whose layers are all softmax attention.
    variables: its variables ('params', ...); a 'cache' collection in them is ignored.
    prompts: token lists, any lengths >= 1.
    max_new_tokens: most tokens generated per prompt.
    rng: PRNG key for sampling (unused when greedy).
    eos_id: a row stops after sampling this token (None: after `max_new_tokens`).
    max_batch: rows decoded together (B).
    page_size: tokens per page.
    num_pages: pages in each layer's pool (default: enough for B rows of the longest request).
    temperature, top_k: as `attnjax.models.generate.generate`.
    share_prefixes: reuse the pages of a running request whose prompt is a prefix of a new prompt.

  Returns:
    One int32 array per prompt, in order: the prompt, then its generated tokens (ending with EOS
    when one was sampled).

  Raises:
    ValueError: bad arguments; a model with non-softmax layers; a pool too small for one request.
  """
  _check(model, prompts, max_new_tokens, temperature, top_k, max_batch, page_size)
  prompts = [np.asarray(p, np.int32) for p in prompts]
  B = min(max_batch, len(prompts))
  width = max(len(p) for p in prompts)
  total = width + max_new_tokens
  max_len = getattr(model, "max_len", 0)
  if max_len and total > max_len:
    raise ValueError(f"generate_paged: prompts of {width} plus {max_new_tokens} tokens exceed the "
                     f"model's {max_len} learned positions")
  max_pages = -(-total // page_size)
  num_pages = B * max_pages if num_pages is None else num_pages
  need = [-(-(len(p) + max_new_tokens) // page_size) for p in prompts]
  if max(need) > num_pages:
    raise ValueError(f"generate_paged: a request needs {max(need)} pages of {page_size} tokens, more "
                     f"than the pool's {num_pages}")
  init, call, free, share = _programs(model, B, width, num_pages, page_size, max_pages,
                                      temperature == 0.0, top_k)
  variables = {k: v for k, v in variables.items() if k != "cache"}
  cache = init()
  temp = jnp.asarray(temperature, jnp.float32)

  queue = list(range(len(prompts)))
  slot_req = [-1] * B                       # request served by each row (-1: free)
  outputs: list[list[int]] = [[] for _ in prompts]
  reserved = [0] * B
  last = np.zeros((B,), np.int32)
  while queue or any(r >= 0 for r in slot_req):
    # Admission: free rows take queued prompts while the pool can hold their whole generation.
    tokens = np.zeros((B, width), np.int32)
    num_new = np.zeros((B,), np.int32)
    for b in range(B):
      if slot_req[b] >= 0 or not queue or sum(reserved) + need[queue[0]] > num_pages:
        continue
      prompt, skip = prompts[queue[0]], 0
      if share_prefixes:
        skip, src = _longest_shared(prompts, slot_req, num_new, prompt)
        if src >= 0 and num_new[src]:
          break      # its prefix is being computed in this call: share it on the next one
        if skip:
          cache = share(cache, src, b, skip)
      r = queue.pop(0)
      slot_req[b], reserved[b] = r, need[r]
      tokens[b, :len(prompt) - skip] = prompt[skip:]
      num_new[b] = len(prompt) - skip
    if num_new.any():
      sampled, cache = call(variables, cache, tokens, num_new, _ids(slot_req),
                            _counts(outputs, slot_req), rng, temp)
      _collect(sampled, num_new > 0, slot_req, outputs, last)
    busy = np.array([r >= 0 and not _done(outputs[r], eos_id, max_new_tokens) for r in slot_req])
    if busy.any():
      sampled, cache = call(variables, cache, last[:, None], busy.astype(np.int32),
                            _ids(slot_req), _counts(outputs, slot_req), rng, temp)
      _collect(sampled, busy, slot_req, outputs, last)
    if np.any(np.asarray(_overflowed(cache))):
      raise RuntimeError("generate_paged: a row ran out of pages (admission should prevent this)")
    ended = np.array([r >= 0 and _done(outputs[r], eos_id, max_new_tokens) for r in slot_req])
    if ended.any():
      cache = free(cache, ended)
      for b in np.flatnonzero(ended):
        slot_req[b], reserved[b] = -1, 0
  return [np.concatenate([p, np.asarray(o, np.int32)]) for p, o in zip(prompts, outputs,
                                                                       strict=True)]


def _longest_shared(prompts, slot_req, num_new, prompt):
  """(length, row) of the longest prompt of a request holding a row that is a prefix of `prompt`,
  shorter than it (its last token must still be computed); (0, -1) when none."""
  best, src = 0, -1
  for row, r in enumerate(slot_req):
    if r < 0:
      continue
    other = prompts[r]
    if best < len(other) < len(prompt) and np.array_equal(prompt[:len(other)], other):
      best, src = len(other), row
  return best, src


def _done(out, eos_id, max_new_tokens) -> bool:
  return len(out) >= max_new_tokens or (eos_id is not None and bool(out) and out[-1] == eos_id)


def _ids(slot_req):
  return np.maximum(np.asarray(slot_req, np.int32), 0)


def _counts(outputs, slot_req):
  return np.array([len(outputs[r]) if r >= 0 else 0 for r in slot_req], np.int32)


def _collect(sampled, rows, slot_req, outputs, last):
  sampled = np.asarray(sampled)
  for b in np.flatnonzero(rows):
    outputs[slot_req[b]].append(int(sampled[b]))
    last[b] = sampled[b]


@functools.lru_cache(maxsize=16)
def _programs(model, batch, width, num_pages, page_size, max_pages, greedy, top_k):
  """The empty paged cache's builder, the compiled model call (one program per input width: the join
  and the step), and the compiled row operations."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((batch, width),
                                                                               jnp.int32),
                                             decode=True))["cache"]

  def init():
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return _rows(to_paged(zeros, num_pages=num_pages, page_size=page_size, max_pages=max_pages),
                 batch)

  def call(variables, cache, tokens, num_new, request, count, rng, temperature):
    logits, mutated = model.apply({**variables, "cache": cache}, tokens, decode=True,
                                  num_new=num_new, mutable=["cache"])
    last = logits[jnp.arange(batch), jnp.maximum(num_new - 1, 0)]
    keys = jax.vmap(lambda r, n: jax.random.fold_in(jax.random.fold_in(rng, r), n))(request, count)
    if greedy:
      nxt = sample_logits(last, keys[0])
    else:
      nxt = jax.vmap(lambda lg, key: sample_categorical(
          lg[None], key, temperature, top_k)[0])(last, keys)
    return nxt, mutated["cache"]

  return init, jax.jit(call), jax.jit(free_rows), jax.jit(share_prefix)
