"""What `make serve` and `make demo` run before exporting: is the model reachable, and a demo checkpoint.

python -m rerank_server.first_contact check-model MODEL
    exit 0 when MODEL is a local folder, is in the Hugging Face cache, or the hub answers; otherwise
    exit 2 within seconds with what to do (a local checkpoint via MODEL=, or `make demo`), instead
    of a download that retries for minutes.
python -m rerank_server.first_contact demo-checkpoint FOLDER
    write a small ModernBERT cross-encoder with random weights and the real ModernBERT tokenizer
    (tests/fixtures/modernbert-tokenizer), so the whole stack can be tried with no download.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

DEMO_MODEL_ID = "random-modernbert-demo (random weights, not a real reranker)"
# Small (a few MB, quick to export and run on a CPU) but shaped like ModernBERT: local and global
# attention layers, the real tokenizer, inputs up to 8192 tokens.
DEMO_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "local_attention": 128,
    "global_attn_every_n_layers": 3,
    "max_position_embeddings": 8192,
}
TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "modernbert-tokenizer"
HUB_TIMEOUT_S = 5.0


def hub_unreachable(model: str) -> str | None:
    """Why `model` cannot be fetched (None when it is local, cached or reachable)."""
    if Path(model).is_dir():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(model, "config.json"), str):
            return None
    except (ImportError, ValueError, OSError):  # no huggingface_hub, or an odd cache: ask the hub
        pass
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return "HF_HUB_OFFLINE is set and the model is not in the Hugging Face cache"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        with urllib.request.urlopen(f"{endpoint}/api/models/{model}", timeout=HUB_TIMEOUT_S):
            return None
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):  # a gated or private model: the hub is there, let the export say more
            return None
        return f"{endpoint} answered {error.code} for {model!r}"
    except (OSError, ValueError) as error:
        return f"cannot reach {endpoint}: {getattr(error, 'reason', error)}"


def check_model(model: str) -> int:
    reason = hub_unreachable(model)
    if reason is None:
        return 0
    print(
        f"make serve: {model} is not a local folder and cannot be downloaded ({reason}).\n"
        "  Serve a local checkpoint (a ModernBertForSequenceClassification folder saved with its tokenizer):\n"
        "      make serve MODEL=/path/to/gte-reranker-modernbert-base\n"
        "  or try the whole stack (gRPC, HTTP, SDK, CLI) with no download, on a small random-weight model:\n"
        "      make demo",
        file=sys.stderr,
    )
    return 2


def demo_checkpoint(folder: Path) -> int:
    from rerank_server.testing import save_random_checkpoint

    save_random_checkpoint(folder, TOKENIZER_DIR, seed=0, **DEMO_CONFIG)
    print(f"wrote a random-weight ModernBERT to {folder} (not a real reranker: its scores mean nothing)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rerank_server.first_contact")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check-model").add_argument("model")
    commands.add_parser("demo-checkpoint").add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if args.command == "check-model":
        return check_model(args.model)
    return demo_checkpoint(args.folder)


if __name__ == "__main__":
    sys.exit(main())
