"""Block-Attention for RAG (#135): the block mask (passages causally within themselves, the final
block over everything before it) against a float64 rewrite; its claims: a passage's keys computed
alone at offset 0 and re-rotated to their offset equal the keys computed in place (RoPE in float64,
partial rotary, and the context extensions), a passage's outputs do not depend on the other
passages (and equal the passage run alone), and the final block's output equals full attention over
the cache assembled from the re-rotated passages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.nn import MultiHeadAttention
from attnjax.ops.decode import block_attention_rag, rerotate_keys
from attnjax.ops.positional import apply_rope
from tests import inputs
from tests import numpy_math
from tests import tolerances

F32 = tolerances.output(jnp.float32)
QUERY = -1
# Two prompts: a system block, passages, then the final block (the user query), as block ids.
BLOCKS = np.array([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, QUERY, QUERY, QUERY],
                   [5, 5, 7, 7, 7, 7, 7, 3, 3, QUERY, QUERY, QUERY, QUERY]], np.int32)


def _attention_float64(q, k, v, keep):
  """Softmax attention with the bool mask `keep [B, T, S]`, float64, GQA by repeating heads."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
  w = numpy_math.softmax(s, where=keep[:, None])
  return np.einsum("bnts,bsnh->btnh", w, v)


def _block_mask(blocks, query_block):
  """The paper's visibility by an explicit loop: j <= p, and the same block unless p is in the final
  block."""
  B, S = blocks.shape
  keep = np.zeros((B, S, S), bool)
  for b in range(B):
    for p in range(S):
      for j in range(p + 1):
        keep[b, p, j] = blocks[b, p] == query_block or blocks[b, j] == blocks[b, p]
  return keep


def _rope_float64(x, positions, *, base=10000.0, d=None):
  """RoPE (half-split pairs) in float64 on `x [B, L, heads, H]` at `positions [L]`."""
  x = np.asarray(x, np.float64)
  d = x.shape[-1] if d is None else d
  angle = np.asarray(positions, np.float64)[:, None] * base ** (-np.arange(0, d, 2) / d)
  cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
  x1, x2 = x[..., :d // 2], x[..., d // 2:d]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., d:]], axis=-1)


_block_rag = inputs.jit_with(block_attention_rag, query_block_id=QUERY)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_equals_the_block_mask(implementation):
  q, k, v = inputs.qkv(B=2, T=BLOCKS.shape[1], N=4, K=2, H=8, h=6, seed=0)
  out = inputs.jit_with(block_attention_rag, query_block_id=QUERY,
                        implementation=implementation)(q, k, v, block_ids=BLOCKS)
  want = _attention_float64(q, k, v, _block_mask(BLOCKS, QUERY))
  np.testing.assert_allclose(np.asarray(out), want, **F32)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_a_passage_rerotated_to_its_offset_equals_the_keys_computed_in_place(fraction):
  B, L, K, H = 2, 6, 2, 8
  raw = jax.random.normal(jax.random.PRNGKey(1), (B, L, K, H))
  d = int(H * fraction)
  offsets = np.array([9, 17])
  alone = apply_rope(raw, jnp.arange(L), fraction=fraction)          # computed at offset 0
  moved = np.asarray(rerotate_keys(alone, jnp.asarray(offsets, jnp.int32), fraction=fraction))
  for b in range(B):
    in_place = _rope_float64(raw[b:b + 1], offsets[b] + np.arange(L), d=d)
    np.testing.assert_allclose(moved[b:b + 1], in_place, **F32)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "ntk", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}])
def test_rerotation_under_context_extensions_equals_rotating_in_place(scaling):
  # YaRN's factor m multiplies keys once: a shift must not apply it again.
  raw = jax.random.normal(jax.random.PRNGKey(2), (1, 5, 2, 8))
  shift = jnp.asarray([[3, 3, 11, 11, 11]], jnp.int32)                # a shift per key token
  alone = apply_rope(raw, jnp.array([0, 1, 0, 1, 2]), scaling=scaling)
  in_place = apply_rope(raw, jnp.array([3, 4, 11, 12, 13]), scaling=scaling)
  np.testing.assert_allclose(np.asarray(rerotate_keys(alone, shift, scaling=scaling)),
                             np.asarray(in_place), **F32)


def test_dynamic_scaling_and_bad_shifts_are_refused():
  k = jnp.zeros((2, 4, 1, 8))
  dynamic = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 8}
  with pytest.raises(ValueError, match="rerotate_keys: dynamic NTK"):
    rerotate_keys(k, 3, scaling=dynamic)
  with pytest.raises(ValueError, match=r"rerotate_keys: `delta` must be an int, \[B\]"):
    rerotate_keys(k, jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="block_attention_rag: .*causal=True"):
    block_attention_rag(k, k, k, block_ids=jnp.zeros((2, 4), jnp.int32), causal=False)


