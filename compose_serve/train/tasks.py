"""Skills the project generates itself: deterministic task data, disjoint splits, exact match.

A task yields items: a user prompt and its gold answer. Items are chat messages (``[{"role":
"user", "content": prompt}]``), so a chat model sees them through its own template, in training
and in evaluation alike.

Two kinds of task:
- generated (``add``, ``reverse``): content is drawn from a seeded ``random.Random`` (two numbers,
  some letters) and phrased by one of the task's templates. Each task has TRAIN templates and a
  disjoint set of HELD-OUT templates that read like real use; training (and anything that fits a
  router) sees only the first, evaluation only the second.
- a pool (``general``): everyday instructions written for this project, one a line in
  ``data/general_prompts.txt``, with no gold answer (``answer == ""``; ``Task.graded`` is False).
  They are what a composition should serve like its base model, so their quality is measured
  against the base model's own reply, not by exact match (``score`` refuses them).

Splits are disjoint by construction, whatever the seeds and sizes, in content AND in phrasing: an
item's content key (the two numbers, smaller first; the letters; a pool prompt itself) is held out
when its SHA-256 falls in the held-out bucket (1 in ``Task.heldout_every``: 10 for generated tasks,
4 for ``general``), and held-out content is only ever phrased by held-out templates, train content
only by train templates. ``heldout(task, n)`` draws from a seeded stream and keeps the first ``n``
distinct held-out items (a pool returns all its held-out prompts when it has fewer than ``n``,
rather than looping); ``train_stream(task, seed)`` yields train items forever (a pool: its train
prompts in a seeded shuffled order, reshuffled every pass).

Scoring is exact match after the task's ``canonical`` form. ``normalize`` (``add``, and
``score`` without a task): surrounding whitespace and quotes dropped, one trailing period dropped,
internal whitespace collapsed to one space, lower case. ``reverse`` also ignores spacing between
letters (``letters_only``): "tsohg" and "t s o h g" both match the gold "t s o h g", "t s o g h"
does not. ``Task.score(gold, gold) == 1`` and anything that differs in canonical form scores 0.

The skills (SmolLM2-135M-Instruct scores 0 on both as shipped; a rank-8 LoRA learns them in minutes):
- ``add``: the sum of two 3-digit numbers, answered as the number only (``"What is 412 + 987?"``
  -> ``"1399"``).
- ``reverse``: 4-6 random letters, shown spaced (``g h o s t``) or as a quoted word
  (``'ghost'``), answered as the reversed letters separated by single spaces (``"t s o h g"``).
"""

from __future__ import annotations

import hashlib
import random
import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

HELDOUT_EVERY = 10  # one item in ten (by content hash) is held out, for generated tasks
HELDOUT_SIZE = 200  # the default size of a held-out set
HELDOUT_SEED = 1234  # the seed of the stream the held-out sets are drawn from
GENERAL_PROMPTS = Path(__file__).parent / "data" / "general_prompts.txt"

# What each template placeholder stands for in a prompt (to read a prompt back into its content).
FIELD_PATTERNS = {
    "a": r"\d{3}",
    "b": r"\d{3}",
    "word": r"[a-z]{4,6}",  # the letters run together
    "spaced": r"[a-z](?: [a-z]){3,5}",  # the same letters separated by single spaces
}

ADD_TRAIN = (
    "What is {a} + {b}? Reply with the number only.",
    "What is {a} + {b}?",
    "{a} + {b} =",
    "Compute {a} + {b}.",
    "Add {a} and {b}. Reply with the number only.",
    "What is the sum of {a} and {b}?",
    "How much is {a} plus {b}?",
    "Work out {a} + {b}. Give only the result.",
    "{a} plus {b} equals what? Reply with the number only.",
    "Tell me the total of {a} and {b}.",
    "Evaluate {a} + {b} and reply with the number only.",
)
ADD_HELDOUT = (
    "Calculate {a} plus {b}.",
    "Find the sum of {a} and {b}.",
    "What do you get when you add {a} to {b}?",
    "What's {a}+{b}?",
    "Can you add up {a} and {b} for me?",
    "Quick question: {a} + {b} equals?",
    "Sum these two numbers: {a}, {b}",
    "I need the total of {a} and {b}, please.",
)
REVERSE_TRAIN = (
    "Reverse this sequence of letters: {spaced}. Reply with the reversed letters only.",
    "Reverse the letters: {spaced}",
    "Reverse these letters and reply with them spaced out: {spaced}",
    "Reverse the word '{word}'.",
    "Reverse '{word}'. Reply with the reversed letters only.",
    "What is '{word}' reversed?",
    "Write the letters {spaced} in reverse order.",
    "Give the letters of '{word}' from last to first.",
    "Read these letters backwards: {spaced}",
    "Say '{word}' backwards, one letter at a time.",
    "How is '{word}' spelled in reverse? Reply with the letters only.",
    "Flip the order of these letters: {spaced}.",
)
REVERSE_HELDOUT = (
    "Write the word '{word}' in reverse.",
    "Put these letters in reverse order: {spaced}",
    "Spell {spaced} backwards.",
    "What does '{word}' look like spelled backwards?",
    'Can you reverse the string "{word}"?',
    "Take the letters {spaced} and list them from the last one to the first.",
    "Invert the letter order of {word}.",
    "{word} backwards, please.",
)


