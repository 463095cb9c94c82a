"""How the application starts another Python process of its own: with the safe path.

`python -m ...` puts the working directory first on `sys.path`; run from a checkout, the repository's
top-level `kernels/` would then shadow Hugging Face's `kernels` package, which transformers imports.
PYTHONSAFEPATH (Python 3.11+) keeps it off, and every process started below inherits it (torchrun's too).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping


def safe_path_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (this process's environment by default) with the safe path switched on."""
    return {**(os.environ if env is None else env), "PYTHONSAFEPATH": "1"}


def python_module_command(module: str, *args: str) -> list[str]:
    """`python -m module args` in this interpreter."""
    return [sys.executable, "-m", module, *args]
