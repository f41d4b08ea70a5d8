"""Sampling: one token per sequence from the fused distribution.

Contract::

    Sampler()(logprobs [B, V] float32 fused log-probs (normalised),
              params [B] SamplingParams, generators [B] torch.Generator,
              prompt_ids [B] token lists, output_ids [B] token lists)
      -> SamplerOutput(tokens [B] int64,
                       chosen_logprobs [B] float32,
                       top_ids [B, N] int64 | None, top_logprobs [B, N] float32 | None)

Every returned log-prob is read from the fused ``logprobs`` as given, before penalties,
temperature, truncation and a grammar's mask (``pick_from``: structured outputs); ``N`` is
the largest ``params.logprobs`` in the batch. Outputs stay on ``logprobs.device``. Each sampled
row draws exactly ``V`` Exp(1) numbers per step from its own generator and greedy rows draw none,
so a seeded request yields the same tokens whatever else is in the batch. ``SamplingParams`` is the validated, frozen form of a request's sampling fields: it
is built once at the edge and raises ``InvalidRequestError`` naming the field.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from compose_serve.errors import InvalidRequestError

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_LOGIT_BIAS = 100.0
#: temperatures below this are greedy (their limit): 1e-300 would be 0 in float32 and divide by it
GREEDY_BELOW = 1e-5


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def _check_int(name: str, value: object, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}", param=name)
    if low is not None and value < low:
        raise InvalidRequestError(f"{name} must be >= {low}, got {value}", param=name)
    return value


def _check_float(
    name: str, value: object, low: float, high: float = math.inf, *, low_open: bool = False
) -> float:
    """Return ``value`` as a float in ``[low, high]`` (``(low, high]`` when ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(f"{name} must be a number, got {value!r}", param=name)
    value = float(value)
    too_low = value <= low if low_open else value < low
    if math.isnan(value) or too_low or value > high or math.isinf(value):
        interval = f"{'(' if low_open else '['}{low}, {high}{']' if high < math.inf else ')'}"
        raise InvalidRequestError(f"{name} must be in {interval}, got {value}", param=name)
    return value


def _token_id(name: str, key: object) -> int:
    """A token id given as an int or, from JSON object keys, as a string of digits."""
    if isinstance(key, str) and key.isascii() and key.isdigit():
        return int(key)
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return key
    raise InvalidRequestError(
        f"{name} keys must be token ids (integers >= 0), got {key!r}", param=name
    )


def _check_logit_bias(value: object) -> dict[int, float] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidRequestError("logit_bias must map token ids to biases", param="logit_bias")
    bias = {
        _token_id("logit_bias", key): _check_float("logit_bias", b, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
        for key, b in value.items()
    }
    return bias or None


def _check_stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    stop = (value,) if isinstance(value, str) else value
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequestError("stop must be a string or a list of strings", param="stop")
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError(f"stop takes at most {MAX_STOP_STRINGS} strings", param="stop")
    if any(s == "" for s in stop):
        raise InvalidRequestError("stop strings must not be empty", param="stop")
    return tuple(stop)


def _check_token_ids(name: str, value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise InvalidRequestError(f"{name} must be a list of token ids", param=name)
    return tuple(_check_int(name, t, low=0) for t in value)


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling fields, validated and normalised on construction."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) = greedy
    top_k: int = 0  # 0 (or -1 on input) = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # prompt and output tokens: s < 0 -> s * p, else s / p
    presence_penalty: float = 0.0  # output tokens only (OpenAI rule)
    frequency_penalty: float = 0.0  # output tokens only, times the count
    logit_bias: Mapping[int, float] | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # n >= 0: the chosen token's log-prob plus the top n
    n: int = 1
    #: n >= 0: every prompt token's log-prob under the fused distribution, plus the top n
    #: (vLLM's ``prompt_logprobs``; ``echo`` with ``logprobs`` on completions). With it,
    #: ``max_tokens`` may be 0: the prompt is scored and nothing is generated.
    prompt_logprobs: int | None = None
    min_tokens: int = 0  # EOS and stop token ids cannot end the output before this many tokens
    skip_special_tokens: bool = True  # special tokens (EOS, chat markers) leave the text out
    include_stop_str_in_output: bool = False  # a matched stop string stays at the end of the text
    #: a compiled grammar request (``compose_serve.structured``): constrains every sampled token
    structured: object | None = None

    def __post_init__(self) -> None:
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, low=0)
            if self.prompt_logprobs > MAX_LOGPROBS:
                raise InvalidRequestError(
                    f"prompt_logprobs must be <= {MAX_LOGPROBS}, got {self.prompt_logprobs}",
                    param="prompt_logprobs",
                )
        _check_int("max_tokens", self.max_tokens, low=0 if self.prompt_logprobs is not None else 1)
        _check_int("min_tokens", self.min_tokens, low=0)
        if self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})",
                param="min_tokens",
            )
        for flag in ("skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, flag), bool):
                raise InvalidRequestError(f"{flag} must be a boolean", param=flag)
        _check_int("n", self.n, low=1)
        top_k = _check_int("top_k", self.top_k, low=-1)
        floats = {
            "temperature": _check_float("temperature", self.temperature, 0.0),
            "top_p": _check_float("top_p", self.top_p, 0.0, 1.0, low_open=True),
            "min_p": _check_float("min_p", self.min_p, 0.0, 1.0),
            "repetition_penalty": _check_float(
                "repetition_penalty", self.repetition_penalty, 0.0, low_open=True
            ),
            "presence_penalty": _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0),
            "frequency_penalty": _check_float(
                "frequency_penalty", self.frequency_penalty, -2.0, 2.0
            ),
        }
        if self.seed is not None:
            _check_int("seed", self.seed)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0)
            if self.logprobs > MAX_LOGPROBS:
                raise InvalidRequestError(
                    f"logprobs must be <= {MAX_LOGPROBS}, got {self.logprobs}", param="logprobs"
                )
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError("ignore_eos must be a boolean", param="ignore_eos")
        normalised = {
            **floats,
            "top_k": 0 if top_k == -1 else top_k,
            "logit_bias": _check_logit_bias(self.logit_bias),
            "stop": _check_stop(self.stop),
            "stop_token_ids": _check_token_ids("stop_token_ids", self.stop_token_ids),
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)  # frozen: normalise once, here

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    @property
    def plain_draw(self) -> bool:
        """Whether the token is a draw from ``softmax(fused / temperature)`` (or its argmax) with
        nothing else applied and no top-n log-probs asked: what the fused samplers of
        ``compose_serve.kernels`` do exactly (``min_tokens`` is checked per step by the engine)."""
        return (self.top_p == 1.0 and self.top_k in (0, 1) and self.min_p == 0.0 and self.repetition_penalty == 1.0
                and not self.presence_penalty and not self.frequency_penalty and not self.logit_bias
                and self.logprobs in (None, 0) and self.structured is None)

    def check_vocab(self, vocab_size: int) -> None:
        """Raise if a token id in the request is outside ``[0, vocab_size)``; call at admission."""
        for name, ids in (
            ("logit_bias", self.logit_bias or {}),
            ("stop_token_ids", self.stop_token_ids),
        ):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"{name} has token ids outside the vocabulary of {vocab_size}: {bad[:5]}",
                    param=name,
                )


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from ``seed`` (any int, taken modulo 2**64), or from OS entropy."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little")
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % 2**64)
    return generator