def normalize(text: str) -> str:
    """The normalisation exact match compares under (see the module docstring)."""
    text = " ".join(text.split()).strip("\"'` ")
    text = text.removesuffix(".").strip()
    return text.lower()


def letters_only(text: str) -> str:
    """``normalize`` with every whitespace removed: letter sequences compared regardless of spacing."""
    return "".join(normalize(text).split())


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


@cache
def template_pattern(template: str) -> re.Pattern[str]:
    """The regex a template's prompts fully match, one named group per placeholder."""
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field:
            parts.append(f"(?P<{field}>{FIELD_PATTERNS[field]})")
    return re.compile("".join(parts))


@dataclass(frozen=True)
class Task:
    """A named skill: generated (templates and ``draw``/``solve``/``key``) or a pool of ``prompts``.

    A generated task draws content (``draw(rng) -> fields``), phrases it with a template of the
    item's split (``template.format(**fields)``) and answers it (``solve(fields)``); ``key(fields)``
    is the content the split hashes (it also accepts the fields ``parse`` reads back from a prompt).
    A pool task has fixed prompts and no gold answer. ``canonical`` is what ``score`` compares.
    """

    name: str
    description: str
    max_answer_tokens: int  # enough new tokens for a correct answer and its end-of-turn token
    train_templates: tuple[str, ...] = ()
    heldout_templates: tuple[str, ...] = ()
    draw: Callable[[random.Random], dict[str, str]] | None = None
    solve: Callable[[dict[str, str]], str] | None = None
    key: Callable[[dict[str, str]], str] | None = None
    prompts: tuple[str, ...] = ()
    heldout_every: int = HELDOUT_EVERY
    canonical: Callable[[str], str] = normalize

    @property
    def graded(self) -> bool:
        """Whether items have a gold answer (generated tasks) to score exact match against."""
        return self.solve is not None

    def templates(self, heldout: bool) -> tuple[str, ...]:
        return self.heldout_templates if heldout else self.train_templates

    def template_of(self, prompt: str) -> str | None:
        """The template (train or held-out) that renders ``prompt``, or None."""
        for template in (*self.train_templates, *self.heldout_templates):
            if template_pattern(template).fullmatch(prompt):
                return template
        return None

    def parse(self, prompt: str) -> dict[str, str] | None:
        """The content fields of ``prompt`` (e.g. ``{"a": "305", "b": "418"}``), or None when no
        template of the task renders it."""
        template = self.template_of(prompt)
        return None if template is None else template_pattern(template).fullmatch(prompt).groupdict()

    def content_key(self, prompt: str) -> str:
        """What the split hashes: the content of a generated prompt, a pool prompt itself."""
        if self.prompts:
            return prompt
        fields = self.parse(prompt)
        if fields is None:
            raise ValueError(f"no template of task {self.name!r} renders {prompt!r}")
        return self.key(fields)

    def score(self, prediction: str, answer: str) -> int:
        """1 when ``prediction`` equals ``answer`` in ``canonical`` form, else 0."""
        if not self.graded:
            raise ValueError(f"task {self.name!r} has no gold answers to score against")
        return int(self.canonical(prediction) == self.canonical(answer))


def draw_add(rng: random.Random) -> dict[str, str]:
    return {"a": str(rng.randint(100, 999)), "b": str(rng.randint(100, 999))}


def draw_reverse(rng: random.Random) -> dict[str, str]:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 6)))
    return {"word": word, "spaced": " ".join(word)}


def reverse_word(fields: dict[str, str]) -> str:
    """The letters of a reverse item, whether its prompt showed them spaced or as a word."""
    return fields["word"] if "word" in fields else fields["spaced"].replace(" ", "")


def load_prompts(path: Path = GENERAL_PROMPTS) -> tuple[str, ...]:
    """One prompt per non-empty line."""
    return tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


