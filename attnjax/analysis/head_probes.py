"""What BERT's heads look at: the head probes of Clark et al.

Clark, Khandelwal, Levy & Manning, "What Does BERT Look At? An Analysis of BERT's Attention",
arXiv:1906.04341.

  special_token_shares(weights, ids, lengths, ...)  per head: mean weight on [CLS], [SEP], and on
                                  punctuation (section 3)
  word_maps(weights, word_ids)    token maps -> word maps: attention *to* a split word is the sum over
                                  its word pieces, attention *from* it the mean (section 4.1)
  most_attended_accuracy(...)     per head: the share of dependents whose most-attended other word
                                  is their syntactic head (or, `reverse=True`, of heads whose most-
                                  attended other word is the dependent) (section 4.2)
  offset_baseline(arcs)           the best fixed-offset predictor the paper compares heads against
  fit_attention_probe / probe_accuracy  the attention-only probe (section 5):
                                  p(i | j) ∝ exp(Σ_k w_k α^k_ij + u_k α^k_ji), i the head of word j,
                                  α^k the word maps of head k (all layers' heads), trained by CE
  LABELLED                        12 sentences written and hand-labelled for this project, with their
                                  determiner, direct-object and subject arcs (dependent, head)
  probe_encoder(enc)              all of the above on a `attnjax.pretrained` encoder

Word maps drop [CLS] / [SEP] (they are not words); a word never counts as its own head.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attnjax import catalog
from attnjax.analysis import statistics

__all__ = ["LABELLED", "Arc", "fit_attention_probe", "most_attended_accuracy", "offset_baseline",
           "probe_accuracy", "probe_encoder", "special_token_shares", "word_maps"]

Arc = tuple[int, int, str]   # (dependent word, head word, relation), word indices from 0

# Words are separated by spaces (punctuation too), so a word-piece tokenizer's word ids index them.
LABELLED: tuple[tuple[str, tuple[Arc, ...]], ...] = (
    ("the old man saw a small dog in the park .",
     ((0, 2, "det"), (4, 6, "det"), (8, 9, "det"), (6, 3, "dobj"), (2, 3, "nsubj"))),
    ("my sister bought a new red car yesterday .", ((3, 6, "det"), (6, 2, "dobj"), (1, 2, "nsubj"))),
    ("the children quickly ate the warm bread .",
     ((0, 1, "det"), (4, 6, "det"), (6, 3, "dobj"), (1, 3, "nsubj"))),
    ("a tired farmer fixed the broken old fence near the barn .",
     ((0, 2, "det"), (4, 7, "det"), (9, 10, "det"), (7, 3, "dobj"), (2, 3, "nsubj"))),
    ("the teacher gave the students a difficult test .",
     ((0, 1, "det"), (3, 4, "det"), (5, 7, "det"), (7, 2, "dobj"), (1, 2, "nsubj"))),
    ("our neighbours painted the tall wooden gate green .",
     ((3, 6, "det"), (6, 2, "dobj"), (1, 2, "nsubj"))),
    ("the dog chased a cat across the busy street .",
     ((0, 1, "det"), (3, 4, "det"), (6, 8, "det"), (4, 2, "dobj"), (1, 2, "nsubj"))),
    ("she reads an interesting book every evening .",
     ((2, 4, "det"), (5, 6, "det"), (4, 1, "dobj"), (0, 1, "nsubj"))),
    ("the small company hired three new engineers last month .",
     ((0, 2, "det"), (6, 3, "dobj"), (2, 3, "nsubj"))),
    ("a young woman opened the heavy door of the old house .",
     ((0, 2, "det"), (4, 6, "det"), (8, 10, "det"), (6, 3, "dobj"), (2, 3, "nsubj"))),
    ("the wind broke the big window in the kitchen .",
     ((0, 1, "det"), (3, 5, "det"), (7, 8, "det"), (5, 2, "dobj"), (1, 2, "nsubj"))),
    ("my brother cooked a delicious spicy soup for dinner .",
     ((3, 6, "det"), (6, 2, "dobj"), (1, 2, "nsubj"))),
)


def special_token_shares(weights, ids, lengths, special: dict[str, int],
                         punctuation_ids: Sequence[int] = ()) -> dict[str, np.ndarray]:
  """`{name: [..., N]}`: each head's mean weight on the tokens with id `special[name]` (e.g.
  {"[CLS]": 101, "[SEP]": 102}), and on `punctuation_ids` as "punctuation" when given, over the
  valid query rows (`attnjax.analysis.statistics.key_share`). `weights [..., B, N, T, S]`,
  `ids [B, S]`."""
  ids = np.asarray(ids)
  out = {name: statistics.key_share(weights, ids == i, lengths) for name, i in special.items()}
  if len(punctuation_ids):
    out["punctuation"] = statistics.key_share(weights, np.isin(ids, punctuation_ids), lengths)
  return out


def word_maps(weights, word_ids: Sequence[Optional[int]]) -> np.ndarray:
  """`[..., W, W]` word-level maps of one example from its token maps `[..., T, S]` (T = S = the
  example's tokens, or more: padding past `len(word_ids)` is ignored): row a, column b =
  mean over a's pieces of the sum over b's pieces. `word_ids[t]` is token t's word (None for special
  tokens), as `tokenizers.Encoding.word_ids` gives it."""
  w = np.asarray(weights, np.float64)
  words = [i for i in word_ids if i is not None]
  if not words:
    raise ValueError("word_maps: word_ids has no word")
  W = max(words) + 1
  if len(word_ids) > min(w.shape[-2:]):
    raise ValueError(f"word_maps: {len(word_ids)} word ids for maps of shape {w.shape}")
  member = np.zeros((len(word_ids), W))
  for t, i in enumerate(word_ids):
    if i is not None:
      member[t, i] = 1.0
  counts = member.sum(0)
  if (counts == 0).any():
    raise ValueError(f"word_maps: words {np.flatnonzero(counts == 0).tolist()} have no token")
  n = len(word_ids)
  to_words = w[..., :n, :n] @ member                           # [..., T, W]: sums over b's pieces
  return np.swapaxes(np.swapaxes(to_words, -1, -2) @ (member / counts), -1, -2)


def _predictions(maps: np.ndarray, rows: Sequence[int]) -> np.ndarray:
  """Most-attended other word of each row `[..., len(rows)]`."""
  m = maps[..., list(rows), :].copy()
  m[..., np.arange(len(rows)), list(rows)] = -np.inf           # never a word's own head
  return m.argmax(-1)


@catalog.serves(128, kind="analysis", name="attnjax.analysis.head_probes.most_attended_accuracy")
def most_attended_accuracy(maps: Sequence[np.ndarray], arcs: Sequence[Sequence[Arc]],
                           relation: Optional[str] = None, reverse: bool = False) -> np.ndarray:
  """`[..., N]`: per head, the share of the arcs (of `relation`, or all) predicted by attention.

  Args:
    maps: one `[..., N, W, W]` word map per sentence (`word_maps`).
    arcs: per sentence, its `(dependent, head, relation)` arcs.
    relation: keep only these arcs.
    reverse: predict the dependent from the head's row (Clark et al. report, per relation, the
      better direction).
  """
  if len(maps) != len(arcs):
    raise ValueError(f"most_attended_accuracy: {len(maps)} maps for {len(arcs)} arc lists")
  hits, total = 0.0, 0
  for m, sentence in zip(maps, arcs, strict=True):
    chosen = [(d, h) for d, h, r in sentence if relation is None or r == relation]
    if not chosen:
      continue
    src, dst = ([h for _, h in chosen], [d for d, _ in chosen]) if reverse else (
        [d for d, _ in chosen], [h for _, h in chosen])
    hits = hits + (_predictions(np.asarray(m), src) == np.asarray(dst)).sum(-1)
    total += len(chosen)
  if not total:
    raise ValueError(f"most_attended_accuracy: no arc of relation {relation!r}")
  return np.asarray(hits, np.float64) / total


def offset_baseline(arcs: Sequence[Sequence[Arc]], relation: Optional[str] = None,
                    reverse: bool = False) -> tuple[int, float]:
  """`(offset, accuracy)` of the best fixed-offset predictor (the head is `offset` words after the
  dependent) on the arcs, the baseline of Clark et al.'s table 1."""
  offs = [(d - h) if reverse else (h - d) for s in arcs for d, h, r in s
          if relation is None or r == relation]
  if not offs:
    raise ValueError(f"offset_baseline: no arc of relation {relation!r}")
  values, counts = np.unique(offs, return_counts=True)
  return int(values[counts.argmax()]), float(counts.max() / len(offs))


