"""Reference implementations of mode-connectivity methods (pure functions on ``Params``)."""

from .params import Params
from .permutation import Permutation, PermutationSpec

__all__ = ["Params", "Permutation", "PermutationSpec"]
__version__ = "0.1.0"
