"""IMSM training: a LoRA adapter and the element-wise gate, jointly, on one frozen base.

Per batch (right-padded ``ids/mask/labels [B, L]``; ``labels`` -100 on the prompt):
    h_M   = decoder(ids) with the adapter disabled       [B, L, d]   frozen, no grad
    h_M'  = decoder(ids) with the adapter                [B, L, d]
    hq_*  = mean of each stream over the prompt tokens   [B, d]      (what serving keeps at prefill)
    g     = sigmoid([hq_M ; h_M ; h_M' ; hq_M'] W_A W_B)  [B, L, d]   dropout 0.1 after each projection
    loss  = CE(lm_head(g h_M + (1 - g) h_M'), labels)    on the answer tokens only
AdamW with separate learning rates (adapter 3e-4, gate 1e-3), weight decay 0.01, linear warm-up
over 10% of the steps then cosine; LoRA rank = alpha = 16, dropout 0.1 (ALGORITHMS.md section 2).
Ablations: ``gate="none"`` (0.5/0.5, nothing to learn but the adapter) and ``gate="no_query"``.

``train_imsm(settings, out)`` writes ``out/adapter`` (PEFT), ``out/gate`` (``gate.safetensors``
with ``proj_a.weight [r, 4d]``, ``proj_b.weight [d, r]``, and ``gate.json``), a ready-to-serve
``out/composition.yaml`` and ``out/train_run.json``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from ..methods.interweave import ImsmGate, prompt_means
from .lora import (
    IGNORE,
    TrainResult,
    TrainSettings,
    invocation,
    make_peft_model,
    save_adapter,
    train_loop,
)


@dataclass(frozen=True)
class ImsmSettings(TrainSettings):
    """A run's settings (stored in ``train_run.json``): LoRA's fields with the paper's defaults,
    plus the gate's."""

    batch_size: int = 16
    rank: int = 16
    alpha: int = 16
    dropout: float = 0.1
    lr: float = 3e-4
    weight_decay: float = 0.01
    gate_lr: float = 1e-3
    gate: str = "vector"  # vector | no_query | none
    gate_rank: int = 8


def imsm_loss(model, gate: ImsmGate | None, input_ids, attention_mask, labels) -> torch.Tensor:
    """Cross-entropy of the interwoven model on the labelled tokens (see the module docstring)."""
    base = model.get_base_model()
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    with torch.no_grad(), model.disable_adapter():
        h_base = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    h_adapted = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    if gate is None:
        fused = 0.5 * h_base + 0.5 * h_adapted
    else:
        prompt = (labels == IGNORE) & attention_mask.bool()
        g = gate(prompt_means(h_base, prompt), h_base, h_adapted, prompt_means(h_adapted, prompt))
        fused = g * h_base + (1 - g) * h_adapted
    targets = labels[:, 1:]
    scored = targets != IGNORE
    logits = head(fused[:, :-1][scored])  # the LM head only where a labelled token is predicted
    return torch.nn.functional.cross_entropy(logits.float(), targets[scored])


