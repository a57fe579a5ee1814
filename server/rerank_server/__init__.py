"""The tokenizing gRPC frontend of the rerank service, its Triton backend, and the model export."""

import rerank_triton_model  # noqa: F401  # first: it sets OpenMP's wait policy before anything loads torch
