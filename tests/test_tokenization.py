"""PairTokenizer equals transformers' pair encoding (the one the model was trained with), per truncation mode."""

from __future__ import annotations

import time

import numpy as np
import pytest
from transformers import AutoTokenizer

from rerank_server.tokenization import (
    EncodeOptions,
    EncodingError,
    InvalidTextError,
    PairTemplate,
    PairTokenizer,
    PairTooLongError,
    QueryTooLongError,
    TooManyTokensError,
    Truncation,
)
from tests.conftest import TOKENIZER_DIR
from tests.texts import mixed_documents, text

QUERY = "how to implement quick sort in python?"
STRESS = [
    "",
    " leading and trailing spaces ",
    "北京是中国的首都。上海是最大的城市。" * 40,
    "مرحبا بالعالم، هذا نص عربي من اليمين إلى اليسار " * 30,
    "emoji 🚀🔥👩‍👩‍👧 and combining e\u0301 a\u0308 and zero\u200bwidth\u200djoiner " * 30,
    "line\nbreaks\tand\ttabs   and   runs      of spaces " * 30,
    " " * 5000,
    "x" * 3000,
]
DOCUMENTS = [*mixed_documents(), *STRESS]


def options(max_length: int, **kwargs) -> EncodeOptions:
    return EncodeOptions(max_length=max_length, max_query_tokens=1000, max_total_tokens=10**7, **kwargs)


@pytest.fixture(scope="module")
def hf_tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def transformers_ids(hf_tokenizer, query: str, documents: list[str], max_length: int, side: str) -> list[list[int]]:
    """transformers' pair encoding of (query, document) with the document cut from `side` ("right": END)."""
    hf_tokenizer.truncation_side = side
    try:
        return hf_tokenizer([query] * len(documents), documents, truncation="only_second", max_length=max_length)[
            "input_ids"
        ]
    finally:
        hf_tokenizer.truncation_side = "right"


def split(pairs, i: int) -> list[int]:
    offsets = np.concatenate(([0], np.cumsum(pairs.lengths)))
    return pairs.input_ids[offsets[i] : offsets[i + 1]].tolist()


@pytest.mark.parametrize("max_length", [13, 64, 512, 8192])
def test_end_truncation_equals_transformers_batched_pair_encoding(hf_tokenizer, max_length: int) -> None:
    tokenizer = PairTokenizer.from_dir(TOKENIZER_DIR, 8192)
    pairs = tokenizer.encode([QUERY] * len(DOCUMENTS), DOCUMENTS, options(max_length))
    expected = hf_tokenizer([QUERY] * len(DOCUMENTS), DOCUMENTS, truncation="only_second", max_length=max_length)
    for i, ids in enumerate(expected["input_ids"]):
        assert split(pairs, i) == ids, repr(DOCUMENTS[i][:40])
    full = hf_tokenizer([QUERY] * len(DOCUMENTS), DOCUMENTS)["input_ids"]
    assert pairs.truncated.tolist() == [len(f) > max_length for f in full]
    assert pairs.windows.tolist() == [1] * len(DOCUMENTS)
    assert pairs.owners.tolist() == list(range(len(DOCUMENTS)))
    assert pairs.input_ids.dtype == np.int32 and pairs.total_tokens == int(pairs.lengths.sum())


# Runs of repeated punctuation after a few words: byte-level BPE merges a cut run differently from the
# whole run, not only at the cut (176 underscores: tokens of 33, 32, 32... characters; cut to 64: 33, 16, 8...).
RUNS = [
    *(f"one two three {c * n}" for c in "-_.=~*#" for n in (37, 141, 300)),
    *(f"hello {c * n} world" for c in "-_.=" for n in (176, 700)),
    "x" * 40 + " " + "_" * 4200,
]


@pytest.mark.parametrize("max_length", [8, 10, 16, 24, 40, 128, 256])
@pytest.mark.parametrize("truncation", [Truncation.END, Truncation.START])
def test_truncation_inside_a_long_run_equals_transformers(hf_tokenizer, max_length: int, truncation) -> None:
    tokenizer = PairTokenizer.from_dir(TOKENIZER_DIR, 8192)
    query = "cat"
    pairs = tokenizer.encode([query] * len(RUNS), RUNS, options(max_length, truncation=truncation))
    side = "left" if truncation is Truncation.START else "right"
    for i, ids in enumerate(transformers_ids(hf_tokenizer, query, RUNS, max_length, side)):
        assert split(pairs, i) == ids, repr(RUNS[i][:60])


