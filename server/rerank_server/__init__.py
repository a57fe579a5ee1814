"""The tokenizing gRPC frontend of the rerank service, its Triton backend, and the model export."""
