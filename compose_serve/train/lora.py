"""LoRA fine-tuning of one member on a generated task; the adapter is saved as PEFT saves it.

Contract of ``train_lora(settings, out_dir)``:
- loads ``settings.model`` (``smollm2-135m-instruct`` by default) in float32 on the CPU (or on
  ``settings.device``), wraps it with a fresh LoRA (peft ``LoraConfig`` / ``get_peft_model``) on
  ``settings.target_modules``;
- each step draws ``batch_size`` items from the task's train stream (never a held-out item),
  renders them with the tokenizer's chat template, and minimises the cross-entropy of the
  assistant's reply tokens only (prompt positions carry label -100): AdamW, linear warm-up over
  the first 10% of the steps then cosine decay to 0, gradient norm clipped at 1;
- everything random is seeded from ``settings.seed`` (torch, the data stream), so a run repeats;
- writes ``out_dir/adapter_model.safetensors`` + ``adapter_config.json`` (``save_pretrained``) and
  ``out_dir/train_run.json`` (command, settings, losses, final loss, seconds, versions).

Batches are right-padded: ``input_ids [B, L]``, ``attention_mask [B, L]``, ``labels [B, L]``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .tasks import Example, train_stream

IGNORE = -100


@dataclass(frozen=True)
class TrainSettings:
    """What a run does; stored verbatim in ``train_run.json``."""

    task: str
    model: str = "smollm2-135m-instruct"
    steps: int = 200
    batch_size: int = 8
    rank: int = 4
    alpha: int = 8
    dropout: float = 0.0
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup: float = 0.1
    seed: int = 0
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    device: str = "cpu"


@dataclass
class TrainResult:
    """What a run measured: the loss of every step and the wall time."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final_loss(self) -> float:
        """Mean loss over the last 10 steps (less noisy than the last one)."""
        tail = self.losses[-10:]
        return sum(tail) / max(len(tail), 1)


def encode_example(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one item: the whole chat, labels only on the reply.

    The reply is what the full conversation adds after the prompt rendered with its generation
    prompt (the answer text and the end-of-turn token(s)).
    """
    prompt = _ids(
        tokenizer.apply_chat_template(
            example.messages(), add_generation_prompt=True, tokenize=True, return_dict=False
        )
    )
    full = _ids(
        tokenizer.apply_chat_template(example.conversation(), tokenize=True, return_dict=False)
    )
    if full[: len(prompt)] != prompt:
        raise ValueError("the chat template renders the prompt differently inside the conversation")
    return full, [IGNORE] * len(prompt) + full[len(prompt) :]


def _ids(rendered) -> list[int]:
    return list(rendered["input_ids"] if isinstance(rendered, dict) else rendered)


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad items into ``input_ids``, ``attention_mask``, ``labels``, each ``[B, L]``."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    for row, (tokens, target) in enumerate(encoded):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, : len(tokens)] = 1
        labels[row, : len(target)] = torch.tensor(target)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warm-up over ``warmup * steps`` steps, then cosine decay to 0."""
    warm = max(1, round(warmup * steps))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_peft_model(lm: torch.nn.Module, settings: TrainSettings):
    """``lm`` wrapped with a fresh, trainable LoRA adapter named ``default``."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(lm, config)


def train_lora(
    settings: TrainSettings, out_dir: str | Path, command: str | None = None, progress: bool = True
) -> TrainResult:
    """Train, save the adapter and ``train_run.json`` into ``out_dir``; see the module docstring."""
    from ..members.hf import load_causal_lm, load_tokenizer

    torch.manual_seed(settings.seed)
    device = torch.device(settings.device)
    tokenizer = load_tokenizer(settings.model)
    lm = load_causal_lm(settings.model, torch.float32, device)
    model = make_peft_model(lm, settings)
    result = fit(model, tokenizer, settings, progress=progress)
    save_run(model, settings, result, Path(out_dir), command)
    return result


def reply_loss(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of the labelled (reply) tokens, all ``[B, L]`` inputs.

    The same value as the model's own ``loss`` with these labels, but the LM head (a fifth of a
    small model's compute) runs only on the positions that predict a labelled token.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask
    ).last_hidden_state
    targets = labels[:, 1:]  # position t predicts token t + 1
    scored = targets != IGNORE  # [B, L-1]
    logits = base.get_output_embeddings()(hidden[:, :-1][scored])  # [N, V]
    return torch.nn.functional.cross_entropy(logits.float(), targets[scored])


def fit(model, tokenizer, settings: TrainSettings, progress: bool = True) -> TrainResult:
    """Train the LoRA adapter of ``model`` on the task's reply tokens; returns the losses."""
    torch.manual_seed(settings.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return train_loop(lambda batch: reply_loss(model, **batch), [{"params": trainable, "lr": settings.lr}],
                      [model], tokenizer, settings, f"lora {settings.task}", progress)


def task_batches(tokenizer, settings) -> Iterator[dict[str, torch.Tensor]]:
    """``settings.batch_size`` items of the task's train stream per batch, collated, forever."""
    stream = train_stream(settings.task, settings.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    while True:
        yield collate([encode_example(tokenizer, next(stream)) for _ in range(settings.batch_size)], pad_id)


def train_loop(loss_fn, param_groups: list[dict], modules: list[torch.nn.Module], tokenizer, settings,
               desc: str, progress: bool = True,
               batches: Iterator[dict[str, torch.Tensor]] | None = None) -> TrainResult:
    """The loop every trainer here shares, over ``settings.steps`` batches.

    ``batches`` yields dicts of ``[B, L]`` tensors (default ``task_batches``: ``input_ids``,
    ``attention_mask``, ``labels`` of the task stream); ``loss_fn(batch) -> loss`` gets each one
    moved to the modules' device. AdamW over ``param_groups`` (each with its own ``lr``)
    with ``settings.weight_decay``, warm-up then cosine (``lr_factor``), gradients clipped at 1.
    ``modules`` are put in training mode for the loop and back in eval mode after it.
    """
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(param_groups, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, settings.steps, settings.warmup)
    )
    params = [p for group in param_groups for p in group["params"]]
    batches = batches if batches is not None else task_batches(tokenizer, settings)
    device = params[0].device
    result = TrainResult()
    started = time.perf_counter()
    for module in modules:
        module.train()
    bar = tqdm(range(settings.steps), desc=desc, disable=not progress)
    for _ in bar:
        batch = next(batches)
        loss = loss_fn({k: v.to(device) for k, v in batch.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        result.losses.append(loss.item())
        bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
    for module in modules:
        module.eval()
    result.seconds = time.perf_counter() - started
    return result


def invocation() -> str | None:
    """The command line this process was started with, as ``compose-serve ...`` (for the records)."""
    import shlex
    import sys

    return "compose-serve " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else None


def save_adapter(model, base_model: str, out_dir: Path) -> dict[str, str]:
    """The PEFT adapter (safetensors) into ``out_dir``, naming ``base_model`` as the user named it
    (``smollm2-135m-instruct``, not this machine's cache path); returns the library versions."""
    from importlib import metadata

    out_dir.mkdir(parents=True, exist_ok=True)
    card = out_dir / "README.md"
    had_card = card.exists()
    model.peft_config["default"].base_model_name_or_path = base_model
    model.save_pretrained(out_dir, safe_serialization=True)
    if not had_card:  # PEFT's placeholder model card: the adapters' README documents them instead
        card.unlink(missing_ok=True)
    return {name: metadata.version(name) for name in ("torch", "transformers", "peft")}


def save_run(
    model, settings: TrainSettings, result: TrainResult, out_dir: Path, command: str | None
) -> None:
    """The adapter (safetensors, by PEFT) and ``train_run.json`` beside it."""
    versions = save_adapter(model, settings.model, out_dir)
    run = {
        "command": command,
        "settings": asdict(settings),
        "final_loss": result.final_loss,
        "first_loss": result.losses[0] if result.losses else None,
        "losses_every_10": result.losses[::10],
        "seconds": round(result.seconds, 1),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "versions": versions,
    }
    (out_dir / "train_run.json").write_text(json.dumps(run, indent=2) + "\n")
