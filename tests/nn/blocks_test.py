"""Transformer blocks: the MLP formulas, the pre-norm residual composition, causality, dropout,
mixed precision and the logical axis names on every parameter."""

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from attnjax.nn import MultiHeadAttention
from attnjax.nn import blocks
from tests import tolerances

B, T, D, N = 2, 9, 32, 4
TOL = tolerances.output(jnp.float32)


def _x(shape=(B, T, D), seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _config(**kw):
  depth = kw.pop("depth", 2)
  mechanisms = kw.pop("mechanisms", ("softmax",) * depth)
  kwargs = kw.pop("mechanism_kwargs", tuple(flax.core.FrozenDict() for _ in mechanisms))
  return blocks.TransformerConfig(**{**dict(width=D, num_heads=N, mechanisms=mechanisms,
                                            mechanism_kwargs=kwargs, mlp_dim=64), **kw})


def _init_apply(module, x, **kw):
  return jax.jit(lambda x: (lambda v: (v, module.apply(v, x, **kw)))(
      module.init(jax.random.PRNGKey(0), x, **kw)))(x)


@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
def test_mlp_matches_its_formula(kind):
  x = _x()
  mlp = blocks.MLP(48, kind=kind)
  variables, y = _init_apply(mlp, x)
  p = nn.unbox(variables)["params"]
  hidden = x @ p["wi"]["kernel"] + p["wi"]["bias"]
  if kind == "swiglu":
    hidden = jax.nn.silu(x @ p["wg"]["kernel"] + p["wg"]["bias"]) * hidden
  else:
    hidden = jax.nn.gelu(hidden)
  chex.assert_trees_all_close(y, hidden @ p["wo"]["kernel"] + p["wo"]["bias"], **TOL)
  assert set(p) == ({"wi", "wg", "wo"} if kind == "swiglu" else {"wi", "wo"})


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_block_is_prenorm_attention_then_mlp(norm):
  """y = h + MLP(Norm(h)), h = x + Attn(Norm(x)), computed from the block's own parameters."""
  cfg = _config(norm=norm, rope_base=10000.0)
  x = _x()
  variables, y = _init_apply(blocks.TransformerBlock(cfg, 0), x)
  p = variables["params"]
  norm_module = blocks.make_norm(norm, dtype=jnp.float32, param_dtype=jnp.float32)
  attention = MultiHeadAttention(num_heads=N, causal=True, rope_base=10000.0)

  @jax.jit
  def want(p, x):
    h = x + attention.apply({"params": p["attention"]},
                            norm_module.apply({"params": p["attention_norm"]}, x))
    return h + blocks.MLP(64).apply({"params": p["mlp"]},
                                    norm_module.apply({"params": p["mlp_norm"]}, h))

  chex.assert_trees_all_close(y, want(p, x), **TOL)
  assert set(nn.unbox(p["attention_norm"])) == ({"scale", "bias"} if norm == "layernorm"
                                                else {"scale"})


def test_causal_stack_ignores_future_tokens():
  x = _x()
  stack = blocks.Transformer(_config())
  variables, y = _init_apply(stack, x)
  changed = x.at[:, 5:].set(_x(seed=1)[:, 5:])
  y2 = jax.jit(stack.apply)(variables, changed)
  chex.assert_trees_all_close(y2[:, :5], y[:, :5], **TOL)
  assert float(jnp.max(jnp.abs(y2[:, 5:] - y[:, 5:]))) > tolerances.CHANGED_MAX_ABS


def test_dropout_only_in_training():
  x = _x()
  block = blocks.TransformerBlock(_config(dropout=0.5), 0)
  variables = jax.jit(block.init)(jax.random.PRNGKey(0), x)
  apply = jax.jit(block.apply, static_argnames="train")
  eval_out = apply(variables, x, train=False)
  chex.assert_trees_all_equal(eval_out, apply(variables, x, train=False))
  a = apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  b = apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  assert float(jnp.max(jnp.abs(a - eval_out))) > tolerances.CHANGED_MAX_ABS
  assert float(jnp.max(jnp.abs(a - b))) > tolerances.CHANGED_MAX_ABS


def test_bfloat16_compute_keeps_float32_params():
  x = _x()
  stack = blocks.Transformer(_config(dtype=jnp.bfloat16, mlp="swiglu"))
  variables, y = _init_apply(stack, x)
  assert y.dtype == jnp.bfloat16
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nn.unbox(variables)))
  want = jax.jit(blocks.Transformer(_config(mlp="swiglu")).apply)(variables, x)
  assert tolerances.rel_rms(y, want) < tolerances.BF16_VS_FP32_REL_RMS


def test_every_parameter_has_logical_axis_names():
  stack = blocks.Transformer(_config(mlp="swiglu", num_kv_heads=2, norm="layernorm"))
  abstract = jax.eval_shape(lambda x: stack.init(jax.random.PRNGKey(0), x), _x())
  boxed = jax.tree.leaves(abstract, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert boxed and all(isinstance(v, nn.LogicallyPartitioned) for v in boxed)
  assert all(len(v.names) == len(v.value.shape) for v in boxed)
  specs = nn.get_partition_spec(abstract)["params"]["layer_0"]
  assert specs["attention"]["key"]["kernel"] == jax.sharding.PartitionSpec("embed", "heads", "kv")
  assert specs["attention"]["out"]["kernel"] == jax.sharding.PartitionSpec("heads", "kv", "embed")
  assert specs["mlp"]["wg"]["kernel"] == jax.sharding.PartitionSpec("embed", "mlp")
  assert specs["mlp"]["wo"]["kernel"] == jax.sharding.PartitionSpec("mlp", "embed")
  assert specs["mlp_norm"]["bias"] == jax.sharding.PartitionSpec("norm")


def test_layers_take_their_own_mechanism():
  """A hybrid stack: each block's attention layer is built with its layer's mechanism and kwargs."""
  cfg = _config(mechanisms=("sliding_window", "softmax"),
                mechanism_kwargs=(flax.core.FrozenDict(window=3), flax.core.FrozenDict()))
  seen = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, MultiHeadAttention) and context.method_name == "__call__":
      seen[context.module.path[-2]] = (context.module.mechanism,
                                       dict(context.module.mechanism_kwargs))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: blocks.Transformer(cfg).init(jax.random.PRNGKey(0), x), _x())
  assert seen == {"layer_0": ("sliding_window", {"window": 3}), "layer_1": ("softmax", {})}


def test_config_errors():
  with pytest.raises(ValueError, match="`mlp`"):
    _config(mlp="relu")
  with pytest.raises(ValueError, match="`norm`"):
    _config(norm="batchnorm")
  with pytest.raises(ValueError, match="one per layer"):
    _config(mechanisms=("softmax",), mechanism_kwargs=())
  with pytest.raises(ValueError, match="`kind`"):
    blocks.MLP(8, kind="relu").init(jax.random.PRNGKey(0), _x())
