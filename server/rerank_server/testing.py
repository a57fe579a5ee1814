"""Helpers for tests and benchmarks: ModernBERT rerankers with random weights, saved like real ones.

Checkpoints are written with a real tokenizer so that tokenization, truncation and lengths are the
production ones; only the weights are random (cost does not depend on them). Needs the `export`
extra (torch, transformers).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

# Small enough for fast correctness tests, with more than one global and one local attention layer.
TINY_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "local_attention": 16,
    "max_position_embeddings": 512,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def save_random_checkpoint(folder: Path, tokenizer_dir: Path, seed: int = 0, **config: Any) -> Path:
    """Save a ModernBertForSequenceClassification (num_labels=1, random weights) and the tokenizer.

    `config` overrides transformers' ModernBertConfig() defaults, which are ModernBERT-base's sizes.
    """
    import torch
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    torch.manual_seed(seed)
    model = ModernBertForSequenceClassification(ModernBertConfig(**{**config, "num_labels": 1}))
    # Random init draws small weights; widen the head so that logits spread and rankings differ.
    with torch.no_grad():
        model.classifier.weight.mul_(20.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy2(tokenizer_dir / name, folder / name)
    return folder


def free_port() -> int:
    """A TCP port free on the loopback interface now (tests and benchmarks start servers on such ports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_serving(target: str, process: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Wait until `rerank serve` at target (plaintext gRPC) answers its health service SERVING, the way a
    Kubernetes readiness probe asks; False if the process exited or timeout_s passed first."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and process.poll() is None:
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass  # not listening yet
            time.sleep(0.3)
    return False
