"""Source-tree stand-in for ``muscle_fast.kernels``.

Installed wheels map the top-level ``csrc_triton/`` folder to ``muscle_fast.kernels`` (see
pyproject.toml) and do not contain this file. When muscle_fast is imported straight from a
checkout (``python -m pytest`` puts the checkout first on sys.path), this package points its
search path at ``csrc_triton/`` so that the same kernels load.
"""

import os

__path__ = [
    os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc_triton")
]
