"""Engine events -> OpenAI response pieces: token strings and bytes, log-probs, usage, SSE lines.

- ``TokenText``: token id -> (text, its own UTF-8 bytes); a byte-level piece holding half a
  character decodes to U+FFFD, its ``bytes`` stay exact;
- completions log-probs: ``tokens``, ``token_logprobs``, ``top_logprobs`` ({token: lp}, top n),
  ``text_offset``; chat log-probs: ``content`` entries {token, logprob, bytes, top_logprobs};
- usage counts each prompt once and every generated token (one TokenEvent is one token, but for
  the one event of a prompt scored with ``max_tokens`` 0, which carries none);
- prompt log-probs: ``add_prompt_logprobs`` (``echo`` with ``logprobs``: OpenAI's shape, the
  first token null) and ``vllm_prompt_logprobs`` (vLLM's ``prompt_logprobs`` field);
- every log-prob is JSON-safe: ``-inf`` (a token no member gives any mass) becomes -9999.0, as
  vLLM writes it, never ``-Infinity``;
- ``return_tokens_as_token_ids``: ``TokenIdText`` names tokens ``token_id:<id>``;
- ``composition`` diagnostics: per token in chunks, the mean over the tokens in a response.
"""

from __future__ import annotations

import json

from ..engine.sequence import PromptLogprobs, TokenEvent
from .protocol import (
    ChatTokenLogprob,
    CompletionLogprobs,
    CompositionDiagnostics,
    PromptTokenLogprob,
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


class TokenIdText:
    """vLLM's ``return_tokens_as_token_ids``: a token's string is ``token_id:<id>`` (always
    unambiguous, even for pieces that are not whole characters); its bytes stay the token's own."""

    def __init__(self, token_text: TokenText) -> None:
        self.token_text = token_text

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        return f"token_id:{token_id}", self.token_text(token_id)[1]


#: what a -inf (or NaN) log-prob is written as: JSON has no infinities (vLLM's value)
LOGPROB_FLOOR = -9999.0


def finite(logprob: float) -> float:
    """``logprob`` clamped to ``LOGPROB_FLOOR`` (NaN too), so that every body is valid JSON."""
    return logprob if logprob > LOGPROB_FLOOR else LOGPROB_FLOOR


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
        if choice.get("prompt_logprobs", 0) is None:  # vLLM's field, only where it was asked
            choice.pop("prompt_logprobs")
    return "data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n\n"


def finish_reason(events: list[TokenEvent]) -> str | None:
    return events[-1].finish_reason if events else None


def stop_reason(events: list[TokenEvent]) -> int | str | None:
    """vLLM's ``stop_reason``: the stop token id or stop string that ended the choice (None for
    EOS, length, or a choice still going)."""
    return events[-1].stop_reason if events else None


def token_count(events: list[TokenEvent]) -> int:
    """Generated tokens among ``events`` (the event of a prompt scored alone carries none)."""
    return sum(1 for event in events if event.generated)


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
    """Append each event's token, log-prob, offset and top-n; as OpenAI, the sampled token is in
    its ``top_logprobs`` even when it is outside the top n (up to n + 1 entries). An event with no
    token (a prompt scored with ``max_tokens`` 0) adds nothing."""
    for event in events:
        if not event.generated:
            continue
        text, _ = token_text(event.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(finite(event.logprob))
        out.text_offset.append(offset)
        top = {token_text(t)[0]: finite(lp) for t, lp in (event.top_logprobs or [])[:top_n]}
        top.setdefault(text, finite(event.logprob))
        out.top_logprobs.append(top)
        offset += len(text)


def add_prompt_logprobs(
    out: CompletionLogprobs,
    prompt_ids: list[int],
    entries: PromptLogprobs,
    token_text: TokenText,
    top_n: int,
) -> int:
    """``echo`` with ``logprobs``: append the prompt's tokens before the generated ones, OpenAI's
    way: the first token's ``token_logprobs`` and ``top_logprobs`` entries are null, the others
    hold the fused log-prob and the top n {token: lp} plus the prompt token itself (up to n + 1);
    ``text_offset`` counts the token texts from 0. Returns the offset after the prompt."""
    offset = 0
    for token_id, entry in zip(prompt_ids, entries, strict=True):
        text, _ = token_text(token_id)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        if entry is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(finite(entry.logprob))
        top = {token_text(t)[0]: finite(lp) for t, lp in entry.top[:top_n]}
        top.setdefault(text, finite(entry.logprob))
        out.top_logprobs.append(top)
    return offset


def vllm_prompt_logprobs(
    entries: PromptLogprobs, token_text: TokenText, top_k: int
) -> list[dict[str, PromptTokenLogprob] | None]:
    """vLLM's ``prompt_logprobs``: None for the first token, then per position
    ``{str(token_id): {logprob, rank, decoded_token}}`` with the top k and the prompt token."""
    out: list[dict[str, PromptTokenLogprob] | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        position = {
            str(t): PromptTokenLogprob(logprob=finite(lp), rank=r, decoded_token=token_text(t)[0])
            for r, (t, lp) in enumerate(entry.top[:top_k], start=1)
        }
        position[str(entry.token_id)] = PromptTokenLogprob(
            logprob=finite(entry.logprob), rank=entry.rank, decoded_token=token_text(entry.token_id)[0]
        )
        out.append(position)
    return out


def chat_logprob(event: TokenEvent, token_text: TokenText, top_n: int) -> ChatTokenLogprob:
    text, raw = token_text(event.token_id)
    top = [
        TopLogprob(token=token_text(t)[0], logprob=finite(lp), bytes=token_text(t)[1])
        for t, lp in (event.top_logprobs or [])[:top_n]
    ]
    return ChatTokenLogprob(token=text, logprob=finite(event.logprob), bytes=raw, top_logprobs=top)
