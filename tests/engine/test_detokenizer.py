"""Incremental text equals decoding the whole output; stop strings are cut and never emitted."""

from __future__ import annotations

from transformers import AutoTokenizer

from compose_serve.engine.detokenizer import Detokenizer

TEXT = "Una frase en español, ünïcödé, 日本語のテキスト 🙂 and more words."


def _run(tok, ids, stop=()):
    d = Detokenizer(tok, tok.encode("Prompt:"), stop)
    pieces, stopped = [], False
    for t in ids:
        piece, stopped = d.push(t)
        pieces.append(piece)
        if stopped:
            break
    if not stopped:
        pieces.append(d.flush())
    return pieces, stopped


def test_incremental_text_equals_full_decode_with_multibyte_characters(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    ids = tok.encode(TEXT)
    pieces, _ = _run(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == TEXT
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_is_cut_even_across_tokens(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    ids = tok.encode(TEXT)
    pieces, stopped = _run(tok, ids, stop=("テキスト",))
    assert stopped and "".join(pieces) == TEXT[: TEXT.index("テキスト")]
    for stop in ("español", "words.", "zzz"):
        pieces, stopped = _run(tok, ids, stop=(stop,))
        want = TEXT[: TEXT.index(stop)] if stop in TEXT else TEXT
        assert "".join(pieces) == want and stopped == (stop in TEXT)
