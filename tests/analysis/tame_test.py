"""T-TAME (arXiv:2403.04523): the head and the objective's terms against a float64 numpy rewrite of
the paper's equations; on a small CNN and a small ViT (its blocks' tokens on the patch grid)
trained on sklearn's digits, maps in (0, 1), the gradient reaching only the head, a short training
lowering the objective, and the trained map of the predicted class keeping more of the frozen
model's confidence as a mask than the same map with its pixels shuffled (same area) or the map of
another class."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from attnjax import models
from attnjax.analysis import tame
from attnjax.data import shipped
from tests import tolerances
from tests import training_loop

LAYERS = ("stage0_block0", "stage1_block0")
VIT_LAYERS = ("encoder/layer_0", "encoder/layer_1")
VALID = 128  # held-out digits used by every test on the trained head


# ----------------------------------------------------------------- float64 numpy rewrite (paper)

def _np_resize_axis(x, out, axis):
  """Bilinear interpolation along one axis, half-pixel centres, source clamped to the edge."""
  n = x.shape[axis]
  src = np.clip((np.arange(out) + 0.5) * n / out - 0.5, 0, n - 1)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, n - 1)
  w = (src - lo).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
  return np.take(x, lo, axis=axis) * (1 - w) + np.take(x, hi, axis=axis) * w


def _np_upsample(x, size):  # [B, h, w, K] -> [B, H, W, K]
  return _np_resize_axis(_np_resize_axis(x, size[0], 1), size[1], 2)


def _np_head(params, stats, features, *, train):
  """A = sigmoid(W_f concat_l up(ReLU(BN_l(W_l F_l + b_l) + F_l)) + b_f), every 1x1 conv a matmul
  over channels; BN on the batch's (biased) statistics when training, else running ones."""
  size = (max(f.shape[1] for f in features), max(f.shape[2] for f in features))
  branches = []
  for l, f in enumerate(features):
    f = np.asarray(f, np.float64)
    conv, norm = params[f"branch{l}_conv"], params[f"branch{l}_norm"]
    g = f @ np.asarray(conv["kernel"], np.float64)[0, 0] + np.asarray(conv["bias"], np.float64)
    if train:
      mean, var = g.mean(axis=(0, 1, 2)), g.var(axis=(0, 1, 2))
    else:
      mean = np.asarray(stats[f"branch{l}_norm"]["mean"], np.float64)
      var = np.asarray(stats[f"branch{l}_norm"]["var"], np.float64)
    g = (g - mean) / np.sqrt(var + 1e-5) * np.asarray(norm["scale"], np.float64) + np.asarray(
        norm["bias"], np.float64)
    branches.append(_np_upsample(np.maximum(g + f, 0), size))
  fused = np.concatenate(branches, axis=-1)
  c = fused @ np.asarray(params["fuser"]["kernel"], np.float64)[0, 0] + np.asarray(
      params["fuser"]["bias"], np.float64)
  return 1 / (1 + np.exp(-c))


def _np_area(a, power=0.3, eps=5e-4):
  return np.mean((np.asarray(a, np.float64) + eps) ** power)


def _np_variation(a, power=2.0, border=0.3):
  """Explicit loops over neighbouring pixels and the border of each example's map."""
  a = np.asarray(a, np.float64)
  b, h, w = a.shape
  total = 0.0
  for n in range(b):
    for i in range(h):
      for j in range(w):
        if i + 1 < h:
          total += abs(a[n, i + 1, j] - a[n, i, j]) ** power
        if j + 1 < w:
          total += abs(a[n, i, j + 1] - a[n, i, j]) ** power
    edges = [a[n, 0, :], a[n, -1, :], a[n, :, 0], a[n, :, -1]]
    total += border * sum(float(np.sum(e ** power)) for e in edges)
  return total / (power * b)


def _np_cross_entropy(logits, labels):
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
  return -np.mean(logp[np.arange(len(labels)), labels])


# ----------------------------------------------------------------------------- fixtures

