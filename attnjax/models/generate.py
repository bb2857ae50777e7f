"""Autoregressive generation with the attention layers' KV caches.

    cache  = zeros sized for P + max_new_tokens positions       (shapes from `init(decode=True)`)
    logits = model(prompt, decode=True)                         prefill: P tokens in one call
    x_{P}  = sample(logits[:, -1])
    x_{t+1} = sample(model(x_t, decode=True)[:, -1])            one token per step (lax.fori_loop)

    sample(l) = argmax l                                         temperature == 0 (greedy)
              = Categorical(softmax(top_k(l) / temperature))     otherwise (top_k=None: all logits)

Each step's key is `fold_in(rng, step)`, so a given `rng` always produces the same tokens. The
caches hold keys/values of every earlier token, so each step costs one token's forward over the
cache instead of a full forward (Pope et al., "Efficiently Scaling Transformer Inference",
arXiv:2211.05102); a layer with a recurrent mechanism (`Mechanism.recurrent`, e.g. linear
attention) carries its fixed-size state instead, so its step costs the same at every length.
Top-k sampling: Fan et al., "Hierarchical Neural Story Generation", arXiv:1805.04833.

A model with a layer whose mechanism cannot decode over a KV cache (`Mechanism.decode` False)
generates by full recompute instead: each step runs the whole forward over a fixed
`[B, P + max_new_tokens]` buffer and reads the logits at the last known position (the model is
causal, so the zeros after it change nothing). Both paths draw the same keys, so they give the same
tokens up to float rounding.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import registry


def sample_logits(logits: jax.Array, rng: jax.Array, *, temperature: float = 0.0,
                  top_k: Optional[int] = None) -> jax.Array:
  """Next tokens `[B]` int32 from logits `[B, V]`: greedy when temperature is 0, else sampled."""
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return sample_categorical(logits, rng, temperature, top_k)


def sample_categorical(logits: jax.Array, rng: jax.Array, temperature,
                       top_k: Optional[int] = None) -> jax.Array:
  """Categorical draw `[B]` from softmax(logits / temperature) over the top_k logits (a traced
  temperature > 0 is fine)."""
  logits = logits.astype(jnp.float32)
  if top_k is not None:
    # Logits below the k-th largest are removed (ties at the k-th value are kept).
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits / temperature, axis=-1).astype(jnp.int32)


def _check(model: nn.Module, prompt: jax.Array, max_new_tokens: int, temperature: float,
           top_k: Optional[int]):
  if jnp.ndim(prompt) != 2 or prompt.shape[1] < 1:
    raise ValueError(f"generate: `prompt` must have shape [B, P] with P >= 1, got "
                     f"{jnp.shape(prompt)}")
  if max_new_tokens < 0:
    raise ValueError(f"generate: `max_new_tokens` must be >= 0, got {max_new_tokens}")
  check_sampling(model, temperature, top_k)
  max_len = getattr(model, "max_len", 0)
  if max_len and prompt.shape[1] + max_new_tokens > max_len:
    raise ValueError(f"generate: {prompt.shape[1]} + {max_new_tokens} tokens exceed the model's "
                     f"{max_len} learned positions")


def check_sampling(model: nn.Module, temperature: float, top_k: Optional[int]) -> None:
  """Raises a ValueError for a negative temperature or a top_k outside [1, model.num_classes]."""
  if temperature < 0:
    raise ValueError(f"generate: `temperature` must be >= 0, got {temperature}")
  num_classes = getattr(model, "num_classes", None)
  if top_k is not None and (top_k < 1 or (num_classes and top_k > num_classes)):
    raise ValueError(f"generate: `top_k` must be in [1, {num_classes}], got {top_k}")


def supports_kv_cache(model: nn.Module) -> bool:
  """Whether every attention layer of `model` can decode over a KV cache.

  Reads `model.config.mechanisms` (a `TransformerConfig`: registry names or `Mechanism` records);
  a model without one is assumed to support `decode=True`.
  """
  names = getattr(getattr(model, "config", None), "mechanisms", None)
  if names is None:
    return True
  records = [n if isinstance(n, registry.Mechanism) else registry.get(n) for n in names]
  return all(m.decode for m in records)


def generate(model: nn.Module, variables: Any, prompt: jax.Array, max_new_tokens: int, *,
             rng: jax.Array, temperature: float = 0.0, top_k: Optional[int] = None,
             use_cache: Optional[bool] = None) -> jax.Array:
  """Continues `prompt [B, P] int32` by `max_new_tokens` tokens with the KV cache.

  Args:
    model: a `DecoderLM` (any module with `__call__(tokens, decode=...)` and 'cache' variables whose
      outputs are next-token logits `[B, T, V]`).
    variables: its variables ('params', ...); a 'cache' collection in them is ignored.
    prompt: `[B, P]` int32 tokens, P >= 1.
    max_new_tokens: tokens to add.
    rng: PRNG key for sampling (unused when greedy).
    temperature: 0 for greedy decoding, else the softmax temperature.
    top_k: sample among the k most likely tokens only (None: all).
    use_cache: True: decode over the KV caches; False: full recompute for every new token; None:
      the cache when every layer supports it (`supports_kv_cache`), else full recompute.

  Returns:
    `[B, P + max_new_tokens]` int32: the prompt followed by the generated tokens.
  """
  _check(model, prompt, max_new_tokens, temperature, top_k)
  prompt = jnp.asarray(prompt, jnp.int32)
  if max_new_tokens == 0:
    return prompt
  cacheable = supports_kv_cache(model)
  if use_cache is None:
    use_cache = cacheable
  elif use_cache and not cacheable:
    raise ValueError("generate: `use_cache=True` but a layer's mechanism does not support decoding "
                     "over a KV cache (Mechanism.decode is False); pass use_cache=None or False to "
                     "generate by full recompute")
  variables = {k: v for k, v in variables.items() if k != "cache"}
  compiled = _compiled if use_cache else _compiled_recompute
  run = compiled(model, prompt.shape[0], prompt.shape[1], max_new_tokens, temperature == 0.0,
                 top_k)
  return run(variables, prompt, rng, jnp.asarray(temperature, jnp.float32))


@functools.lru_cache(maxsize=32)
def _compiled(model: nn.Module, batch: int, prompt_len: int, max_new_tokens: int, greedy: bool,
              top_k: Optional[int]):
  """The jitted prefill + decode loop for one model and shape (cached: modules hash by value)."""
  total = prompt_len + max_new_tokens
  # The cache is zeros of the shapes `init` gives on a full-length input (the layers size it there);
  # only shapes are computed, no parameters are initialized.
  cache_shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((batch, total), jnp.int32),
                         decode=True))["cache"]
  # The layers size their KV caches on the init input; a cache shorter than prompt + new tokens
  # would be overrun, so check before anything runs.
  for path, leaf in jax.tree_util.tree_leaves_with_path(cache_shapes):
    if getattr(path[-1], "key", None) == "cached_key" and leaf.shape[1] < total:
      raise ValueError(f"generate: the KV cache at {jax.tree_util.keystr(path)} holds "
                       f"{leaf.shape[1]} positions, fewer than the prompt ({prompt_len}) plus "
                       f"max_new_tokens ({max_new_tokens})")

  def run(variables, prompt, rng, temperature):
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache_shapes)
    return cached_decode(model, variables, cache, prompt, max_new_tokens, rng, temperature,
                         greedy=greedy, top_k=top_k)

  return jax.jit(run)


def cached_decode(model: nn.Module, variables: Any, cache: Any, prompt: jax.Array,
                  max_new_tokens: int, rng: jax.Array, temperature: jax.Array, *, greedy: bool,
                  top_k: Optional[int]) -> jax.Array:
  """Prefill `prompt [B, P]` into the empty decode `cache` (any layout the layers read: contiguous,
  StreamingLLM), then one token per step in a `lax.fori_loop` (traceable; max_new_tokens >= 1):
  `[B, P + max_new_tokens]` int32. Step i's key is `fold_in(rng, i)`."""
  batch, prompt_len = prompt.shape
  total = prompt_len + max_new_tokens
  sample = functools.partial(_sampler, greedy=greedy, top_k=top_k)

  def step(cache, tokens):
    logits, mutated = model.apply({**variables, "cache": cache}, tokens, decode=True,
                                  mutable=["cache"])
    return logits[:, -1], mutated["cache"]

  last, cache = step(cache, prompt)
  tokens = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(prompt)
  tokens = tokens.at[:, prompt_len].set(sample(last, jax.random.fold_in(rng, 0), temperature))

  def body(i, carry):
    tokens, cache = carry
    current = jax.lax.dynamic_slice_in_dim(tokens, prompt_len + i, 1, axis=1)
    last, cache = step(cache, current)
    nxt = sample(last, jax.random.fold_in(rng, i + 1), temperature)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], prompt_len + i + 1, axis=1)
    return tokens, cache

  tokens, _ = jax.lax.fori_loop(0, max_new_tokens - 1, body, (tokens, cache))
  return tokens


def _sampler(logits, rng, temperature, *, greedy, top_k):
  if greedy:
    return sample_logits(logits, rng)
  return sample_categorical(logits, rng, temperature, top_k)


@functools.lru_cache(maxsize=32)
def _compiled_recompute(model: nn.Module, batch: int, prompt_len: int, max_new_tokens: int,
                        greedy: bool, top_k: Optional[int]):
  """The jitted loop that re-runs the full forward for every new token (no cache)."""
  total = prompt_len + max_new_tokens
  sample = functools.partial(_sampler, greedy=greedy, top_k=top_k)

  def run(variables, prompt, rng, temperature):
    tokens = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(prompt)

    def body(i, tokens):
      # Causal model: the zeros at positions >= prompt_len + i leave the logits before them alone.
      logits = model.apply(variables, tokens)
      last = jax.lax.dynamic_index_in_dim(logits, prompt_len + i - 1, axis=1, keepdims=False)
      nxt = sample(last, jax.random.fold_in(rng, i), temperature)
      return jax.lax.dynamic_update_slice_in_dim(tokens, nxt[:, None], prompt_len + i, axis=1)

    return jax.lax.fori_loop(0, max_new_tokens, body, tokens)

  return jax.jit(run)
