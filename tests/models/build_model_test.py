"""build_model: parameter counts from abstract shapes (a 7B config without allocating), tied vs
untied embeddings, hybrid mechanism schedules, config errors raised before any tracing, logical
axis metadata on every parameter, and mixed precision."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from attnjax import models
from attnjax import parallel
from attnjax.data.base import TaskSpec
from attnjax.nn import MultiHeadAttention
from tests import tolerances

LM_SPEC = TaskSpec(name="toy_lm", kind="lm", input_shape=(8,), input_dtype="int32", vocab_size=40,
                   num_classes=40, seq_len=8)
CLS_SPEC = TaskSpec(name="toy_cls", kind="classify", input_shape=(8,), input_dtype="int32",
                    vocab_size=40, num_classes=5, seq_len=8)
IMG_SPEC = TaskSpec(name="toy_img", kind="classify", input_shape=(8, 8, 1), input_dtype="float32",
                    vocab_size=0, num_classes=10, seq_len=64)


def _config(**overrides):
  base = dict(arch="decoder_lm", width=32, depth=2, num_heads=4, num_kv_heads=None, mlp_dim=64,
              mlp="gelu", norm="rmsnorm", mechanism="softmax", mechanism_kwargs={},
              layer_mechanisms=None, rope_base=10000.0, tie_embeddings=True, pooling="mean",
              patch_size=2, dropout=0.0, dtype="float32", param_dtype="float32")
  return ml_collections.ConfigDict({**base, **overrides})


def _count(config, spec=LM_SPEC):
  model = models.build_model(config, spec)
  return models.param_count(models.abstract_variables(model, spec)["params"])


def test_7b_config_param_count_from_abstract_shapes():
  """LLaMA-7B's shape (arXiv:2302.13971): 6,738,415,616 parameters, computed without allocating."""
  spec = TaskSpec(name="lm", kind="lm", input_shape=(8,), input_dtype="int32", vocab_size=32000,
                  num_classes=32000, seq_len=8)
  config = _config(width=4096, depth=32, num_heads=32, mlp_dim=11008, mlp="swiglu",
                   tie_embeddings=False, use_bias=False)
  abstract = models.abstract_variables(models.build_model(config, spec), spec)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nn.unbox(abstract)))
  assert models.param_count(abstract["params"]) == 6_738_415_616


def _expected_count(*, width, depth, heads, kv_heads, mlp_dim, mlp, norm, bias, vocab, classes,
                    tied):
  head_dim = width // heads
  attention = width * head_dim * (heads + 2 * kv_heads) + heads * head_dim * width
  attention += (head_dim * (heads + 2 * kv_heads) + width) if bias else 0
  mlp_params = (3 if mlp == "swiglu" else 2) * width * mlp_dim
  mlp_params += ((2 if mlp == "swiglu" else 1) * mlp_dim + width) if bias else 0
  norm_params = width * (2 if norm == "layernorm" else 1)
  layer = attention + mlp_params + 2 * norm_params
  return vocab * width + depth * layer + norm_params + (0 if tied else width * classes)


@pytest.mark.parametrize("mlp,norm,bias,kv_heads,tied", [
    ("gelu", "rmsnorm", True, 4, True),
    ("swiglu", "layernorm", False, 2, False),
    ("gelu", "layernorm", True, 1, False),
])
def test_decoder_param_count_matches_formula(mlp, norm, bias, kv_heads, tied):
  config = _config(mlp=mlp, norm=norm, use_bias=bias, num_kv_heads=kv_heads, tie_embeddings=tied)
  assert _count(config) == _expected_count(width=32, depth=2, heads=4, kv_heads=kv_heads,
                                           mlp_dim=64, mlp=mlp, norm=norm, bias=bias, vocab=40,
                                           classes=40, tied=tied)


def test_tied_and_untied_embeddings():
  tied = _count(_config(tie_embeddings=True))
  untied = _count(_config(tie_embeddings=False))
  assert untied - tied == 32 * LM_SPEC.num_classes
  spec = TaskSpec(name="lm", kind="lm", input_shape=(8,), input_dtype="int32", vocab_size=40,
                  num_classes=7, seq_len=8)
  with pytest.raises(ValueError, match="tie_embeddings"):
    models.build_model(_config(tie_embeddings=True), spec)
  assert _count(_config(tie_embeddings=False), spec) == untied - 32 * (40 - 7)


def test_schedule_strings():
  assert models.layer_mechanisms("linear", "every 4: softmax", 8) == (
      "linear", "linear", "linear", "softmax") * 2
  assert models.layer_mechanisms("a", None, 3) == ("a",) * 3
  assert models.layer_mechanisms("a", ["b", "c"], 2) == ("b", "c")
  for bad in ["every 0: softmax", "every two: softmax", "softmax", ["softmax"]]:
    with pytest.raises(ValueError, match="model.layer_mechanisms"):
      models.layer_mechanisms("a", bad, 2)


def _built_mechanisms(model, spec):
  """{layer name: (mechanism, kwargs)} of the attention layers `init` builds."""
  seen = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, MultiHeadAttention) and context.method_name == "__call__":
      seen[context.module.path[-2]] = (context.module.mechanism,
                                       dict(context.module.mechanism_kwargs))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    models.abstract_variables(model, spec)
  return seen


