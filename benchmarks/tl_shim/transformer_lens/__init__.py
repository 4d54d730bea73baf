"""A stand-in ``transformer_lens`` package that hands TransformerLens's FactoredMatrix tests attnlens's class.

Only for ``benchmarks/tl_factored_tests.py``: it is put first on ``PYTHONPATH`` so that ``from transformer_lens import
FactoredMatrix`` (and ``utilities``, or ``utils`` before 4.0) in those tests imports attnlens. It is never installed and holds no TransformerLens code.
"""

from attnlens.factored import FactoredMatrix

from . import utilities
from . import utilities as utils

__all__ = ["FactoredMatrix", "utilities", "utils"]
