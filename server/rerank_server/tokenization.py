"""(query, document) pairs to model inputs, the way the model was trained: `[CLS] query [SEP] document [SEP]`.

Queries and documents are encoded without special tokens, then laid out with the tokenizer's own
pair template, so an input equals transformers' batched
`tokenizer([query], [document], truncation="only_second")`, the call sentence-transformers'
CrossEncoder makes (an empty document keeps its [SEP]: `[CLS] query [SEP] [SEP]`). The query is
kept whole; the document is cut at its end (END) or its start (START), refused (NONE) or split into
overlapping windows (CHUNK, at most max_windows of them) when the pair is longer than max_length.

Only as much text is tokenized as the answer needs, in segments: a document is encoded a segment
at a time (at most _SEGMENT_CHARS characters, cut just before a whitespace, where byte-level BPE's
pre-tokenizer splits anyway, so the tokens are the same as the full text's) until it has the
tokens the answer needs, which keeps a 10 MB document from costing seconds. A segment that had to be cut
inside a word contributes only the tokens before its last safe cut: BPE merges a cut run of repeated
characters differently from the whole run, from its first tokens on. START encodes the same
way from the text's end backwards, so keeping a long text's last tokens costs what its first cost. Between segments the
caller's `should_stop` is checked, so a call whose deadline passed or that was cancelled stops
within one segment's time (milliseconds). A run of more than _SEGMENT_CHARS characters without
whitespace (CJK or Thai text, a base64 blob: one pre-token for byte-level BPE, whose merges cost
more than linear time in its length) is cut at _SEGMENT_CHARS anyway: the few tokens at such a
cut may differ from what the whole text gives. Each text is searched whole for a lone surrogate first (no
tokens, and no UTF-8 for an answer that echoes it), which costs milliseconds per megabyte, nothing for ASCII.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from rerank_triton_model.reranker_engine import gather_pairs, pair_offsets

# First guess of characters per token when cutting a prefix; the cut grows when it was too short.
_CHARS_PER_TOKEN = 8
_GROWTH = 4
# Longest piece of text encoded at once (a few milliseconds), and the most characters one
# encode_batch call is given: the bounds of the time between two `should_stop` checks.
_SEGMENT_CHARS = 16384
_BATCH_CHARS = 262144


class Truncation(enum.Enum):
    END = "end"  # keep the document's first tokens
    START = "start"  # keep its last tokens (TEI's truncation_direction Left)
    NONE = "none"
    CHUNK = "chunk"


@dataclass(frozen=True)
class EncodeOptions:
    max_length: int
    max_query_tokens: int
    max_total_tokens: int
    truncation: Truncation = Truncation.END
    chunk_overlap: int | None = None  # None: default_chunk_overlap, capped at half a window
    default_chunk_overlap: int = 64
    max_windows: int | None = None  # CHUNK: the document's first max_windows windows; None: all
    # Document tokens per model input, at most (Cohere's max_tokens_per_doc): the query does not count against
    # it, max_length still bounds the whole input. None: what max_length leaves.
    max_document_tokens: int | None = None


@dataclass(frozen=True)
class TokenizedPairs:
    """Model inputs as a ragged batch, and how they map back to the caller's pairs.

    Every input's ids are laid end to end in `input_ids`; `owners[i]` is the caller's pair that
    input i belongs to (non-decreasing: a pair's windows are consecutive).
    """

    input_ids: np.ndarray  # int32 [total_tokens]
    lengths: np.ndarray  # int32 [inputs]
    owners: np.ndarray  # int32 [inputs]
    windows: np.ndarray  # int32 [pairs]: inputs per pair (1 unless CHUNK)
    truncated: np.ndarray  # bool [pairs]: the document was cut (END, START, or CHUNK past max_windows)

    @property
    def total_tokens(self) -> int:
        return int(self.input_ids.size)

    def select(self, inputs: np.ndarray) -> TokenizedPairs:
        """The model inputs at `inputs` (indices, ascending) alone, each its own pair: what is left to
        compute when the others' logits are known."""
        count = inputs.size
        offsets = pair_offsets(self.lengths)
        return TokenizedPairs(
            input_ids=gather_pairs(self.input_ids, offsets, self.lengths, inputs) if count else self.input_ids[:0],
            lengths=self.lengths[inputs],
            owners=np.arange(count, dtype=np.int32),
            windows=np.ones(count, dtype=np.int32),
            truncated=np.zeros(count, dtype=bool),
        )

    def best_per_pair(self, logits: np.ndarray) -> np.ndarray:
        """The highest logit of each pair's inputs (its windows), in pair order."""
        starts = np.concatenate(([0], np.cumsum(self.windows)[:-1]))
        return np.maximum.reduceat(logits, starts) if logits.size else logits


class EncodingError(ValueError):
    """A pair cannot be encoded under the options.

    `part` says what is at fault ("query", "document", "total", or an option's name) and `index`
    which pair, so that each API surface can name its own request field.
    """

    def __init__(self, part: str, description: str, index: int | None = None) -> None:
        super().__init__(description)
        self.part = part
        self.description = description
        self.index = index


class StoppedError(Exception):
    """Encoding stopped because the caller's `should_stop` said so (deadline passed, call cancelled)."""


class QueryTooLongError(EncodingError):
    def __init__(self, index: int, tokens: str, limit: int, by_max_length: bool = False) -> None:
        # Named by what set the limit: max_query_tokens, or max_length, which must leave the document a token.
        cause = "max_length, less the special tokens and one document token" if by_max_length else "max_query_tokens"
        super().__init__("query", f"the query is {tokens} tokens long; the limit is {limit} ({cause})", index)


class PairTooLongError(EncodingError):
    def __init__(self, index: int, length: str, max_length: int) -> None:
        super().__init__(
            "document",
            f"document {index} does not fit: with the query it is {length} tokens long and max_length is "
            f"{max_length} (truncation NONE)",
            index,
        )


class TooManyTokensError(EncodingError):
    def __init__(self, limit: int) -> None:
        super().__init__("total", f"the request needs more than {limit} tokens over all its pairs (max_total_tokens)")


@dataclass(frozen=True)
class PairTemplate:
    """Special tokens around the two sequences of a pair, e.g. [CLS] | [SEP] | [SEP]."""

    prefix: tuple[int, ...]
    middle: tuple[int, ...]
    suffix: tuple[int, ...]

    @property
    def special_tokens(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> PairTemplate:
        """Read the template off the tokenizer's post-processor by encoding a sample pair."""
        encoding = tokenizer.encode("a", "b", add_special_tokens=True)
        sequence_ids = encoding.sequence_ids
        first = [i for i, s in enumerate(sequence_ids) if s == 0]
        second = [i for i, s in enumerate(sequence_ids) if s == 1]
        if not first or not second:
            raise ValueError("the tokenizer does not encode sentence pairs")
        ids = encoding.ids
        return cls(tuple(ids[: first[0]]), tuple(ids[first[-1] + 1 : second[0]]), tuple(ids[second[-1] + 1 :]))


def _is_safe(text: str, cut: int) -> bool:
    """Byte-level BPE pre-tokenizes just before a whitespace that follows a non-whitespace, so the
    tokens of text[:cut] followed by those of text[cut:] are the text's at such a cut."""
    return text[cut].isspace() and not text[cut - 1].isspace()


def _safe_cut(text: str, start: int, limit: int) -> int:
    """A safe cut in (start, limit], the nearest to `limit`; without one in the upper half (a whitespace
    run, one huge word), `limit`."""
    for cut in range(limit, start + (limit - start) // 2, -1):
        if _is_safe(text, cut):
            return cut
    return limit


def _last_safe_cut(text: str, start: int, end: int) -> int:
    """The last safe cut in (start, end), or `start` when there is none."""
    for cut in range(end - 1, start, -1):
        if _is_safe(text, cut):
            return cut
    return start


def _tokens_before(offsets: Sequence[tuple[int, int]], limit: int) -> int:
    """How many leading tokens end at or before character `limit` (offsets: each token's span)."""
    count = 0
    for _, end in offsets:
        if end > limit:
            break
        count += 1
    return count


def _safe_cut_back(text: str, limit: int, end: int) -> int:
    """A safe cut in [limit, end), the nearest to `limit`; without one in the lower half, `limit`."""
    for cut in range(limit, end - (end - limit) // 2):
        if _is_safe(text, cut):
            return cut
    return limit


class PairTokenizer:
    """Tokenizes (query, document) pairs into a TokenizedPairs ragged batch."""

    def __init__(self, tokenizer: Tokenizer, max_length: int) -> None:
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer = tokenizer
        self.template = PairTemplate.of(tokenizer)
        if max_length <= self.template.special_tokens + 1:
            raise ValueError(f"max_length {max_length} leaves no room for text")
        self.max_length = max_length

    @classmethod
    def from_dir(cls, folder: Path, max_length: int) -> PairTokenizer:
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {folder}")
        return cls(Tokenizer.from_file(str(path)), max_length)

    def describe(self) -> str:
        model = type(self.tokenizer.model).__name__
        return f"{model}, {self.tokenizer.get_vocab_size(with_added_tokens=True)} ids"

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def encode_prefixes(
        self,
        texts: Sequence[str],
        needs: Sequence[int],
        should_stop: Callable[[], bool] | None = None,
        from_end: bool = False,
    ) -> list[list[int]]:
        """Token ids of each text, or at least its first needs[i] + 1 (exact) when it has more; with
        `from_end`, at least its last needs[i] + 1.

        Texts are encoded in segments (see the module's docstring); `should_stop` is checked before
        each encode_batch call, and StoppedError raised when it returns True.
        """
        # A lone surrogate anywhere is refused, not only in the segments encoded: a text cut after its first
        # tokens would be scored and then fail where the answer echoes it (UTF-8 cannot carry it).
        for i, text in enumerate(texts):
            position = lone_surrogate(text, should_stop)
            if position is not None:
                raise InvalidTextError(i, position)
        results: list[list[int]] = [[] for _ in texts]
        # The text still to encode: texts[i][positions[i]:], or with from_end texts[i][:positions[i]].
        positions = [len(text) for text in texts] if from_end else [0] * len(texts)
        grown = [1] * len(texts)  # how many times a segment without a safe cut was retried longer

        def left(i: int) -> int:
            return positions[i] if from_end else len(texts[i]) - positions[i]

        pending = list(range(len(texts)))
        while pending:
            still = []
            for group in _groups(pending, [min(left(i), _SEGMENT_CHARS) for i in pending]):
                if should_stop is not None and should_stop():
                    raise StoppedError
                cuts = []
                for i in group:
                    # Enough characters for the tokens still needed (a guess), within one segment.
                    want = min(max(64, (needs[i] + 1 - len(results[i])) * _CHARS_PER_TOKEN) * grown[i], _SEGMENT_CHARS)
                    text, position = texts[i], positions[i]
                    if from_end:
                        cuts.append(0 if position <= want else _safe_cut_back(text, position - want, position))
                    else:
                        cuts.append(len(text) if left(i) <= want else _safe_cut(text, position, position + want))
                segments = [
                    texts[i][cut : positions[i]] if from_end else texts[i][positions[i] : cut]
                    for i, cut in zip(group, cuts, strict=True)
                ]
                # Every text was checked above: the Rust tokenizer (UTF-8 text only) gets no other.
                encodings = self.tokenizer.encode_batch(segments, add_special_tokens=False)
                for i, cut, segment, encoding in zip(group, cuts, segments, encodings, strict=True):
                    ids = encoding.ids
                    enough = len(results[i]) + len(ids) > needs[i]
                    ends = cut == (0 if from_end else len(texts[i]))
                    hard = not ends and not _is_safe(texts[i], cut)
                    if hard and not from_end and enough and len(segment) < _SEGMENT_CHARS:
                        # Forward, a cut inside a pre-token changes that pre-token's first tokens too (BPE
                        # merges a cut run of repeated characters differently from the whole run): only the
                        # tokens before the segment's last safe cut are the text's own. Enough of them: keep
                        # those; too few: retry the segment longer, as below.
                        safe = _last_safe_cut(texts[i], positions[i], cut)
                        kept = _tokens_before(encoding.offsets, safe - positions[i])
                        if len(results[i]) + kept > needs[i]:
                            ids, cut, hard = ids[:kept], safe, False
                        else:
                            enough = False
                    # A cut inside a word (or a whitespace run): retry the segment longer. From the end, even
                    # when it has enough: the tokens kept are the segment's last, and a pre-token's tokens
                    # depend on where it starts.
                    if hard and (from_end or not enough) and len(segment) < _SEGMENT_CHARS:
                        grown[i] *= _GROWTH
                        still.append(i)
                        continue
                    results[i] = ids + results[i] if from_end else results[i] + ids
                    positions[i] = cut
                    grown[i] = 1
                    if not ends and not enough:
                        still.append(i)  # not enough yet: its next segment
            pending = still
        return results

    def encode(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        options: EncodeOptions,
        should_stop: Callable[[], bool] | None = None,
    ) -> TokenizedPairs:
        """Encode the pairs (queries[i], documents[i]); raises an EncodingError naming the field at fault,
        or StoppedError as soon as `should_stop()` is True (checked between segments)."""
        if options.max_length > self.max_length:
            raise EncodingError("max_length", f"max_length {options.max_length} exceeds the model's {self.max_length}")
        specials = self.template.special_tokens
        if options.max_length < specials + 2:
            raise EncodingError("max_length", f"max_length {options.max_length} leaves no room for text")
        query_limit = min(options.max_query_tokens, options.max_length - specials - 1)
        distinct = list(dict.fromkeys(queries))
        query_ids: dict[str, list[int]] = {}
        try:
            query_prefixes = self.encode_prefixes(distinct, [query_limit] * len(distinct), should_stop)
        except InvalidTextError as error:
            raise error.named("query", "the query", queries.index(distinct[error.text_index])) from None
        for query, ids in zip(distinct, query_prefixes, strict=True):
            if len(ids) > query_limit:
                # Only a prefix was encoded: the exact length of a 20 MB query is not worth its cost.
                by_max_length = query_limit < options.max_query_tokens
                raise QueryTooLongError(queries.index(query), f"more than {query_limit}", query_limit, by_max_length)
            query_ids[query] = ids

        rooms = [options.max_length - specials - len(query_ids[q]) for q in queries]
        if options.max_document_tokens is not None:
            rooms = [min(room, options.max_document_tokens) for room in rooms]
        # A window's size is known from max_length and the query: an overlap that leaves no stride
        # is refused whatever the documents' lengths (not only when one needs chunking).
        if options.truncation is Truncation.CHUNK and options.chunk_overlap is not None and rooms:
            smallest = min(rooms)
            if options.chunk_overlap >= smallest:
                raise EncodingError(
                    "chunk_overlap",
                    f"chunk_overlap {options.chunk_overlap} must be smaller than a window's {smallest} document tokens",
                )
        # CHUNK needs every token its windows cover (up to the request's budget); the others only enough to
        # fill the room, START from the document's end.
        needs = rooms
        if options.truncation is Truncation.CHUNK:
            needs = [self._chunk_need(room, options) for room in rooms]

        pieces: list[np.ndarray] = []
        lengths: list[int] = []
        owners: list[int] = []
        windows = np.zeros(len(documents), dtype=np.int32)
        truncated = np.zeros(len(documents), dtype=bool)
        total = 0
        heads = {
            q: np.array([*self.template.prefix, *ids, *self.template.middle], dtype=np.int32)
            for q, ids in query_ids.items()
        }
        tail = np.array(self.template.suffix, dtype=np.int32)
        from_end = options.truncation is Truncation.START
        # The documents are encoded a group at a time (_BATCH_CHARS), each group's inputs counted against the
        # budget before the next is encoded: a request far past max_total_tokens is refused after about one
        # group's tokens, not all of its documents' (16 MB of CJK is 7 million tokens, as Python ints).
        for group in _groups(list(range(len(documents))), [len(document) for document in documents]):
            try:
                group_ids = self.encode_prefixes(
                    [documents[i] for i in group], [needs[i] for i in group], should_stop, from_end
                )
            except InvalidTextError as error:
                index = group[error.text_index]
                raise error.named("document", f"document {index}", index) from None
            for index, doc_ids in zip(group, group_ids, strict=True):
                room = rooms[index]
                if options.truncation is Truncation.NONE and len(doc_ids) > room:
                    # Only room + 1 tokens were encoded: enough to refuse, and to say by how much at least.
                    raise PairTooLongError(index, f"more than {options.max_length}", options.max_length)
                spans = self._spans(len(doc_ids), room, options)
                truncated[index] = spans[-1][1] < len(doc_ids) or spans[0][0] > 0
                windows[index] = len(spans)
                head = heads[queries[index]]
                for start, end in spans:
                    pieces += (head, np.asarray(doc_ids[start:end], dtype=np.int32), tail)
                    lengths.append(head.size + (end - start) + tail.size)
                    owners.append(index)
                    total += lengths[-1]
                    if total > options.max_total_tokens:
                        raise TooManyTokensError(options.max_total_tokens)
        return TokenizedPairs(
            input_ids=np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int32),
            lengths=np.asarray(lengths, dtype=np.int32),
            owners=np.asarray(owners, dtype=np.int32),
            windows=windows,
            truncated=truncated,
        )

    def _spans(self, tokens: int, room: int, options: EncodeOptions) -> list[tuple[int, int]]:
        """The [start, end) document-token spans of a pair's model inputs."""
        if tokens <= room:
            return [(0, tokens)]
        if options.truncation is Truncation.END:
            return [(0, room)]
        if options.truncation is Truncation.START:
            return [(tokens - room, tokens)]
        stride = room - self._overlap(room, options)
        last = -(-(tokens - room) // stride)  # windows until one reaches the end
        if options.max_windows is not None:
            last = min(last, options.max_windows - 1)
        return [(k * stride, min(k * stride + room, tokens)) for k in range(last + 1)]

    @staticmethod
    def _overlap(room: int, options: EncodeOptions) -> int:
        """Tokens shared by consecutive CHUNK windows of `room` document tokens."""
        overlap = options.chunk_overlap
        if overlap is None:
            return min(options.default_chunk_overlap, room // 2)
        if overlap >= room:
            raise EncodingError(
                "chunk_overlap", f"chunk_overlap {overlap} must be smaller than a window's {room} document tokens"
            )
        return overlap

    def _chunk_need(self, room: int, options: EncodeOptions) -> int:
        """The document tokens CHUNK windows of `room` tokens can cover: all of the request's budget, or
        max_windows windows' worth."""
        if options.max_windows is None:
            return options.max_total_tokens
        stride = room - self._overlap(room, options)
        return min(options.max_total_tokens, room + (options.max_windows - 1) * stride)


class InvalidTextError(EncodingError):
    """A text holds a lone surrogate (JSON's "\\ud800" escape): no Unicode text, so no UTF-8, no tokens.

    From encode_prefixes `part` is "text" and `index` the position among the texts encoded together; encode
    names it the query or the document of a pair (named)."""

    def __init__(self, index: int, position: int, part: str = "text", subject: str = "") -> None:
        prefix = f"{subject} " if subject else ""
        super().__init__(part, f"{prefix}is not valid Unicode: a lone surrogate at character {position}", index)
        self.text_index = index
        self.position = position

    def named(self, part: str, subject: str, index: int) -> InvalidTextError:
        """The same error about the caller's `part` ("query", "document") of pair `index`, described as `subject`."""
        return InvalidTextError(index, self.position, part, subject)


def lone_surrogate(text: str, should_stop: Callable[[], bool] | None = None) -> int | None:
    """Where `text` holds a lone surrogate (no Unicode, so no UTF-8), or None. Linear: an ASCII text is known
    at once; another is searched _BATCH_CHARS characters at a time (under 1 ms), `should_stop` checked
    before each (StoppedError)."""
    if text.isascii():
        return None
    for start in range(0, len(text), _BATCH_CHARS):
        if should_stop is not None and should_stop():
            raise StoppedError
        try:
            # UTF-8 encoding fails exactly at a surrogate (a str holds a valid pair as one code point), and runs
            # several times faster than a regular-expression search over non-ASCII text.
            text[start : start + _BATCH_CHARS].encode("utf-8")
        except UnicodeEncodeError as error:
            return start + error.start
    return None


def _groups(indices: list[int], sizes: list[int]) -> list[list[int]]:
    """Consecutive groups of `indices` of at most _BATCH_CHARS characters each (one index at least)."""
    groups: list[list[int]] = [[]]
    total = 0
    for index, size in zip(indices, sizes, strict=True):
        if groups[-1] and total + size > _BATCH_CHARS:
            groups.append([])
            total = 0
        groups[-1].append(index)
        total += size
    return [group for group in groups if group]
