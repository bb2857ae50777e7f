"""Theory papers as runnable mechanisms: hard attention of formal-language analyses (#203),
attention as a posterior marginal (#36) and triple (Kronecker) attention over key pairs (#178)."""

from attnjax.ops.theory.hard import hard_attention
from attnjax.ops.theory.marginal import marginal_attention
from attnjax.ops.theory.triple import triple_attention

__all__ = ["hard_attention", "marginal_attention", "triple_attention"]
