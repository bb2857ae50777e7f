"""Streaming generation with attention sinks and a sliding window (StreamingLLM's cache policy).

Every softmax layer keeps a `SinkWindowCache` (the first `sinks` tokens and the `window` most recent
ones, a fixed `sinks + window` slots per row) instead of a cache as long as the text, so memory does
not grow with the number of tokens generated. The prompt is one call (`SinkWindowCache.extend`:
attend, then evict, exact for a chunk), then one token per step (`lax.fori_loop`), sampled as in
`attnjax.models.generate`. Token i attends to the keys at positions j <= i with j < sinks or
i - j < window, so the tokens are those of full recompute under that mask (`masks.sink_window`).

Positions: keys are rotated (RoPE) at their absolute positions before they are cached, so every
position must be one the model can embed (learned positions: within `max_len`). StreamingLLM's
re-assignment of positions within the cache (`SinkWindowCache.cache_positions`), which lets a model
stream past its trained length, needs keys cached un-rotated; the layer does not keep that layout.

Paper: Xiao, Tian, Chen, Han and Lewis, "Efficient Streaming Language Models with Attention Sinks",
arXiv:2309.17453.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax.core.sink_cache import SinkWindowCache, check_sinks_and_window
from attnjax.models.generate import cached_decode, check_sampling

__all__ = ["generate_streaming", "to_sink_window"]


def to_sink_window(cache: Mapping[str, Any], *, sinks: int, window: int) -> dict[str, Any]:
  """A model's contiguous decode cache (from `init(..., decode=True)`, any length) turned into
  StreamingLLM caches: each layer's `cached_key`/`cached_value`/`cache_index` become one empty
  `sink_kv` of `sinks + window` slots; a learned `position_index` becomes one per row.

  Raises:
    ValueError: for a layer that keeps anything else (a recurrent state, cached per-token arrays).
  """
  if "cached_key" in cache:         # one layer's cache
    extra = set(cache) - {"cached_key", "cached_value", "cache_index"}
    if extra:
      raise ValueError(f"to_sink_window: a layer caches {sorted(extra)} besides keys and values")
    k, v = cache["cached_key"], cache["cached_value"]
    return {"sink_kv": SinkWindowCache.create(k.shape[0], sinks, window, k.shape[2], k.shape[3],
                                              v.shape[3], dtype=k.dtype)}
  out = {}
  for name, value in cache.items():
    if isinstance(value, Mapping):
      out[name] = to_sink_window(value, sinks=sinks, window=window)
    elif name == "position_index":
      out[name] = jnp.zeros(_cache_batch(cache), jnp.int32)
    else:
      raise ValueError(f"to_sink_window: cache entry {name!r} is not a KV cache (a recurrent "
                       "state?); streaming generation needs softmax layers")
  return out


def _cache_batch(cache: Mapping[str, Any]) -> tuple[int]:
  """`(B,)` of a decode cache tree (from its first cached keys)."""
  for value in cache.values():
    if isinstance(value, Mapping):
      if "cached_key" in value:
        return (value["cached_key"].shape[0],)
      found = _cache_batch(value)
      if found:
        return found
  return ()


def generate_streaming(model: nn.Module, variables: Any, prompt: jax.Array, max_new_tokens: int, *,
                       sinks: int, window: int, rng: jax.Array, temperature: float = 0.0,
                       top_k: Optional[int] = None) -> jax.Array:
  """Continues `prompt [B, P] int32` by `max_new_tokens` tokens with a fixed-size cache per layer.

  Args:
    model: a `DecoderLM` whose layers are all softmax attention.
    variables: its variables; a 'cache' collection in them is ignored.
    prompt: `[B, P]` int32, P >= 1.
    max_new_tokens: tokens to add (>= 1).
    sinks, window: the cache policy (StreamingLLM keeps 4 sinks).
    rng, temperature, top_k: as `attnjax.models.generate.generate`.

  Returns:
    `[B, P + max_new_tokens]` int32.
  """
  sinks, window = check_sinks_and_window("generate_streaming", sinks, window)
  if jnp.ndim(prompt) != 2 or prompt.shape[1] < 1 or max_new_tokens < 1:
    raise ValueError(f"generate_streaming: `prompt` must be [B, P] with P >= 1 and "
                     f"`max_new_tokens` >= 1, got {jnp.shape(prompt)} and {max_new_tokens}")
  check_sampling(model, temperature, top_k)
  max_len = getattr(model, "max_len", 0)
  if max_len and prompt.shape[1] + max_new_tokens > max_len:
    raise ValueError(f"generate_streaming: {prompt.shape[1]} + {max_new_tokens} tokens exceed the "
                     f"model's {max_len} learned positions")
  names = getattr(getattr(model, "config", None), "mechanisms", None) or ()
  for n in names:
    if getattr(n, "name", n) != "softmax":
      raise ValueError(f"generate_streaming: the StreamingLLM cache serves softmax layers; the "
                       f"model has {getattr(n, 'name', n)!r}")
  run = _compiled(model, prompt.shape[0], prompt.shape[1], max_new_tokens, sinks, window,
                  temperature == 0.0, top_k)
  variables = {k: v for k, v in variables.items() if k != "cache"}
  return run(variables, jnp.asarray(prompt, jnp.int32), rng, jnp.asarray(temperature, jnp.float32))


@functools.lru_cache(maxsize=16)
def _compiled(model, batch, prompt_len, max_new_tokens, sinks, window, greedy, top_k):
  """The jitted prefill + decode loop (the cache's shapes do not depend on the length)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((batch, 1), jnp.int32),
                                             decode=True))["cache"]

  def run(variables, prompt, rng, temperature):
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    cache = to_sink_window(zeros, sinks=sinks, window=window)
    return cached_decode(model, variables, cache, prompt, max_new_tokens, rng, temperature,
                         greedy=greedy, top_k=top_k)

  return jax.jit(run)