def _random_head_variables(head, features, seed=0):
  """The head's params drawn from its initializers, BatchNorm's scale / bias / running averages
  moved off their defaults so that each enters the comparison."""
  variables = jax.jit(head.init)(jax.random.PRNGKey(seed), features)
  rng = np.random.default_rng(seed)
  moved = jax.tree.map(lambda v: np.asarray(v) + rng.normal(0, 0.3, v.shape), variables)
  stats = {k: {"mean": v["mean"], "var": np.abs(v["var"]) + 0.5}
           for k, v in moved["batch_stats"].items()}
  return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32),
                      {"params": moved["params"], "batch_stats": stats})


# Shared compiled functions (the file is compile-bound): the modules and layers are static.
_features = jax.jit(tame.feature_maps, static_argnums=(0, 3))
_head = jax.jit(lambda head, v, f: head.apply(v, f, return_logits=True), static_argnums=0)
_explain = jax.jit(tame.explain, static_argnums=(0, 2, 5), static_argnames=("at_input_size",))
_objective = jax.jit(functools.partial(tame.objective, train=False), static_argnums=(0, 2, 5))


@functools.partial(jax.jit, static_argnums=0)
def _confidence(model, model_variables, images, maps, labels):
  """Mean probability of `labels` under the frozen model on `images ⊙ up(maps)`."""
  probs = jax.nn.softmax(tame.masked_logits(model, model_variables, images, maps))
  return probs[jnp.arange(len(labels)), labels].mean()


@pytest.fixture(scope="module")
def trained():
  """A ResNet CNN trained 60 steps on digits (frozen from here on) and a T-TAME head trained 100
  steps on its two stages' outputs; the objective on a held-out batch before and after."""
  task = shipped.Digits()
  config = ml_collections.ConfigDict(dict(arch="cnn", width=64, depth=2, num_heads=2,
                                          widths=[8, 16], blocks=[1, 1]))
  model = models.build_model(config, task.spec)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
  params, _ = training_loop.train(lambda p, x: model.apply({"params": p}, x), params,
                                  lambda s: task.batch(s, 64), 60)
  mv = {"params": params}
  valid = jnp.asarray(task.batch(0, VALID, split="valid")["inputs"])
  head = tame.TameHead(num_classes=10)
  features, _ = _features(model, mv, valid, LAYERS)
  initial = jax.jit(head.init)(jax.random.PRNGKey(1), features)
  frozen_copy = jax.tree.map(np.array, mv)
  tx = optax.adam(1e-2)
  step = tame.make_train_step(head, model, LAYERS, tx)
  hv, opt_state = initial, tx.init(initial["params"])
  for s in range(100):
    hv, opt_state, _ = step(hv, opt_state, mv, jnp.asarray(task.batch(1000 + s, 64)["inputs"]))
  return dict(model=model, model_variables=mv, head=head, initial=initial, head_variables=hv,
              frozen_copy=frozen_copy, valid=valid,
              before=float(_objective(head, initial, model, mv, valid, LAYERS)[0]),
              after=float(_objective(head, hv, model, mv, valid, LAYERS)[0]))


@pytest.fixture(scope="module")
def trained_vit():
  """T-TAME's ViT path: a 2-block ViT (2x2 patches, so a 4x4 grid, and a class token) trained 150
  steps on digits, and a head trained 100 steps on both blocks' tokens (class token multiplied in)."""
  task = shipped.Digits()
  config = ml_collections.ConfigDict(dict(arch="vit", width=32, depth=2, num_heads=2, mlp_dim=64,
                                          mechanism="softmax", patch_size=2, pooling="cls"))
  model = models.build_model(config, task.spec)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
  params, _ = training_loop.train(lambda p, x: model.apply({"params": p}, x), params,
                                  lambda s: task.batch(s, 64), 150, learning_rate=3e-3)
  mv = {"params": params}
  valid = jnp.asarray(task.batch(0, VALID, split="valid")["inputs"])
  head = tame.TameHead(num_classes=10)
  features, _ = _features(model, mv, valid, VIT_LAYERS)
  initial = jax.jit(head.init)(jax.random.PRNGKey(1), features)
  tx = optax.adam(1e-2)
  step = tame.make_train_step(head, model, VIT_LAYERS, tx)
  hv, opt_state = initial, tx.init(initial["params"])
  for s in range(100):
    hv, opt_state, _ = step(hv, opt_state, mv, jnp.asarray(task.batch(1000 + s, 64)["inputs"]))
  return dict(model=model, model_variables=mv, head=head, initial=initial, head_variables=hv,
              valid=valid)