TASKS: dict[str, Task] = {
    "add": Task(
        "add", "sum of two 3-digit numbers, the number only", max_answer_tokens=8,
        train_templates=ADD_TRAIN, heldout_templates=ADD_HELDOUT, draw=draw_add,
        solve=lambda f: str(int(f["a"]) + int(f["b"])),
        key=lambda f: "+".join(sorted((f["a"], f["b"]))),  # 305 + 418 and 418 + 305 are one sum
    ),
    "reverse": Task(
        "reverse", "reverse 4-6 letters, answered spaced", max_answer_tokens=16,
        train_templates=REVERSE_TRAIN, heldout_templates=REVERSE_HELDOUT, draw=draw_reverse,
        solve=lambda f: " ".join(reversed(reverse_word(f))), key=reverse_word,
        canonical=letters_only,
    ),
    "general": Task(
        "general", "everyday instructions, no gold answer (compared with the base model)",
        max_answer_tokens=128, prompts=load_prompts(), heldout_every=4,
    ),
}
GRADED_TASKS = tuple(name for name, task in TASKS.items() if task.graded)  # ("add", "reverse")


def get_task(name: str) -> Task:
    """The task called ``name``; a ``KeyError`` lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; tasks are {sorted(TASKS)}") from None


def in_heldout_bucket(task: Task, key: str) -> bool:
    digest = hashlib.sha256(f"{task.name}\n{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % task.heldout_every == 0


def is_heldout(task: str, prompt: str) -> bool:
    """Whether the content of ``prompt`` is held out (a pure function of task and content).

    Held-out items are also phrased only by held-out templates (``Task.template_of``). A
    ``ValueError`` when no template of a generated task renders ``prompt``."""
    t = get_task(task)
    return in_heldout_bucket(t, t.content_key(prompt))


def _generated(task: Task, seed: int, heldout_bucket: bool) -> Iterator[Example]:
    """Items of one split, in the order a generator seeded with ``(task, seed)`` draws them."""
    rng = random.Random(f"{task.name}:{seed}")
    templates = task.templates(heldout_bucket)
    while True:
        fields = task.draw(rng)
        if in_heldout_bucket(task, task.key(fields)) == heldout_bucket:
            prompt = rng.choice(templates).format(**fields)
            yield Example(task.name, prompt, task.solve(fields))


def _pool(task: Task, heldout_bucket: bool) -> list[Example]:
    """The pool's prompts of one split, in file order."""
    return [
        Example(task.name, p, "")
        for p in task.prompts
        if in_heldout_bucket(task, p) == heldout_bucket
    ]


def heldout(task: str, n: int = HELDOUT_SIZE, seed: int = HELDOUT_SEED) -> list[Example]:
    """The first ``n`` distinct held-out items of ``task`` (deterministic in ``seed``); for a pool,
    its held-out prompts in a seeded order, all of them when there are fewer than ``n``."""
    t = get_task(task)
    if t.prompts:
        items = _pool(t, heldout_bucket=True)
        random.Random(f"{t.name}:{seed}").shuffle(items)
        return items[:n]
    seen: set[str] = set()
    out: list[Example] = []
    for item in _generated(t, seed, heldout_bucket=True):
        if item.prompt not in seen:
            seen.add(item.prompt)
            out.append(item)
            if len(out) == n:
                return out
    raise AssertionError("unreachable: the stream is infinite")


def train_stream(task: str, seed: int = 0) -> Iterator[Example]:
    """Train items of ``task`` forever (repeats possible; never held-out content or phrasing)."""
    t = get_task(task)
    if not t.prompts:
        return _generated(t, seed, heldout_bucket=False)
    return _pool_forever(t, seed)


def _pool_forever(task: Task, seed: int) -> Iterator[Example]:
    rng = random.Random(f"{task.name}:{seed}")
    items = _pool(task, heldout_bucket=False)
    while True:
        rng.shuffle(items)
        yield from items


def score(prediction: str, answer: str, task: str | None = None) -> int:
    """1 when ``prediction`` equals ``answer`` under ``task``'s canonical form (``normalize``
    when no task is named), else 0."""
    if task is not None:
        return get_task(task).score(prediction, answer)
    return int(normalize(prediction) == normalize(answer))


def accuracy(predictions: list[str], examples: list[Example]) -> float:
    """Mean exact match of ``predictions`` against ``examples`` (same length, same order), each
    under its own task's scoring (``normalize`` for a task not in ``TASKS``, e.g. a data file's);
    a ``ValueError`` for an ungraded task's example."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    if not examples:
        return 0.0
    hits = sum(
        score(p, e.answer, e.task if e.task in TASKS else None)
        for p, e in zip(predictions, examples, strict=True)
    )
    return hits / len(examples)
