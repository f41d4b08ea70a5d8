"""Compose, then compress: distil a composition into one LoRA student (ALGORITHMS.md section 6).

The teacher is the composition itself: ``FusedTeacher`` scores each teacher-forced batch with every
member and fuses position by position with the composition's own method, so any method distils,
logit arithmetic and IMSM included. Per step (right-padded ``input_ids / attention_mask / labels
[B, L]``, labels -100 off the reply; ``select = scored_positions(labels)``, the same shift for every
term; N scored positions):

- ``kd`` (LLM-NEO): ``(1 - lam) * CE(labels) + lam * KL(p_teacher || p_student)``, forward KL over
  the full vocabulary per scored token, T = 1, float32 (``kd_rows``). ``lam = 0`` is plain
  fine-tuning on the same data (the teacher is then not run).
- ``rationale`` (TinyLLM): before each step every member writes a rationale for each item, given
  the gold answer in its prompt with in-context examples (teacher-forcing chain of thought); the
  student learns ``gamma * CE(answer) + sum_k alpha_k * CE(rationale_k)``, where rationale k is
  asked for with the member's name in the instruction (``rationale_rows``).
- ``self_distill`` (DynSDPB, ``SelfDistill``): the student's detached logits on the previous batch,
  kept from that step's forward, are the targets of ``alpha_t * T_t^2 * KL(p_prev^T || p_now^T)`` on
  the same batch re-run now. ``alpha_t`` and ``T_t`` follow the student's uncertainty ``u`` (mean
  entropy of those targets over log V, in [0, 1]) for the first ``sd_dynamic`` fraction of the
  steps: ``alpha_t = alpha * (1 - u)``, ``T_t = T * (1 + u)`` (trust uncertain targets less, and
  carry only their coarse ranking); after that ``alpha`` and ``T``. This schedule is our reading of
  the paper's "adjusted from the uncertainty"; ALGORITHMS.md gives no formula. It needs LoRA dropout
  > 0 (two runs of a deterministic student on one batch agree up to the update); ``run_distill``
  sets 0.1 when none is given and says so. Usable alone (no teacher) or beside the KD term.

Data (``distill_batches``): the project's task generators (``--task add,reverse``: round-robin, never
a held-out item), or a JSONL file of ``{"prompt": ..., "answer": ...}`` lines (answer optional), or
prompts whose answers the composition writes itself (``answers="teacher"``, greedy, through the
engine). The student is any causal LM with a fresh LoRA on every linear layer (rank 64, alpha 2 *
rank, dropout 0: LLM-NEO's defaults); its adapter is saved by PEFT with ``distill_report.json``
and a one-member ``composition.yaml`` that serves it like any member.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import re
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import yaml

from ..errors import ConfigError
from .lora import (
    TrainResult,
    TrainSettings,
    collate,
    encode_example,
    invocation,
    make_peft_model,
    save_adapter,
    train_loop,
)
from .tasks import GRADED_TASKS, TASKS, Example, heldout, train_stream
from .teacher import FusedTeacher, forward_kl, prompt_positions, scored_positions

logger = logging.getLogger(__name__)

MODES = ("kd", "rationale")


@dataclass(frozen=True)
class DistillSettings(TrainSettings):
    """A distillation run (stored in ``distill_report.json``): LoRA's fields with LLM-NEO's
    defaults, the teacher, the data and each method's knobs."""

    task: str = "add,reverse"  # comma-separated task names (ignored with ``data``)
    config: str | None = None  # the teacher composition: a YAML path or a built-in name
    data: str | None = None  # a JSONL file of {"prompt", "answer"?} lines
    answers: str = "gold"  # gold (the data's, where given) | teacher (the composition writes them)
    max_answer_tokens: int = 64  # when the composition writes the answers
    steps: int = 200
    batch_size: int = 8
    rank: int = 64
    alpha: int = 128
    dropout: float = 0.0
    lr: float = 2e-4
    lam: float = 0.5
    mode: str = "kd"
    gamma: float = 1.0  # rationale mode: the answer's weight
    rationale_weights: tuple[float, ...] | None = None  # alpha_k per member; default 1 / K each
    rationale_tokens: int = 48
    self_distill: bool = False
    sd_alpha: float = 1.0
    sd_temperature: float = 2.0
    sd_dynamic: float = 0.3  # fraction of the steps during which alpha and T follow the uncertainty