# ---------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------


@dataclass
class SamplerOutput:
    tokens: torch.Tensor  # [B] int64
    chosen_logprobs: torch.Tensor  # [B] float32, fused (unprocessed) log-prob of each token
    top_ids: torch.Tensor | None  # [B, N] int64, None when no row asked for logprobs
    top_logprobs: torch.Tensor | None  # [B, N] float32, descending


class Sampler:
    """Pick one token per row of the fused log-probs.

    Steps, in order (every step is skipped when no row in the batch needs it):
      0. min_tokens: until a row has that many output tokens, EOS and its stop token ids are out.
      1. logit_bias: add each row's bias to its tokens.
      2. repetition penalty on prompt and output tokens, vLLM's and transformers' rule on raw
         scores: ``z < 0 -> z * p``, else ``z / p``, where ``z = logprobs + raw_shift`` (the
         method's pre-normalisation scale: a member alone gets exactly its own logits back).
      3. frequency and presence penalties on output tokens: ``s -= f * count + p * (count > 0)``.
      4. greedy rows (temperature 0, or below GREEDY_BELOW, or top_k 1): argmax; no random draws.
      5. temperature: ``(s - max s) / T`` (the shift keeps tiny temperatures finite).
      6. top-k: keep the k highest scores (ties broken by lower token id).
      7. top-p: keep the smallest prefix of the sorted tokens whose probability sums to >= top_p;
         the most likely token always stays. Steps 6-7 share one sort.
      8. min-p: drop tokens whose probability is < min_p * the highest probability.
      9. sample each row from the softmax of what remains, with its own generator:
         ``argmax(probs / E)``, ``E ~ Exp(1)`` of size V (the exponential race, = Gumbel-max).
     10. gather the chosen token's log-prob and the top-N from the ORIGINAL fused log-probs.
    """

    def __init__(self, eos_token_ids: Sequence[int] = ()) -> None:
        self.eos_token_ids = tuple(eos_token_ids)

    def __call__(
        self,
        logprobs: torch.Tensor,  # [B, V]
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        raw_shift: torch.Tensor | None = None,  # [B]: logprobs + raw_shift = raw fused scores
        pick_from: torch.Tensor | None = None,  # [B, V]: structured outputs' grammar-masked copy
    ) -> SamplerOutput:
        _check_batch(logprobs, params, generators, prompt_ids, output_ids)
        # tokens are picked from ``pick_from`` when given; returned log-probs stay ``logprobs``'
        picking = logprobs if pick_from is None else pick_from
        scores = self.apply_penalties(picking, params, prompt_ids, output_ids, raw_shift)  # 0-3
        tokens = self._pick(scores, params, generators)  # steps 4-9
        return self._gather(logprobs, tokens, params)  # step 10

    # -- steps 1-3 ------------------------------------------------------------------------------

    def apply_penalties(
        self,
        logprobs: torch.Tensor,  # [B, V]
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        raw_shift: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Steps 0-3. Returns ``logprobs`` itself when no row has a bias, a penalty or a
        min_tokens still to reach. ``raw_shift [B]`` (default 0) puts the scores on the raw scale
        that the repetition penalty is defined on."""
        early = [
            row
            for row, (p, out) in enumerate(zip(params, output_ids, strict=True))
            if len(out) < p.min_tokens
        ]
        if not (early or any(p.logit_bias for p in params) or any(_penalised(p) for p in params)):
            return logprobs
        scores = logprobs.clone()  # [B, V]; the original is needed again in step 10
        device = scores.device
        for row in early:  # step 0
            p = params[row]
            banned = [*(() if p.ignore_eos else self.eos_token_ids), *p.stop_token_ids]
            if banned:
                scores[row, _long(banned, device)] = -math.inf
        bias_rows, bias_ids, bias_values = [], [], []
        for row, p in enumerate(params):
            for token, bias in (p.logit_bias or {}).items():
                bias_rows.append(row)
                bias_ids.append(token)
                bias_values.append(bias)
        if bias_rows:
            index = (_long(bias_rows, device), _long(bias_ids, device))
            scores.index_put_(
                index, torch.tensor(bias_values, dtype=scores.dtype, device=device), accumulate=True
            )
        if any(p.repetition_penalty != 1.0 for p in params):
            if raw_shift is not None:
                scores = scores + raw_shift.to(scores).unsqueeze(-1)
            scores = self._repetition(scores, params, prompt_ids, output_ids)
        if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params):
            scores = self._frequency_presence(scores, params, output_ids)
        return scores

    def _repetition(
        self,
        scores: torch.Tensor,  # [B, V]
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
    ) -> torch.Tensor:
        # Only rows with a penalty list their (possibly long) prompts.
        seen_lists = [
            [*prompt, *output] if p.repetition_penalty != 1.0 else ()
            for p, prompt, output in zip(params, prompt_ids, output_ids, strict=True)
        ]
        seen = _token_counts(seen_lists, scores) > 0  # [B, V]
        penalty = _column([p.repetition_penalty for p in params], scores)  # [B, 1]
        penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
        return torch.where(seen, penalised, scores)

    def _frequency_presence(
        self,
        scores: torch.Tensor,  # [B, V]
        params: Sequence[SamplingParams],
        output_ids: Sequence[Sequence[int]],
    ) -> torch.Tensor:
        wanted = [p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params]
        counts = _token_counts(
            [o if w else () for o, w in zip(output_ids, wanted, strict=True)], scores
        )
        frequency = _column([p.frequency_penalty for p in params], scores)  # [B, 1]
        presence = _column([p.presence_penalty for p in params], scores)  # [B, 1]
        return scores - frequency * counts - presence * (counts > 0).float()

    # -- steps 4-9 ------------------------------------------------------------------------------

    def _pick(
        self,
        scores: torch.Tensor,  # [B, V]
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator],
    ) -> torch.Tensor:
        greedy, sampled = _split(params)
        if not sampled:
            return scores.argmax(dim=-1)  # step 4, whole batch
        tokens = torch.empty(len(params), dtype=torch.long, device=scores.device)
        if greedy:
            greedy_index = _long(greedy, scores.device)
            tokens[greedy_index] = scores[greedy_index].argmax(dim=-1)  # step 4
        sampled_index = _long(sampled, scores.device)
        sub = scores if not greedy else scores[sampled_index]  # [b, V]
        sub = self.truncate(sub, [params[row] for row in sampled])  # steps 5-8
        tokens[sampled_index] = _draw(sub, [generators[row] for row in sampled])  # step 9
        return tokens

    def truncate(self, scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
        """Steps 5-8 on non-greedy rows ``[b, V]``: tempered scores, -inf outside the allowed set."""
        # Shift every row, not only tempered ones, so a row's numbers never depend on its batch.
        scores = scores - scores.amax(dim=-1, keepdim=True)
        if any(p.temperature != 1.0 for p in params):
            scores = scores / _column([p.temperature for p in params], scores)  # [b, 1]
        if any(0 < p.top_k < scores.shape[-1] or p.top_p < 1.0 for p in params):
            scores = _top_k_top_p(scores, params)
        if any(p.min_p > 0.0 for p in params):
            # prob < min_p * max prob  <=>  s < max s + log(min_p); log(0) = -inf keeps everything.
            log_min_p = torch.log(_column([p.min_p for p in params], scores))  # [b, 1]
            floor = scores.amax(dim=-1, keepdim=True) + log_min_p
            scores = scores.masked_fill(scores < floor, -math.inf)
        return scores

    def processed_logits(
        self,
        logprobs: torch.Tensor,  # [B, V]
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
    ) -> torch.Tensor:
        """The ``[B, V]`` scores each row's token is drawn from; -inf outside its allowed set.

        A greedy row keeps only its argmax (at 0). For inspection and tests: the same steps as
        ``__call__``, which does not build this tensor for greedy rows.
        """
        scores = self.apply_penalties(logprobs, params, prompt_ids, output_ids)
        processed = torch.full_like(scores, -math.inf)  # [B, V]
        greedy, sampled = _split(params)
        if greedy:
            greedy_index = _long(greedy, scores.device)
            processed[greedy_index, scores[greedy_index].argmax(dim=-1)] = 0.0
        if sampled:
            sampled_index = _long(sampled, scores.device)
            sub_params = [params[row] for row in sampled]
            processed[sampled_index] = self.truncate(scores[sampled_index], sub_params)
        return processed

    # -- step 10 --------------------------------------------------------------------------------

    def _gather(
        self, logprobs: torch.Tensor, tokens: torch.Tensor, params: Sequence[SamplingParams]
    ) -> SamplerOutput:
        chosen = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [B]
        asked = [p.logprobs for p in params if p.logprobs is not None]
        if not asked:
            return SamplerOutput(tokens, chosen, None, None)
        top_n = min(max(asked), logprobs.shape[-1])
        top_logprobs, top_ids = torch.topk(logprobs, top_n, dim=-1)  # [B, N], descending
        return SamplerOutput(tokens, chosen, top_ids, top_logprobs)


def _check_batch(logprobs: torch.Tensor, *per_row: Sequence) -> None:
    """The engine's side of the contract: one float32 row per sequence, every list of length B."""
    if logprobs.dim() != 2 or logprobs.dtype != torch.float32:
        raise ValueError(
            f"logprobs must be [B, V] float32, got {logprobs.dtype} {tuple(logprobs.shape)}"
        )
    lengths = {len(values) for values in per_row}
    if lengths != {logprobs.shape[0]}:
        raise ValueError(
            f"{logprobs.shape[0]} rows of logprobs but per-row lists of lengths {lengths}"
        )


def _split(params: Sequence[SamplingParams]) -> tuple[list[int], list[int]]:
    """Row numbers of the greedy rows and of the sampled rows."""
    greedy = [row for row, p in enumerate(params) if p.greedy]
    return greedy, [row for row, p in enumerate(params) if not p.greedy]


def _penalised(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _long(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-row values as a ``[B, 1]`` tensor that broadcasts against ``[B, V]``."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(-1)


def _token_counts(token_lists: Sequence[Sequence[int]], like: torch.Tensor) -> torch.Tensor:
    """How often each token occurs in each row's list: ``[B, V]`` float."""
    counts = torch.zeros_like(like)
    lengths = [len(tokens) for tokens in token_lists]
    if sum(lengths) == 0:
        return counts
    rows = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    ids = [t for tokens in token_lists for t in tokens]
    index = (rows.to(like.device), _long(ids, like.device))
    counts.index_put_(
        index, torch.ones(len(ids), dtype=like.dtype, device=like.device), accumulate=True
    )
    return counts


def _top_k_top_p(scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Steps 6-7 with one stable sort of ``scores [b, V]`` for the whole batch."""
    vocab = scores.shape[-1]
    sorted_scores, sorted_ids = scores.sort(dim=-1, descending=True, stable=True)  # [b, V]
    top_k = _long([p.top_k if 0 < p.top_k < vocab else vocab for p in params], scores.device)
    position = torch.arange(vocab, device=scores.device)  # [V]
    drop = position >= top_k.unsqueeze(-1)  # [b, V] in sorted order
    top_p = _column([p.top_p for p in params], scores)  # [b, 1]
    probs = sorted_scores.masked_fill(drop, -math.inf).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
    # top_p == 1 rows are skipped outright: rounding could push mass_before to 1.0 in a long tail.
    drop |= (mass_before >= top_p) & (top_p < 1.0)
    drop[:, 0] = False  # the most likely token always stays (a tiny top_p is 0 in float32)
    drop_by_id = torch.empty_like(drop).scatter_(-1, sorted_ids, drop)  # back to vocabulary order
    return scores.masked_fill(drop_by_id, -math.inf)


def _draw(scores: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Step 9: one token per row of ``scores [b, V]`` by the exponential race."""
    probs = scores.softmax(dim=-1)  # [b, V]
    noise = torch.empty_like(probs)  # [b, V]
    for row, generator in enumerate(generators):  # per row: V draws from its own generator
        noise[row].exponential_(generator=generator)
    # A zero draw would turn a removed token (prob 0) into 0/0 = NaN, which argmax would pick.
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)