def _unpack(trained):
  return (trained[k] for k in ("model", "model_variables", "head", "head_variables", "valid"))


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("train", [False, True])
def test_head_matches_numpy_rewrite(train):
  """Branches (1x1 conv, BN, skip, ReLU), bilinear upsampling of a 3x3 and a 2x2 map to 5x5,
  concatenation, fusion and sigmoid, against float64 numpy."""
  rng = np.random.default_rng(0)
  features = [jnp.asarray(rng.normal(size=s), jnp.float32)
              for s in [(3, 5, 5, 4), (3, 3, 3, 6), (3, 2, 2, 5)]]
  head = tame.TameHead(num_classes=7)
  variables = _random_head_variables(head, features)
  if train:
    got, updates = jax.jit(lambda v, f: head.apply(v, f, train=True, mutable=["batch_stats"]))(
        variables, features)
    # The running averages move towards the batch statistics (momentum 0.9 as PyTorch's 0.1).
    assert not np.allclose(updates["batch_stats"]["branch0_norm"]["mean"],
                           variables["batch_stats"]["branch0_norm"]["mean"])
  else:
    got = _head(head, variables, features)[0]
  want = _np_head(variables["params"], variables["batch_stats"], features, train=train)
  assert got.shape == (3, 5, 5, 7)
  np.testing.assert_allclose(got, want, **tolerances.OUTPUT[jnp.float32])
  if not train:  # with running averages each example's maps depend on that example alone
    alone = _head(head, variables, [f[:1] for f in features])[0]
    np.testing.assert_allclose(alone, got[:1], **tolerances.OUTPUT[jnp.float32])


def test_loss_terms_match_numpy_rewrite():
  maps = jnp.asarray(np.random.default_rng(1).uniform(size=(3, 5, 4)), jnp.float32)
  np.testing.assert_allclose(tame.area_loss(maps), _np_area(maps), **tolerances.OUTPUT[jnp.float32])
  np.testing.assert_allclose(tame.variation_loss(maps), _np_variation(maps),
                             **tolerances.OUTPUT[jnp.float32])
  np.testing.assert_allclose(tame.variation_loss(maps, border=0.0),
                             _np_variation(maps, border=0.0), **tolerances.OUTPUT[jnp.float32])
  # The upsampling used to mask the input is the bilinear resize of the rewrite.
  np.testing.assert_allclose(tame.upsample(maps[..., None], (8, 7))[..., 0],
                             _np_upsample(np.asarray(maps)[..., None], (8, 7))[..., 0],
                             **tolerances.OUTPUT[jnp.float32])


def test_objective_is_the_papers_weighted_sum(trained):
  """L = 1.5 CE(f(x ⊙ up(A_y)), y) + 2 mean((A_y + 5e-4)^0.3) + 0.01 TV(A_y), y = f's prediction;
  the masked input built in numpy, the maps of the head's eval forward."""
  model, mv, head, hv, x = _unpack(trained)
  loss, terms = _objective(head, hv, model, mv, x, LAYERS)
  features, logits = _features(model, mv, x, LAYERS)
  y = np.argmax(np.asarray(logits), axis=-1)
  np.testing.assert_array_equal(terms["labels"], y)
  a_y = np.asarray(_head(head, hv, features)[0], np.float64)[np.arange(len(y)), :, :, y]
  masked = np.asarray(x, np.float64) * _np_upsample(a_y[..., None], (8, 8))
  masked_logits = _features(model, mv, jnp.asarray(masked, jnp.float32), LAYERS)[1]
  ce = _np_cross_entropy(masked_logits, y)
  want = 1.5 * ce + 2 * _np_area(a_y) + 0.01 * _np_variation(a_y)
  np.testing.assert_allclose(loss, want, rtol=tolerances.GRAD[jnp.float32]["rtol"])
  np.testing.assert_allclose(terms["cross_entropy"], 1.5 * ce,
                             rtol=tolerances.GRAD[jnp.float32]["rtol"])


