"""Continuous batching over the paged KV cache (vLLM / FlashInfer style): prompts of different lengths,
rows stopping at their own EOS and new prompts joining as others finish generate, token for token,
what the contiguous-cache `generate` gives each prompt alone; with shared prefixes too; learned
positions per row; sampling per request does not depend on the batch."""

import functools

import jax
import ml_collections
import numpy as np
import pytest

from attnjax import models
from attnjax.data.base import TaskSpec
from attnjax.models import paged_generate

V, NEW = 31, 7
SPEC = TaskSpec(name="toy_lm", kind="lm", input_shape=(16,), input_dtype="int32", vocab_size=V,
                num_classes=V, seq_len=16)
BASE = dict(arch="decoder_lm", width=32, depth=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
            mechanism="softmax", rope_base=10000.0, tie_embeddings=False)
CONFIGS = {"rope_gqa": {},
           "learned_positions": dict(rope_base=None, position_embedding="learned")}
# Prompts of two lengths (so each prompt alone takes two compiled programs); the fifth extends the
# second (a shared prefix).
PROMPTS = [[3, 7], [5, 12], [9, 2, 8, 4], [11, 6], [5, 12, 30, 1], [2, 2, 2, 2]]


@functools.lru_cache(maxsize=None)
def _model(name):
  model = models.build_model(ml_collections.ConfigDict({**BASE, **CONFIGS[name]}), SPEC)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), models.dummy_inputs(SPEC, 2))
  return model, variables


@functools.lru_cache(maxsize=None)
def _alone(name):
  """Each prompt alone through the contiguous cache, greedy, NEW tokens (the rows of one batch are
  independent, so prompts of one length share a call)."""
  model, variables = _model(name)
  out = [None] * len(PROMPTS)
  for length in {len(p) for p in PROMPTS}:
    rows = [i for i, p in enumerate(PROMPTS) if len(p) == length]
    tokens = models.generate(model, variables, np.asarray([PROMPTS[i] for i in rows], np.int32),
                             NEW, rng=jax.random.PRNGKey(0))
    for i, row in zip(rows, np.asarray(tokens), strict=True):
      out[i] = row
  return out


def _cut_at_eos(row, prompt_len, eos):
  new = list(row[prompt_len:])
  return np.asarray(list(row[:prompt_len]) + (new[:new.index(eos) + 1] if eos in new else new))


def _eos(alone):
  """A token some rows emit early and others never or late: rows finish at different steps."""
  firsts = [list(r[len(p):]) for r, p in zip(alone, PROMPTS, strict=True)]
  for t in firsts[0][1:4] + firsts[2][1:4]:
    if sum(t in f for f in firsts) < len(firsts):
      return int(t)
  return int(firsts[0][2])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_continuous_batching_equals_each_prompt_alone(name):
  model, variables = _model(name)
  alone = _alone(name)
  eos = _eos(alone)
  out = paged_generate.generate_paged(model, variables, PROMPTS, NEW, rng=jax.random.PRNGKey(0),
                                      eos_id=eos, max_batch=3, page_size=2)
  ends = []
  for got, want, p in zip(out, alone, PROMPTS, strict=True):
    np.testing.assert_array_equal(got, _cut_at_eos(want, len(p), eos))
    ends.append(len(got) - len(p))
  assert len(set(ends)) > 1          # rows did finish at different steps, so others joined mid-run


def test_shared_prefixes_and_a_small_pool_give_the_same_tokens():
  model, variables = _model("rope_gqa")
  alone = _alone("rope_gqa")
  # 3 rows, pages of 3 tokens, a pool of 6 pages: a request needs up to 5, so admission waits.
  out = paged_generate.generate_paged(model, variables, PROMPTS, NEW, rng=jax.random.PRNGKey(0),
                                      max_batch=3, page_size=3, num_pages=6, share_prefixes=True)
  for got, want in zip(out, alone, strict=True):
    np.testing.assert_array_equal(got, want)


def test_a_prompt_extending_a_running_one_reuses_its_pages(monkeypatch):
  model, variables = _model("rope_gqa")
  shared = []
  original = paged_generate.share_prefix
  monkeypatch.setattr(paged_generate, "share_prefix",
                      lambda c, s, d, n: shared.append(1) or original(c, s, d, n))
  # Prompt 4 ([5, 12, 30, 1]) extends prompt 1 ([5, 12]): it waits one call for prompt 1's prefill, then
  # starts from its pages (a pool size of its own, so the programs are built with the counter).
  out = paged_generate.generate_paged(model, variables, PROMPTS, NEW, rng=jax.random.PRNGKey(0),
                                      max_batch=6, page_size=1, num_pages=61, share_prefixes=True)
  assert shared
  for got, want in zip(out, _alone("rope_gqa"), strict=True):
    np.testing.assert_array_equal(got, want)


def test_sampling_per_request_does_not_depend_on_the_batch():
  model, variables = _model("rope_gqa")
  kw = dict(rng=jax.random.PRNGKey(3), temperature=1.0, top_k=5, page_size=4)
  together = paged_generate.generate_paged(model, variables, PROMPTS, NEW, max_batch=4, **kw)
  one_by_one = paged_generate.generate_paged(model, variables, PROMPTS, NEW, max_batch=1, **kw)
  for a, b in zip(together, one_by_one, strict=True):
    np.testing.assert_array_equal(a, b)


def test_rejects_what_it_cannot_serve():
  model, variables = _model("rope_gqa")
  with pytest.raises(ValueError, match="generate_paged.*prompts"):
    paged_generate.generate_paged(model, variables, [], 3, rng=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="generate_paged.*pages"):
    paged_generate.generate_paged(model, variables, PROMPTS, NEW, rng=jax.random.PRNGKey(0),
                                  page_size=2, num_pages=3)
  window = models.build_model(ml_collections.ConfigDict(
      {**BASE, "mechanism": "sliding_window", "mechanism_kwargs": {"window": 3}}), SPEC)
  with pytest.raises(ValueError, match="generate_paged.*softmax.*sliding_window"):
    paged_generate.generate_paged(window, variables, PROMPTS, NEW, rng=jax.random.PRNGKey(0))
