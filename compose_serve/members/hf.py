"""A transformers causal LM as a member: batched prefill and decode over a slot cache.

Shapes: ``prefill`` takes n prompts (lists of ids) and returns ``Scores.logits [n, V]`` for the
token after each prompt; ``decode`` takes ``last_tokens [B]`` for the member's live slots and
returns ``[B, V]``. The decoder runs once per call; the LM head runs on the last position only
(and over the prompt when its NLL is asked for).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from ..errors import ConfigError
from .base import Member, Scores
from .kv import SlotCache
from .smollm2 import resolve_model

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def load_tokenizer(model: str, revision: str | None = None):
    """The tokenizer of a model path, hub id or the built-in ``smollm2-135m-instruct``."""
    path = check_model_path(resolve_model(model))
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(model: str, dtype: torch.dtype, device: torch.device, revision: str | None = None):
    """``AutoModelForCausalLM.from_pretrained`` in eval mode, on ``device``."""
    path = check_model_path(resolve_model(model))
    try:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, revision=revision)
    except OSError as exc:  # a hub id with no hub in reach, or a folder without weights
        raise ConfigError(f"model {model!r} could not be loaded: {exc}", param="model") from None
    return lm.to(device).eval().requires_grad_(False)


def check_model_path(path: str) -> str:
    """A local path must exist; anything shaped like ``org/name`` is left to the hub."""
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or Path(path).exists()
    if looks_local and not Path(path).expanduser().is_dir():
        raise ConfigError(f"model folder {path!r} does not exist", param="model")
    if not looks_local and path.count("/") != 1:
        raise ConfigError(f"model {path!r} is neither a local folder nor a hub id (org/name)", param="model")
    return str(Path(path).expanduser()) if looks_local else path


def attach_adapter(lm, adapter: str, merge: bool, adapter_name: str = "default"):
    """Wrap ``lm`` with the PEFT adapter in ``adapter``; merged into the weights if ``merge``."""
    from peft import PeftModel

    if not Path(adapter).is_dir():
        raise ConfigError(f"adapter directory {adapter!r} does not exist", param="adapter")
    peft_model = PeftModel.from_pretrained(lm, adapter, adapter_name=adapter_name)
    peft_model.eval().requires_grad_(False)
    return peft_model.merge_and_unload() if merge else peft_model


def cache_kwarg(decoder: torch.nn.Module) -> str:
    """transformers 5.x renamed ``past_key_values`` to ``cache``: the one place that knows."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


class HFMember(Member):
    """A causal LM (optionally with an active PEFT adapter) whose rows are slots."""

    def __init__(self, name: str, lm: torch.nn.Module, tokenizer) -> None:
        self.name = name
        self.lm = lm
        self.tokenizer = tokenizer
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        self.config = base.config
        self.decoder = base.get_decoder()
        self.head = base.get_output_embeddings()
        self.softcap = getattr(self.config, "final_logit_softcapping", None)
        self.vocab_size = self.head.weight.shape[0]
        self.max_context = int(getattr(self.config, "max_position_embeddings", 2048))
        self.device = self.head.weight.device
        self.dtype = self.head.weight.dtype
        self.kv = SlotCache()
        self._cache_kw = cache_kwarg(self.decoder)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # -- the contract ---------------------------------------------------------------------
    @property
    def live_slots(self) -> list[int]:
        return list(self.kv.keys)

    @torch.inference_mode()
    def prefill(self, slots, token_ids, want_prompt_nll: bool = False) -> Scores:
        ids, mask = self.pad_prompts(token_ids)
        cache = DynamicCache(config=self.config)
        hidden = self.run_decoder(ids, mask, self.positions(mask), cache)  # [n, Lp, d]
        self.kv.extend(cache, mask, list(slots))
        last = hidden[:, -1]
        nll = self.prompt_nll(hidden, ids, mask) if want_prompt_nll else None
        return Scores(logits=self.logits(last), hidden=last, prompt_nll=nll)

    @torch.inference_mode()
    def decode(self, slots, last_tokens: torch.Tensor) -> Scores:
        self.kv.select(list(slots))
        mask, positions = self.kv.step_inputs()
        hidden = self.run_decoder(last_tokens.view(-1, 1).to(self.device), mask, positions, self.kv.cache)
        self.kv.advance(mask)
        last = hidden[:, -1]
        return Scores(logits=self.logits(last), hidden=last)

    def release(self, slots) -> None:
        self.kv.drop(list(slots))

    # -- teacher forcing (training, distillation, evaluation; no cache is kept) ------------
    @torch.inference_mode()
    def sequence_logits(
        self, ids: torch.Tensor, mask: torch.Tensor, prompt: torch.Tensor, select: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits at every position of right-padded ``ids [B, T]`` (``mask [B, T]``): ``[B, T, V]``,
        or ``[N, V]`` at the ``N`` true positions of ``select [B, T]``. Position t scores token t+1.
        ``prompt [B, T]`` marks each row's prompt tokens (a siamese member takes its means there)."""
        hidden = self.forward_sequences(ids, mask)
        return self.logits(hidden if select is None else hidden[select.to(self.device)])

    def forward_sequences(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``[B, T, d]`` of right-padded rows, no cache kept."""
        ids, mask = ids.to(self.device), mask.to(self.device)
        return self.decoder(
            input_ids=ids, attention_mask=mask, position_ids=self.positions(mask), use_cache=False
        ).last_hidden_state

    # -- the steps ------------------------------------------------------------------------
    def pad_prompts(self, token_ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad prompts into ``ids [n, Lp]`` and ``mask [n, Lp]``."""
        width = max(len(t) for t in token_ids)
        ids = torch.full((len(token_ids), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(token_ids), width), dtype=torch.long)
        for row, tokens in enumerate(token_ids):
            ids[row, width - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
            mask[row, width - len(tokens) :] = 1
        return ids.to(self.device), mask.to(self.device)

    @staticmethod
    def positions(mask: torch.Tensor) -> torch.Tensor:
        """Position ids that count real tokens only (padding gets 0)."""
        return (mask.cumsum(dim=1) - 1).clamp(min=0)

    def run_decoder(self, ids, mask, positions, cache):
        """One decoder forward; returns final hidden states ``[R, T, d]`` (after the last norm)."""
        kwargs = {self._cache_kw: cache, "use_cache": True}
        return self.decoder(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head (with the model's final soft-capping, where it has one): ``[..., d] -> [..., V]``."""
        logits = self.head(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def prompt_nll(self, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean next-token NLL over each prompt ``[n]`` (0 for a one-token prompt); row by row."""
        out = []
        for row in range(ids.shape[0]):
            valid = (mask[row, :-1] * mask[row, 1:]).bool()  # predicting position and target both real
            if not valid.any():
                out.append(torch.zeros((), device=ids.device))
                continue
            logprobs = torch.log_softmax(self.logits(hidden[row, :-1][valid]).float(), dim=-1)
            targets = ids[row, 1:][valid]
            out.append(-logprobs.gather(1, targets.unsqueeze(1)).mean())
        return torch.stack(out)
