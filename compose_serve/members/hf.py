"""A transformers causal LM as a member: batched prefill and decode over a slot cache.

Shapes: ``prefill`` takes n prompts (lists of ids) and returns ``Scores.logits [n, V]`` for the
token after each prompt; ``decode`` takes ``last_tokens [B]`` for the member's live slots and
returns ``[B, V]``. The decoder runs once per call; the LM head runs on the last position only
(and over the prompt when its NLL is asked for).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import ConfigError
from .base import Member, Scores
from .kv import SlotCache, register_packed_attention
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


@dataclass
class Chunk:
    """One prefill forward over right-padded chunks: ``hidden [n, W, d]``, ``ids [n, W]``,
    ``valid [n, W]`` (bool, the chunk's real tokens), ``last [n, d]`` (hidden at each row's last
    real token: it scores the token after the chunk)."""

    hidden: torch.Tensor
    ids: torch.Tensor
    valid: torch.Tensor
    last: torch.Tensor

    def rows(self, start: int, end: int) -> Chunk:
        return Chunk(self.hidden[start:end], self.ids[start:end], self.valid[start:end], self.last[start:end])

    def odd(self) -> Chunk:
        """Rows 1, 3, 5, ... (a siamese pair's adapted stream)."""
        return Chunk(self.hidden[1::2], self.ids[1::2], self.valid[1::2], self.last[1::2])


class HFMember(Member):
    """A causal LM (optionally with an active PEFT adapter) whose rows are slots.

    A prompt may come in chunks: each ``prefill`` call appends the next chunk of each slot's
    prompt (a slot seen for the first time is admitted) and scores the token after it; the scores
    of a prompt's last chunk are the prompt's. ``decode`` then advances the slots whose prompt is
    done. The prompt NLL (PackLLM) is accumulated over the chunks. ``packed`` does a step's decode
    and prefill chunk in one forward.
    """

    packs_steps = True
    can_rollback = True

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
        self.kv = SlotCache.for_model(self.config, self.dtype, self.device, self.max_context)
        self._cache_kw = cache_kwarg(self.decoder)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._nll: dict[Hashable, list] = {}  # key -> [sum, count, last hidden of the previous chunk]
        self._packed_attention = register_packed_attention()

    # -- the contract ---------------------------------------------------------------------
    @property
    def live_slots(self) -> list[int]:
        return list(self.kv.keys)

    @torch.inference_mode()
    def prefill(self, slots, token_ids, want_prompt_nll: bool = False) -> Scores:
        keys = list(slots)
        chunk = self.prefill_rows(keys, token_ids)
        nll = self.chunk_nll(keys, chunk) if want_prompt_nll else None
        return Scores(logits=self.logits(chunk.last), hidden=chunk.last, prompt_nll=nll)

    @torch.inference_mode()
    def decode(self, slots, last_tokens: torch.Tensor) -> Scores:
        hidden = self.decode_rows(list(slots), last_tokens)
        return Scores(logits=self.logits(hidden), hidden=hidden)

    def release(self, slots) -> None:
        self.kv.release(list(slots))
        for key in slots:
            self._nll.pop(key, None)

    def checkpoint(self) -> tuple:
        return self.kv.checkpoint(), dict(self._nll)

    def rollback(self, saved: tuple) -> None:
        lengths, nll = saved
        self.kv.rollback(lengths)
        self._nll = nll  # its keys were live at the checkpoint (release drops a key's entry)

    # -- rows of the slot cache (a shared base calls these with its own keys) --------------
    def prefill_rows(self, keys: list[Hashable], token_ids: Sequence[Sequence[int]]) -> Chunk:
        """Append each key's next chunk of prompt (new keys admitted); one forward."""
        width = max(len(t) for t in token_ids)
        ids = torch.full((len(token_ids), width), self._pad_id, dtype=torch.long)
        for row, tokens in enumerate(token_ids):
            ids[row, : len(tokens)] = torch.tensor(list(tokens), dtype=torch.long)
        lens = torch.tensor([len(t) for t in token_ids])
        positions, mask = self.kv.plan_prefill(keys, lens.tolist(), width)
        ids = ids.to(self.device)
        hidden = self.run_decoder(ids, mask, positions, self.kv)  # [n, W, d]
        valid = torch.arange(width).unsqueeze(0) < lens.unsqueeze(1)  # [n, W]
        last = hidden[torch.arange(len(keys), device=self.device), (lens - 1).to(self.device)]
        return Chunk(hidden, ids, valid.to(self.device), last)

    def decode_rows(self, keys: list[Hashable], last_tokens: torch.Tensor) -> torch.Tensor:
        """One token for every decoding key, in one forward over the cache's decoding rows (read
        in place); returns ``hidden [B, d]`` in the order of ``keys``."""
        perm, positions, mask = self.kv.plan_decode(keys)
        perm = perm.to(self.device)
        tokens = torch.empty(len(keys), dtype=torch.long, device=self.device)
        tokens[perm] = last_tokens.reshape(-1).to(self.device)
        self.before_decode(perm)
        hidden = self.run_decoder(tokens.view(-1, 1), mask, positions, self.kv)  # physical order
        return hidden[perm, -1]

    def before_decode(self, perm: torch.Tensor) -> None:
        """Hook for subclasses: the decode forward runs rows in physical order (``x_phys[perm] = x``)."""

    def packed_rows(self, decode_keys: list[Hashable], last_tokens: torch.Tensor, prefill_keys: list[Hashable],
                    token_ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, Chunk]:
        """``decode_rows`` and ``prefill_rows`` in ONE forward (``SlotCache.plan_packed``: every token
        in one packed sequence, so the weights are read once); returns what each would: ``hidden
        [B, d]`` in the order of ``decode_keys``, and the chunk's ``Chunk`` (right-padded)."""
        lens = [len(t) for t in token_ids]
        perm, positions = self.kv.plan_packed(decode_keys, prefill_keys, lens)
        b = len(decode_keys)
        first = torch.empty(b, dtype=torch.long)
        first[perm] = last_tokens.reshape(-1).cpu()
        ids = torch.cat([first, *(torch.tensor(list(t), dtype=torch.long) for t in token_ids)]).to(self.device)
        self.before_packed(perm, lens)
        hidden = self.run_packed(ids.view(1, -1), positions.view(1, -1))[0]  # [T, d]
        width = max(lens)
        chunk_hidden = hidden.new_zeros((len(lens), width, hidden.shape[-1]))
        chunk_ids = torch.full((len(lens), width), self._pad_id, dtype=torch.long, device=self.device)
        offset = b
        for i, n in enumerate(lens):
            chunk_hidden[i, :n] = hidden[offset : offset + n]
            chunk_ids[i, :n] = ids[offset : offset + n]
            offset += n
        lens_t = torch.tensor(lens)
        valid = (torch.arange(width).unsqueeze(0) < lens_t.unsqueeze(1)).to(self.device)
        last = chunk_hidden[torch.arange(len(lens), device=self.device), (lens_t - 1).to(self.device)]
        return hidden[:b][perm.to(self.device)], Chunk(chunk_hidden, chunk_ids, valid, last)

    def before_packed(self, perm: torch.Tensor, chunk_lens: list[int]) -> None:
        """Hook for subclasses: a packed forward runs the decode rows in physical order, then the chunks."""

    def run_packed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One decoder forward over a packed plan (``ids``, ``positions [1, T]``); ``[1, T, d]``.
        Attention goes through ``packed_attention`` for this forward only."""
        config = self.decoder.config
        implementation = config._attn_implementation
        config._attn_implementation = self._packed_attention
        try:
            stub = torch.ones((1, 1, ids.shape[1], 1), dtype=torch.bool, device=self.device)  # unread: a 4D
            kwargs = {self._cache_kw: self.kv, "use_cache": True}  # mask keeps transformers from building one
            return self.decoder(input_ids=ids, attention_mask=stub, position_ids=positions, slot_plan=self.kv.plan,
                                **kwargs).last_hidden_state
        finally:
            config._attn_implementation = implementation

    @torch.inference_mode()
    def packed(self, decode_slots, last_tokens: torch.Tensor, prefill_slots, token_ids,
               want_prompt_nll: bool = False) -> tuple[Scores, Scores]:
        """``decode`` and ``prefill`` in one forward (``Member.packed``)."""
        keys = list(prefill_slots)
        hidden, chunk = self.packed_rows(list(decode_slots), last_tokens, keys, token_ids)
        nll = self.chunk_nll(keys, chunk) if want_prompt_nll else None
        logits = self.logits(torch.cat([hidden, chunk.last]))  # the LM head once for both
        return (Scores(logits=logits[: len(hidden)], hidden=hidden),
                Scores(logits=logits[len(hidden) :], hidden=chunk.last, prompt_nll=nll))

    def chunk_nll(self, keys: list[Hashable], chunk: Chunk) -> torch.Tensor:
        """Mean next-token NLL over each prompt so far ``[n]`` (0 while no pair is scored): within
        the chunk, and its first token from the previous chunk's last hidden state."""
        out = []
        for i, key in enumerate(keys):
            total, count, previous = self._nll.get(key, [0.0, 0, None])
            n = int(chunk.valid[i].sum())
            preds, targets = chunk.hidden[i, : n - 1], chunk.ids[i, 1:n]
            if previous is not None:
                preds, targets = torch.cat([previous[None], preds]), torch.cat([chunk.ids[i, :1], targets])
            if len(targets):
                logprobs = torch.log_softmax(self.logits(preds).float(), dim=-1)
                total += float(-logprobs.gather(1, targets.unsqueeze(1)).sum())
                count += len(targets)
            self._nll[key] = [total, count, chunk.hidden[i, n - 1]]
            out.append(total / max(count, 1))
        return torch.tensor(out, device=self.device)

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

    @torch.inference_mode()
    def prompt_features(self, token_ids: Sequence[Sequence[int]], layer: int, pooling: str) -> torch.Tensor:
        """Pooled hidden states ``[n, d]`` of the bare model at block ``layer`` (a router's
        features), with a PEFT adapter disabled; a merged adapter cannot be, and is read as is."""
        from ..router import layer_features

        ids, mask = self.pad_prompts(token_ids)
        with self.bare_base(len(token_ids)):
            return layer_features(self.decoder, ids, mask, layer, pooling)

    @torch.inference_mode()
    def prompt_features_chunk(self, state, piece: list[int], layer: int, pooling: str) -> None:
        """The next ``piece`` of one prompt into its router ``state`` (``router.chunk_features``),
        on the bare model as ``prompt_features``."""
        from ..router import chunk_features

        with self.bare_base(1):
            chunk_features(self.decoder, state, piece, layer, pooling, self._cache_kw)

    def bare_base(self, rows: int):
        """A context in which a forward of ``rows`` rows runs the model without its adapter."""
        return self.lm.disable_adapter() if hasattr(self.lm, "disable_adapter") else contextlib.nullcontext()

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