def test_hybrid_schedule_builds_each_layer_with_its_mechanism():
  config = _config(depth=4, mechanism="sliding_window", mechanism_kwargs={"window": 4},
                   layer_mechanisms="every 2: softmax")
  model = models.build_model(config, LM_SPEC)
  window = ("sliding_window", {"window": 4})
  assert _built_mechanisms(model, LM_SPEC) == {
      "layer_0": window, "layer_1": ("softmax", {}), "layer_2": window, "layer_3": ("softmax", {})}
  # A list, with kwargs for the mechanism that is not `mechanism`.
  config = _config(depth=2, layer_mechanisms=["softcap", "softmax"],
                   layer_mechanism_kwargs={"softcap": {"cap": 5.0}})
  assert _built_mechanisms(models.build_model(config, LM_SPEC), LM_SPEC) == {
      "layer_0": ("softcap", {"cap": 5.0}), "layer_1": ("softmax", {})}


@pytest.mark.parametrize("overrides,spec,field", [
    (dict(arch="mamba"), LM_SPEC, "model.arch"),
    (dict(mechanism="no_such_mechanism"), LM_SPEC, "model.mechanism"),
    (dict(layer_mechanisms="every 2: no_such"), LM_SPEC, r"model.layer_mechanisms\[1\]"),
    (dict(num_heads=5), LM_SPEC, "model.num_heads"),
    (dict(num_heads=0), LM_SPEC, "model.num_heads"),
    (dict(num_kv_heads=3), LM_SPEC, "model.num_kv_heads"),
    (dict(width=-8), LM_SPEC, "model.width"),
    (dict(depth=0), LM_SPEC, "model.depth"),
    (dict(mlp="relu"), LM_SPEC, "model.mlp"),
    (dict(norm="batchnorm"), LM_SPEC, "model.norm"),
    (dict(dtype="float64"), LM_SPEC, "model.dtype"),
    (dict(dropout=1.5), LM_SPEC, "model.dropout"),
    (dict(rope_base=-1.0), LM_SPEC, "model.rope_base"),
    (dict(width=36, num_heads=4), LM_SPEC, "model.rope_base"),  # odd head dim 9
    (dict(mechanism="sliding_window", mechanism_kwargs={"windw": 4}), LM_SPEC,
     "model.mechanism_kwargs"),
    (dict(mechanism_kwargs={"causal": False}), LM_SPEC, "model.mechanism_kwargs"),
    (dict(mechanism="prefix_lm"), LM_SPEC, "model.mechanism_kwargs"),  # prefix_length missing
    (dict(arch="encoder_classifier", mechanism="prefix_lm",
          mechanism_kwargs={"prefix_length": 2}), CLS_SPEC, "model.mechanism"),  # causal only
    (dict(arch="encoder_classifier"), LM_SPEC, "model.arch"),
    (dict(arch="vit"), CLS_SPEC, "model.arch"),
    (dict(arch="vit", patch_size=3), IMG_SPEC, "model.patch_size"),
    (dict(arch="encoder_classifier", pooling="max"), CLS_SPEC, "model.pooling"),
    (dict(arch="encoder_classifier", pad_id=99), CLS_SPEC, "model.pad_id"),
    (dict(position_embedding="sinusoidal"), LM_SPEC, "model.position_embedding"),
    (dict(arch="vit", position_embedding="none"), IMG_SPEC, "model.position_embedding"),
    (dict(num_head=4), LM_SPEC, r"model: unknown fields \['num_head'\]"),
])
def test_bad_values_raise_naming_the_field_before_tracing(overrides, spec, field, monkeypatch):
  def no_tracing(*args, **kwargs):
    raise AssertionError("build_model traced or compiled something")

  monkeypatch.setattr(jax, "jit", no_tracing)
  monkeypatch.setattr(jax, "eval_shape", no_tracing)
  with pytest.raises(ValueError, match=field):
    models.build_model(_config(**overrides), spec)


@pytest.mark.parametrize("arch,spec", [("decoder_lm", LM_SPEC), ("encoder_classifier", CLS_SPEC),
                                       ("vit", IMG_SPEC)])
def test_every_parameter_carries_logical_axis_names(arch, spec):
  config = _config(arch=arch, pooling="cls", tie_embeddings=False, mlp="swiglu",
                   rope_base=None)
  abstract = models.abstract_variables(models.build_model(config, spec), spec)
  leaves = jax.tree.leaves(abstract, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
  specs = jax.tree.leaves(nn.get_partition_spec(abstract),
                          is_leaf=lambda v: isinstance(v, jax.sharding.PartitionSpec))
  rule_names = {name for name, _ in parallel.DEFAULT_LOGICAL_AXIS_RULES}
  assert {n for s in specs for n in s if n is not None} <= rule_names
  # Every spec maps onto the default mesh axes, no mesh axis used twice within one parameter.
  for s in specs:
    mesh_spec = nn.logical_to_mesh_axes(tuple(s), parallel.DEFAULT_LOGICAL_AXIS_RULES)
    used = [a for axes in mesh_spec if axes for a in ((axes,) if isinstance(axes, str) else axes)]
    assert len(used) == len(set(used)) and set(used) <= {"data", "fsdp", "tensor"}


def test_bfloat16_compute_float32_params_and_logits():
  config = _config(dtype="bfloat16")
  model = models.build_model(config, LM_SPEC)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 40)

  @jax.jit
  def run(tokens):
    variables = model.init(jax.random.PRNGKey(1), tokens)
    logits, state = model.apply(variables, tokens, capture_intermediates=True)
    return variables, logits, state["intermediates"]

  variables, logits, intermediates = run(tokens)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(variables)))
  assert logits.dtype == jnp.float32
  assert intermediates["decoder"]["layer_0"]["__call__"][0].dtype == jnp.bfloat16
  fp32 = models.build_model(_config(dtype="float32"), LM_SPEC)
  want = jax.jit(fp32.apply)(variables, tokens)
  assert tolerances.rel_rms(logits, want) < tolerances.BF16_VS_FP32_REL_RMS
