"""The Triton model: a Python-backend model (model.py) over the reranker engines, as a package.

`rerank export` copies this package into a model's version folder, <output>/<name>/1/rerank_triton_model/,
beside a model.py of one import (ENTRY_POINT): Triton's stub loads <name>/1/model.py, and that file puts
its own folder first on sys.path so the copy, not any installed version, is what runs. It also renders
CONFIG_TEMPLATE into <name>/config.pbtxt; the weights and the tokenizer it writes itself.

Importing the package imports nothing heavy: the frontend uses contract, cpu_features and reranker_engine
(numpy only), and only model.py needs Triton's triton_python_backend_utils.
"""

import hashlib
import os
from functools import cache
from pathlib import Path

# The PyTorch engines' OpenMP threads wait passively (sleep) between parallel regions rather than spin. Spinning
# threads take the cycles of whatever shares the cores (Triton's and the frontend's threads, another instance, a
# neighbour): with one of 2 cores busy elsewhere, the packed engine took 2.5x its quiet time spinning and 1.8x
# passive, and 3-4% less time quiet too (docs/performance.md, Decisions). libgomp reads it once, when torch loads:
# set on import of this package, which Triton's stub (model.py), `rerank` and the benchmarks import before torch.
# An OMP_WAIT_POLICY set by the operator wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_TEMPLATE = PACKAGE_DIR / "config.pbtxt.template"


@cache
def package_digest() -> str:
    """A digest of this package's sources and config template: the export records it, and the frontend
    compares it with its own to tell when Triton runs model code another version of the service exported."""
    digest = hashlib.sha256()
    for path in sorted([*PACKAGE_DIR.glob("*.py"), CONFIG_TEMPLATE]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


# <name>/1/model.py: what Triton's stub imports.
ENTRY_POINT = '''"""Written by `rerank export`: the model is the package rerank_triton_model/ beside this file."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # this copy, before any installed one
from rerank_triton_model.model import TritonPythonModel  # noqa: E402

__all__ = ["TritonPythonModel"]
'''
