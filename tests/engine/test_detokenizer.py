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
        assert "".join(pieces) == want and stopped == (stop if stop in TEXT else None)


def test_include_stop_keeps_the_stop_string_and_names_it(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    ids = tok.encode(TEXT)
    d = Detokenizer(tok, tok.encode("Prompt:"), ("ünïcödé", "español"), include_stop=True)
    pieces, stopped = [], None
    for t in ids:
        piece, stopped = d.push(t)
        pieces.append(piece)
        if stopped:
            break
    assert stopped == "español"  # the first to occur in the text, not the first listed
    assert "".join(pieces) == TEXT[: TEXT.index("español") + len("español")]


def test_before_min_tokens_a_stop_string_neither_ends_nor_holds_text(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    ids = tok.encode(TEXT)
    d = Detokenizer(tok, tok.encode("Prompt:"), ("Una",))
    pieces = [d.push(t, check_stop=False) for t in ids]
    assert all(stopped is None for _, stopped in pieces)
    assert "".join(p for p, _ in pieces) + d.flush() == TEXT


def test_special_tokens_are_in_the_text_only_when_not_skipped(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    ids = tok.encode("The quick") + [tok.eos_token_id] + tok.encode(" fox")
    for skip, want in ((True, "The quick fox"), (False, "The quick<|endoftext|> fox")):
        d = Detokenizer(tok, [], skip_special_tokens=skip)
        assert "".join(d.push(t)[0] for t in ids) + d.flush() == want
