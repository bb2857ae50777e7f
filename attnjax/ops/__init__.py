"""The papers' mechanisms, one module per family; importing a module registers its mechanisms."""

from attnjax.ops import additive  # noqa: F401
from attnjax.ops import decode  # noqa: F401
from attnjax.ops import dot_product  # noqa: F401
from attnjax.ops import flex_variants  # noqa: F401
from attnjax.ops import linear_attention  # noqa: F401
from attnjax.ops import low_rank  # noqa: F401
from attnjax.ops import memory_linear  # noqa: F401
from attnjax.ops import mixers  # noqa: F401
from attnjax.ops import ran  # noqa: F401
from attnjax.ops import recurrent_memory  # noqa: F401
from attnjax.ops.dot_product import dot_product_attention  # noqa: F401
