"""Attention-free token mixers that papers offer as drop-in replacements for self-attention.

Each paper's mixer reads one stream, the layer input x, with no query-key scores. Here that stream
is each head's values `v` (the head-space image of x): every mixer here declares
`reads=frozenset({"v"})`, never depends on `q` or `k` (it takes them only for their shapes and the
common call contract of `attnjax.registry`), and `attnjax.nn.MultiHeadAttention` creates no query
or key projection for it. Self-attention only: the keys are the queries' own tokens, T == S, or a
KV cache of them when decoding. There are no scores, so `scale` must stay None (anything else is a
ValueError). Learned arrays are explicit keyword arguments (`Mechanism.params`; the layer creates
them, with the value width h equal to the head dim H as in that layer). Arrays indexed by position
have a fixed maximum length L (their first dimension); a longer sequence is a clear error. The
input preparation they share (GQA, padding, packed runs, KV-cache rows) is `attnjax.core.mixing`.

  fftnet.py           fftnet_spectral_filter: FFT along the sequence, adaptive spectral filter,
                      modReLU, inverse FFT (Fein-Ashley, "The FFT Strikes Back", arXiv:2502.18394).
  pairwise.py         causal_pairwise_mixer: a learned function of each token and its
                      predecessor, plus a running mean (Hilsenbek, "Breaking the Attention
                      Bottleneck", arXiv:2406.10906).
  ffn_replacement.py  ffn_attention_replacement: a shallow FFN over the flattened, padded sequence
                      (Bozic et al., "Rethinking Attention", arXiv:2311.10642), trained end to end
                      here (the paper's distillation from attention is not implemented).

Packed sequences (`segment_ids`) are taken as contiguous runs: a token mixes only tokens of its own
run, and positions (for position-indexed weights) restart at each run's first token. Every
statistic (context means, running sums) is per example: no example of a batch affects another.

Importing this package registers the mechanisms.
"""

from attnjax.core.mixing import DEFAULT_MAX_LENGTH
from attnjax.ops.mixers.ffn_replacement import ffn_attention_replacement
from attnjax.ops.mixers.fftnet import fftnet_spectral_filter, modrelu, spectral_filter
from attnjax.ops.mixers.pairwise import causal_pairwise_mixer

__all__ = ["DEFAULT_MAX_LENGTH", "causal_pairwise_mixer", "ffn_attention_replacement",
           "fftnet_spectral_filter", "modrelu", "spectral_filter"]
