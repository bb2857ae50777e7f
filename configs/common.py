"""Shared pieces of the experiment configs (configs/*.py): the default training fields and the
`"mechanism=<name>,size=<s>"` argument of `get_config(arg)`.

Imports nothing of attnjax: a config is loaded while flags are parsed, before
`jax.distributed.initialize`, and importing attnjax touches the JAX backend.

Every training config has the sections

  task       the data config (attnjax.data.make_task): name, seed and task fields
  model      the model config (attnjax.models.build_model; schema attnjax.models.ModelConfig)
  optimizer  name ("adamw"), learning_rate, warmup_steps, decay ("cosine" | "constant"),
             weight_decay, b1, b2, eps, clip_norm, grad_accum_steps
  train      num_steps, batch_size, eval_batch_size, eval_every, eval_batches, log_every,
             checkpoint_every, keep_checkpoints, best_metric, seed, mixed_precision,
             async_checkpoints
  mesh       data, fsdp, tensor, context: axis sizes (data -1: every device not used by the others)
  logical_axis_rules  None (attnjax.parallel.DEFAULT_LOGICAL_AXIS_RULES) or (logical, mesh) pairs

`optimizer.warmup_steps`, `train.eval_every` and `train.checkpoint_every` are None: they follow
`train.num_steps` at the start of the run (attnjax.train.validate.resolve_config: warm-up
min(100, steps // 10), eval and checkpoint 5 times a run), so `--config.train.num_steps=100` alone
gives a sensible schedule; set them to override. Fields that may be None (`model.num_kv_heads`,
`model.layer_mechanisms`, `model.rope_base`, ...) are typed placeholders, so
`--config.model.num_kv_heads=1` works on the command line. `python -m experiments.train
--config=configs/<task>.py --show_config` prints every field of a config.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections


def parse_arg(arg: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
  """Parses "key=value,key=value" over `defaults` (values keep the defaults' types).

  Raises:
    ValueError: an unknown key or a malformed item.
  """
  out = dict(defaults)
  for item in filter(None, (s.strip() for s in (arg or "").split(","))):
    if "=" not in item:
      raise ValueError(f"config argument {item!r}: expected key=value (keys: {sorted(defaults)})")
    key, value = (s.strip() for s in item.split("=", 1))
    if key not in defaults:
      raise ValueError(f"config argument {key!r}: unknown key; known: {sorted(defaults)}")
    default = defaults[key]
    if default is None or isinstance(default, str):
      out[key] = value
      continue
    try:
      out[key] = type(default)(value)
    except ValueError:
      raise ValueError(f"config argument {key}={value!r}: expected {type(default).__name__} "
                       f"(e.g. {key}={default})") from None
  return out


def pick_size(sizes: Mapping[str, Mapping[str, Any]], size: str) -> Mapping[str, Any]:
  if size not in sizes:
    raise ValueError(f"config argument size={size!r}: known sizes {sorted(sizes)}")
  return sizes[size]


def base_config() -> ml_collections.ConfigDict:
  """Every training field at its default; a task config fills task and model. None fields are
  typed placeholders (overridable from the command line); the schedule fields follow num_steps."""
  placeholder = ml_collections.config_dict.placeholder
  config = ml_collections.ConfigDict()

  config.task = ml_collections.ConfigDict()
  config.task.name = "mqar"  # attnjax.data task name
  config.task.seed = 0  # data seed

  # The fields of attnjax.models.ModelConfig (attnjax/models/config.py documents each).
  config.model = ml_collections.ConfigDict()
  config.model.arch = "decoder_lm"  # "decoder_lm" | "encoder_classifier" | "vit"
  config.model.width = 64  # residual width D
  config.model.depth = 2  # number of blocks
  config.model.num_heads = 2  # query heads N (divides width)
  config.model.num_kv_heads = placeholder(int)  # key/value heads K (None: N; divides N)
  config.model.mlp_dim = 128  # MLP hidden width
  config.model.mlp = "gelu"  # "gelu" | "swiglu"
  config.model.norm = "rmsnorm"  # "rmsnorm" | "layernorm"
  config.model.mechanism = "softmax"  # registry name of every layer's attention
  config.model.mechanism_kwargs = {}  # the mechanism's keyword arguments (e.g. window)
  # None, a list of names (one per layer) or a schedule string "every <n>: <name>".
  config.model.layer_mechanisms = placeholder(object)
  config.model.rope_base = placeholder(float)  # None: no RoPE
  # None, or a Hugging Face rope_scaling dict ({"rope_type": "yarn", "factor": 4.0, ...}).
  config.model.rope_scaling = placeholder(object)
  config.model.fope = placeholder(object)  # None, or FoPE settings {"train_length": L, "sigma": σ}
  # None, one bool per layer, or "every <n>: nope" (RNoPE: those layers without RoPE).
  config.model.layer_rope = placeholder(object)
  # decoder_lm: None, or TidalDecode on decode steps {"top_k": k, "selection_layer": 2}.
  config.model.tidal_decode = placeholder(object)
  config.model.position_embedding = "learned"  # "learned" | "none"
  config.model.tie_embeddings = False  # decoder_lm: logits through the input embedding
  config.model.pooling = "mean"  # classifiers: "mean" | "cls"
  config.model.dropout = 0.0  # residual / embedding dropout rate
  config.model.dtype = "float32"  # compute dtype ("float32" | "bfloat16")
  config.model.param_dtype = "float32"  # parameter dtype

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"  # attnjax.train.optim.OPTIMIZERS
  config.optimizer.learning_rate = 1e-3  # peak learning rate
  config.optimizer.warmup_steps = placeholder(int)  # None: min(100, updates // 10)
  config.optimizer.decay = "cosine"  # "cosine" | "constant" after the warm-up
  config.optimizer.weight_decay = 0.1  # decoupled weight decay
  config.optimizer.b1 = 0.9  # Adam beta1
  config.optimizer.b2 = 0.98  # Adam beta2
  config.optimizer.eps = 1e-8  # Adam epsilon
  config.optimizer.clip_norm = 1.0  # global gradient-norm clip
  config.optimizer.grad_accum_steps = 1  # micro-batches per update

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 1000  # training steps
  config.train.batch_size = 64  # global batch size
  config.train.eval_batch_size = 256  # global eval batch size
  config.train.eval_every = placeholder(int)  # None: num_steps // 5
  config.train.eval_batches = 4  # batches per evaluation
  config.train.log_every = 50  # steps between metric logs
  config.train.checkpoint_every = placeholder(int)  # None: num_steps // 5
  config.train.keep_checkpoints = 2  # latest checkpoints kept (plus the best one)
  config.train.best_metric = "eval_accuracy"  # ranks checkpoints to keep the best one
  config.train.seed = 0  # parameter init and step RNG seed
  config.train.mixed_precision = False  # bfloat16 compute, float32 parameters
  config.train.async_checkpoints = True  # save checkpoints in the background
  # Redraw fixed random arrays (the 'buffers', e.g. FAVOR+'s features) every n steps; 0: never.
  config.train.redraw_buffers_every = 0
  # Attention-map penalty added to the training loss (attnjax.train.regularizers): None (off) or
  # {"name": "deceive" | "entropy" | "diversity", "weight": λ, ...its settings}; see that module.
  config.train.attention_regularizer = None
  # Quantization / pruning of the model's kernels by attention (attnjax.train.weight_methods): None
  # (off) or {"name": "dqa" | "aswl", ...its settings}; see that module.
  config.train.weight_method = None

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # data-parallel axis (-1: every device not used by the others)
  config.mesh.fsdp = 1  # parameter-sharding axis
  config.mesh.tensor = 1  # tensor-parallel axis
  config.mesh.context = 1  # sequence axis

  # None: attnjax.parallel.DEFAULT_LOGICAL_AXIS_RULES; else (logical axis, mesh axes) pairs.
  config.logical_axis_rules = placeholder(tuple)
  return config


def set_model(config: ml_collections.ConfigDict, args: Mapping[str, Any], *, width: int,
              arch: str = "decoder_lm"):
  """Architecture, width (MLP 2·width), mechanism and (when `window` is given) its window."""
  config.model.arch = arch
  config.model.width = width
  config.model.mlp_dim = 2 * width
  config.model.mechanism = args["mechanism"]
  if args.get("window"):
    config.model.mechanism_kwargs = {"window": args["window"]}


def set_schedule(config: ml_collections.ConfigDict, *, num_steps: int, batch_size: int,
                 learning_rate: float):
  """Steps, batch and peak rate. Warm-up (10%, at most 100 steps) and the eval and checkpoint
  cadence (5 times a run) stay None: they are derived from train.num_steps when the run starts,
  so they follow an override of num_steps."""
  config.optimizer.learning_rate = learning_rate
  config.train.num_steps = num_steps
  config.train.batch_size = batch_size