def _probe_features(maps: np.ndarray) -> np.ndarray:
  """`[W, W, 2K]` features of candidate head i for word j: α^k_ji (j attends i) and α^k_ij, over the
  K = layers x heads heads (`maps [..., W, W]`, leading axes flattened)."""
  m = np.asarray(maps, np.float64).reshape(-1, *np.shape(maps)[-2:])   # [K, W, W]
  return np.concatenate([np.moveaxis(m, 0, -1).swapaxes(0, 1), np.moveaxis(m, 0, -1)], -1)


def _probe_logits(params, feats):
  return feats @ params                                                # [W(j), W(i)]


def fit_attention_probe(maps: Sequence[np.ndarray], arcs: Sequence[Sequence[Arc]],
                        relation: Optional[str] = None, steps: int = 300,
                        learning_rate: float = 0.1, seed: int = 0) -> np.ndarray:
  """The attention-only probe's weights `[2K]` (w then u), trained by cross-entropy of
  p(head | dependent) with Adam on the given arcs (Clark et al., section 5)."""
  data = [(_probe_features(m), [(d, h) for d, h, r in s if relation is None or r == relation])
          for m, s in zip(maps, arcs, strict=True)]
  data = [(f, a) for f, a in data if a]
  if not data:
    raise ValueError(f"fit_attention_probe: no arc of relation {relation!r}")

  def loss(params):
    total = 0.0
    for feats, chosen in data:
      logits = _probe_logits(params, jnp.asarray(feats, jnp.float32))
      eye = jnp.eye(logits.shape[0], dtype=bool)                       # a word is not its own head
      logp = jax.nn.log_softmax(jnp.where(eye, -jnp.inf, logits), -1)
      total = total - sum(logp[d, h] for d, h in chosen)
    return total / sum(len(a) for _, a in data)

  params = 0.01 * jax.random.normal(jax.random.PRNGKey(seed), (data[0][0].shape[-1],))
  opt = optax.adam(learning_rate)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    updates, state = opt.update(jax.grad(loss)(params), state)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return np.asarray(params)