# -- losses ----------------------------------------------------------------------------------
def kd_rows(
    student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, targets: torch.Tensor, lam: float
) -> dict[str, torch.Tensor]:
    """LLM-NEO's loss over ``N`` scored positions: ``student_logits [N, V]``, ``teacher_logprobs
    [N, V]`` (normalised), ``targets [N]``; returns ``loss``, ``ce`` and ``kd`` (means over N)."""
    logprobs = torch.log_softmax(student_logits.float(), dim=-1)
    ce = torch.nn.functional.nll_loss(logprobs, targets)
    kd = forward_kl(teacher_logprobs.float(), logprobs).mean()
    return {"loss": (1 - lam) * ce + lam * kd, "ce": ce, "kd": kd}


def kd_loss(
    student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, labels: torch.Tensor, lam: float
) -> dict[str, torch.Tensor]:
    """``kd_rows`` over whole sequences: ``student_logits [B, L, V]`` and ``teacher_logprobs
    [B, L, V]`` as the models emit them (position t scores token t+1), ``labels [B, L]``."""
    select = scored_positions(labels)
    return kd_rows(student_logits[select], teacher_logprobs[select], labels[:, 1:][select[:, :-1]], lam)


def student_rows(model, batch: dict[str, torch.Tensor], select: torch.Tensor) -> torch.Tensor:
    """The student's logits ``[N, V]`` at the ``select [B, L]`` positions (LM head only there)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    return base.get_output_embeddings()(hidden[select])


class SelfDistill:
    """DynSDPB's term (see the module docstring): remembers the student's detached logits on the
    batch of the previous step and scores the student against them on that batch now."""

    def __init__(self, alpha: float, temperature: float, dynamic_steps: int) -> None:
        self.alpha, self.temperature, self.dynamic_steps = alpha, temperature, dynamic_steps
        self.previous: tuple[dict[str, torch.Tensor], torch.Tensor] | None = None  # (batch, [N, V])
        self.step = 0
        self.last: dict[str, float] = {}

    def schedule(self, targets: torch.Tensor) -> tuple[float, float, float]:
        """``(alpha_t, T_t, u)`` for targets ``[N, V]`` (logits) at the current step."""
        logprobs = torch.log_softmax(targets.float(), dim=-1)
        entropy = -(logprobs.exp() * logprobs).sum(-1).mean().item()
        u = min(1.0, max(0.0, entropy / math.log(targets.shape[-1])))
        if self.step < self.dynamic_steps:
            return self.alpha * (1 - u), self.temperature * (1 + u), u
        return self.alpha, self.temperature, u

    def term(self, model) -> torch.Tensor | None:
        """The term on the previous batch, or None at the first step."""
        if self.previous is None:
            return None
        batch, targets = self.previous
        now = student_rows(model, batch, scored_positions(batch["labels"]))
        alpha, temperature, u = self.schedule(targets)
        kl = forward_kl(
            torch.log_softmax(targets.float() / temperature, dim=-1),
            torch.log_softmax(now.float() / temperature, dim=-1),
        ).mean()
        self.last = {"sd_alpha": alpha, "sd_temperature": temperature, "sd_uncertainty": u}
        return alpha * temperature**2 * kl

    def remember(self, batch: dict[str, torch.Tensor], logits: torch.Tensor) -> None:
        """Keep this step's batch and the student's logits on it (detached) for the next step."""
        self.previous = (batch, logits.detach())
        self.step += 1


# -- rationales (TinyLLM) ---------------------------------------------------------------------
def explain(example: Example) -> str:
    """A worked rationale for a task item (the in-context demonstrations)."""
    if example.task == "add":
        a, b = (int(x) for x in re.findall(r"\d{3}", example.prompt)[:2])  # the two operands, in order
        return (f"Add the units, tens and hundreds with carries: {a} + {b}. "
                f"{a} + {b - b % 100} = {a + b - b % 100}, then + {b % 100} gives {a + b}.")
    if example.task == "reverse":
        letters = example.answer.split()
        return (f"The letters from last to first are {', '.join(letters)}, "
                f"so the reversed sequence is {example.answer}.")
    return f"The answer is {example.answer}."


def demonstrations() -> list[Example]:
    """One train item of each task, for the in-context examples of the rationale prompt (an item
    is shown those of its own task, or all of them when it has no task here)."""
    return [next(train_stream(name, seed=99)) for name in GRADED_TASKS]


def rationale_prompt(example: Example, shots: list[Example]) -> str:
    """TinyLLM's teacher-forcing chain of thought: the gold answer is given, the reason is asked."""
    parts = ["Explain briefly why the answer is correct."]
    for shot in shots:
        parts.append(f"Question: {shot.prompt}\nAnswer: {shot.answer}\nExplanation: {explain(shot)}")
    parts.append(f"Question: {example.prompt}\nAnswer: {example.answer}\nExplanation:")
    return "\n\n".join(parts)


def student_rationale_prompt(example: Example, member: str) -> str:
    """What the student is asked when it learns member ``member``'s rationale."""
    return f"{example.prompt}\nExplain the answer as {member} would."


def write_rationales(members: list, examples: list[Example], max_tokens: int) -> list[list[str]]:
    """``[K][B]`` rationales: each member (a one-member composition) answers ``rationale_prompt``
    greedily. The in-context examples are dropped for an item whose prompt would not fit the
    context with them; an item that does not fit even without them gets an empty rationale."""
    from .evaluate import complete, prompt_ids

    shots = demonstrations()
    tokenizer, limit = members[0].tokenizer, min(m.max_context for m in members) - max_tokens
    prompts: list[Example | None] = []
    for e in examples:
        own = [s for s in shots if s.task == e.task] or shots
        fitting = None
        for chosen in (own, []):
            candidate = Example(e.task, rationale_prompt(e, chosen), e.answer)
            if len(prompt_ids(tokenizer, candidate)) <= limit:
                fitting = candidate
                break
        prompts.append(fitting)
    kept = [p for p in prompts if p is not None]
    out = []
    for member in members:
        texts = iter(c.text.strip() for c in complete(member, kept, max_tokens=max_tokens))
        out.append([next(texts) if p is not None else "" for p in prompts])
    return out


def rationale_rows(
    logits: torch.Tensor, targets: torch.Tensor, groups: torch.Tensor, weights: list[float]
) -> dict[str, torch.Tensor]:
    """``sum_g weights[g] * CE_g``: ``logits [N, V]``, ``targets [N]``, ``groups [N]`` (0 = the
    answer, k + 1 = member k's rationale); each CE is the mean over its group's tokens."""
    per_token = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    out: dict[str, torch.Tensor] = {}
    loss = per_token.new_zeros(())
    for g, weight in enumerate(weights):
        chosen = groups == g
        if chosen.any():
            ce = per_token[chosen].mean()
            out["ce" if g == 0 else f"ce_rationale_{g - 1}"] = ce
            loss = loss + weight * ce
    out["loss"] = loss
    return out


# -- data -------------------------------------------------------------------------------------
def read_jsonl(path: str | Path) -> list[Example]:
    """``{"prompt": str, "answer": str?}`` per line; an empty answer means "the teacher writes it"."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file {str(path)!r} does not exist", param="data")
    out = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"data file {path.name} line {number}: not JSON ({exc})", param="data") from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"]:
            raise ConfigError(f"data file {path.name} line {number}: needs a non-empty string 'prompt'",
                              param="data")
        answer = item.get("answer", "")
        if not isinstance(answer, str):
            raise ConfigError(f"data file {path.name} line {number}: 'answer' must be a string", param="data")
        out.append(Example(str(item.get("task", "data")), item["prompt"], answer))
    if not out:
        raise ConfigError(f"data file {path.name} has no items", param="data")
    return out


def example_stream(settings: DistillSettings) -> Iterator[Example]:
    """Items forever: the JSONL file reshuffled each pass (seeded), or the tasks round-robin."""
    if settings.data:
        items = read_jsonl(settings.data)
        rng = random.Random(settings.seed)
        while True:
            order = list(items)
            rng.shuffle(order)
            yield from order
    names = task_names(settings.task)
    streams = [train_stream(name, settings.seed) for name in names]
    while True:
        for stream in streams:
            yield next(stream)


def task_names(task: str) -> list[str]:
    names = [t.strip() for t in task.split(",") if t.strip()]
    for name in names:
        if name not in TASKS:
            raise ConfigError(f"unknown task {name!r}; tasks are {sorted(TASKS)}", param="task")
    if not names:
        raise ConfigError("--task names no task", param="task")
    return names


def distill_batches(settings: DistillSettings, tokenizer, composition=None,
                    rationale_members: list | None = None,
                    samples: list[dict] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches of ``settings.batch_size`` items; with ``rationale_members`` each item
    brings its answer row plus one rationale row per member (``groups [B']``). The first batch's
    items (with any written answers and rationales) are appended to ``samples``, for the report."""
    from .evaluate import complete

    stream = example_stream(settings)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    while True:
        items = [next(stream) for _ in range(settings.batch_size)]
        needs = [i for i, e in enumerate(items) if settings.answers == "teacher" or not e.answer]
        if needs:
            written = complete(composition, [items[i] for i in needs], max_tokens=settings.max_answer_tokens)
            for i, completion in zip(needs, written, strict=True):
                items[i] = replace(items[i], answer=completion.text.strip())
        rows = [(e, 0) for e in items]
        if rationale_members:
            texts = write_rationales(rationale_members, items, settings.rationale_tokens)
            for k, member in enumerate(rationale_members):
                for e, text in zip(items, texts[k], strict=True):
                    if text:  # an empty rationale teaches nothing
                        prompt = student_rationale_prompt(e, member.members[0].name)
                        rows.append((Example(e.task, prompt, text), k + 1))
        if samples is not None and not samples:
            samples.extend({"prompt": e.prompt, "target": e.answer, "group": g} for e, g in rows)
        batch = collate([encode_example(tokenizer, e) for e, _ in rows], pad_id)
        batch["groups"] = torch.tensor([g for _, g in rows], dtype=torch.long)
        yield batch


# -- the run ----------------------------------------------------------------------------------
class Distiller:
    """One step's loss for the student (a PEFT model), with the parts of every step kept in
    ``history`` (``loss``, ``ce``, ``kd``, ``sd``, ...)."""

    def __init__(self, model, settings: DistillSettings, teacher: FusedTeacher | None,
                 self_distill: SelfDistill | None = None, rationale_weights: list[float] | None = None) -> None:
        self.model, self.settings, self.teacher = model, settings, teacher
        self.self_distill = self_distill
        self.rationale_weights = rationale_weights
        self.history: list[dict[str, float]] = []

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        select = scored_positions(labels)
        targets = labels[:, 1:][select[:, :-1]]  # [N]
        logits = student_rows(self.model, batch, select)  # [N, V]
        if self.rationale_weights is not None:
            groups = batch["groups"].unsqueeze(1).expand_as(select)[select]  # [N]
            parts = rationale_rows(logits, targets, groups, self.rationale_weights)
        elif self.teacher is not None and self.settings.lam > 0:
            prompt = prompt_positions(labels, batch["attention_mask"])
            taught = self.teacher(batch["input_ids"], batch["attention_mask"], prompt, select)
            parts = kd_rows(logits, taught.to(logits.device), targets, self.settings.lam)
        else:
            ce = torch.nn.functional.cross_entropy(logits.float(), targets)
            parts = {"loss": ce, "ce": ce}
        loss = parts["loss"]
        record = {k: v.item() for k, v in parts.items()}
        if self.self_distill is not None:
            term = self.self_distill.term(self.model)
            if term is not None:
                loss = loss + term
                record.update(sd=term.item(), **self.self_distill.last)
            self.self_distill.remember(batch, logits)
        record["loss"] = loss.item()
        self.history.append(record)
        return loss


