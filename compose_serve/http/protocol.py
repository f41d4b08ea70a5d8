"""OpenAI wire models (pydantic), nothing else: requests in, responses and stream chunks out.

What both generation routes take (OpenAI's shared sampling and streaming fields, vLLM's sampling
and structured-output fields, prompt log-probs, the refused fields, and this project's one
extension, ``composition``) is declared once, in ``_Generation``; each route's model adds its own.
Requests are strict about types (``"0.5"`` is not a number) and ignore fields they do not know,
as OpenAI-compatible servers do; ranges are checked once, by ``SamplingParams``, which names the
field. Known fields that would change the output and are not
implemented (beam search, ``bad_words``, ``suffix`` ...) are typed ``Any`` so that a request
setting one gets a 400 naming it (``inputs.refuse_unsupported``), never a silently different reply.
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


# -- what both generation routes take beyond OpenAI's fields -------------------------------------
class _Generation(_Request):
    """What /v1/completions and /v1/chat/completions both take: OpenAI's sampling and streaming
    fields, vLLM's sampling and structured-output fields, prompt log-probs, the known fields that
    are refused (they would change the output and are not implemented), and this project's
    ``composition``. (``logprobs`` differs: a count on completions, a flag on chat.)"""

    model: str
    # -- OpenAI --
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = None
    n: int | None = 1
    presence_penalty: float | None = None
    response_format: Any = None  # {"type": "text" | "json_object" | "json_schema", ...}
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    # -- vLLM sampling extensions --
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    truncate_prompt_tokens: int | None = None
    return_tokens_as_token_ids: bool | None = None
    add_special_tokens: bool | None = None
    # -- structured outputs (vLLM) --
    guided_json: Any = None  # a JSON schema (object or its text)
    guided_regex: Any = None  # a regular expression
    guided_choice: Any = None  # a list of strings
    guided_grammar: Any = None  # an EBNF (root ::= ...) or Lark grammar
    structured_outputs: Any = None  # {"json" | "regex" | "choice" | "grammar" | "json_object": ...}
    guided_whitespace_pattern: Any = None  # refused (JSON is written compact)
    # -- prompt log-probs (vLLM) --
    prompt_logprobs: int | None = None  # every prompt token's log-prob + the top k (0..20)
    # -- fields that change the output and are not implemented: refused when set (inputs.py) --
    use_beam_search: Any = None
    length_penalty: Any = None
    early_stopping: Any = None
    bad_words: Any = None
    allowed_token_ids: Any = None
    logits_processors: Any = None
    spaces_between_special_tokens: Any = None
    # -- compose-serve extension: per-request composition ({"weights": {member: w}} or {"alpha": a})
    composition: dict[str, Any] | None = None


# -- /v1/completions ----------------------------------------------------------------------------
class CompletionRequest(_Generation):
    """(``response_format``, OpenAI's chat field, is taken here too, as vLLM does.)"""

    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = None
    echo: bool | None = False
    logprobs: int | None = None
    suffix: Any = None  # refused: insertion is not implemented
    # -- refused when set (inputs.py) --
    prompt_embeds: Any = None


# -- /v1/chat/completions -----------------------------------------------------------------------
class ContentPart(_Request):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


# -- structured outputs --
class FunctionCallIn(_Request):
    name: str
    arguments: str  # JSON text, as OpenAI and its clients send it


class ToolCallIn(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # -- structured outputs: an assistant's tool calls, and a tool message's answer to one --
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage]
    logprobs: bool | None = False
    max_completion_tokens: int | None = None
    tool_choice: Any = None
    tools: Any = None
    top_logprobs: int | None = None
    parallel_tool_calls: bool | None = None  # accepted; one call per reply is always allowed
    # -- vLLM chat template controls --
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # -- refused when set (inputs.py) --
    echo: Any = None
    documents: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    functions: Any = None
    function_call: Any = None


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


class PromptTokenLogprob(_Response):
    """vLLM's ``Logprob`` in ``prompt_logprobs``: a token's log-prob at a prompt position, its
    rank (1 = the most likely) and its text; keyed by the token id as a string."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


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
    stop_reason: int | str | None = None  # vLLM: the stop token id or string that ended it
    # -- prompt log-probs (vLLM): per prompt token, None for the first --
    prompt_logprobs: list[dict[str, PromptTokenLogprob] | None] | None = None
    # -- compose-serve extension --
    composition: CompositionDiagnostics | None = None


class CompletionResponse(_Response):
    """Both the whole response and, with ``stream``, each chunk (OpenAI uses one shape)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
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
    refusal: list[ChatTokenLogprob] | None = None


# -- structured outputs --
class FunctionCall(_Response):
    name: str
    arguments: str  # JSON text of the arguments object


class ToolCall(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaFunctionCall(_Response):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _present_only(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaToolCall(_Response):
    """A streamed tool call piece: the first names it (id, type, function.name), the next ones
    add to ``function.arguments``; ``index`` says which call of the message it belongs to."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None

    @model_serializer(mode="wrap")
    def _present_only(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None  # -- structured outputs --


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM: the stop token id or string that ended it
    # -- compose-serve extension --
    composition: CompositionDiagnostics | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: UsageInfo
    # -- prompt log-probs (vLLM: on the response, the prompt being one for every choice) --
    prompt_logprobs: list[dict[str, PromptTokenLogprob] | None] | None = None


class DeltaMessage(_Response):
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None  # -- structured outputs --

    @model_serializer(mode="wrap")
    def _present_only(self, handler):  # a delta lists only what it changes
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # -- compose-serve extension --
    composition: CompositionDiagnostics | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
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


# -- /tokenize, /detokenize, /version (vLLM's shapes) --------------------------------------------
class TokenizeRequest(_Request):
    """vLLM's two tokenize bodies in one: ``prompt`` (completions) or ``messages`` (chat, the
    chat template applied as /v1/chat/completions does). ``model`` may be left out when one
    composition is served."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: true for a prompt, false for messages
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool | None = False


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(_Response):
    prompt: str


class VersionResponse(_Response):
    version: str


# -- errors -------------------------------------------------------------------------------------
class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorInfo
