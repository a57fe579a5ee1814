"""HTTP/JSON surfaces beside gRPC over the same scoring core: Cohere v1/v2 and Jina (cohere.py), Hugging
Face TEI (tei.py) and NVIDIA NIM (nim.py); the call policy (gate.py), errors in each API's own shape
(errors.py) and the server on the gRPC server's event loop (server.py)."""
