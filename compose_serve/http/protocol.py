"""OpenAI wire models (pydantic), nothing else: requests in, responses and stream chunks out.

Fields follow the OpenAI API reference in its order; the vLLM sampling fields OpenAI lacks come
next, and this project's one extension, ``composition``, sits in its own marked block at the end
of each model that carries it. Requests are strict about types (``"0.5"`` is not a number) and
ignore fields they do not know, as OpenAI-compatible servers do; ranges are checked once, by
``SamplingParams``, which names the field. Fields accepted only to be refused with a clear error
(tools, response formats, suffix) are typed ``Any`` and checked in ``serving.py``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Request):
    include_usage: bool | None = False


# -- /v1/completions ----------------------------------------------------------------------------
class CompletionRequest(_Request):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = None
    echo: bool | None = False
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = None
    max_tokens: int | None = None
    n: int | None = 1
    presence_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    suffix: Any = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    # -- vLLM sampling extensions --
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    # -- compose-serve extension: per-request composition ({"weights": {member: w}} or {"alpha": a})
    composition: dict[str, Any] | None = None


# -- /v1/chat/completions -----------------------------------------------------------------------
class ContentPart(_Request):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage]
    model: str
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = False
    max_completion_tokens: int | None = None
    max_tokens: int | None = None
    n: int | None = 1
    presence_penalty: float | None = None
    response_format: Any = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    tool_choice: Any = None
    tools: Any = None
    top_logprobs: int | None = None
    top_p: float | None = None
    user: str | None = None
    # -- vLLM sampling extensions --
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    # -- compose-serve extension: per-request composition ({"weights": {member: w}} or {"alpha": a})
    composition: dict[str, Any] | None = None


# -- responses ----------------------------------------------------------------------------------
class UsageInfo(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompositionDiagnostics(_Response):
    """The extension in responses: per member, the effective weight, the members that ran
    (weight > 0), the router's probabilities (routed compositions) and the IMSM mean gate."""

    weights: dict[str, float] | None = None
    ran: list[str] | None = None
    router: dict[str, float] | None = None
    gate_mean: dict[str, float] | None = None


class CompletionLogprobs(_Response):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    # -- compose-serve extension --
    composition: CompositionDiagnostics | None = None


class CompletionResponse(_Response):
    """Both the whole response and, with ``stream``, each chunk (OpenAI uses one shape)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    # -- compose-serve extension --
    composition: CompositionDiagnostics | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(_Response):
    role: str | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _present_only(self, handler):  # a delta lists only what it changes
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    # -- compose-serve extension --
    composition: CompositionDiagnostics | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


# -- /v1/models ---------------------------------------------------------------------------------
class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "compose-serve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    # -- compose-serve extension: how the model is composed --
    composition: dict[str, Any] | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- errors -------------------------------------------------------------------------------------
class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorInfo
