"""generate: greedy decoding through the KV cache equals re-running the full forward for each new
token (softmax, sliding-window and linear attention); a mechanism without decode support generates
by full recompute; sampling is reproducible from its rng, the same with and without the cache, top-k
only emits top-k tokens, temperature sampling follows softmax(logits / temperature)."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from attnjax import models
from attnjax import registry
from attnjax.data.base import TaskSpec
from tests import tolerances

B, P, NEW, V = 2, 3, 6, 40
SPEC = TaskSpec(name="toy_lm", kind="lm", input_shape=(P + NEW,), input_dtype="int32",
                vocab_size=V, num_classes=V, seq_len=P + NEW)


# Untied embeddings: a random tied model tends to repeat its input token, which would make the
# greedy comparisons weak.
BASE = dict(arch="decoder_lm", width=32, depth=2, num_heads=4, mlp_dim=64, mechanism="softmax",
            rope_base=10000.0, tie_embeddings=False)
CONFIGS = {
    "softmax_rope": {},
    "sliding_window": dict(mechanism="sliding_window", mechanism_kwargs={"window": 3}),
    "lightning_linear": dict(mechanism="lightning_attention_2", num_kv_heads=2),
    "hybrid_gqa": dict(num_kv_heads=2, mechanism="sliding_window", mechanism_kwargs={"window": 4},
                       layer_mechanisms="every 2: softmax", mlp="swiglu"),
    "learned_positions_alibi": dict(rope_base=None, position_embedding="learned",
                                    mechanism="alibi"),
}


@functools.lru_cache(maxsize=None)
def _model_and_variables(name="softmax_rope"):
  """One init per configuration for the whole file (compiles dominate its run time)."""
  config = ml_collections.ConfigDict({**BASE, **CONFIGS[name]})
  model = models.build_model(config, SPEC)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), models.dummy_inputs(SPEC, B))
  return model, variables


@functools.lru_cache(maxsize=None)
def _forward(name="softmax_rope"):
  """The jitted full forward (no cache) of a configuration."""
  return jax.jit(_model_and_variables(name)[0].apply)


def _prompt():
  return jax.random.randint(jax.random.PRNGKey(5), (B, P), 0, V, jnp.int32)


def _greedy_by_full_forward(name):
  """Greedy continuation computed the slow way: one full forward (no cache) per new token.

  The sequence sits in a fixed [B, P + NEW] buffer so that one compile serves every step: the model
  is causal (lm_test), so the zeros after position t do not change its logits there."""
  _, variables = _model_and_variables(name)
  want = jnp.zeros((B, P + NEW), jnp.int32).at[:, :P].set(_prompt())
  for t in range(P, P + NEW):
    logits = _forward(name)(variables, want)
    want = want.at[:, t].set(jnp.argmax(logits[:, t - 1], axis=-1))
  return want


@pytest.mark.parametrize("name", ["softmax_rope", "sliding_window", "lightning_linear"])
def test_greedy_generation_with_cache_equals_full_forward_per_token(name):
  """The KV cache changes nothing: softmax, a windowed and a linear (decaying) mechanism."""
  model, variables = _model_and_variables(name)
  assert models.supports_kv_cache(model)
  got = models.generate(model, variables, _prompt(), NEW, rng=jax.random.PRNGKey(0),
                        use_cache=True)
  chex.assert_shape(got, (B, P + NEW))
  np.testing.assert_array_equal(got, _greedy_by_full_forward(name))
  assert len(np.unique(np.asarray(got[:, P:]))) > 1  # the model does not just repeat one token


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hybrid_gqa", "learned_positions_alibi"])
def test_greedy_generation_is_argmax_of_full_forward(name):
  """Each new token is the argmax of the full forward at the previous position (one full forward
  of the final sequence suffices: the model is causal, see lm_test). Slow: lm_test already ties
  these configurations' cached logits to the full forward."""
  model, variables = _model_and_variables(name)
  got = models.generate(model, variables, _prompt(), NEW, rng=jax.random.PRNGKey(0))
  logits = _forward(name)(variables, got)
  np.testing.assert_array_equal(got[:, P:], jnp.argmax(logits[:, P - 1:-1], axis=-1))
  np.testing.assert_array_equal(got[:, :P], _prompt())


def test_sampling_by_full_recompute_equals_sampling_with_cache():
  """Both paths draw the same keys: temperature / top-k samples agree token for token."""
  model, variables = _model_and_variables()
  run = lambda use_cache: models.generate(model, variables, _prompt(), NEW,
                                          rng=jax.random.PRNGKey(7), temperature=1.5, top_k=8,
                                          use_cache=use_cache)
  np.testing.assert_array_equal(run(False), run(True))


def test_mechanism_without_decode_generates_by_full_recompute():
  """A layer whose mechanism cannot decode over a cache: generate falls back to full recompute
  (same tokens as the cached softmax model it copies), and asking for the cache is a clear error."""
  model, variables = _model_and_variables()
  no_decode = dataclasses.replace(registry.get("softmax"), name="softmax_without_decode",
                                  decode=False)
  config = dataclasses.replace(model.config, mechanisms=(no_decode,) * model.config.depth)
  recompute_model = model.clone(config=config)
  assert not models.supports_kv_cache(recompute_model)
  got = models.generate(recompute_model, variables, _prompt(), NEW, rng=jax.random.PRNGKey(0))
  np.testing.assert_array_equal(got, _greedy_by_full_forward("softmax_rope"))
  with pytest.raises(ValueError, match="use_cache"):
    models.generate(recompute_model, variables, _prompt(), NEW, rng=jax.random.PRNGKey(0),
                    use_cache=True)
  with pytest.raises(ValueError, match="does not support decoding"):
    jax.eval_shape(lambda: recompute_model.init(jax.random.PRNGKey(0), _prompt(), decode=True))


def test_top_k_sampling_emits_only_top_k_tokens():
  model, variables = _model_and_variables()
  k = 3
  for seed in range(3):
    got = models.generate(model, variables, _prompt(), NEW, rng=jax.random.PRNGKey(seed),
                          temperature=2.0, top_k=k)
    logits = _forward()(variables, got)[:, P - 1:-1]
    allowed = jax.lax.top_k(logits, k)[1]
    assert bool(jnp.all(jnp.any(allowed == got[:, P:, None], axis=-1)))


def test_sampling_is_reproducible_and_top_1_is_greedy():
  model, variables = _model_and_variables()
  sample = lambda seed, **kw: models.generate(model, variables, _prompt(), NEW,
                                              rng=jax.random.PRNGKey(seed), temperature=1.0, **kw)
  np.testing.assert_array_equal(sample(1), sample(1))
  assert not np.array_equal(sample(1), sample(2))
  greedy = models.generate(model, variables, _prompt(), NEW, rng=jax.random.PRNGKey(0))
  np.testing.assert_array_equal(sample(3, top_k=1), greedy)


def test_sample_logits_follows_tempered_softmax():
  logits = jnp.array([[2.0, 1.0, 0.0, -1.0, -3.0]])
  keys = jax.random.split(jax.random.PRNGKey(0), 20000)
  for temperature, top_k in [(0.5, None), (2.0, None), (1.0, 2)]:
    draws = jax.vmap(lambda key: models.sample_logits(
        logits, key, temperature=temperature, top_k=top_k)[0])(keys)
    freq = np.bincount(np.asarray(draws), minlength=5) / len(keys)
    scaled = logits[0] / temperature
    if top_k is not None:
      scaled = jnp.where(jnp.arange(5) < top_k, scaled, -jnp.inf)
    # 20000 draws: the standard error of each frequency is below 0.0036.
    np.testing.assert_allclose(freq, jax.nn.softmax(scaled), **tolerances.SAMPLED_FREQUENCY)


def test_generate_argument_errors():
  model, variables = _model_and_variables()
  prompt = _prompt()
  np.testing.assert_array_equal(
      models.generate(model, variables, prompt, 0, rng=jax.random.PRNGKey(0)), prompt)
  with pytest.raises(ValueError, match="top_k"):
    models.generate(model, variables, prompt, 2, rng=jax.random.PRNGKey(0), temperature=1.0,
                    top_k=V + 1)
  with pytest.raises(ValueError, match="temperature"):
    models.generate(model, variables, prompt, 2, rng=jax.random.PRNGKey(0), temperature=-1.0)
  with pytest.raises(ValueError, match="prompt"):
    models.generate(model, variables, prompt[:, :0], 2, rng=jax.random.PRNGKey(0))
  learned, learned_vars = _model_and_variables("learned_positions_alibi")
  with pytest.raises(ValueError, match="learned positions"):
    models.generate(learned, learned_vars, prompt, NEW + 1, rng=jax.random.PRNGKey(0))