def test_chunk_windows_overlap_and_cover_the_document(hf_tokenizer) -> None:
    tokenizer = PairTokenizer.from_dir(TOKENIZER_DIR, 8192)
    document = text(300, seed=3)
    doc_ids = hf_tokenizer(document, add_special_tokens=False)["input_ids"]
    query_ids = hf_tokenizer(QUERY, add_special_tokens=False)["input_ids"]
    max_length, overlap = 64, 10
    room = max_length - 3 - len(query_ids)
    pairs = tokenizer.encode(
        [QUERY, QUERY], ["short", document], options(max_length, truncation=Truncation.CHUNK, chunk_overlap=overlap)
    )
    windows = int(pairs.windows[1])
    assert pairs.windows[0] == 1 and windows == 1 + -(-(len(doc_ids) - room) // (room - overlap))
    assert pairs.owners.tolist() == [0] + [1] * windows
    for k in range(windows):
        start = k * (room - overlap)
        expected = [50281, *query_ids, 50282, *doc_ids[start : start + room], 50282]
        assert split(pairs, 1 + k) == expected
    assert split(pairs, windows)[-2] == doc_ids[-1], "the last window does not reach the document's end"
    assert not pairs.truncated.any()
    np.testing.assert_array_equal(pairs.best_per_pair(np.arange(1 + windows, dtype=np.float32)), [0, windows])


def test_none_truncation_refuses_a_pair_that_does_not_fit_naming_it() -> None:
    tokenizer = PairTokenizer.from_dir(TOKENIZER_DIR, 8192)
    fits = tokenizer.encode([QUERY] * 2, ["a", "b c"], options(64, truncation=Truncation.NONE))
    assert fits.windows.tolist() == [1, 1]
    long_document = text(200, seed=1)
    with pytest.raises(PairTooLongError) as caught:
        tokenizer.encode([QUERY] * 3, ["a", long_document, "b"], options(64, truncation=Truncation.NONE))
    assert caught.value.index == 1
    # Only a prefix is tokenized (a 20 MB document must not be tokenized whole to be refused).
    assert "document 1 does not fit: with the query it is more than 64 tokens long and max_length is 64" in str(
        caught.value
    )


@pytest.mark.parametrize(
    "truncation", [Truncation.END, Truncation.START, Truncation.NONE, Truncation.CHUNK], ids=lambda t: t.name
)
def test_a_lone_surrogate_past_the_tokens_needed_is_refused(truncation: Truncation) -> None:
    """Each mode encodes only the tokens it needs (CHUNK: max_windows' worth), but the answer may echo the whole
    text: a lone surrogate anywhere in it is refused, in a query too."""
    tokenizer = PairTokenizer.from_dir(TOKENIZER_DIR, 8192)
    chunk = {"max_windows": 1} if truncation is Truncation.CHUNK else {}
    for long in ("word " * 20_000 + "\ud800", "\udfff" + "word " * 20_000, "wörd " * 60_000 + "\udc00 end"):
        position = long.index(next(c for c in long if "\ud800" <= c <= "\udfff"))
        with pytest.raises(InvalidTextError) as caught:
            tokenizer.encode([QUERY] * 2, ["fine", long], options(64, truncation=truncation, **chunk))
        assert (caught.value.part, caught.value.index) == ("document", 1)
        assert f"a lone surrogate at character {position}" in str(caught.value)
    with pytest.raises(InvalidTextError) as caught:
        tokenizer.encode(["q " * 2_000 + "\ud800"], ["fine"], options(64, truncation=truncation, **chunk))
    assert caught.value.part == "query"


def test_template_is_read_off_the_tokenizer() -> None:
    template = PairTemplate.of(PairTokenizer.from_dir(TOKENIZER_DIR, 64).tokenizer)
    assert template == PairTemplate(prefix=(50281,), middle=(50282,), suffix=(50282,))


def test_the_query_is_kept_whole_or_refused() -> None:
    tokenizer = PairTokenizer.from_dir(TOKENIZER_DIR, 64)
    query = text(20)
    pairs = tokenizer.encode([query], [text(200)], options(64))
    assert pairs.lengths.tolist() == [64]
    assert (
        pairs.input_ids[1 : 1 + tokenizer.count_tokens(query)].tolist()
        == tokenizer.tokenizer.encode(query, add_special_tokens=False).ids
    )
    limited = EncodeOptions(max_length=64, max_query_tokens=10, max_total_tokens=10**6)
    with pytest.raises(QueryTooLongError, match=r"the limit is 10 \(max_query_tokens\)"):
        tokenizer.encode([query], ["doc"], limited)
    # max_length leaves the query 64 - 3 special tokens - 1 document token: named as the cause.
    with pytest.raises(QueryTooLongError, match=r"the limit is 60 \(max_length, less the special tokens"):
        tokenizer.encode([text(80)], ["doc"], options(64))


def test_options_are_checked() -> None:
    tokenizer = PairTokenizer.from_dir(TOKENIZER_DIR, 512)
    with pytest.raises(EncodingError, match="exceeds the model's 512") as caught:
        tokenizer.encode(["q"], ["d"], options(513))
    assert caught.value.part == "max_length"
    with pytest.raises(EncodingError, match="leaves no room") as caught:
        tokenizer.encode(["q"], ["d"], options(4))
    with pytest.raises(EncodingError, match="must be smaller than a window") as caught:
        tokenizer.encode(["q"], [text(100)], options(32, truncation=Truncation.CHUNK, chunk_overlap=40))
    assert caught.value.part == "chunk_overlap"
    budget = EncodeOptions(max_length=64, max_query_tokens=100, max_total_tokens=100)
    with pytest.raises(TooManyTokensError, match="more than 100 tokens"):
        tokenizer.encode(["q"] * 3, [text(30)] * 3, budget)


def test_ten_megabytes_of_whitespace_cost_only_the_prefix_they_need() -> None:
    tokenizer = PairTokenizer.from_dir(TOKENIZER_DIR, 8192)
    huge = " \n\t " * 2_500_000  # 10 MB
    started = time.process_time()
    pairs = tokenizer.encode([QUERY, QUERY], [huge, "after"], options(8192))
    assert time.process_time() - started < 30  # a bound on runaway work, not a performance target
    assert pairs.lengths[0] == 8192 and pairs.truncated.tolist() == [True, False]


@pytest.mark.parametrize("max_length", [13, 64, 512, 8192])
def test_start_truncation_equals_transformers_left_truncation(hf_tokenizer, max_length: int) -> None:
    """START keeps each document's last tokens: transformers' truncation_side="left" on the second text.
    The longest documents span several backward segments at 8192."""
    tokenizer = PairTokenizer.from_dir(TOKENIZER_DIR, 8192)
    documents = [*DOCUMENTS, text(12000, seed=7), "word " * 30000 + "the end"]
    pairs = tokenizer.encode([QUERY] * len(documents), documents, options(max_length, truncation=Truncation.START))
    for i, ids in enumerate(transformers_ids(hf_tokenizer, QUERY, documents, max_length, "left")):
        assert split(pairs, i) == ids, repr(documents[i][:40])
    full = hf_tokenizer([QUERY] * len(documents), documents)["input_ids"]
    assert pairs.truncated.tolist() == [len(f) > max_length for f in full]
    assert pairs.windows.tolist() == [1] * len(documents)


def test_start_truncation_of_ten_megabytes_costs_only_the_suffix_it_needs(hf_tokenizer) -> None:
    tokenizer = PairTokenizer.from_dir(TOKENIZER_DIR, 8192)
    huge = "lorem ipsum dolor " * 600_000 + "sit amet at the very end"  # 10 MB
    started = time.process_time()
    pairs = tokenizer.encode([QUERY], [huge], options(64, truncation=Truncation.START))
    assert time.process_time() - started < 30  # a bound on runaway work, not a performance target
    tail = hf_tokenizer(huge[-2000:], add_special_tokens=False)["input_ids"]
    assert split(pairs, 0)[-6:-1] == tail[-5:] and pairs.truncated.tolist() == [True]


def test_max_windows_keeps_a_documents_first_windows(hf_tokenizer) -> None:
    tokenizer = PairTokenizer.from_dir(TOKENIZER_DIR, 8192)
    document = text(300, seed=3)
    chunk = options(64, truncation=Truncation.CHUNK, chunk_overlap=10)
    every = tokenizer.encode([QUERY, QUERY], ["short", document], chunk)
    capped = tokenizer.encode(
        [QUERY, QUERY], ["short", document], options(64, truncation=Truncation.CHUNK, chunk_overlap=10, max_windows=2)
    )
    assert every.windows[1] > 2 and capped.windows.tolist() == [1, 2]
    assert [split(capped, i) for i in range(3)] == [split(every, i) for i in range(3)]
    assert capped.truncated.tolist() == [False, True] and not every.truncated.any()
    # A cap the document does not reach changes nothing.
    roomy = tokenizer.encode(
        [QUERY], [document], options(64, truncation=Truncation.CHUNK, chunk_overlap=10, max_windows=1000)
    )
    assert roomy.windows[0] == every.windows[1] and not roomy.truncated.any()