def imsm_scorer(model, gate: ImsmGate | float, prompt_fraction: float = 0.5):
    """A scorer for ``general_text.mean_nll``: the interwoven model's next-token log-probs.

    ``(ids [B, T], mask [B, T]) -> logprobs [B, T-1, V]``; the first ``prompt_fraction`` of each
    row's real tokens play the prompt (their means feed the gate), as at serving time.
    """
    base = model.get_base_model()
    decoder, head = base.get_decoder(), base.get_output_embeddings()

    @torch.no_grad()
    def score(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with model.disable_adapter():
            h_base = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        h_adapted = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
        if isinstance(gate, ImsmGate):
            cut = (mask.sum(1, keepdim=True) * prompt_fraction).clamp_min(1)  # [B, 1]
            prompt = (torch.arange(ids.shape[1]).unsqueeze(0) < cut) & mask.bool()
            g = gate(prompt_means(h_base, prompt), h_base, h_adapted, prompt_means(h_adapted, prompt))
        else:
            g = float(gate)
        fused = g * h_base + (1 - g) * h_adapted
        return torch.log_softmax(head(fused[:, :-1]).float(), dim=-1)

    return score


def make_models(lm: torch.nn.Module, settings: ImsmSettings):
    """``(peft_model, gate | None)``: a fresh LoRA named ``default`` and the gate."""
    model = make_peft_model(lm, settings)
    if settings.gate == "none":
        return model, None
    d = lm.config.hidden_size
    gate = ImsmGate(d, settings.gate_rank, use_query=settings.gate == "vector", dropout=0.1)
    return model, gate.to(next(lm.parameters()).device)


def fit_imsm(model, gate, tokenizer, settings: ImsmSettings, progress: bool = True) -> TrainResult:
    """The joint training loop (adapter and gate, separate learning rates); returns the losses."""
    torch.manual_seed(settings.seed)
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": settings.lr}]
    modules = [model]
    if gate is not None:
        groups.append({"params": list(gate.parameters()), "lr": settings.gate_lr})
        modules.append(gate)
    return train_loop(lambda batch: imsm_loss(model, gate, **batch), groups, modules, tokenizer, settings,
                      f"imsm {settings.task}", progress)


def save_imsm(
    model, gate, settings: ImsmSettings, result: TrainResult, out: Path, command: str | None
) -> Path:
    """Adapter, gate, a servable composition and the run's record; returns the composition path."""
    out.mkdir(parents=True, exist_ok=True)
    save_adapter(model, settings.model, out / "adapter")
    params: dict = {"scalar": 0.5}
    if gate is not None:
        gate.save(out / "gate")
        params = {"gate": "gate"}
    composition = {
        "name": f"imsm-{settings.task}",
        "method": "interweave",
        "params": params,
        "members": [{"name": settings.task, "model": settings.model, "adapter": "adapter"}],
    }
    (out / "composition.yaml").write_text(yaml.safe_dump(composition, sort_keys=False))
    run = {
        "command": command,
        "settings": asdict(settings),
        "first_loss": result.losses[0] if result.losses else None,
        "final_loss": result.final_loss,
        "losses_every_10": result.losses[::10],
        "seconds": round(result.seconds, 1),
        "trainable_parameters": {
            "adapter": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "gate": sum(p.numel() for p in gate.parameters()) if gate is not None else 0,
        },
    }
    (out / "train_run.json").write_text(json.dumps(run, indent=2) + "\n")
    return out / "composition.yaml"


def train_imsm(
    settings: ImsmSettings, out: str | Path, command: str | None = None, progress: bool = True
):
    """Train and save (see the module docstring); returns ``(result, composition_path)``."""
    from ..members.hf import load_causal_lm, load_tokenizer

    torch.manual_seed(settings.seed)
    tokenizer = load_tokenizer(settings.model)
    lm = load_causal_lm(settings.model, torch.float32, torch.device(settings.device))
    model, gate = make_models(lm, settings)
    result = fit_imsm(model, gate, tokenizer, settings, progress=progress)
    return result, save_imsm(model, gate, settings, result, Path(out), command)


def add_train_imsm(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train-imsm", help="train an IMSM adapter + gate on a task")
    p.add_argument("--task", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--gate-lr", type=float, default=1e-3)
    p.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout (paper: 0.1)")
    p.add_argument("--seed", type=int, default=0)
    ablation = p.add_mutually_exclusive_group()
    ablation.add_argument(
        "--no-gate", action="store_true", help="0.5/0.5 averaging (paper's 'w/o gate')"
    )
    ablation.add_argument("--no-query", action="store_true", help="gate from the two states only")
    p.set_defaults(func=run_train_imsm)
    return p


def run_train_imsm(args) -> int:
    import sys

    gate = "none" if args.no_gate else "no_query" if args.no_query else "vector"
    settings = ImsmSettings(
        task=args.task,
        model=args.model,
        steps=args.steps,
        batch_size=args.batch_size,
        rank=args.rank,
        alpha=args.alpha,
        lr=args.lr,
        gate_lr=args.gate_lr,
        dropout=args.dropout,
        gate=gate,
        seed=args.seed,
    )
    result, path = train_imsm(settings, args.out, invocation())
    print(
        f"loss {result.losses[0]:.3f} -> {result.final_loss:.3f} in {result.seconds:.0f} s; serve it with "
        f"--config {path}",
        file=sys.stderr,
    )
    return 0