def probe_accuracy(params: np.ndarray, maps: Sequence[np.ndarray], arcs: Sequence[Sequence[Arc]],
                   relation: Optional[str] = None) -> float:
  """The share of arcs whose head is the probe's argmax over the other words."""
  hits = total = 0
  for m, s in zip(maps, arcs, strict=True):
    logits = _probe_logits(np.asarray(params), _probe_features(m))
    np.fill_diagonal(logits, -np.inf)
    for d, h, r in s:
      if relation is None or r == relation:
        hits += int(logits[d].argmax() == h)
        total += 1
  if not total:
    raise ValueError(f"probe_accuracy: no arc of relation {relation!r}")
  return hits / total


def probe_encoder(enc, sentences=LABELLED) -> dict:
  """Clark et al.'s probes on a pretrained encoder (`attnjax.pretrained.load(...)`): its word maps of
  `sentences` `[(text, arcs)]`, per relation the best head (layer, head, accuracy, direction) and
  the best offset baseline, and the special-token shares `[layers, heads]`."""
  texts = [t for t, _ in sentences]
  arcs = [a for _, a in sentences]
  weights = enc.attention_maps(texts)                                  # [L, n, N, T, T]
  ids, lengths = enc.tokenize(texts)
  encodings = enc.tokenizer.encode_batch(texts)
  maps = []
  for i, (text, e) in enumerate(zip(texts, encodings, strict=True)):
    if max(x for x in e.word_ids if x is not None) + 1 != len(text.split()):
      raise ValueError(f"probe_encoder: the tokenizer splits {text!r} into other words than spaces do")
    maps.append(word_maps(weights[:, i], e.word_ids))
  vocab = enc.tokenizer.get_vocab()
  special = {s: vocab[s] for s in ("[CLS]", "[SEP]") if s in vocab}
  punct = [vocab[p] for p in (".", ",") if p in vocab]
  out = {"special": special_token_shares(weights, ids, lengths, special, punct), "relations": {}}
  for relation in sorted({r for a in arcs for _, _, r in a}):
    best = None
    for reverse in (False, True):
      acc = most_attended_accuracy(maps, arcs, relation, reverse)
      layer, head = np.unravel_index(acc.argmax(), acc.shape)
      if best is None or acc.max() > best["accuracy"]:
        best = {"layer": int(layer), "head": int(head), "accuracy": float(acc.max()),
                "direction": "head->dependent" if reverse else "dependent->head",
                "offset_baseline": offset_baseline(arcs, relation, reverse)[1]}
    out["relations"][relation] = best
  return out
