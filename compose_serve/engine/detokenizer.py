"""Incremental detokenization with stop strings, one instance per sequence.

Text is produced from a sliding window of ids (the previous read position onward), so each push
costs O(window), not O(length): only the text a new token adds is decoded. A character still
incomplete (a multi-byte UTF-8 sequence split over tokens decodes to U+FFFD) is held back, and so
is any tail that could be the start of a stop string; the stop string itself is emitted only
with ``include_stop``. ``skip_special_tokens`` (vLLM's default True) leaves special tokens' text out.
"""

from __future__ import annotations

from collections.abc import Sequence

PROMPT_CONTEXT = 4  # prompt tokens decoded with the first outputs, so leading spaces come out right
MAX_PENDING = 6  # tokens after which bytes that never form a character are let out as U+FFFD


class Detokenizer:
    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = (),
                 skip_special_tokens: bool = True, include_stop: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.include_stop = include_stop
        self.ids = list(prompt_ids[-PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = tuple(stop)
        self.text = ""  # every complete character produced so far
        self.emitted = 0  # how much of ``text`` was handed out

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def push(self, token_id: int, check_stop: bool = True) -> tuple[str, str | None]:
        """Add one token: returns ``(new text to emit, the stop string reached or None)``.
        With ``check_stop`` False (before ``min_tokens``) stop strings neither end nor hold text."""
        self.ids.append(token_id)
        self._absorb(force=len(self.ids) - self.read_offset > MAX_PENDING)
        return self._release(check_stop)

    def _absorb(self, force: bool) -> None:
        """Move the text of the tokens after ``read_offset`` into ``text`` once it is complete."""
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and (force or not after.endswith("\ufffd")):
            self.text += after[len(before) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)

    def _release(self, check_stop: bool = True) -> tuple[str, str | None]:
        pending = self.text[self.emitted :]
        stop = self.stop if check_stop else ()
        hits = [(i, s) for i, s in ((pending.find(s), s) for s in stop) if i >= 0]
        if hits:
            at, first = min(hits, key=lambda hit: (hit[0], -len(hit[1])))
            cut = at + len(first) if self.include_stop else at
            self.emitted = len(self.text)
            self.text = self.text[: len(self.text) - len(pending) + cut]
            return pending[:cut], first
        hold = max((_overlap(pending, s) for s in stop), default=0)
        out = pending[: len(pending) - hold]
        self.emitted += len(out)
        return out, None

    def flush(self) -> str:
        """At the end: whatever was held back (incomplete bytes, a possible stop-string start)."""
        self._absorb(force=True)
        out, hit_stop = self._release()
        if hit_stop is not None:
            return out
        rest = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out + rest


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
