"""OpenAI request bodies -> engine inputs: prompt ids and SamplingParams, and what is refused.

Completions take text, a list of texts, a list of token ids or a list of lists of ids; chat
applies the tokenizer's chat template to text messages and opens the assistant's turn. Every
error is an InvalidRequestError naming the field as the request spelled it (``top_logprobs``,
``max_completion_tokens``, ``messages.0.content.1.type``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from ..errors import InvalidRequestError
from ..sampling import SamplingParams
from .protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from .structured_io import ToolPlan, conversation_entry, with_tools

SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "include_stop_str_in_output",
)

#: known fields that would change the output and are not implemented -> a 400 naming the field
#: when set to anything but their no-op value (``None``, or the value listed here)
NOT_IMPLEMENTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "suffix": ((), "insertion is not implemented"),
    "use_beam_search": ((False,), "beam search is not implemented"),
    "length_penalty": ((1, 1.0), "it applies to beam search, which is not implemented"),
    "early_stopping": ((False,), "it applies to beam search, which is not implemented"),
    "bad_words": ((), "banned words are not implemented"),
    "allowed_token_ids": ((), "allowed token ids are not implemented"),
    "logits_processors": ((), "custom logits processors are not implemented"),
    "spaces_between_special_tokens": ((True,), "only the default (true) is implemented"),
    "prompt_embeds": ((), "prompts are token ids or text"),
    "guided_whitespace_pattern": ((), "structured JSON is written compact, with no free whitespace"),
    "documents": ((), "documents for the chat template are not implemented"),
    "audio": ((), "audio output is not implemented"),
    "modalities": ((["text"],), "only text output"),
    "prediction": ((), "predicted outputs are not implemented"),
    "web_search_options": ((), "web search is not implemented"),
    "reasoning_effort": ((), "the models served here do not reason in a separate channel"),
    "functions": ((), "the legacy functions field is not implemented: use tools"),
    "function_call": ((), "the legacy function_call field is not implemented: use tool_choice"),
}
CHAT_NOT_IMPLEMENTED = {"echo": ((False,), "echo on chat is not implemented")}


def renamed(exc: InvalidRequestError, renames: dict[str, str]) -> InvalidRequestError:
    """``exc`` naming the field as the request spelled it (``max_completion_tokens``, ``messages``)."""
    name = renames.get(exc.param)
    if name is None:
        return exc
    return type(exc)(exc.message.replace(exc.param, name, 1), param=name)


def sampling_params(
    body,
    max_tokens: int,
    logprobs: int | None,
    renames: dict[str, str],
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """The request's SamplingParams; an error names the field as the request spelled it.
    ``prompt_logprobs``: top-n per prompt token (None: the prompt is not scored)."""
    fields = {
        name: getattr(body, name) for name in SAMPLING_FIELDS if getattr(body, name) is not None
    }
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            logprobs=logprobs,
            n=1 if body.n is None else body.n,
            prompt_logprobs=prompt_logprobs,
            **fields,
        )
    except InvalidRequestError as exc:
        raise renamed(exc, renames) from None


def refuse_invalid_text(value: Any, path: str = "") -> None:
    """Every string of a request must be Unicode text: JSON's ``"\\ud800"`` (a lone surrogate)
    is not, and could be neither tokenized nor sent back. The error names the field."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequestError(
                f"{path or 'the request'} is not valid Unicode text: a lone surrogate "
                f"{ascii(value[exc.start])} at index {exc.start}",
                param=path or None,
            ) from None
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            refuse_invalid_text(getattr(value, name), f"{path}.{name}" if path else name)
    elif isinstance(value, dict):
        for key, item in value.items():
            refuse_invalid_text(key, path)
            refuse_invalid_text(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            refuse_invalid_text(item, f"{path}.{i}")


def completion_prompts(
    tokenizer, prompt, vocab_size: int | None = None, add_special_tokens: bool = True
) -> list[list[int]]:
    """Text, a list of texts, a list of token ids, or a list of lists of ids -> id lists; ids
    outside ``[0, vocab_size)`` are refused here, before anything decodes them (``echo``)."""
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt, add_special_tokens=add_special_tokens)]
    if not prompt:
        raise InvalidRequestError("prompt must not be an empty list", param="prompt")
    if isinstance(prompt[0], str):
        return [tokenizer.encode(text, add_special_tokens=add_special_tokens) for text in prompt]
    prompts = [list(prompt)] if isinstance(prompt[0], int) else [list(ids) for ids in prompt]
    for p, ids in enumerate(prompts):
        bad = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
        if bad:
            where = "prompt" if isinstance(prompt[0], int) else f"prompt.{p}"
            limit = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise InvalidRequestError(
                f"{where}: token ids {bad[:5]} are outside the vocabulary {limit}", param="prompt"
            )
    return prompts


