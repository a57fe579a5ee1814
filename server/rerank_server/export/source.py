"""The checkpoint being exported: what is accepted, and loading it (fp32 eager model, fast tokenizer)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from rerank_server.export.options import ExportError, ExportOptions

ARCHITECTURE = "ModernBertForSequenceClassification"
Progress = Callable[[str], None]


class Steps:
    """Numbered progress lines with timings: `[2/6] Loading the model ... done in 1.2s`."""

    def __init__(self, total: int, progress: Progress) -> None:
        self.total, self.done, self.progress = total, 0, progress

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.done += 1
        self.progress(f"[{self.done}/{self.total}] {title} ...")
        start = time.perf_counter()
        yield
        self.progress(f"[{self.done}/{self.total}] {title}: done in {time.perf_counter() - start:.1f}s")


def check_config(config: Any) -> None:
    """Refuse anything that is not a single-logit ModernBERT sequence classifier."""
    model_type = getattr(config, "model_type", None)
    architectures = list(getattr(config, "architectures", None) or [])
    if model_type != "modernbert":
        raise ExportError(f"expected a ModernBERT checkpoint (model_type 'modernbert'), got model_type {model_type!r}")
    if ARCHITECTURE not in architectures:
        raise ExportError(
            f"expected a {ARCHITECTURE} checkpoint, got architectures {architectures or 'none'}: "
            "a base or masked-LM ModernBERT has no trained scoring head"
        )
    if config.num_labels != 1:
        raise ExportError(f"expected a cross-encoder with one output logit, got num_labels={config.num_labels}")


@dataclass(frozen=True)
class Source:
    """The checkpoint being exported: its configuration, the eager fp32 model and the tokenizer."""

    config: Any
    model: Any
    tokenizer: Any
    max_length: int

    @property
    def pad_token_id(self) -> int:
        token = self.tokenizer.pad_token_id
        return int(token) if token is not None else int(self.config.pad_token_id or 0)


def load_config(options: ExportOptions) -> Any:
    import transformers

    return load(transformers.AutoConfig.from_pretrained, options.model, "configuration")


def load_source(options: ExportOptions, config: Any, steps: Steps) -> Source:
    import torch
    import transformers

    with steps.step(f"Checking {options.model}"):
        check_config(config)
    with steps.step("Loading the model and tokenizer"):
        model, loading_info = load(
            transformers.ModernBertForSequenceClassification.from_pretrained,
            options.model,
            "weights",
            attn_implementation="sdpa",
            dtype=torch.float32,
            output_loading_info=True,
        )
        if loading_info.get("missing_keys"):
            raise ExportError(f"the checkpoint lacks weights: {sorted(loading_info['missing_keys'])[:5]}")
        model.eval()
        tokenizer = load(transformers.AutoTokenizer.from_pretrained, options.tokenizer or options.model, "tokenizer")
        if not tokenizer.is_fast:
            raise ExportError("the tokenizer has no fast (tokenizer.json) version, which the frontend needs")
        if len(tokenizer) > config.vocab_size:
            raise ExportError(f"the tokenizer has {len(tokenizer)} ids but the model embeds only {config.vocab_size}")
    return Source(config, model, tokenizer, max_length(config, tokenizer, options.max_length))


def load(loader: Callable[..., Any], source: str, what: str, **kwargs: Any) -> Any:
    try:
        return loader(source, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise ExportError(f"cannot load the {what} of {source!r}: {error}") from None


def longest_pair(config: Any, requested: int | None) -> int:
    """An upper bound of max_length known before the tokenizer loads (the model's positions, the request)."""
    limit = int(getattr(config, "max_position_embeddings", 0))
    return min(limit, requested) if requested is not None else limit


def max_length(config: Any, tokenizer: Any, requested: int | None) -> int:
    limit = int(config.max_position_embeddings)
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < limit:
        limit = tokenizer_limit
    if requested is not None:
        if not 4 <= requested <= limit:
            raise ExportError(f"--max-length must lie in [4, {limit}], got {requested}")
        return requested
    return limit
