"""Structured outputs: a grammar masks the fused distribution, per sequence, every step.

A request's constraint is a ``StructuredSpec`` (frozen, picklable, validated where it is built:
a bad schema, regex or grammar raises ``InvalidRequestError`` naming the request field). It
travels in ``SamplingParams.structured``. The engine, each step (``Engine._constrain``):

    1. ``GrammarCompiler.matcher(spec)``  a sequence's matcher, created once; the grammar is compiled
                                          once per (tokenizer, spec) and kept in an LRU
    2. ``mask_rows(logprobs, rows, matchers)``  a copy of the fused log-probs [B, V] with -inf at the
                                          tokens the grammar forbids, on the constrained rows only
                                          (the sampler picks from it; the log-probs it returns
                                          are read from the unmasked fused row)
    3. ``Matcher.accept(token)``          after sampling; ``Matcher.finished`` once the grammar is
                                          complete and nothing but a stop token could follow, or
                                          a stop token was taken: the sequence ends ("stop")

The library is xgrammar (``benchmarks/bench_grammar.py``: per-token mask fill + accept on the
SmolLM2 tokenizer is 2.0-3.6x faster than llguidance's; ``benchmarks/results/grammar.json``).
JSON is generated compactly (``", "`` and ``": "`` separators, no free whitespace: a weak model
cannot wander off into endless blank lines) and strictly (no properties the schema does not name).

Kinds of spec (``StructuredSpec.kind``) and their ``source`` text:
  - ``json``: a JSON schema (JSON text); ``json_object`` is ``{"type": "object"}``
  - ``regex``: a regular expression the whole output matches
  - ``choice``: a JSON list of strings; the output is exactly one of them
  - ``grammar``: EBNF (GBNF-style ``root ::= ...``) or Lark (``start: ...``)
  - ``union``: a JSON list of ``[kind, source]`` pairs; the output matches one of them (tool
    choice ``auto``: a tool call, or free text whose first character is not ``{``)
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from .errors import InvalidRequestError

logger = logging.getLogger(__name__)

KINDS = ("json", "regex", "choice", "grammar", "union")
MAX_SOURCE_CHARS = 200_000  # a grammar's text; compile time grows with it
MAX_CHOICES = 1_000
CACHE_SIZE = 256  # compiled grammars kept per tokenizer
#: free text that cannot be mistaken for the start of a JSON object
TEXT_NOT_JSON = r"[^{][\s\S]*"


def _xgr():
    import xgrammar

    return xgrammar


# -- the request's constraint -------------------------------------------------------------------
@dataclass(frozen=True)
class StructuredSpec:
    """What a request's output must match; hashable (the compiled-grammar cache key).

    Build it with the class methods, which validate: ``json_schema``, ``json_object``, ``regex``,
    ``choice``, ``grammar``, ``union``, ``json_or_text``. ``param`` is the request field it came
    from, named by every error about it (it is not part of the spec's identity).
    """

    kind: str
    source: str
    param: str = field(default="structured_outputs", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown structured output kind {self.kind!r}")
        if len(self.source) > MAX_SOURCE_CHARS:
            raise InvalidRequestError(
                f"{self.param}: the {self.kind} is {len(self.source)} characters long; at most "
                f"{MAX_SOURCE_CHARS} are accepted",
                param=self.param,
            )
        build_grammar(self.kind, self.source, self.param)  # validates; cached

    # -- builders ---------------------------------------------------------------------------
    @classmethod
    def json_schema(cls, schema: Any, param: str = "response_format") -> StructuredSpec:
        """Output is JSON valid under ``schema`` (a dict, a bool, or its JSON text)."""
        return cls("json", _schema_text(schema, param), param)

    @classmethod
    def json_object(cls, param: str = "response_format") -> StructuredSpec:
        """Output is one JSON object (OpenAI's ``{"type": "json_object"}``)."""
        return cls("json", json.dumps({"type": "object"}), param)

    @classmethod
    def regex(cls, pattern: Any, param: str = "guided_regex") -> StructuredSpec:
        if not isinstance(pattern, str) or not pattern:
            raise InvalidRequestError(f"{param} must be a non-empty string", param=param)
        return cls("regex", pattern, param)

    @classmethod
    def choice(cls, choices: Any, param: str = "guided_choice") -> StructuredSpec:
        if (
            not isinstance(choices, (list, tuple))
            or not choices
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise InvalidRequestError(
                f"{param} must be a non-empty list of non-empty strings", param=param
            )
        if len(choices) > MAX_CHOICES:
            raise InvalidRequestError(f"{param} takes at most {MAX_CHOICES} choices", param=param)
        return cls("choice", json.dumps(list(choices), ensure_ascii=False), param)

    @classmethod
    def grammar(cls, text: Any, param: str = "guided_grammar") -> StructuredSpec:
        """EBNF (``root ::= ...``, the form vLLM's xgrammar backend takes) or Lark (``start:``)."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequestError(f"{param} must be a non-empty grammar text", param=param)
        return cls("grammar", text, param)

    @classmethod
    def union(cls, parts: Sequence[tuple[str, str]], param: str = "tools") -> StructuredSpec:
        """Output matches one of ``parts``: ``(kind, source)`` pairs of other specs."""
        if len(parts) < 2 or any(kind not in KINDS or kind == "union" for kind, _ in parts):
            raise ValueError(f"a union needs at least two non-union parts, got {parts!r}")
        return cls("union", json.dumps([list(p) for p in parts], ensure_ascii=False), param)

    @classmethod
    def json_or_text(cls, schema: Any, param: str = "tools") -> StructuredSpec:
        """JSON valid under ``schema``, or free text that does not start with ``{``."""
        return cls.union([("json", _schema_text(schema, param)), ("regex", TEXT_NOT_JSON)], param)


def _schema_text(schema: Any, param: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise InvalidRequestError(f"{param}: the JSON schema is not JSON ({exc})", param=param) from None
    if not isinstance(schema, (dict, bool)):
        raise InvalidRequestError(
            f"{param}: a JSON schema must be an object or a boolean, got {type(schema).__name__}",
            param=param,
        )
    return json.dumps(schema, ensure_ascii=False)


@lru_cache(maxsize=CACHE_SIZE)
def build_grammar(kind: str, source: str, param: str = "structured_outputs"):
    """The tokenizer-free xgrammar ``Grammar`` of a spec; raises InvalidRequestError naming
    ``param`` when the schema, regex or grammar is invalid or unsupported."""
    xgr = _xgr()
    try:
        if kind == "json":
            return _json_grammar(source)
        if kind == "regex":
            return xgr.Grammar.from_regex(source)
        if kind == "choice":
            alternatives = " | ".join(_ebnf_literal(c) for c in json.loads(source))
            return xgr.Grammar.from_ebnf(f"root ::= {alternatives}")
        if kind == "grammar":
            if "::=" in source:
                return xgr.Grammar.from_ebnf(source)
            return xgr.Grammar.from_lark(source)
        # union: each part was validated when its own spec was built
        return xgr.Grammar.union(*(build_grammar(k, s, param) for k, s in json.loads(source)))
    except InvalidRequestError:
        raise
    except Exception as exc:  # xgrammar raises RuntimeError (and a few others) on bad input
        what = {"json": "JSON schema", "regex": "regular expression", "choice": "choice list",
                "grammar": "grammar", "union": "grammar"}[kind]
        detail = str(exc).strip().splitlines()
        detail = detail[-1] if detail else type(exc).__name__
        if "]" in detail and detail.startswith("["):  # xgrammar's "[time] file.cc:line: message"
            detail = detail.split(": ", 1)[-1]
        raise InvalidRequestError(f"{param}: invalid {what}: {detail}", param=param) from None


#: xgrammar 0.2.9 builds strings that have ``minLength``/``maxLength`` from this character class,
#: which lets raw control characters in (a tab, U+0019): not JSON. ``_json_grammar`` swaps it for
#: JSON's unescaped characters (such strings then hold no escapes, and stay valid JSON).
_LOOSE_CHARS = r'[^\"\\\r\n]'
_JSON_CHARS = r'[^\0-\x1f\"\\]'


def _json_grammar(source: str):
    """xgrammar's grammar of the JSON schema ``source`` (compact, strict), with the fix above
    (applied to the grammar's text, which xgrammar parses back)."""
    xgr = _xgr()
    grammar = xgr.Grammar.from_json_schema(source, any_whitespace=False, strict_mode=True)
    text = str(grammar)
    if _LOOSE_CHARS not in text:
        return grammar
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_CHARS, _JSON_CHARS))


def _ebnf_literal(text: str) -> str:
    """``text`` as an EBNF string literal (every character escaped that could end or bend it)."""
    out = []
    for ch in text:
        if ch in '"\\' or not ch.isprintable() or not ch.isascii():
            out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


# -- per tokenizer: compiled grammars and matchers ----------------------------------------------
class GrammarCompiler:
    """Compiles specs for one tokenizer and logits width; an LRU of ``CACHE_SIZE`` compiled
    grammars. Thread-safe (HTTP worker threads compile while the engine's thread matches)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Iterable[int]) -> None:
        xgr = _xgr()
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=self.stop_token_ids or None
        )
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, spec: StructuredSpec):
        """The spec's compiled grammar (cached); raises InvalidRequestError naming its field."""
        key = (spec.kind, spec.source)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        grammar = build_grammar(spec.kind, spec.source, spec.param)
        try:
            compiled = self._compiler.compile_grammar(grammar)
        except Exception as exc:  # xgrammar's RuntimeError: the grammar does not fit the vocabulary
            raise InvalidRequestError(f"{spec.param}: cannot compile: {exc}", param=spec.param) from None
        with self._lock:
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: StructuredSpec) -> Matcher:
        """A fresh matcher for one sequence."""
        return Matcher(self._xgr_matcher(self.compile(spec)), self)

    def _xgr_matcher(self, compiled):
        return _xgr().GrammarMatcher(compiled, override_stop_tokens=self.stop_token_ids or None)

    @property
    def words(self) -> int:
        """int32 words of one bitmask row (32 tokens each)."""
        return (self.vocab_size + 31) // 32


_COMPILERS: dict[tuple[int, int, tuple[int, ...]], tuple[object, GrammarCompiler]] = {}
_COMPILERS_LOCK = threading.Lock()


def compiler_for(tokenizer, vocab_size: int, stop_token_ids: Iterable[int]) -> GrammarCompiler:
    """The process's GrammarCompiler for this tokenizer object, width and stop ids (made once:
    reading a 50k vocabulary takes about 0.1 s)."""
    stops = tuple(sorted(stop_token_ids))
    key = (id(tokenizer), vocab_size, stops)
    with _COMPILERS_LOCK:
        held = _COMPILERS.get(key)
        if held is not None and held[0] is tokenizer:
            return held[1]
    compiler = GrammarCompiler(tokenizer, vocab_size, stops)
    with _COMPILERS_LOCK:
        _COMPILERS[key] = (tokenizer, compiler)  # the tokenizer is held: its id is not reused
    return compiler


class Matcher:
    """One sequence's place in its grammar.

    ``fill(bitmask, row)`` writes the allowed next tokens into ``bitmask[row]`` (int32 words,
    bit ``t % 32`` of word ``t // 32`` set = token ``t`` allowed); ``accept(token)`` advances;
    ``finished`` is True once the grammar took a stop token, or is complete and allows nothing
    but a stop token next (then the engine ends the sequence without spending a step on EOS).
    """

    def __init__(self, matcher, compiler: GrammarCompiler) -> None:
        self._m = matcher
        self._compiler = compiler
        self._next: torch.Tensor | None = None  # [W] int32: the mask filled early, for the next fill
        self.finished = False

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        if self._next is not None:
            bitmask[row] = self._next
            return
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> bool:
        """Advance by ``token``; False (and ``finished``) if the grammar does not allow it."""
        self._next = None
        if not self._m.accept_token(int(token)):
            self.finished = True
            return False
        if self._m.is_terminated():
            self.finished = True
        elif self._m.is_completed():  # complete: can anything but a stop token follow?
            mask = torch.zeros((1, self._compiler.words), dtype=torch.int32)
            self._m.fill_next_token_bitmask(mask, 0)
            allowed = unpack(mask, self._compiler.vocab_size)[0]
            allowed[self._compiler.stop_token_ids] = False
            self.finished = not bool(allowed.any())
            self._next = mask[0]
        return True

    @property
    def is_terminated(self) -> bool:
        """The sequence is done: a stop token was taken, or nothing but one could follow."""
        return self.finished


# -- masks --------------------------------------------------------------------------------------
_SHIFTS: dict[torch.device, torch.Tensor] = {}


def unpack(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[n, W]`` int32 bit words -> ``[n, vocab_size]`` bool (True: allowed), on their device."""
    shifts = _SHIFTS.get(bitmask.device)
    if shifts is None:
        shifts = _SHIFTS[bitmask.device] = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab_size]


def fill_masks(matchers: Sequence[Matcher], words: int) -> torch.Tensor:
    """Every matcher's next-token bitmask: ``[n, W]`` int32 on the CPU."""
    bitmask = torch.empty((len(matchers), words), dtype=torch.int32)
    for row, matcher in enumerate(matchers):
        matcher.fill(bitmask, row)
    return bitmask


def mask_rows(logprobs: torch.Tensor, rows: Sequence[int], matchers: Sequence[Matcher]) -> torch.Tensor:
    """A copy of ``logprobs [B, V]`` with -inf where ``matchers[i]`` forbids a token of row
    ``rows[i]``; the other rows are copied unchanged. ``logprobs`` itself is not touched."""
    vocab = logprobs.shape[-1]
    bitmask = fill_masks(matchers, (vocab + 31) // 32).to(logprobs.device, non_blocking=True)
    allowed = unpack(bitmask, vocab)  # [n, V]
    index = torch.tensor(list(rows), dtype=torch.long, device=logprobs.device)
    picking = logprobs.clone()
    picking[index] = picking[index].masked_fill(~allowed, float("-inf"))
    return picking
