"""The papers' mechanisms, one module per family; importing a module registers its mechanisms."""

from attnjax.ops import cross  # noqa: F401
from attnjax.ops import decode  # noqa: F401
from attnjax.ops import geometric  # noqa: F401
from attnjax.ops import graph  # noqa: F401
from attnjax.ops import linear  # noqa: F401
from attnjax.ops import local  # noqa: F401
from attnjax.ops import low_rank  # noqa: F401
from attnjax.ops import memory  # noqa: F401
from attnjax.ops import mixers  # noqa: F401
from attnjax.ops import pooling  # noqa: F401
from attnjax.ops import positional  # noqa: F401
from attnjax.ops import quantized  # noqa: F401
from attnjax.ops import softmax  # noqa: F401
from attnjax.ops import sparse  # noqa: F401
from attnjax.ops import theory  # noqa: F401
from attnjax.ops.softmax import dot_product_attention  # noqa: F401
