"""Skills the project generates itself: deterministic task data, disjoint splits, exact match.

A task turns a seeded ``random.Random`` into one item: a user prompt and its gold answer. Items are
chat messages (``[{"role": "user", "content": prompt}]``), so a chat model sees them through its own
template, in training and in evaluation alike.

Splits are disjoint by construction, whatever the seeds and sizes: an item belongs to the held-out
split when the SHA-256 of its key (the prompt) falls in the held-out bucket (1 in ``HELDOUT_EVERY``),
and to the train split otherwise. ``heldout(task, n)`` draws items from a seeded stream and keeps
the first ``n`` distinct held-out ones; ``train_stream(task, seed)`` yields train-bucket items forever.

Scoring is exact match after ``normalize``: surrounding whitespace and quotes dropped, one trailing
period dropped, internal whitespace collapsed to one space, lower case. ``score(gold, gold) == 1``
and anything that differs after normalisation scores 0.

The skills (SmolLM2-135M-Instruct scores 0 on both as shipped; a rank-8 LoRA learns them in minutes):
- ``add``: the sum of two 3-digit numbers, answered as the number only (``"What is 412 + 987?"``
  -> ``"1399"``).
- ``reverse``: a random 4-6 letter string spelled with spaces, reversed, answered spelled
  (``"p l a n k"`` -> ``"k n a l p"``).
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass

HELDOUT_EVERY = 10  # one item in ten (by key hash) is held out
HELDOUT_SIZE = 200  # the default size of a held-out set
HELDOUT_SEED = 1234  # the seed of the stream the held-out sets are drawn from


@dataclass(frozen=True)
class Example:
    """One item: the user prompt and the gold answer (what the assistant should reply)."""

    task: str
    prompt: str
    answer: str

    def messages(self) -> list[dict[str, str]]:
        """The chat messages of the prompt (one user turn)."""
        return [{"role": "user", "content": self.prompt}]

    def conversation(self) -> list[dict[str, str]]:
        """The prompt followed by the gold reply (what training teaches)."""
        return [*self.messages(), {"role": "assistant", "content": self.answer}]


@dataclass(frozen=True)
class Task:
    """A named skill: ``make(rng) -> (prompt, answer)`` and a one-line description."""

    name: str
    description: str
    make: Callable[[random.Random], tuple[str, str]]
    max_answer_tokens: int  # enough new tokens for a correct answer and its end-of-turn token


def make_add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(100, 999), rng.randint(100, 999)
    return f"What is {a} + {b}? Reply with the number only.", str(a + b)


def make_reverse(rng: random.Random) -> tuple[str, str]:
    letters = [rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 6))]
    prompt = f"Reverse this sequence of letters: {' '.join(letters)}. Reply with the reversed letters only."
    return prompt, " ".join(reversed(letters))


TASKS: dict[str, Task] = {
    "add": Task(
        "add", "sum of two 3-digit numbers, the number only", make_add, max_answer_tokens=8
    ),
    "reverse": Task(
        "reverse", "reverse 4-6 space-separated letters", make_reverse, max_answer_tokens=16
    ),
}


def get_task(name: str) -> Task:
    """The task called ``name``; a ``KeyError`` lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; tasks are {sorted(TASKS)}") from None


def is_heldout(task: str, prompt: str) -> bool:
    """Whether an item belongs to the held-out bucket (a pure function of task and prompt)."""
    digest = hashlib.sha256(f"{task}\n{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_EVERY == 0


def _stream(task: Task, seed: int, heldout_bucket: bool) -> Iterator[Example]:
    """Items of one bucket, in the order a generator seeded with ``(task, seed)`` draws them."""
    rng = random.Random(f"{task.name}:{seed}")
    while True:
        prompt, answer = task.make(rng)
        if is_heldout(task.name, prompt) == heldout_bucket:
            yield Example(task.name, prompt, answer)


def heldout(task: str, n: int = HELDOUT_SIZE, seed: int = HELDOUT_SEED) -> list[Example]:
    """The first ``n`` distinct held-out items of ``task`` (deterministic in ``seed``)."""
    seen: set[str] = set()
    out: list[Example] = []
    for item in _stream(get_task(task), seed, heldout_bucket=True):
        if item.prompt not in seen:
            seen.add(item.prompt)
            out.append(item)
            if len(out) == n:
                return out
    raise AssertionError("unreachable: the stream is infinite")


def train_stream(task: str, seed: int = 0) -> Iterator[Example]:
    """Train items of ``task`` forever (repeats possible; never a held-out item)."""
    return _stream(get_task(task), seed, heldout_bucket=False)


def normalize(text: str) -> str:
    """The normalisation exact match compares under (see the module docstring)."""
    text = " ".join(text.split()).strip("\"'` ")
    text = text.removesuffix(".").strip()
    return text.lower()


def score(prediction: str, answer: str) -> int:
    """1 when ``prediction`` equals ``answer`` after ``normalize``, else 0."""
    return int(normalize(prediction) == normalize(answer))


def accuracy(predictions: list[str], examples: list[Example]) -> float:
    """Mean exact match of ``predictions`` against ``examples`` (same length, same order)."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    if not examples:
        return 0.0
    return sum(score(p, e.answer) for p, e in zip(predictions, examples, strict=True)) / len(
        examples
    )
