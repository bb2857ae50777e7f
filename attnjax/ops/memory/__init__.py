"""Memory mechanisms: attention that carries the context in a recurrent or compressive memory.

  mega      Mega: damped multi-dim EMA + gated single-head attention (arXiv:2209.10655)
  sha_rnn   SHA-RNN's single-headed attention over a memory (arXiv:1911.11423)
  infini    Infini-attention: local softmax + compressive linear memory (arXiv:2404.07143)
  lavo      LAVO: orthogonal-memory slots + local window (arXiv:2312.11135)
  chela     CHELA: short-long convolutions + tiled linear attention (arXiv:2406.08128)
  ran       Recurrent Attention Network: windows + a Global Perception Cell (arXiv:2306.06843)

Importing this package registers the mechanisms.
"""

from attnjax.ops.memory.chela import chela_attention
from attnjax.ops.memory.infini import infini_attention, infini_memory
from attnjax.ops.memory.lavo import orthogonal_basis, orthogonal_memory_attention
from attnjax.ops.memory.mega import mega_attention
from attnjax.ops.memory.ran import gpc_states, recurrent_attention_network
from attnjax.ops.memory.sha_rnn import sha_rnn_attention

__all__ = ["chela_attention", "infini_attention", "infini_memory", "orthogonal_basis",
           "orthogonal_memory_attention", "mega_attention", "gpc_states",
           "recurrent_attention_network", "sha_rnn_attention"]
