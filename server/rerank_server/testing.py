"""Helpers for tests and benchmarks: ModernBERT rerankers with random weights, saved like real ones, and
readiness asked of the gRPC health service (as a probe would), never read from printed output.

Checkpoints are written with a real tokenizer so that tokenization, truncation and lengths are the
production ones; only the weights are random (cost does not depend on them). Needs the `export`
extra (torch, transformers).
"""

from __future__ import annotations

import functools
import json
import random
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rerank_server.triton_launcher import port_taken
from rerank_triton_model.contract import ModelParameters

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


def narrow_logits(source: Path, folder: Path, logits: Any, std: float = 0.3, centre: float = 2.5) -> Path:
    """`source` saved to `folder` with its classifier rescaled so that `logits` (source's fp32 logits of some
    inputs) become `std` around `centre`: close candidates, which fp32 keeps apart and a bf16 logit would
    round together (its steps between 2 and 4 are 1/64). The head is linear, so every logit moves alike."""
    import numpy as np
    import torch
    from transformers import ModernBertForSequenceClassification

    values = np.asarray(logits, dtype=np.float64)
    scale = std / float(values.std())
    model = ModernBertForSequenceClassification.from_pretrained(source).eval()
    bias = model.classifier.bias
    if bias is None:
        raise ValueError("the source's classifier has no bias to centre the logits with")
    with torch.no_grad():
        model.classifier.weight.mul_(scale)
        bias.copy_((bias - float(values.mean())) * scale + centre)
    shutil.copytree(source, folder)
    model.save_pretrained(folder)
    return folder


# One entry of config.pbtxt's parameters block; export.render_config writes keys and values JSON-quoted.
_PARAMETER = re.compile(r'key: ("(?:[^"\\]|\\.)*") value: \{ string_value: ("(?:[^"\\]|\\.)*") \}')


def exported_parameters(model_dir: Path) -> ModelParameters:
    """The typed parameters of a model folder written by `rerank export`, read from its config.pbtxt."""
    text = (model_dir / "config.pbtxt").read_text()
    return ModelParameters.from_strings({json.loads(k): json.loads(v) for k, v in _PARAMETER.findall(text)})


_HANDED_OUT: set[int] = set()
# Ports for servers are picked below the kernel's ephemeral range, where it takes the local ports of outgoing
# connections: a picked port not yet bound (a server exporting its model first) cannot become one of the
# many client connections' ports meanwhile. Seeded from the OS: each process picks its own sequence.
_LOWEST_PORT = 10_000
_RANDOM = random.Random()


@functools.cache
def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def free_port() -> int:
    """A TCP port nothing listens on now, on any interface (tests and benchmarks start servers on such ports), and
    not one this process was given before: a port picked for one server and not yet bound is free again to
    the kernel, and two gRPC servers given the same port share it silently (SO_REUSEPORT), so a client
    would reach either."""
    high = _ephemeral_low()
    for _ in range(1000):
        if high - _LOWEST_PORT >= 1000:
            port = _RANDOM.randrange(_LOWEST_PORT, high)
            if port in _HANDED_OUT or port_taken(port):
                continue
        else:  # an unusual ephemeral range: the kernel's pick
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port in _HANDED_OUT:
                continue
        break
    _HANDED_OUT.add(port)
    return port


def health_status(
    target: str,
    service: str = "",
    credentials: grpc.ChannelCredentials | None = None,
    timeout_s: float = 5.0,
) -> int:
    """What the gRPC health service at target says of `service` ("" is the server as a whole), over
    plaintext or, with credentials, TLS. Raises grpc.RpcError when it cannot answer."""
    with _channel(target, credentials) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout_s).status)


def wait_for_health(
    target: str,
    timeout_s: float,
    *,
    serving: bool = True,
    service: str = "",
    credentials: grpc.ChannelCredentials | None = None,
    process: subprocess.Popen[bytes] | None = None,
) -> bool:
    """Wait until the health service at target says SERVING (serving=False: anything else, or no answer),
    the way a Kubernetes readiness probe asks; False if timeout_s passed or `process` exited first."""
    deadline = time.monotonic() + timeout_s
    request = health_pb2.HealthCheckRequest(service=service)
    with _channel(target, credentials) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and (process is None or process.poll() is None):
            try:
                answer = health.Check(request, timeout=2)
                if (answer.status == health_pb2.HealthCheckResponse.SERVING) == serving:
                    return True
            except grpc.RpcError:  # not listening (yet, or any more), or the service is not set yet
                if not serving:
                    return True
            time.sleep(0.1)
    return False


def wait_until_serving(
    target: str,
    process: subprocess.Popen[bytes],
    timeout_s: float,
    credentials: grpc.ChannelCredentials | None = None,
) -> bool:
    """Wait until `rerank serve` at target answers its health service SERVING: the model is ready and
    every API surface listens. False if the process exited or timeout_s passed first."""
    return wait_for_health(target, timeout_s, credentials=credentials, process=process)


# gRPC's reconnect backoff (triton_backend.RECONNECT_OPTIONS says why it matters) would let a poller started
# before the server listens see it seconds late; a poller lives only until it sees it: retry every 100 ms.
_POLL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 100)]


def _channel(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(target, options=_POLL_OPTIONS)
    return grpc.secure_channel(target, credentials, options=_POLL_OPTIONS)
