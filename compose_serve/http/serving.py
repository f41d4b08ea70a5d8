"""Translation between OpenAI JSON and the engine's Requests / TokenEvents, and the error mapper.

Per HTTP request (``OpenAIServing.create_completion`` / ``create_chat_completion``):
  0. every string must be Unicode text (no lone surrogates)                             -> 400
  1. resolve ``model``: a composition, or one member served alone (the method's plan
     for it, ``CompositionInfo.solo``)                                                   -> 404
  2. prompt ids: completions take text or ids, one prompt or many; chat applies the
     tokenizer's chat template to the messages                                          -> 400
  3. SamplingParams, built once, names any bad field                                    -> 400
  4. n Requests per prompt (seed + i when a seed is given); every prompt passes the
     backend's admission checks first, then all are admitted or none                    -> 400/429
  Steps 0-4 up to admission run in a worker thread: tokenizing a long prompt never stalls
  the event loop (the other streams, /health).
  5. without ``stream``: every choice's events gathered into one response (text, finish_reason,
     logprobs, usage, the ``composition`` diagnostics); with ``stream``: an ``EventStream`` of
     SSE chunks as tokens arrive, the usage chunk when ``stream_options.include_usage``, then
     ``[DONE]``; a failure after the first byte is sent as one error event and the stream ends.
Usage counts each prompt once and every generated token (one TokenEvent is one token, but the
event of a prompt scored with ``max_tokens`` 0, which carries none).
Prompt log-probs ride on a choice's first event: ``echo`` with ``logprobs`` puts the prompt's
tokens first in the completions ``logprobs`` (the first token's entries null; in a stream, in the
choice's first chunk with the echoed text), and vLLM's ``prompt_logprobs`` field returns vLLM's
shape (per choice on completions, on the response for chat; refused with ``stream``, as vLLM does).
Every exception becomes OpenAI's error JSON in ``error_response`` and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from .. import __version__
from ..engine.sequence import Request, TokenEvent
from ..errors import (
    AuthenticationError,
    ComposeError,
    ContextLengthError,
    InvalidRequestError,
    ModelNotFoundError,
    PayloadTooLargeError,
    QueueFullError,
)
from ..sampling import SamplingParams
from .backend import Backend, CompositionInfo
from .catalog import ModelCatalog
from .inputs import (
    chat_prompt_ids,
    completion_prompts,
    prompt_logprobs_of,
    prompt_texts,
    refuse_invalid_text,
    refuse_unsupported_chat,
    refuse_unsupported_completion,
    renamed,
    sampling_params,
    template_options,
    truncated,
)
from .outputs import (
    TokenIdText,
    TokenText,
    add_completion_logprobs,
    add_prompt_logprobs,
    chat_logprob,
    diagnostics,
    finish_reason,
    mean_diagnostics,
    sse,
    stop_reason,
    token_count,
    usage,
    vllm_prompt_logprobs,
)
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorInfo,
    ErrorResponse,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    UsageInfo,
)
from .structured_io import ToolPlan, ToolStream, structured_spec, tool_plan, tool_reply

logger = logging.getLogger(__name__)

MAX_N = 64

Disconnected = Callable[[], Awaitable[None]]  # returns once the client has gone


# -- one HTTP request as engine requests --------------------------------------------------------
@dataclass
class _Job:
    """What an HTTP request became: ``requests[c]`` produces choice ``c``."""

    id: str
    model: str
    composition: str
    tokenizer: Any
    prompts: list[list[int]]
    requests: list[Request]
    logprobs: int | None  # top-n asked for, None when no log-probs
    include_usage: bool
    echo: list[str] | None = None  # completions: each choice's prompt text
    fingerprint: str | None = None  # system_fingerprint: the server build and the composition
    token_ids_as_text: bool = False  # return_tokens_as_token_ids
    #: vLLM's ``prompt_logprobs`` (top k) asked for: the response carries them in vLLM's shape
    prompt_logprobs: int | None = None
    tools: ToolPlan | None = None  # structured outputs: chat tools and tool_choice


class OpenAIServing:
    """The endpoints' logic over a ``Backend``; the routes in ``app.py`` only call these."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.catalog = ModelCatalog(backend.compositions())
        self.created = int(time.time())
        self._token_text: dict[str, TokenText] = {}

    def list_models(self) -> ModelList:
        return self.catalog.cards(self.created)

    # -- /v1/completions --------------------------------------------------------------------
    async def create_completion(
        self, body: CompletionRequest, disconnected: Disconnected | None = None
    ):
        """A CompletionResponse, or an EventStream of SSE lines when ``body.stream``."""
        job = await off_loop(self._completion_job, body)
        streams = await self._admit(job)
        if body.stream:
            return EventStream(self._completion_chunks(job, streams), streams)
        events = await _gather(streams, disconnected)
        return self._completion_response(job, events)

    def _completion_job(self, body: CompletionRequest) -> _Job:
        """Steps 1-4 short of admission (tokenizing: a worker thread's job, not the loop's)."""
        refuse_invalid_text(body)
        info, member = self.catalog.resolve(body.model)
        refuse_unsupported_completion(body)
        tokenizer = self.backend.tokenizer(info.name)
        prompts = completion_prompts(
            tokenizer, body.prompt, info.vocab_size, body.add_special_tokens is not False
        )
        cut = [truncated(ids, body.truncate_prompt_tokens, info.max_context) for ids in prompts]
        cut_any = any(len(c) < len(ids) for c, ids in zip(cut, prompts, strict=True))
        prompts = cut
        max_tokens = body.max_tokens if body.max_tokens is not None else 16
        prompt_n = prompt_logprobs_of(body, max_tokens)  # echo + logprobs: the prompt's too
        renames = {}  # an error about prompt log-probs the request did not name names its field
        if body.prompt_logprobs is None:
            renames["prompt_logprobs"] = "echo" if body.logprobs is None else "logprobs"
        params = sampling_params(body, max_tokens, body.logprobs, renames, prompt_n)
        params = replace(params, structured=structured_spec(body))  # structured outputs
        job = self._job("cmpl", body, info, member, tokenizer, prompts, params, body.logprobs)
        job.prompt_logprobs = body.prompt_logprobs
        self._check(job, renames)
        if body.echo:  # a truncated prompt is echoed as the model saw it
            texts = prompt_texts(tokenizer, prompts if cut_any else body.prompt, prompts)
            job.echo = [texts[c // params.n] for c in range(len(job.requests))]
        return job

    def _completion_response(self, job: _Job, events: list[list[TokenEvent]]) -> CompletionResponse:
        token_text = self._tokens(job)
        choices = []
        for c, choice_events in enumerate(events):
            prefix = job.echo[c] if job.echo else ""
            prompt_lps = _prompt_logprobs(choice_events)
            logprobs = None
            if job.logprobs is not None:
                logprobs = CompletionLogprobs()
                if job.echo and prompt_lps is not None:  # the prompt's tokens come first
                    add_prompt_logprobs(
                        logprobs, job.requests[c].prompt_ids, prompt_lps, token_text, job.logprobs
                    )
                add_completion_logprobs(
                    logprobs, choice_events, token_text, len(prefix), job.logprobs
                )
            choices.append(
                CompletionChoice(
                    index=c,
                    text=prefix + "".join(e.text for e in choice_events),
                    logprobs=logprobs,
                    finish_reason=finish_reason(choice_events),
                    stop_reason=stop_reason(choice_events),
                    prompt_logprobs=self._vllm_prompt_logprobs(job, prompt_lps, token_text),
                    composition=mean_diagnostics(choice_events),
                )
            )
        return CompletionResponse(
            id=job.id,
            created=int(time.time()),
            model=job.model,
            system_fingerprint=job.fingerprint,
            choices=choices,
            usage=usage(job.prompts, [token_count(e) for e in events]),
        )

    async def _completion_chunks(self, job: _Job, streams) -> AsyncIterator[str]:
        token_text, chunk = self._tokens(job), _chunker(job, CompletionResponse)
        offsets = [len(p) for p in job.echo] if job.echo else [0] * len(job.requests)
        counts = [0] * len(job.requests)

        # echo with logprobs: the prompt's text and log-probs wait for the choice's first event,
        # which carries them, and go out in one first chunk with it; plain echo goes out at once
        echo_first = [bool(job.echo) and job.logprobs is not None] * len(job.requests)
        if not any(echo_first):
            for c, text in enumerate(job.echo or []):
                yield chunk([CompletionChoice(index=c, text=text)])
        async with contextlib.aclosing(_merge(streams)) as events:
            async for c, event in events:
                counts[c] += token_count([event])
                head, logprobs = "", None
                if job.logprobs is not None:
                    logprobs = CompletionLogprobs()
                    prompt_lps = event.prompt_logprobs
                    if echo_first[c] and prompt_lps is not None:
                        prompt_ids = job.requests[c].prompt_ids
                        add_prompt_logprobs(
                            logprobs, prompt_ids, prompt_lps, token_text, job.logprobs
                        )
                    start = len(logprobs.tokens)
                    add_completion_logprobs(logprobs, [event], token_text, offsets[c], job.logprobs)
                    offsets[c] += sum(len(t) for t in logprobs.tokens[start:])
                if echo_first[c]:
                    head, echo_first[c] = job.echo[c], False
                if head or event.text or logprobs is not None or event.finish_reason:
                    yield chunk(
                        [
                            CompletionChoice(
                                index=c,
                                text=head + event.text,
                                logprobs=logprobs,
                                finish_reason=event.finish_reason,
                                stop_reason=event.stop_reason,
                                composition=diagnostics(event.diagnostics),
                            )
                        ]
                    )
        if job.include_usage:
            yield chunk([], usage(job.prompts, counts))
        yield "data: [DONE]\n\n"

    # -- /v1/chat/completions ---------------------------------------------------------------
    async def create_chat_completion(
        self, body: ChatCompletionRequest, disconnected: Disconnected | None = None
    ):
        """A ChatCompletionResponse, or an EventStream of SSE lines when ``body.stream``."""
        job = await off_loop(self._chat_job, body)
        streams = await self._admit(job)
        if body.stream:
            return EventStream(self._chat_chunks(job, streams), streams)
        events = await _gather(streams, disconnected)
        return self._chat_response(job, events)

    def _chat_job(self, body: ChatCompletionRequest) -> _Job:
        """Steps 1-4 short of admission (templating: a worker thread's job, not the loop's)."""
        refuse_invalid_text(body)
        info, member = self.catalog.resolve(body.model)
        refuse_unsupported_chat(body)
        tokenizer = self.backend.tokenizer(info.name)
        plan = tool_plan(body.tools, body.tool_choice)  # structured outputs: tools, tool_choice
        prompt_ids = chat_prompt_ids(tokenizer, body.messages, **template_options(body), tools=plan)
        prompt_ids = truncated(prompt_ids, body.truncate_prompt_tokens, info.max_context)
        max_tokens, max_field = body.max_completion_tokens, "max_completion_tokens"
        if max_tokens is None:
            max_tokens, max_field = body.max_tokens, "max_tokens"
        if max_tokens is None:
            max_tokens = info.max_context - len(prompt_ids)
            if max_tokens < 1:
                raise ContextLengthError(
                    f"the messages ({len(prompt_ids)} tokens) fill the context length "
                    f"{info.max_context}",
                    param="messages",
                )
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling_params(
            body,
            max_tokens,
            top,
            {"max_tokens": max_field, "logprobs": "top_logprobs"},
            body.prompt_logprobs,
        )
        params = replace(params, structured=structured_spec(body, plan))  # structured outputs
        job = self._job("chatcmpl", body, info, member, tokenizer, [prompt_ids], params, top)
        job.tools = plan
        job.prompt_logprobs = body.prompt_logprobs
        self._check(job, {"max_tokens": max_field, "prompt": "messages"})
        return job

    def _chat_response(self, job: _Job, events: list[list[TokenEvent]]) -> ChatCompletionResponse:
        token_text = self._tokens(job)
        choices = [
            ChatChoice(
                index=c,
                message=AssistantMessage(content="".join(e.text for e in choice_events)),
                logprobs=None
                if job.logprobs is None
                else ChatLogprobs(
                    content=[
                        chat_logprob(e, token_text, job.logprobs)
                        for e in choice_events
                        if e.generated
                    ]
                ),
                finish_reason=finish_reason(choice_events),
                stop_reason=stop_reason(choice_events),
                composition=mean_diagnostics(choice_events),
            )
            for c, choice_events in enumerate(events)
        ]
        for choice in choices:  # structured outputs: a reply that is a call becomes tool_calls
            tool_reply(choice, job.tools)
        prompt_lps = _prompt_logprobs(events[0]) if events else None  # one prompt: any choice's
        return ChatCompletionResponse(
            id=job.id,
            created=int(time.time()),
            model=job.model,
            system_fingerprint=job.fingerprint,
            choices=choices,
            usage=usage(job.prompts, [token_count(e) for e in events]),
            prompt_logprobs=self._vllm_prompt_logprobs(job, prompt_lps, token_text),
        )

    async def _chat_chunks(self, job: _Job, streams) -> AsyncIterator[str]:
        token_text, chunk = self._tokens(job), _chunker(job, ChatCompletionChunk)
        counts = [0] * len(job.requests)

        for c in range(len(job.requests)):
            yield chunk(
                [ChatChunkChoice(index=c, delta=DeltaMessage(role="assistant", content=""))]
            )
        tool_stream = ToolStream(job.tools, len(job.requests))  # structured outputs: tool calls
        async with contextlib.aclosing(_merge(streams)) as events:
            async for c, event in events:
                counts[c] += token_count([event])
                logprobs = None
                if job.logprobs is not None and event.generated:
                    logprobs = ChatLogprobs(content=[chat_logprob(event, token_text, job.logprobs)])
                if event.text or logprobs is not None or event.finish_reason:
                    yield chunk(
                        [
                            ChatChunkChoice(
                                index=c,
                                delta=tool_stream.delta(c, event),
                                logprobs=logprobs,
                                finish_reason=tool_stream.finish(c, event),
                                stop_reason=event.stop_reason,
                                composition=diagnostics(event.diagnostics),
                            )
                        ]
                    )
        if job.include_usage:
            yield chunk([], usage(job.prompts, counts))
        yield "data: [DONE]\n\n"

    # -- shared -----------------------------------------------------------------------------
    def _job(
        self,
        kind: str,
        body,
        info: CompositionInfo,
        member: str | None,
        tokenizer,
        prompts: list[list[int]],
        params: SamplingParams,
        logprobs: int | None,
    ) -> _Job:
        """Expand ``n`` choices per prompt into Requests; a member model gets one-hot weights."""
        if params.n > MAX_N:
            raise InvalidRequestError(f"n must be <= {MAX_N}, got {params.n}", param="n")
        composition = body.composition
        if member is not None:
            if composition:
                raise InvalidRequestError(
                    f"{body.model!r} is the member {member!r} of {info.name!r} served alone; "
                    f"per-request composition needs the composition model",
                    param="composition",
                )
            composition = info.solo[member]  # the method's plan for its member alone
        job_id = f"{kind}-{uuid.uuid4().hex}"
        requests = []
        for p, prompt_ids in enumerate(prompts):
            for i in range(params.n):
                seed = None if params.seed is None else params.seed + i
                requests.append(
                    Request(
                        prompt_ids,
                        replace(params, n=1, seed=seed),
                        composition,
                        request_id=f"{job_id}-{p * params.n + i}",
                    )
                )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        job = _Job(
            job_id, body.model, info.name, tokenizer, prompts, requests, logprobs, include_usage
        )
        job.fingerprint = self._fingerprint(info)
        job.token_ids_as_text = bool(body.return_tokens_as_token_ids)
        return job

    def _fingerprint(self, info: CompositionInfo) -> str:
        """OpenAI's ``system_fingerprint``: changes when the server build or what the
        composition serves changes (its name, members, method, context)."""
        digest = hashlib.sha256(f"{__version__}|{info!r}".encode()).hexdigest()
        return f"fp_{digest[:10]}"

    def _check(self, job: _Job, renames: dict[str, str]) -> None:
        """Every prompt of the job passes the admission checks before any request is queued
        (its ``n`` choices differ by their seed only, so one per prompt is checked)."""
        n = len(job.requests) // len(job.prompts)
        for request in job.requests[::n]:
            try:
                self.backend.check(job.composition, request)
            except InvalidRequestError as exc:
                raise renamed(exc, renames) from None

    async def _admit(self, job: _Job) -> list[AsyncIterator[TokenEvent]]:
        """Admit every request of the job, or none (those admitted are aborted on a refusal)."""
        streams = []
        try:
            for request in job.requests:
                streams.append(await self.backend.generate(job.composition, request))
        except BaseException:
            for stream in streams:
                await stream.aclose()
            raise
        return streams

    # -- /tokenize, /detokenize --------------------------------------------------------------
    def _default_model(self, model: str | None, field: str = "model") -> CompositionInfo:
        """``model`` resolved; left out, the one composition served (else a 400 naming it)."""
        if model is not None:
            return self.catalog.resolve(model)[0]
        served = self.backend.compositions()
        if len(served) != 1:
            raise InvalidRequestError(
                f"model is required: {len(served)} compositions are served", param=field
            )
        return served[0]

    def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        """vLLM's /tokenize: the ids the server would give the model for ``prompt`` or for
        ``messages`` through the chat template (no truncation, no context check)."""
        refuse_invalid_text(body)
        info = self._default_model(body.model)
        tokenizer = self.backend.tokenizer(info.name)
        if (body.prompt is None) == (body.messages is None):
            raise InvalidRequestError("give exactly one of prompt and messages", param="prompt")
        if body.prompt is not None:
            ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
        else:
            ids = chat_prompt_ids(tokenizer, body.messages, **template_options(body))
        strs = None
        if body.return_token_strs:
            strs = tokenizer.convert_ids_to_tokens(ids)
        return TokenizeResponse(
            count=len(ids), max_model_len=info.max_context, tokens=list(ids), token_strs=strs
        )

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        """vLLM's /detokenize: ids -> text; ids outside the vocabulary are a 400."""
        info = self._default_model(body.model)
        tokenizer = self.backend.tokenizer(info.name)
        ids = list(body.tokens)
        bad = [t for t in ids if t < 0 or (info.vocab_size is not None and t >= info.vocab_size)]
        if bad:
            raise InvalidRequestError(
                f"token ids {bad[:5]} are outside the vocabulary [0, {info.vocab_size})",
                param="tokens",
            )
        try:
            return DetokenizeResponse(prompt=tokenizer.decode(ids))
        except Exception as exc:  # a tokenizer that cannot decode some id
            raise InvalidRequestError(f"tokens could not be decoded: {exc}", param="tokens") from None

    def _tokens(self, job: _Job) -> TokenText | TokenIdText:
        if job.composition not in self._token_text:
            self._token_text[job.composition] = TokenText(job.tokenizer)
        token_text = self._token_text[job.composition]
        return TokenIdText(token_text) if job.token_ids_as_text else token_text

    @staticmethod
    def _vllm_prompt_logprobs(job: _Job, entries, token_text) -> list | None:
        """vLLM's ``prompt_logprobs`` for a response, when the request set that field."""
        if job.prompt_logprobs is None or entries is None:
            return None
        return vllm_prompt_logprobs(entries, token_text, job.prompt_logprobs)


def _prompt_logprobs(events: list[TokenEvent]):
    """The prompt log-probs a choice's first event carries (None when not asked)."""
    return events[0].prompt_logprobs if events else None


def _chunker(job: _Job, shape: type[CompletionResponse] | type[ChatCompletionChunk]):
    """``chunk(choices, totals=None) -> str``: one SSE line of the job's stream (``shape`` is the
    route's chunk model); every chunk of a stream has the same id, created time and fingerprint."""
    created = int(time.time())

    def chunk(choices: list, totals: UsageInfo | None = None) -> str:
        body = shape(id=job.id, created=created, model=job.model,
                     system_fingerprint=job.fingerprint, choices=choices, usage=totals)
        return sse(body, job.include_usage)

    return chunk


async def off_loop(prepare, body):
    """Run ``prepare(body)`` (tokenizer, chat template: CPU work that grows with the prompt) in a
    worker thread, so that a long prompt never stalls the other streams nor /health."""
    return await asyncio.get_running_loop().run_in_executor(_PREPARE, prepare, body)


_PREPARE = ThreadPoolExecutor(max_workers=4, thread_name_prefix="compose-serve-prepare")


# -- events -> responses ------------------------------------------------------------------------
async def _merge(streams: list[AsyncIterator[TokenEvent]]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """``(choice, event)`` from every stream as they arrive; closing this closes them all."""
    if len(streams) == 1:
        try:
            async for event in streams[0]:
                yield 0, event
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(c: int, stream) -> None:
        try:
            async for event in stream:
                queue.put_nowait((c, event))
        except Exception as exc:
            queue.put_nowait((c, exc))
        finally:
            queue.put_nowait((c, None))

    tasks = [asyncio.ensure_future(pump(c, s)) for c, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            c, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield c, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            await stream.aclose()


async def _gather(streams, disconnected: Disconnected | None) -> list[list[TokenEvent]]:
    """Every choice's events; if the client goes first, abort them all and raise ClientGone."""

    async def collect() -> list[list[TokenEvent]]:
        out: list[list[TokenEvent]] = [[] for _ in streams]
        async with contextlib.aclosing(_merge(streams)) as events:
            async for c, event in events:
                out[c].append(event)
        return out

    task = asyncio.ensure_future(collect())
    watch = asyncio.ensure_future(disconnected()) if disconnected is not None else None
    try:
        if watch is None:
            return await task
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientGone("the client disconnected")
    finally:
        for pending in (task, watch):
            if pending is not None and not pending.done():
                pending.cancel()
        for stream in streams:  # also when collect() never started
            await stream.aclose()


class ClientGone(Exception):
    """The client disconnected before its response was ready (nothing is sent)."""


class EventStream:
    """An SSE body: iterate for the lines; ``aclose()`` ends the requests even if never iterated."""

    def __init__(self, lines: AsyncIterator[str], streams: list) -> None:
        self._lines = lines
        self._streams = streams
        self._iterator: AsyncIterator[str] | None = None

    def __aiter__(self) -> AsyncIterator[str]:
        if self._iterator is None:
            self._iterator = self._guarded()
        return self._iterator

    async def _guarded(self) -> AsyncIterator[str]:
        try:
            async for line in self._lines:
                yield line
        except Exception as exc:  # after the first byte: one error event, then the stream ends
            _, error, _ = error_response(exc)
            yield "data: " + error.model_dump_json() + "\n\n"

    async def aclose(self) -> None:
        if self._iterator is not None:
            await self._iterator.aclose()
        await self._lines.aclose()
        for stream in self._streams:
            await stream.aclose()


# -- the one error mapper -----------------------------------------------------------------------
ERROR_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (ContextLengthError, "context_length_exceeded"),
    (ModelNotFoundError, "model_not_found"),
    (QueueFullError, "rate_limit_exceeded"),
    (AuthenticationError, "invalid_api_key"),
    (PayloadTooLargeError, "request_too_large"),
)
UNION_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def error_response(exc: BaseException) -> tuple[int, ErrorResponse, dict[str, str]]:
    """Any exception -> (HTTP status, OpenAI error body, headers). Bad input is never a 500."""
    headers: dict[str, str] = {}
    errors = getattr(exc, "errors", None)
    if callable(errors) and not isinstance(exc, ComposeError):  # FastAPI / pydantic validation
        exc = _validation_error(errors())
    if isinstance(exc, ComposeError):
        code = next((c for cls, c in ERROR_CODES if isinstance(exc, cls)), None)
        retry_after = getattr(exc, "retry_after", None)  # 429, and 503 while a replica restarts
        if retry_after is not None:
            headers["Retry-After"] = str(max(1, round(retry_after)))
        info = ErrorInfo(message=exc.message, type=exc.error_type, param=exc.param, code=code)
        return exc.status_code, ErrorResponse(error=info), headers
    status = getattr(exc, "status_code", None)
    if status == 413:  # the body limit, raised as an HTTPException while FastAPI reads the body
        return error_response(PayloadTooLargeError(str(getattr(exc, "detail", exc))))
    if isinstance(status, int) and 400 <= status < 500:  # starlette: 404 no route, 405 ...
        kind = "not_found_error" if status == 404 else "invalid_request_error"
        info = ErrorInfo(message=str(getattr(exc, "detail", exc)), type=kind)
        return status, ErrorResponse(error=info), headers
    logger.error("internal error", exc_info=exc)
    info = ErrorInfo(message=f"internal server error ({type(exc).__name__})", type="internal_error")
    return 500, ErrorResponse(error=info), headers


def _validation_error(errors: list[dict]) -> InvalidRequestError:
    """The first of FastAPI's / pydantic's errors, naming the field as a dotted path."""
    err = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    if err["type"] == "json_invalid":
        detail = err.get("ctx", {}).get("error", "")
        return InvalidRequestError(f"the request body is not valid JSON ({detail})", param=None)
    loc = [p for p in err["loc"] if p != "body"]
    path = [str(p) for p in loc if not (isinstance(p, str) and _union_tag(p))]
    param = ".".join(path) or None
    union = len(path) < len(loc)  # one of several accepted types: say so, not just the first
    if param is None:
        return InvalidRequestError(
            "the request body must be a JSON object (Content-Type: application/json)"
        )
    if err["type"] == "missing":
        return InvalidRequestError(f"{param} is required", param=param)
    got = err.get("input")
    got_text = (
        f" (got {json.dumps(got)[:80]})"
        if isinstance(got, (str, int, float, bool, type(None)))
        else ""
    )
    if union:
        return InvalidRequestError(
            f"{param}: no accepted type matches{got_text}; first mismatch: {err['msg']}",
            param=param,
        )
    return InvalidRequestError(f"{param}: {err['msg']}{got_text}", param=param)


def _union_tag(part: str) -> bool:
    return part in UNION_TAGS or "[" in part or part.startswith("function-")
