"""Context parallelism (ring attention, arXiv:2310.01889): on 8 fake CPU devices, attention sharded
along T over the `context` axis equals the single-device flex attention in outputs and gradients
(causal in both layouts, a sliding window, a per-row static block mask, packed documents, the
all-gather strategy, GQA, a batch also split over `data`), and so does the gated linear recurrence
with its states handed across devices (per-head and per-key decay, normalized, packed documents);
the Flax layer under a context mesh runs the context-parallel forms by itself and equals the layer
without one; the zigzag layout balances causal tiles across devices and the contiguous one does not;
bad meshes and misaligned block masks stop with a clear error before compiling."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import masks
from attnjax.core.block_mask import create_block_mask
from attnjax.parallel import context as cp
from attnjax.parallel import mesh as mesh_lib
from tests import tolerances

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs in a fresh python with 8 host devices; prints one JSON line of max abs differences.
_SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from attnjax.core import flex, masks
from attnjax.core.block_mask import create_block_mask
from attnjax.parallel import context as cp
from attnjax.parallel import mesh as mesh_lib

B, T, N, K, H, h = 2, 48, 4, 2, 8, 6
rng = np.random.default_rng(0)
q = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)
k = jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32)
v = jnp.asarray(rng.standard_normal((B, T, K, h)), jnp.float32)
seg = jnp.asarray(np.stack([[0] * 20 + [1] * 28, [0] * 33 + [1] * 15]))
window = lambda b, n, i, j: jnp.abs(i - j) < 7
rowwise = lambda b, n, i, j: jnp.abs(i - j) < jnp.where(b == 0, 5, 13)
cases = {
    "causal_zigzag": ({"context": 4, "data": 2}, dict(causal=True), masks.causal(0)),
    "causal_contiguous_8": ({"context": 8}, dict(causal=True, layout="contiguous"), masks.causal(0)),
    "window": ({"context": 4, "data": 2}, dict(mask_mod=window), window),
    # A static block mask (6-token tiles = the zigzag chunks of 48 tokens over 4 devices), per
    # batch row: a wider window on row 1.
    "block_mask": ({"context": 4, "data": 2}, dict(block_mask=create_block_mask(
        rowwise, B, None, T, T, block_q=6, block_kv=6), causal=True),
                   masks.combine_masks(masks.causal(0), rowwise)),
    "documents_allgather": ({"context": 4, "data": 2},
                            dict(causal=True, segment_ids=seg, strategy="allgather"),
                            masks.combine_masks(masks.causal(0), masks.document(seg, seg))),
}
report = {}
for name, (shape, kw, ref_mask) in cases.items():
  mesh = mesh_lib.make_mesh(shape)
  ours = lambda q, k, v: cp.context_parallel_attention(q, k, v, mesh=mesh, **kw)
  ref = lambda q, k, v: flex.flex_attention(q, k, v, mask_mod=ref_mask, implementation="xla")
  loss = lambda f: jax.jit(jax.value_and_grad(
      lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v))), argnums=(0, 1, 2)))
  out_a, out_b = jax.jit(ours)(q, k, v), jax.jit(ref)(q, k, v)
  (_, ga), (_, gb) = loss(ours)(q, k, v), loss(ref)(q, k, v)
  report[name] = [float(jnp.max(jnp.abs(out_a - out_b)))] + [
      float(jnp.max(jnp.abs(x - y))) for x, y in zip(ga, gb)]

# The gated linear recurrence: per-head decay over packed documents; per-key decay, normalized, on
# positive (feature-mapped) queries and keys.
from attnjax.core import linear
from attnjax.parallel import recurrence
ld_head = jnp.asarray(-np.abs(rng.standard_normal((B, T, N))) * 0.3, jnp.float32)
ld_key = jnp.asarray(-np.abs(rng.standard_normal((B, T, N, H))) * 0.3, jnp.float32)
seg3 = jnp.asarray(np.stack([[0] * 20 + [1] * 28, [0] * 5 + [1] * 7 + [2] * 36]))
mesh = mesh_lib.make_mesh({"context": 4, "data": 2})
for name, kw, (qq, kk) in [
    ("linear_documents", dict(log_decay=ld_head, segment_ids=seg3), (q, k)),
    ("linear_key_decay_normalized", dict(log_decay=ld_key, normalize=True),
     (jax.nn.softplus(q), jax.nn.softplus(k)))]:
  ours = lambda q, k, v: recurrence.context_parallel_linear_attention(q, k, v, mesh=mesh, **kw)
  ref = lambda q, k, v: linear.gated_linear_attention(q, k, v, causal=True, implementation="xla",
                                                      **kw)
  loss = lambda f: jax.jit(jax.value_and_grad(
      lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v))), argnums=(0, 1, 2)))
  out_a, out_b = jax.jit(ours)(qq, kk, v), jax.jit(ref)(qq, kk, v)
  (_, ga), (_, gb) = loss(ours)(qq, kk, v), loss(ref)(qq, kk, v)
  report[name] = [float(jnp.max(jnp.abs(out_a - out_b)))] + [
      float(jnp.max(jnp.abs(x - y))) for x, y in zip(ga, gb)]

# The layer under a context mesh (config only): each mechanism with a context-parallel form equals
# the same layer without a mesh, in outputs and input gradients, and its program holds the form's
# collectives (the ring's collective-permute; the recurrence's all-gather of chunk states).
import attnjax as aj
x = jnp.asarray(rng.standard_normal((B, T, 16)), jnp.float32)
layers = {
    "layer_softmax": (dict(mechanism="softmax", causal=True), True, "collective_permute"),
    "layer_sliding_window": (dict(mechanism="sliding_window", causal=True,
                                  mechanism_kwargs={"window": 9}), False, "collective_permute"),
    "layer_alibi": (dict(mechanism="alibi"), False, "collective_permute"),
    "layer_softcap": (dict(mechanism="softcap", causal=True, mechanism_kwargs={"cap": 2.0}),
                      True, "collective_permute"),
    "layer_prefix_lm": (dict(mechanism="prefix_lm", causal=True,
                             mechanism_kwargs={"prefix_length": 13}), False, "collective_permute"),
    "layer_lightning": (dict(mechanism="lightning_attention_2", causal=True), True, "all_gather"),
    "layer_regla": (dict(mechanism="refined_gated_linear_attention", causal=True), False,
                    "all_gather"),
}
for name, (kw, packed, collective) in layers.items():
  layer = aj.nn.MultiHeadAttention(num_heads=4, num_kv_heads=2, **kw)
  call = dict(segment_ids=seg) if packed else {}
  params = layer.init(jax.random.key(0), x, **call)
  f = lambda x: layer.apply(params, x, **call)
  loss = jax.value_and_grad(lambda x: jnp.sum(jnp.sin(f(x))))
  with jax.set_mesh(mesh):
    text = jax.jit(f).lower(x).as_text()
    out_a, (_, ga) = jax.jit(f)(x), jax.jit(loss)(x)
  out_b, (_, gb) = jax.jit(f)(x), jax.jit(loss)(x)
  report[name] = [float(jnp.max(jnp.abs(out_a - out_b))), float(jnp.max(jnp.abs(ga - gb))),
                  collective in text]

# Decoding keeps working under the context mesh: a 24-token prefill over the KV cache (or the
# recurrent state) and then one token at a time equal the full forward without a mesh (cache steps
# run the mechanism itself, which XLA partitions).
for name, mech in (("decode_softmax", "softmax"), ("decode_lightning", "lightning_attention_2")):
  layer = aj.nn.MultiHeadAttention(num_heads=4, num_kv_heads=2, mechanism=mech, causal=True)
  params = layer.init(jax.random.key(0), x)
  full = jax.jit(lambda x: layer.apply(params, x))(x)
  step = jax.jit(lambda cache, xs: layer.apply({**params, "cache": cache}, xs, decode=True,
                                               mutable=["cache"]))
  with jax.set_mesh(mesh):
    cache = layer.init(jax.random.key(0), x, decode=True)["cache"]
    cache = jax.tree.map(jnp.zeros_like, cache)
    outs = []
    for a, b in ((0, 24), (24, 25), (25, 26)):
      out, mutated = step(cache, x[:, a:b])
      outs.append(out)
      cache = mutated["cache"]
  report[name] = [float(jnp.max(jnp.abs(jnp.concatenate(outs, 1) - full[:, :26])))]
print(json.dumps(report))
"""


