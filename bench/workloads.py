"""Seeded benchmark workloads: texts with exact token counts under the real ModernBERT tokenizer.

Every text is a run of lower-case English words that the tokenizer keeps whole, with or without a
leading space, so a text of n words is exactly n tokens and a pair `[CLS] query [SEP] document [SEP]`
is exactly query + document + 3 tokens. The texts are verified against the tokenizer when built.

    a  fixed:  16 pairs of exactly 256 tokens (pair length, special tokens included)
    b  rerank: a query of 8-32 tokens against 64 documents with log-normal lengths in [16, 1024]
               (median about 200 tokens)
    c  mixed:  16 concurrent clients, each a query of 8-32 tokens and 8 documents of (b)'s lengths

(a) is built once per concurrency (1, 4, 16): each client sends its own 16 texts. QUICK is a smaller
version of the same shapes for smoke tests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

QUERY_TOKENS = (8, 32)
FIXED_QUERY_TOKENS = 16
DOCUMENT_SIGMA = 0.8  # of log(length): about 10% of documents are more than 2.8 x the median


@dataclass(frozen=True)
class Shape:
    fixed_pairs: int = 16
    fixed_pair_tokens: int = 256
    rerank_documents: int = 64
    document_tokens: tuple[int, int] = (16, 1024)
    document_median: int = 200
    clients: int = 16
    client_documents: int = 8
    concurrencies: tuple[int, ...] = (1, 4, 16)


FULL = Shape()
QUICK = Shape(
    fixed_pairs=8,
    fixed_pair_tokens=128,
    rerank_documents=16,
    document_tokens=(16, 256),
    document_median=64,
    clients=4,
    client_documents=4,
    concurrencies=(1, 2, 4),
)


@dataclass(frozen=True)
class Request:
    """One rerank call: a query and its documents, with the pair lengths the model will see."""

    query: str
    documents: tuple[str, ...]
    pair_lengths: tuple[int, ...]  # [CLS] query [SEP] document [SEP], per document

    @property
    def pairs(self) -> int:
        return len(self.documents)

    @property
    def tokens(self) -> int:
        return sum(self.pair_lengths)


@dataclass(frozen=True)
class Workload:
    """Requests per client: client i sends requests[i] one after the other."""

    name: str  # a1, a4, a16, b, c
    kind: str  # a, b or c
    title: str
    clients: tuple[tuple[Request, ...], ...]

    @property
    def concurrency(self) -> int:
        return len(self.clients)

    @cached_property
    def requests(self) -> tuple[Request, ...]:
        return tuple(r for client in self.clients for r in client)

    @property
    def pairs(self) -> int:
        return sum(r.pairs for r in self.requests)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.requests)


class TextMaker:
    """Random word sequences of exact token counts."""

    def __init__(self, tokenizer_dir: Path) -> None:
        self.tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        vocab = self.tokenizer.get_vocab()
        # Byte-level BPE marks a leading space with 'Ġ': keep words that are one token both at the
        # start of a text and after a space.
        candidates = sorted(
            token[1:]
            for token in vocab
            if token.startswith("Ġ") and token[1:].isascii() and token[1:].isalpha() and token[1:].islower()
        )
        self.words = [w for w in candidates if 3 <= len(w) <= 10 and w in vocab]
        if len(self.words) < 500:
            raise RuntimeError(f"the tokenizer has only {len(self.words)} usable words")
        self.special_tokens = len(self.tokenizer.encode("a", "b").ids) - 2

    def text(self, tokens: int, rng: random.Random) -> str:
        return " ".join(rng.choices(self.words, k=tokens))

    def request(self, query_tokens: int, document_tokens: list[int], rng: random.Random) -> Request:
        query = self.text(query_tokens, rng)
        documents = tuple(self.text(n, rng) for n in document_tokens)
        lengths = tuple(query_tokens + n + self.special_tokens for n in document_tokens)
        encoded = self.tokenizer.encode_batch([(query, d) for d in documents])
        got = tuple(len(e.ids) for e in encoded)
        if got != lengths:
            raise RuntimeError(f"texts do not tokenize to the planned lengths: {got[:5]} vs {lengths[:5]}")
        return Request(query, documents, lengths)


def document_lengths(count: int, rng: np.random.Generator, shape: Shape) -> list[int]:
    """Log-normal lengths (median shape.document_median) redrawn until they fall in shape.document_tokens."""
    low, high = shape.document_tokens
    out: list[int] = []
    while len(out) < count:
        n = round(float(rng.lognormal(np.log(shape.document_median), DOCUMENT_SIGMA)))
        if low <= n <= high:
            out.append(n)
    return out


def build(tokenizer_dir: Path, seed: int = 0, shape: Shape = FULL) -> dict[str, Workload]:
    """Workloads a<concurrency> (one per concurrency), b and c. Every client gets its own texts."""
    maker = TextMaker(tokenizer_dir)
    rng = random.Random(seed)
    lengths_rng = np.random.default_rng(seed)
    fixed_document = shape.fixed_pair_tokens - FIXED_QUERY_TOKENS - maker.special_tokens
    fixed_title = f"(a) fixed {shape.fixed_pairs} x {shape.fixed_pair_tokens} tokens"
    workloads: dict[str, Workload] = {}
    for concurrency in shape.concurrencies:
        clients = tuple(
            (maker.request(FIXED_QUERY_TOKENS, [fixed_document] * shape.fixed_pairs, rng),) for _ in range(concurrency)
        )
        workloads[f"a{concurrency}"] = Workload(f"a{concurrency}", "a", fixed_title, clients)
    query_tokens = rng.randint(*QUERY_TOKENS)
    rerank = maker.request(query_tokens, document_lengths(shape.rerank_documents, lengths_rng, shape), rng)
    title = f"(b) rerank 1 query x {shape.rerank_documents} documents"
    workloads["b"] = Workload("b", "b", title, ((rerank,),))
    clients = tuple(
        (maker.request(rng.randint(*QUERY_TOKENS), document_lengths(shape.client_documents, lengths_rng, shape), rng),)
        for _ in range(shape.clients)
    )
    title = f"(c) {shape.clients} clients x {shape.client_documents} documents"
    workloads["c"] = Workload("c", "c", title, clients)
    return workloads