def check_settings(settings: DistillSettings, has_teacher: bool | None = None) -> None:
    """Refuse settings that cannot run, naming the field (``has_teacher``: a composition was given
    already built; by default, whether ``settings.config`` names one)."""
    if settings.mode not in MODES:
        raise ConfigError(f"--mode must be one of {MODES}, got {settings.mode!r}", param="mode")
    if settings.answers not in ("gold", "teacher"):
        raise ConfigError(f"--answers must be gold or teacher, got {settings.answers!r}", param="answers")
    if not 0.0 <= settings.lam <= 1.0:
        raise ConfigError(f"--lam must be in [0, 1], got {settings.lam}", param="lam")
    for name in ("steps", "batch_size", "rank", "max_answer_tokens", "rationale_tokens"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1", param=name)
    if not (settings.config is not None if has_teacher is None else has_teacher):
        if settings.mode == "rationale":
            raise ConfigError("--mode rationale needs --config (the members write the rationales)", param="config")
        if settings.lam > 0:
            raise ConfigError("--lam > 0 needs a teacher: give --config, or --lam 0", param="lam")
        if settings.answers == "teacher":
            raise ConfigError("--answers teacher needs --config", param="answers")
        if not settings.self_distill and settings.lam == 0:
            logger.info("no teacher and no self-distillation: plain fine-tuning")
    if settings.data is None:
        task_names(settings.task)
    if settings.self_distill and settings.sd_temperature <= 0:
        raise ConfigError("--sd-temperature must be > 0", param="sd_temperature")


def distill(settings: DistillSettings, out: str | Path, command: str | None = None, progress: bool = True,
            composition=None, eval_n: int = 0) -> dict:
    """Train the student as ``settings`` say, save it into ``out``, return the report.

    ``composition`` may be given already built (tests); otherwise ``settings.config`` is loaded.
    With ``eval_n``, the student (and the untrained student, and the teacher) are scored on the
    first ``eval_n`` held-out items of each task: exact match and KL to the teacher."""
    from ..composition import build_composition
    from ..config import load_composition
    from ..members.hf import HFMember, load_causal_lm, load_tokenizer

    check_settings(settings, has_teacher=composition is not None or settings.config is not None)
    torch.manual_seed(settings.seed)
    if composition is None and settings.config is not None:
        composition = build_composition(load_composition(settings.config))
    tokenizer = load_tokenizer(settings.model)
    if composition is not None and tokenizer.get_vocab() != composition.tokenizer.get_vocab():
        raise ConfigError(f"student {settings.model!r} and teacher {composition.name!r} do not share one "
                          "vocabulary; distillation needs the teacher's tokenizer", param="student")
    lm = load_causal_lm(settings.model, torch.float32, torch.device(settings.device))
    model = make_peft_model(lm, settings)
    student = HFMember("student", model, tokenizer)
    teacher = FusedTeacher(composition) if composition is not None else None

    rationale_members = rationale_weights = None
    if settings.mode == "rationale":
        rationale_members = [_single(composition, k) for k in range(len(composition.members))]
        k = len(rationale_members)
        alphas = list(settings.rationale_weights or [1.0 / k] * k)
        if len(alphas) != k:
            raise ConfigError(f"--rationale-weights needs {k} values (one per member), got {len(alphas)}",
                              param="rationale_weights")
        rationale_weights = [settings.gamma, *alphas]
    sd = None
    if settings.self_distill:
        sd = SelfDistill(settings.sd_alpha, settings.sd_temperature, round(settings.sd_dynamic * settings.steps))
    report: dict = {"command": command, "settings": asdict(settings)}
    if eval_n and teacher is not None and settings.data is None:
        report["before"] = evaluate_student(student, teacher, settings, eval_n, accuracy=False)

    distiller = Distiller(model, settings, teacher, sd, rationale_weights)
    trainable = [p for p in model.parameters() if p.requires_grad]
    samples: list[dict] = []
    batches = distill_batches(settings, tokenizer, composition, rationale_members, samples)
    result: TrainResult = train_loop(distiller, [{"params": trainable, "lr": settings.lr}], [model], tokenizer,
                                     settings, f"distill {settings.mode} lam={settings.lam}", progress, batches=batches)
    report.update(
        seconds=round(result.seconds, 1),
        final_loss=result.final_loss,
        history_every_10=distiller.history[::10],
        trainable_parameters=sum(p.numel() for p in trainable),
        first_batch=samples,
    )
    if eval_n and settings.data is None:
        report["after"] = evaluate_student(student, teacher, settings, eval_n)
    save_student(model, settings, report, Path(out))
    return report


def _single(composition, k: int):
    """Member ``k`` of ``composition`` as a one-member composition (sharing the loaded member)."""
    from ..composition import build_composition

    spec = composition.spec
    method = "interweave" if spec.method == "interweave" else "mixture"
    one = spec.model_copy(update={
        "name": f"{spec.name}/{spec.members[k].name}", "method": method,
        "members": [spec.members[k].model_copy(update={"weight": 1.0})],
        "params": spec.params if method == "interweave" else {},
    })
    return build_composition(one, members=[composition.members[k]])


def student_composition(student, settings: DistillSettings):
    """The student (an ``HFMember``) as a one-member composition, for the engine."""
    from ..composition import build_composition
    from ..config import parse_composition

    spec = parse_composition({"name": "student", "method": "mixture",
                              "members": [{"name": "student", "model": settings.model}]})
    return build_composition(spec, members=[student])


def evaluate_student(student, teacher: FusedTeacher | None, settings: DistillSettings, n: int,
                     accuracy: bool = True) -> dict:
    """Per task: exact match of the student's greedy replies and KL(teacher || student) on the
    first ``n`` held-out items (prompt + gold reply, teacher-forced)."""
    from .evaluate import task_accuracy
    from .teacher import teacher_kl

    composition = student_composition(student, settings)
    was_training = student.lm.training
    student.lm.eval()
    out = {}
    for name in task_names(settings.task):
        items = heldout(name, n)
        row: dict = {"n": n}
        if accuracy:
            row["accuracy"], _ = task_accuracy(composition, items)
        if teacher is not None:
            row["kl_to_teacher"] = teacher_kl(teacher, FusedTeacher(composition), items)
        out[name] = row
    student.lm.train(was_training)
    return out


def save_student(model, settings: DistillSettings, report: dict, out: Path) -> None:
    """The adapter (PEFT, safetensors), ``distill_report.json`` and a servable ``composition.yaml``."""
    report["versions"] = save_adapter(model, settings.model, out)
    (out / "distill_report.json").write_text(json.dumps(report, indent=2) + "\n")
    composition = {
        "name": f"{out.name}-student",
        "method": "mixture",
        "members": [{"name": "student", "model": settings.model, "adapter": "."}],
    }
    (out / "composition.yaml").write_text(yaml.safe_dump(composition, sort_keys=False))


# -- the command ------------------------------------------------------------------------------
def add_distill(subparsers) -> argparse.ArgumentParser:
    """Register ``distill`` on an argparse ``subparsers`` object."""
    d = DistillSettings()
    p = subparsers.add_parser("distill", help="distil a composition into one LoRA student")
    p.add_argument("--config", default=None, help="the teacher composition: YAML path or built-in name")
    p.add_argument("--student", default=d.model, help="student model: a folder or smollm2-135m-instruct")
    p.add_argument("--out", required=True, type=Path, help="folder for the adapter and the report")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", default=None, help='JSONL of {"prompt": ..., "answer": ...} (answer optional)')
    source.add_argument("--task", default=d.task, help="comma-separated generated tasks (round-robin)")
    p.add_argument("--answers", choices=("gold", "teacher"), default=d.answers,
                   help="teacher: the composition writes every answer (greedy)")
    p.add_argument("--max-answer-tokens", type=int, default=d.max_answer_tokens)
    p.add_argument("--mode", choices=MODES, default=d.mode)
    p.add_argument("--lam", type=float, default=None, help="KD weight (default 0.5 with --config, else 0)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=int, default=None, help="LoRA alpha (default 2 * rank)")
    p.add_argument("--dropout", type=float, default=None, help="LoRA dropout (default 0; 0.1 with --self-distill)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--gamma", type=float, default=d.gamma, help="rationale mode: weight of the answer CE")
    p.add_argument("--rationale-weights", default=None, help="rationale mode: alpha_k per member, a,b,...")
    p.add_argument("--rationale-tokens", type=int, default=d.rationale_tokens)
    p.add_argument("--self-distill", action="store_true", help="add DynSDPB's previous-batch term")
    p.add_argument("--sd-alpha", type=float, default=d.sd_alpha)
    p.add_argument("--sd-temperature", type=float, default=d.sd_temperature)
    p.add_argument("--sd-dynamic", type=float, default=d.sd_dynamic)
    p.add_argument("--eval", type=int, default=0, metavar="N",
                   help="score N held-out items per task before and after (accuracy, KL to the teacher)")
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=run_distill)
    return p


def run_distill(args) -> int:
    """``compose-serve distill``: build the settings from ``args``, run, print one summary line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dropout = args.dropout
    if dropout is None:
        dropout = 0.1 if args.self_distill else 0.0
        if args.self_distill:
            print("--self-distill: LoRA dropout not given, using 0.1 (DynSDPB needs dropout > 0)", file=sys.stderr)
    elif args.self_distill and dropout == 0:
        print("warning: --self-distill with LoRA dropout 0: the term only sees the previous update", file=sys.stderr)
    weights = None
    if args.rationale_weights:
        try:
            weights = tuple(float(x) for x in args.rationale_weights.split(","))
        except ValueError:
            raise ConfigError(f"--rationale-weights must be numbers a,b,...: {args.rationale_weights!r}",
                              param="rationale_weights") from None
    settings = DistillSettings(
        task=args.task, model=args.student, config=args.config, data=args.data, answers=args.answers,
        max_answer_tokens=args.max_answer_tokens, steps=args.steps, batch_size=args.batch_size,
        rank=args.rank, alpha=args.alpha if args.alpha is not None else 2 * args.rank, dropout=dropout,
        lr=args.lr, seed=args.seed, lam=args.lam if args.lam is not None else (0.5 if args.config else 0.0),
        mode=args.mode, gamma=args.gamma, rationale_weights=weights, rationale_tokens=args.rationale_tokens,
        self_distill=args.self_distill, sd_alpha=args.sd_alpha, sd_temperature=args.sd_temperature,
        sd_dynamic=args.sd_dynamic, device=args.device,
    )
    report = distill(settings, args.out, command=invocation(), eval_n=args.eval)
    line = f"distilled into {args.out} in {report['seconds']:.0f} s, final loss {report['final_loss']:.4f}"
    for name, row in report.get("after", {}).items():
        line += f"; {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "n")
    print(line)
    return 0