def test_passages_are_independent_of_each_other_and_equal_their_run_alone():
  # RoPE in place: a passage's rows only see the passage, and RoPE logits depend on relative
  # positions, so they equal the passage run alone from position 0.
  B, S, N, K, H, h = 2, BLOCKS.shape[1], 4, 2, 8, 6
  q_raw, k_raw, v = inputs.qkv(B=B, T=S, N=N, K=K, H=H, h=h, seed=3)
  pos = jnp.arange(S)
  base = np.asarray(_block_rag(apply_rope(q_raw, pos), apply_rope(k_raw, pos), v,
                               block_ids=BLOCKS))
  for b, block in ((0, 1), (1, 7)):
    rows = np.flatnonzero(BLOCKS[b] == block)
    # Every other token moved: the passage's rows do not change.
    others = np.flatnonzero(BLOCKS[b] != block)
    noise = np.random.default_rng(b).standard_normal((len(others),) + k_raw.shape[2:])
    k2, v2 = np.array(k_raw), np.array(v)
    k2[b, others] += 3.0 * noise
    v2[b, others] += 3.0 * noise[..., :h]
    out = np.asarray(_block_rag(apply_rope(q_raw, pos), apply_rope(jnp.asarray(k2), pos),
                                jnp.asarray(v2), block_ids=BLOCKS))
    np.testing.assert_allclose(out[b, rows], base[b, rows], **F32)
    # The passage alone, at positions 0..L-1, causal softmax attention in float64.
    L = len(rows)
    alone = _attention_float64(
        _rope_float64(q_raw[b:b + 1, rows], np.arange(L)),
        _rope_float64(k_raw[b:b + 1, rows], np.arange(L)), v[b:b + 1, rows],
        np.tril(np.ones((L, L), bool))[None])
    np.testing.assert_allclose(base[b, rows], alone[0], **F32)


def test_the_final_block_over_the_assembled_cache_equals_full_attention():
  # Each passage's keys computed alone at offset 0, re-rotated to its offset in the prompt (one shift
  # per key token); the final block's own keys and its queries rotated in place.
  B, S, N, K, H, h = 2, BLOCKS.shape[1], 4, 2, 8, 6
  q_raw, k_raw, v = inputs.qkv(B=B, T=S, N=N, K=K, H=H, h=h, seed=4)
  starts = np.zeros((B, S), np.int32)   # the first position of each token's block
  for b in range(B):
    for s in range(1, S):
      starts[b, s] = starts[b, s - 1] if BLOCKS[b, s] == BLOCKS[b, s - 1] else s
  local = np.arange(S)[None] - starts
  alone = apply_rope(k_raw, jnp.asarray(local, jnp.int32))
  cache = rerotate_keys(alone, jnp.asarray(starts))
  q = apply_rope(q_raw, jnp.arange(S))
  out = np.asarray(_block_rag(q, cache, v, block_ids=BLOCKS))
  # Full causal attention with every key rotated in place (float64).
  want = _attention_float64(_rope_float64(q_raw, np.arange(S)), _rope_float64(k_raw, np.arange(S)),
                            v, np.broadcast_to(np.tril(np.ones((S, S), bool)), (B, S, S)))
  final = BLOCKS == QUERY
  np.testing.assert_allclose(out[final], want[final], **F32)


def test_the_layer_caches_block_ids_and_generates_in_the_final_block():
  # A RoPE layer: the prompt's blocks prefilled at once, then three generated tokens, which belong
  # to the final block; the cached block ids keep the passages' rows as they were.
  B, D, extra = 2, 16, 3
  ids = np.concatenate([BLOCKS, np.full((B, extra), QUERY, np.int32)], axis=1)
  T, prompt = ids.shape[1], BLOCKS.shape[1]
  layer = MultiHeadAttention(num_heads=4, num_kv_heads=2, mechanism="block_attention_rag",
                             mechanism_kwargs={"query_block_id": QUERY}, causal=True,
                             rope_base=10000.0)
  x = jax.random.normal(jax.random.PRNGKey(0), (B, T, D))
  variables = layer.init(jax.random.PRNGKey(1), x, block_ids=ids)
  full = layer.apply(variables, x, block_ids=ids)
  cache = layer.init(jax.random.PRNGKey(1), x, block_ids=ids, decode=True)["cache"]
  step = jax.jit(lambda cache, x, ids: layer.apply({**variables, "cache": cache}, x, decode=True,
                                                   block_ids=ids, mutable=["cache"]))
  out, mutated = step(cache, x[:, :prompt], ids[:, :prompt])
  outs = [out]
  for t in range(prompt, T):
    out, mutated = step(mutated["cache"], x[:, t:t + 1], ids[:, t:t + 1])
    outs.append(out)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, axis=1)), np.asarray(full), **F32)
