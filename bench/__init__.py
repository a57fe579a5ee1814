"""The benchmarks (docs/performance.md)."""

import rerank_triton_model  # noqa: F401  # first: its OpenMP wait policy, as the served model has it