def prompt_texts(tokenizer, prompt, prompts: list[list[int]]) -> list[str]:
    """Each prompt as text, for ``echo``: as given, or decoded from its ids."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt[0], str):
        return list(prompt)
    return [tokenizer.decode(ids) for ids in prompts]


#: arguments of ``apply_chat_template`` that ``chat_template_kwargs`` may not set
RESERVED_TEMPLATE_KWARGS = frozenset(
    {"conversation", "tokenize", "return_dict", "add_generation_prompt", "continue_final_message",
     "chat_template", "tools", "documents", "return_tensors", "padding", "truncation", "max_length"}
)


def template_options(body) -> dict[str, Any]:
    """vLLM's chat-template controls of a request body (chat completions, /tokenize), as the
    keyword arguments of ``chat_prompt_ids``."""
    return {
        "add_generation_prompt": body.add_generation_prompt,
        "continue_final_message": body.continue_final_message,
        "chat_template": body.chat_template,
        "template_kwargs": body.chat_template_kwargs,
    }


def chat_prompt_ids(
    tokenizer,
    messages: list[ChatMessage],
    *,
    add_generation_prompt: bool | None = None,
    continue_final_message: bool | None = None,
    chat_template: str | None = None,
    template_kwargs: dict[str, Any] | None = None,
    tools: ToolPlan | None = None,
) -> list[int]:
    """The chat template applied to the messages: by default the assistant's turn is opened
    (``add_generation_prompt``); ``continue_final_message`` instead leaves the last message (an
    assistant's) open, for the model to go on with it. ``chat_template`` replaces the tokenizer's
    template and ``template_kwargs`` reach it as variables (vLLM's ``chat_template_kwargs``)."""
    if not messages:
        raise InvalidRequestError("messages must contain at least one message", param="messages")
    if not (chat_template or getattr(tokenizer, "chat_template", None)):
        raise InvalidRequestError(
            "this model has no chat template; use /v1/completions", param="messages"
        )
    go_on = bool(continue_final_message)
    open_turn = not go_on if add_generation_prompt is None else add_generation_prompt
    if go_on and open_turn:
        raise InvalidRequestError(
            "continue_final_message and add_generation_prompt cannot both be true",
            param="continue_final_message",
        )
    if go_on and messages[-1].role != "assistant":
        raise InvalidRequestError(
            "continue_final_message needs the last message to be the assistant's",
            param="continue_final_message",
        )
    extra = dict(template_kwargs or {})
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(extra))
    if reserved:
        raise InvalidRequestError(
            f"chat_template_kwargs may not set {reserved}: they are request fields of their own",
            param=f"chat_template_kwargs.{reserved[0]}",
        )
    conversation = [conversation_entry(m, _message_text(m, i)) for i, m in enumerate(messages)]
    # -- structured outputs: tools reach the template, or a system message lists them --
    template_tools = list(tools.template_tools) if tools is not None else None
    announce = tools is not None and tools.calls
    conversation = with_tools(tokenizer, conversation, template_tools, announce, chat_template, extra)
    try:
        ids = tokenizer.apply_chat_template(
            conversation,
            add_generation_prompt=open_turn,
            continue_final_message=go_on,
            chat_template=chat_template,
            tokenize=True,
            return_dict=False,
            tools=template_tools,
            **extra,
        )
    except Exception as exc:  # jinja2 raises TemplateError for conversations it refuses
        raise InvalidRequestError(
            f"the chat template refused the messages: {exc}", param="messages"
        ) from None
    return list(ids)


def _message_text(message: ChatMessage, i: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for j, part in enumerate(message.content):
        if part.type != "text" or part.text is None:
            raise InvalidRequestError(
                f"only text content parts are supported, got type {part.type!r}",
                param=f"messages.{i}.content.{j}.type",
            )
        texts.append(part.text)
    return "".join(texts)


def _refuse(value: Any, param: str, why: str) -> None:
    if value not in (None, "", [], {}):
        raise InvalidRequestError(f"{param} is not supported: {why}", param=param)


def refuse_unsupported(body: BaseModel, extra: dict | None = None) -> None:
    """A 400 naming the first field of ``NOT_IMPLEMENTED`` (and ``extra``) that the request sets
    to something other than its no-op value: a client never gets a reply that ignored it."""
    for name, (no_op, why) in {**NOT_IMPLEMENTED, **(extra or {})}.items():
        value = getattr(body, name, None)
        if value is not None and value not in no_op:
            _refuse(value, name, why)


def truncated(prompt_ids: list[int], keep: int | None, max_context: int) -> list[int]:
    """vLLM's ``truncate_prompt_tokens``: the last ``keep`` tokens (-1: the context length)."""
    if keep is None:
        return prompt_ids
    if keep == -1:
        keep = max_context
    if keep < 1:
        raise InvalidRequestError(
            f"truncate_prompt_tokens must be >= 1 (or -1 for the context length), got {keep}",
            param="truncate_prompt_tokens",
        )
    return prompt_ids[-keep:]


def refuse_streamed_prompt_logprobs(body: CompletionRequest | ChatCompletionRequest) -> None:
    """vLLM's ``prompt_logprobs`` field is refused with ``stream`` (as vLLM does); a stream with
    ``echo`` and ``logprobs`` carries the prompt's log-probs in its first chunk instead."""
    if body.prompt_logprobs is not None and body.stream:
        raise InvalidRequestError(
            "prompt_logprobs is not available when stream is true", param="prompt_logprobs"
        )


def prompt_logprobs_of(body: CompletionRequest, max_tokens: int) -> int | None:
    """The engine's ``prompt_logprobs`` (top-n per prompt token) for a completions request:
    vLLM's field, raised to ``logprobs`` when ``echo`` asks for the prompt's log-probs too; 0
    for ``echo`` with ``max_tokens`` 0 alone (scoring the prompt is what ends such a request)."""
    n = body.prompt_logprobs
    if body.echo and body.logprobs is not None:
        n = max(n or 0, body.logprobs)
    if body.echo and max_tokens == 0 and n is None:
        n = 0
    return n


def refuse_unsupported_completion(body: CompletionRequest) -> None:
    refuse_unsupported(body)
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise InvalidRequestError(
            "best_of must equal n (candidates are not ranked)", param="best_of"
        )
    refuse_streamed_prompt_logprobs(body)
    if body.stream_options is not None and not body.stream:
        raise InvalidRequestError(
            "stream_options is only allowed when stream is true", param="stream_options"
        )


def refuse_unsupported_chat(body: ChatCompletionRequest) -> None:
    refuse_unsupported(body, CHAT_NOT_IMPLEMENTED)
    # tools, tool_choice, response_format: structured outputs (structured_io.py) check them
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
    refuse_streamed_prompt_logprobs(body)
    if body.stream_options is not None and not body.stream:
        raise InvalidRequestError(
            "stream_options is only allowed when stream is true", param="stream_options"
        )