def _report():
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
         "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"}
  done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=600, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


CASES = ("causal_zigzag", "causal_contiguous_8", "window", "block_mask", "documents_allgather",
         "linear_documents", "linear_key_decay_normalized")
# The Flax layer under a context mesh, one mechanism per form (ring flex mods; linear recurrence).
LAYER_CASES = ("layer_softmax", "layer_sliding_window", "layer_alibi", "layer_softcap",
               "layer_prefix_lm", "layer_lightning", "layer_regla")
DECODE_CASES = ("decode_softmax", "decode_lightning")


def test_sharded_attention_equals_single_device_outputs_and_gradients():
  # One test for every case: one 8-device subprocess (a module fixture would run once per xdist
  # worker).
  report = _report()
  assert set(report) == set(CASES) | set(LAYER_CASES) | set(DECODE_CASES)
  for case in CASES:
    out, dq, dk, dv = report[case]
    assert out < tolerances.output(jnp.float32)["atol"], (case, out)
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
      assert g < tolerances.grad(jnp.float32)["atol"], (case, name, g)
  for case in DECODE_CASES:
    assert report[case][0] < tolerances.output(jnp.float32)["atol"], (case, report[case])
  for case in LAYER_CASES:
    out, dx, sharded = report[case]
    assert sharded, f"{case}: the layer did not run the context-parallel form"
    assert out < tolerances.output(jnp.float32)["atol"], (case, out)
    assert dx < tolerances.grad(jnp.float32)["atol"], (case, dx)


