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
)


def renamed(exc: InvalidRequestError, renames: dict[str, str]) -> InvalidRequestError:
    """``exc`` naming the field as the request spelled it (``max_completion_tokens``, ``messages``)."""
    name = renames.get(exc.param)
    if name is None:
        return exc
    return type(exc)(exc.message.replace(exc.param, name, 1), param=name)


def sampling_params(
    body, max_tokens: int, logprobs: int | None, renames: dict[str, str]
) -> SamplingParams:
    """The request's SamplingParams; an error names the field as the request spelled it."""
    fields = {
        name: getattr(body, name) for name in SAMPLING_FIELDS if getattr(body, name) is not None
    }
    try:
        return SamplingParams(
            max_tokens=max_tokens, logprobs=logprobs, n=1 if body.n is None else body.n, **fields
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


def completion_prompts(tokenizer, prompt, vocab_size: int | None = None) -> list[list[int]]:
    """Text, a list of texts, a list of token ids, or a list of lists of ids -> id lists; ids
    outside ``[0, vocab_size)`` are refused here, before anything decodes them (``echo``)."""
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if not prompt:
        raise InvalidRequestError("prompt must not be an empty list", param="prompt")
    if isinstance(prompt[0], str):
        return [tokenizer.encode(text) for text in prompt]
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


def chat_prompt_ids(tokenizer, messages: list[ChatMessage]) -> list[int]:
    """The chat template applied to the messages, with the assistant's turn opened."""
    if not messages:
        raise InvalidRequestError("messages must contain at least one message", param="messages")
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(
            "this model has no chat template; use /v1/completions", param="messages"
        )
    conversation = [
        {"role": m.role, "content": _message_text(m, i)} for i, m in enumerate(messages)
    ]
    try:
        ids = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=False
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


def refuse_unsupported_completion(body: CompletionRequest) -> None:
    _refuse(body.suffix, "suffix", "insertion is not implemented")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise InvalidRequestError(
            "best_of must equal n (candidates are not ranked)", param="best_of"
        )
    if body.echo and body.logprobs is not None:
        raise InvalidRequestError(
            "echo with logprobs is not supported (prompt log-probs are not computed)", param="echo"
        )
    if body.stream_options is not None and not body.stream:
        raise InvalidRequestError(
            "stream_options is only allowed when stream is true", param="stream_options"
        )


def refuse_unsupported_chat(body: ChatCompletionRequest) -> None:
    _refuse(body.tools, "tools", "tool calls are not implemented")
    if body.tool_choice not in (None, "none"):
        raise InvalidRequestError(
            "tool_choice is not supported: tool calls are not implemented", param="tool_choice"
        )
    if body.response_format not in (None, {"type": "text"}):
        raise InvalidRequestError(
            "response_format is not supported: only plain text", param="response_format"
        )
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs set to true", param="top_logprobs")
    if body.stream_options is not None and not body.stream:
        raise InvalidRequestError(
            "stream_options is only allowed when stream is true", param="stream_options"
        )
