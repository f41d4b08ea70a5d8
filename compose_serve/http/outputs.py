"""Engine events -> OpenAI response pieces: token strings and bytes, log-probs, usage, SSE lines.

- ``TokenText``: token id -> (text, its own UTF-8 bytes); a byte-level piece holding half a
  character decodes to U+FFFD, its ``bytes`` stay exact;
- completions log-probs: ``tokens``, ``token_logprobs``, ``top_logprobs`` ({token: lp}, top n),
  ``text_offset``; chat log-probs: ``content`` entries {token, logprob, bytes, top_logprobs};
- usage counts each prompt once and every generated token (one TokenEvent is one token);
- ``composition`` diagnostics: per token in chunks, the mean over the tokens in a response.
"""

from __future__ import annotations

import json

from ..engine.sequence import TokenEvent
from .protocol import (
    ChatTokenLogprob,
    CompletionLogprobs,
    CompositionDiagnostics,
    TopLogprob,
    UsageInfo,
)


class TokenText:
    """Token id -> (text, UTF-8 bytes), cached per tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self.cache:
            text = self.tokenizer.decode(
                [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            self.cache[token_id] = (text, list(_token_bytes(self.tokenizer, token_id, text)))
        return self.cache[token_id]


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-level alphabet (bytes shown as printable characters)."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_DECODER = _byte_decoder()


def _token_bytes(tokenizer, token_id: int, text: str) -> bytes:
    """A token's own bytes (a byte-level piece may hold half a character, which decodes to U+FFFD)."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str) and piece and token_id not in tokenizer.all_special_ids:
        if all(c in BYTE_DECODER for c in piece):
            return bytes(BYTE_DECODER[c] for c in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # byte fallback
            return bytes([int(piece[3:5], 16)])
    return text.encode("utf-8")


def sse(model, include_usage: bool) -> str:
    data = model.model_dump(exclude=None if include_usage else {"usage"}, exclude_none=False)
    for choice in data.get("choices", []):
        if choice.get("composition") is None:
            choice.pop("composition", None)
    return "data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def finish_reason(events: list[TokenEvent]) -> str | None:
    return events[-1].finish_reason if events else None


def usage(prompts: list[list[int]], counts: list[int]) -> UsageInfo:
    """Each prompt once, plus ``counts[c]`` tokens generated for choice c."""
    prompt = sum(len(p) for p in prompts)
    completion = sum(counts)
    return UsageInfo(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def diagnostics(values: dict[str, dict[str, float]]) -> CompositionDiagnostics | None:
    if not values:
        return None
    ran = [m for m, w in values.get("weights", {}).items() if w > 0] if "weights" in values else None
    return CompositionDiagnostics(**values, ran=ran)


def mean_diagnostics(events: list[TokenEvent]) -> CompositionDiagnostics | None:
    sums: dict[str, dict[str, float]] = {}
    for event in events:
        for name, per_member in event.diagnostics.items():
            into = sums.setdefault(name, {})
            for member, value in per_member.items():
                into[member] = into.get(member, 0.0) + value
    return diagnostics({n: {m: v / len(events) for m, v in s.items()} for n, s in sums.items()})


def add_completion_logprobs(
    out: CompletionLogprobs,
    events: list[TokenEvent],
    token_text: TokenText,
    offset: int,
    top_n: int,
) -> None:
    for event in events:
        text, _ = token_text(event.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(event.logprob)
        out.text_offset.append(offset)
        out.top_logprobs.append(
            {token_text(t)[0]: lp for t, lp in (event.top_logprobs or [])[:top_n]}
        )
        offset += len(text)


def chat_logprob(event: TokenEvent, token_text: TokenText, top_n: int) -> ChatTokenLogprob:
    text, raw = token_text(event.token_id)
    top = [
        TopLogprob(token=token_text(t)[0], logprob=lp, bytes=token_text(t)[1])
        for t, lp in (event.top_logprobs or [])[:top_n]
    ]
    return ChatTokenLogprob(token=text, logprob=event.logprob, bytes=raw, top_logprobs=top)
