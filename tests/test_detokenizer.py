"""Incremental detokenization on the real tokenizer: same text as a full decode, no broken characters, stop strings
never streamed."""

import pytest
from transformers import AutoTokenizer

from engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Unicode: naïve café, 東京タワー, emoji 🚀🔥 and math ∑∫√.",
    "  leading spaces and\nnew lines\n\n  and tabs\t.",
]


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return AutoTokenizer.from_pretrained(default_model)


def stream(tokenizer, prompt, ids, stop=()):
    detok = IncrementalDetokenizer(tokenizer, prompt, stop)
    pieces = []
    for token in ids:
        detok.add([token])
        pieces.append(detok.take())
        if detok.stopped:
            break
    pieces.append(detok.take(final=True))
    return pieces, detok


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode(tokenizer, text):
    prompt = tokenizer("Say:")["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces, _ = stream(tokenizer, prompt, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_stop_string_is_never_streamed(tokenizer):
    text = "The answer is forty-two. END of story, more text."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces, detok = stream(tokenizer, [1], ids, stop=("END of",))
    assert detok.stopped and "".join(pieces) == "The answer is forty-two. "
    assert not any("E" in p for p in pieces)


def test_stop_string_inside_a_token(tokenizer):
    ids = tokenizer("abracadabra is magic", add_special_tokens=False)["input_ids"]
    pieces, detok = stream(tokenizer, [1], ids, stop=("cad",))
    assert detok.stopped and "".join(pieces) == "abra"


def test_unmatched_stop_prefix_is_released_at_the_end(tokenizer):
    ids = tokenizer("it ends with EN", add_special_tokens=False)["input_ids"]
    pieces, detok = stream(tokenizer, [1], ids, stop=("END",))
    assert not detok.stopped and "".join(pieces) == "it ends with EN"


def test_long_outputs_keep_a_small_window(tokenizer):
    ids = tokenizer(" ".join(["word"] * 400), add_special_tokens=False)["input_ids"]
    pieces, detok = stream(tokenizer, [1], ids)
    assert "".join(pieces) == tokenizer.decode(ids) and len(detok.ids) < 40