def test_maps_in_sigmoid_range_and_explain_shapes(trained):
  model, mv, head, hv, x = _unpack(trained)
  features, logits = _features(model, mv, x, LAYERS)
  assert [f.shape for f in features] == [(VALID, 8, 8, 8), (VALID, 4, 4, 16)]
  maps, pre = _head(head, hv, features)
  assert maps.shape == (VALID, 8, 8, 10)
  assert bool(jnp.all((maps >= 0) & (maps <= 1)))
  np.testing.assert_allclose(maps, jax.nn.sigmoid(pre), **tolerances.OUTPUT[jnp.float32])
  # explain: one forward pass, the predicted class's map by default, any class on request.
  y = jnp.argmax(logits, axis=-1)
  small = _explain(head, hv, model, mv, x, LAYERS, at_input_size=False)
  np.testing.assert_allclose(small, maps[jnp.arange(VALID), :, :, y],
                             **tolerances.OUTPUT[jnp.float32])
  three = _explain(head, hv, model, mv, x, LAYERS, jnp.full((VALID,), 3))
  np.testing.assert_allclose(three, tame.upsample(maps[..., 3:4], (8, 8))[..., 0],
                             **tolerances.OUTPUT[jnp.float32])


def test_gradient_reaches_only_the_head(trained):
  """No gradient reaches the frozen model's variables; every head parameter gets one, and the
  gradient flows through the frozen forward pass to the mask (the images get one)."""
  model, mv, head, hv, x = _unpack(trained)

  def loss(head_params, model_variables, images):
    return tame.objective(head, {**hv, "params": head_params}, model, model_variables, images,
                          LAYERS)[0]

  g_head, g_model, g_images = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(hv["params"], mv, x)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(g_model))
  assert all(float(jnp.max(jnp.abs(g))) > 0.0 for g in jax.tree.leaves(g_head))
  assert float(jnp.max(jnp.abs(g_images))) > 0.0
  # The fixture's training steps moved every head parameter and left the frozen model as it was.
  jax.tree.map(np.testing.assert_array_equal, trained["frozen_copy"], jax.tree.map(np.asarray, mv))
  moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(hv["params"]), jax.tree.leaves(trained["initial"]["params"]), strict=True)]
  assert min(moved) > 0, moved


def test_short_training_lowers_the_objective(trained):
  assert trained["after"] < 0.7 * trained["before"], (trained["before"], trained["after"])


@pytest.mark.parametrize("which", ["cnn", "vit"])
def test_trained_map_keeps_more_confidence_than_same_area_or_other_class(which, request):
  """Masking with the trained map of the predicted class keeps more of the frozen model's
  probability of that class than the same map with its pixels shuffled (the same area) or the
  map of another class, and more than the untrained head's map (the training is what explains);
  for the CNN and, through its blocks' tokens, for the ViT."""
  trained = request.getfixturevalue("trained" if which == "cnn" else "trained_vit")
  layers = LAYERS if which == "cnn" else VIT_LAYERS
  model, mv, head, hv, x = _unpack(trained)
  y = jnp.argmax(_features(model, mv, x, layers)[1], axis=-1)
  mine = _explain(head, hv, model, mv, x, layers, y, at_input_size=False)
  keys = jax.random.split(jax.random.PRNGKey(7), len(y))
  shuffled = jax.vmap(lambda k, a: jax.random.permutation(k, a.reshape(-1)).reshape(a.shape))(
      keys, mine)
  other = _explain(head, hv, model, mv, x, layers, (y + 1) % 10, at_input_size=False)
  untrained = _explain(head, trained["initial"], model, mv, x, layers, y, at_input_size=False)
  kept = {name: float(_confidence(model, mv, x, m, y))
          for name, m in [("trained", mine), ("shuffled", shuffled), ("other", other),
                          ("untrained", untrained)]}
  assert kept["trained"] > kept["shuffled"] + 0.05, kept
  assert kept["trained"] > kept["other"] + 0.05, kept
  assert kept["trained"] > kept["untrained"], kept