def test_zigzag_balances_causal_tiles_and_contiguous_does_not():
  zigzag = cp.tile_counts(8192, 8, layout="zigzag", block=128)
  contiguous = cp.tile_counts(8192, 8, layout="contiguous", block=128)
  assert zigzag.max() <= tolerances.LOAD_BALANCE_MAX_RATIO * zigzag.min()
  assert contiguous.max() > tolerances.LOAD_BALANCE_MAX_RATIO * contiguous.min()
  # Every tile is counted once somewhere: the layouts share the total work.
  assert zigzag.sum() == contiguous.sum()


def test_layout_is_a_permutation_giving_each_device_two_mirrored_chunks():
  pos = cp.layout_positions(16, 4, "zigzag")
  assert sorted(pos.tolist()) == list(range(16))
  np.testing.assert_array_equal(pos[:4], [0, 1, 14, 15])


def test_bad_meshes_stop_before_compiling():
  mesh = mesh_lib.make_mesh({"data": -1})
  q = np.zeros((2, 10, 2, 4), np.float32)
  with pytest.raises(ValueError, match="no axis 'sequence'"):
    cp.context_parallel_attention(q, q, q, mesh=mesh, axis="sequence")
  with pytest.raises(ValueError, match=r"T = 10 must divide into 4 equal chunks"):
    cp.layout_positions(10, 2, "zigzag")
  with pytest.raises(ValueError, match="layout"):
    cp.layout_positions(16, 2, "striped")
  with pytest.raises(ValueError, match="self-attention"):
    cp.context_parallel_attention(q, q[:, :8], q[:, :8], mesh=mesh)
  # One device on the context axis: each zigzag chunk is T = 16 tokens, which 6-token tiles split.
  q16 = np.zeros((2, 16, 2, 4), np.float32)
  context = mesh_lib.make_mesh({"context": 1, "data": -1})
  misaligned = create_block_mask(masks.causal(0), None, None, 16, 16, block_q=6, block_kv=6)
  with pytest.raises(ValueError, match=r"tiles \(6, 6\) do not align with the shards"):
    cp.context_parallel_attention(q16, q16, q16, mesh=context, block_mask=misaligned)
  wrong_length = create_block_mask(masks.causal(0), None, None, 32, 32, block_q=8, block_kv=8)
  with pytest.raises(ValueError, match=r"built for \(T, S\) = \(32, 32\)"):
    cp.context_parallel_attention(q16, q16, q16, mesh=context, block_mask=wrong_length)