def _np_token_grid(tokens, mode, grid):
  """Explicit loops: patch token 1 + i*w + j (or i*w + j without a class token) at (i, j)."""
  tokens = np.asarray(tokens, np.float64)
  b, _, c = tokens.shape
  first = 0 if mode == "none" else 1
  out = np.zeros((b, grid[0], grid[1], c))
  for n in range(b):
    for i in range(grid[0]):
      for j in range(grid[1]):
        out[n, i, j] = tokens[n, first + i * grid[1] + j]
        if mode == "multiply":
          out[n, i, j] *= tokens[n, 0]
  return out


@pytest.mark.parametrize("mode", tame.CLASS_TOKEN)
def test_token_grid_matches_loops(mode):
  rng = np.random.default_rng(2)
  grid = (2, 3)
  tokens = jnp.asarray(rng.normal(size=(2, 6 + (mode != "none"), 5)), jnp.float32)
  got = tame.TokenGrid(mode, grid)(tokens)
  np.testing.assert_allclose(got, _np_token_grid(tokens, mode, grid),
                             **tolerances.OUTPUT[jnp.float32])
  square = jnp.asarray(rng.normal(size=(2, 9 + (mode != "none"), 5)), jnp.float32)
  assert tame.TokenGrid(mode)(square).shape == (2, 3, 3, 5)
  with pytest.raises(ValueError, match="grid"):
    tame.TokenGrid(mode, (4, 2))(tokens)


def test_vit_features_are_the_blocks_tokens_on_the_grid(trained_vit):
  """`feature_maps` on the ViT gives each block's patch tokens on the 4x4 grid times its class
  token (the raw tokens read through a 1 x 17 grid without a class token), the head's maps are
  on that grid, and no gradient reaches the frozen ViT while every head parameter gets one."""
  model, mv, head, hv, x = _unpack(trained_vit)
  features, _ = _features(model, mv, x, VIT_LAYERS)
  raw, _ = jax.jit(tame.feature_maps, static_argnums=(0, 3), static_argnames="tokens")(
      model, mv, x, VIT_LAYERS, tokens=tame.TokenGrid("none", (1, 17)))
  for f, r in zip(features, raw, strict=True):
    assert f.shape == (VALID, 4, 4, 32)
    np.testing.assert_allclose(f, _np_token_grid(r[:, 0], "multiply", (4, 4)),
                               **tolerances.OUTPUT[jnp.float32])
  assert _head(head, hv, features)[0].shape == (VALID, 4, 4, 10)

  def loss(head_params, model_variables):
    return tame.objective(head, {**hv, "params": head_params}, model, model_variables, x,
                          VIT_LAYERS)[0]

  g_head, g_model = jax.jit(jax.grad(loss, argnums=(0, 1)))(hv["params"], mv)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(g_model))
  assert all(float(jnp.max(jnp.abs(g))) > 0.0 for g in jax.tree.leaves(g_head))


def test_errors_name_the_argument(trained):
  model, mv, head, hv, x = _unpack(trained)
  with pytest.raises(ValueError, match="stage9_block0"):
    _features(model, mv, x, ("stage0_block0", "stage9_block0"))
  with pytest.raises(ValueError, match="layers"):
    _features(model, mv, x, ())
  with pytest.raises(ValueError, match="TameHead: features"):
    head.apply(hv, [jnp.zeros((2, 8, 8))])
  with pytest.raises(ValueError, match="class_index"):
    tame.explain(head, hv, model, mv, x, LAYERS, class_index=10)
  with pytest.raises(ValueError, match="area_loss: maps"):
    tame.area_loss(jnp.zeros((2, 8, 8, 1)))
  with pytest.raises(ValueError, match="labels"):
    jax.eval_shape(lambda: tame.objective(head, hv, model, mv, x, LAYERS,
                                          jnp.zeros((3,), jnp.int32)))
