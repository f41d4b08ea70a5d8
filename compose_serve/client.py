"""``ComposeClient`` / ``AsyncComposeClient``: compose-serve's OpenAI API on httpx.

    client = ComposeClient("http://127.0.0.1:8000/v1", api_key=None, timeout=600, max_retries=2)
    client.chat.completions.create(model="m", messages=[...], composition={"weights": {"a": 0.7, "b": 0.3}})
    for chunk in client.completions.create(model="m", prompt="Hi", stream=True): ...
    client.models.list()

Shaped like the openai client. Responses are the pydantic models of ``compose_serve.http.protocol``
(``ChatCompletionResponse``, ``CompletionResponse``, their chunks, ``ModelList``). A stream is an
iterator of chunks that stops at ``[DONE]`` and closes its response in ``finally`` (use it in a
``with`` block to close it early). The composition extension is the typed ``composition``
argument (``{"weights": {member: w}}``, or ``{"alpha": a}`` for delta).

Errors by status, all ``APIError`` (a ``ComposeError``): BadRequestError 400 (also an
InvalidRequestError), AuthenticationError 401, PermissionDeniedError 403, NotFoundError 404 (a
ModelNotFoundError), RateLimitError 429 (a QueueFullError, with ``retry_after``),
InternalServerError 5xx, ServiceUnavailableError 503 (an EngineDeadError); APIConnectionError and
APITimeoutError when no response came. A 408, 429 or 5xx answer, or no answer, is retried up to
``max_retries`` times with exponential backoff (0.5 s doubling, capped at 8 s, jittered), waiting
the server's Retry-After instead when it gives one (capped at ``max_retry_after``). A stream is
retried only before its first chunk.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel
from typing_extensions import TypedDict, Unpack

from .errors import (
    ComposeError,
    EngineDeadError,
    InvalidRequestError,
    ModelNotFoundError,
    QueueFullError,
)
from .http.protocol import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionResponse,
    ModelCard,
    ModelList,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=5.0)
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})

T = TypeVar("T", bound=BaseModel)


# -- errors -------------------------------------------------------------------------------------
class APIError(ComposeError):
    """Any failure of a call; ``status_code`` is None when no response came."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        body: Any = None,
        retry_after: float | None = None,
    ) -> None:
        ComposeError.__init__(self, message, param)
        self.status_code = status_code
        self.code = code
        self.error_type = error_type or self.error_type
        self.body = body
        self.retry_after = retry_after


class APIConnectionError(APIError):
    """No response: the server is unreachable or the connection broke."""


class APITimeoutError(APIConnectionError):
    """No response within the timeout."""


class APIStatusError(APIError):
    """The server answered with an error status."""


class BadRequestError(APIStatusError, InvalidRequestError):
    pass


class AuthenticationError(APIStatusError):
    pass


class PermissionDeniedError(APIStatusError):
    pass


class NotFoundError(APIStatusError, ModelNotFoundError):
    pass


class RateLimitError(APIStatusError, QueueFullError):
    pass


class InternalServerError(APIStatusError):
    pass


class ServiceUnavailableError(InternalServerError, EngineDeadError):
    pass


BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    422: BadRequestError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}
BY_TYPE = {
    "invalid_request_error": 400,
    "not_found_error": 404,
    "rate_limit_error": 429,
    "internal_error": 500,
    "service_unavailable": 503,
    "timeout_error": 504,
}


def _error(status: int, payload: Any, retry_after: float | None = None) -> APIStatusError:
    """The typed error for an OpenAI error body ``{"error": {message, type, param, code}}``."""
    info = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(info, dict):
        info = {"message": str(payload)[:500] or f"HTTP {status}"}
    cls = BY_STATUS.get(status) or (InternalServerError if status >= 500 else APIStatusError)
    return cls(
        str(info.get("message")),
        status_code=status,
        param=info.get("param"),
        code=info.get("code"),
        error_type=info.get("type"),
        body=payload,
        retry_after=retry_after,
    )


def _response_error(response: httpx.Response) -> APIStatusError:
    try:
        payload = response.json()
    except ValueError:
        payload = response.text
    return _error(response.status_code, payload, _retry_after(response))


def _retry_after(response: httpx.Response | None) -> float | None:
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


# -- request bodies -----------------------------------------------------------------------------
class CompositionOverride(TypedDict, total=False):
    """The per-request composition: member weights (mixture, logit_mix) or alpha (delta)."""

    weights: dict[str, float]
    alpha: float


class _SamplingFields(TypedDict, total=False):
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    n: int
    stop: str | list[str]
    seed: int
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    logit_bias: dict[str, float]
    stop_token_ids: list[int]
    ignore_eos: bool
    min_tokens: int
    skip_special_tokens: bool
    include_stop_str_in_output: bool
    truncate_prompt_tokens: int
    return_tokens_as_token_ids: bool
    prompt_logprobs: int
    # structured outputs (vLLM's names; chat also takes response_format, tools, tool_choice)
    guided_json: dict[str, Any] | str
    guided_regex: str
    guided_choice: list[str]
    structured_outputs: dict[str, Any]
    response_format: dict[str, Any]
    stream_options: dict[str, Any]
    user: str
    composition: CompositionOverride
    extra_body: dict[str, Any]  # merged into the JSON body last
    timeout: float  # seconds, this call only


class CompletionParams(_SamplingFields, total=False):
    echo: bool
    logprobs: int


class ChatParams(_SamplingFields, total=False):
    max_completion_tokens: int
    logprobs: bool
    top_logprobs: int
    tools: list[dict[str, Any]]
    tool_choice: str | dict[str, Any]
    add_generation_prompt: bool
    continue_final_message: bool
    chat_template: str
    chat_template_kwargs: dict[str, Any]


def _body(fixed: dict[str, Any], params: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    params = dict(params)
    extra, timeout = params.pop("extra_body", None) or {}, params.pop("timeout", None)
    body = {**fixed, **{k: v for k, v in params.items() if v is not None}, **extra}
    return body, timeout


def _backoff(attempt: int, response: httpx.Response | None, cap: float) -> float:
    retry_after = _retry_after(response)
    if retry_after is not None:
        return min(retry_after, cap)
    return min(0.5 * 2**attempt, 8.0) * (0.75 + 0.5 * random.random())


_DONE = object()


def _sse_data(line: str) -> Any:
    """One SSE line: None (not data), ``_DONE``, or the JSON payload; an error event raises."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return _DONE
    payload = json.loads(data)
    if isinstance(payload, dict) and "error" in payload:
        raise _error(BY_TYPE.get(str(payload["error"].get("type")), 500), payload)
    return payload


# -- sync ---------------------------------------------------------------------------------------
class Stream(Generic[T]):
    """Chunks of one streamed response; stops at ``[DONE]``; always closes the response."""

    def __init__(self, response: httpx.Response, model: type[T]) -> None:
        self.response = response
        self._model = model

    def __iter__(self) -> Iterator[T]:
        try:
            for line in self.response.iter_lines():
                payload = _sse_data(line)
                if payload is _DONE:
                    return
                if payload is not None:
                    yield self._model.model_validate(payload)
        finally:
            self.response.close()

    def close(self) -> None:
        self.response.close()

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ComposeClient:
    """Synchronous client; see the module docstring."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = 2,
        max_retry_after: float = 60.0,
        http_client: httpx.Client | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = http_client or httpx.Client(timeout=timeout)
        self._http.headers.update(headers)
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.max_retry_after = max_retry_after
        self.completions = _Completions(self)
        self.chat = _Chat(_ChatCompletions(self))
        self.models = _Models(self)

    def request(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        stream: bool = False,
        timeout: Any = None,
    ) -> httpx.Response:
        """Send with retries; returns a response with a success status or raises its APIError."""
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            response = None
            try:
                request = self._http.build_request(
                    method,
                    self.base_url + path,
                    json=body,
                    timeout=timeout if timeout is not None else self._http.timeout,
                )
                response = self._http.send(request, stream=stream)
            except httpx.TimeoutException as exc:
                error: APIError = APITimeoutError(f"no response within the timeout: {exc}")
            except httpx.TransportError as exc:
                error = APIConnectionError(f"could not reach {self.base_url}: {exc}")
            else:
                if response.status_code < 400:
                    return response
                response.read()
                response.close()
                error = _response_error(response)
                if response.status_code not in RETRY_STATUSES:
                    raise error
            if last:
                raise error
            time.sleep(_backoff(attempt, response, self.max_retry_after))
        raise AssertionError("unreachable")

    def post(self, path: str, body: dict, model: type[T], stream: bool, timeout: Any = None):
        response = self.request("POST", path, body, stream, timeout)
        if stream:
            return Stream(response, model)
        return model.model_validate(response.json())

    def health(self) -> dict:
        root = self.base_url.removesuffix("/v1")
        return self._http.get(root + "/health").json()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ComposeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Completions:
    def __init__(self, client) -> None:
        self._client = client

    def create(
        self,
        *,
        model: str,
        prompt: str | list[str] | list[int] | list[list[int]],
        stream: bool = False,
        **params: Unpack[CompletionParams],
    ) -> CompletionResponse | Stream[CompletionResponse]:
        body, timeout = _body({"model": model, "prompt": prompt, "stream": stream}, params)
        return self._client.post("/completions", body, CompletionResponse, stream, timeout)


class _ChatCompletions:
    def __init__(self, client) -> None:
        self._client = client

    def create(
        self,
        *,
        model: str,
        messages: list[dict[str, Any]],
        stream: bool = False,
        **params: Unpack[ChatParams],
    ) -> ChatCompletionResponse | Stream[ChatCompletionChunk]:
        body, timeout = _body({"model": model, "messages": messages, "stream": stream}, params)
        return self._client.post(
            "/chat/completions",
            body,
            ChatCompletionChunk if stream else ChatCompletionResponse,
            stream,
            timeout,
        )


class _Chat:
    def __init__(self, completions) -> None:
        self.completions = completions


class _Models:
    def __init__(self, client) -> None:
        self._client = client

    def list(self) -> ModelList:
        return ModelList.model_validate(self._client.request("GET", "/models").json())

    def retrieve(self, model: str) -> ModelCard:
        return ModelCard.model_validate(self._client.request("GET", f"/models/{model}").json())


# -- async --------------------------------------------------------------------------------------
class AsyncStream(Generic[T]):
    """The async twin of ``Stream``: ``async for chunk in stream``; closes in ``finally``."""

    def __init__(self, response: httpx.Response, model: type[T]) -> None:
        self.response = response
        self._model = model

    async def __aiter__(self) -> AsyncIterator[T]:
        try:
            async for line in self.response.aiter_lines():
                payload = _sse_data(line)
                if payload is _DONE:
                    return
                if payload is not None:
                    yield self._model.model_validate(payload)
        finally:
            await self.response.aclose()

    async def aclose(self) -> None:
        await self.response.aclose()

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class AsyncComposeClient:
    """Asynchronous client; the same surface as ``ComposeClient`` with ``await``."""

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = 2,
        max_retry_after: float = 60.0,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = http_client or httpx.AsyncClient(
            timeout=timeout, limits=httpx.Limits(max_connections=256)
        )
        self._http.headers.update(headers)
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.max_retry_after = max_retry_after
        self.completions = _AsyncCompletions(self)
        self.chat = _Chat(_AsyncChatCompletions(self))
        self.models = _AsyncModels(self)

    async def request(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        stream: bool = False,
        timeout: Any = None,
    ) -> httpx.Response:
        """Send with retries; returns a response with a success status or raises its APIError."""
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            response = None
            try:
                request = self._http.build_request(
                    method,
                    self.base_url + path,
                    json=body,
                    timeout=timeout if timeout is not None else self._http.timeout,
                )
                response = await self._http.send(request, stream=stream)
            except httpx.TimeoutException as exc:
                error: APIError = APITimeoutError(f"no response within the timeout: {exc}")
            except httpx.TransportError as exc:
                error = APIConnectionError(f"could not reach {self.base_url}: {exc}")
            else:
                if response.status_code < 400:
                    return response
                await response.aread()
                await response.aclose()
                error = _response_error(response)
                if response.status_code not in RETRY_STATUSES:
                    raise error
            if last:
                raise error
            await asyncio.sleep(_backoff(attempt, response, self.max_retry_after))
        raise AssertionError("unreachable")

    async def post(self, path: str, body: dict, model: type[T], stream: bool, timeout: Any = None):
        response = await self.request("POST", path, body, stream, timeout)
        if stream:
            return AsyncStream(response, model)
        return model.model_validate(response.json())

    async def health(self) -> dict:
        root = self.base_url.removesuffix("/v1")
        return (await self._http.get(root + "/health")).json()

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncComposeClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class _AsyncCompletions:
    def __init__(self, client) -> None:
        self._client = client

    async def create(
        self,
        *,
        model: str,
        prompt: str | list[str] | list[int] | list[list[int]],
        stream: bool = False,
        **params: Unpack[CompletionParams],
    ) -> CompletionResponse | AsyncStream[CompletionResponse]:
        body, timeout = _body({"model": model, "prompt": prompt, "stream": stream}, params)
        return await self._client.post("/completions", body, CompletionResponse, stream, timeout)


class _AsyncChatCompletions:
    def __init__(self, client) -> None:
        self._client = client

    async def create(
        self,
        *,
        model: str,
        messages: list[dict[str, Any]],
        stream: bool = False,
        **params: Unpack[ChatParams],
    ) -> ChatCompletionResponse | AsyncStream[ChatCompletionChunk]:
        body, timeout = _body({"model": model, "messages": messages, "stream": stream}, params)
        return await self._client.post(
            "/chat/completions",
            body,
            ChatCompletionChunk if stream else ChatCompletionResponse,
            stream,
            timeout,
        )


class _AsyncModels:
    def __init__(self, client) -> None:
        self._client = client

    async def list(self) -> ModelList:
        return ModelList.model_validate((await self._client.request("GET", "/models")).json())

    async def retrieve(self, model: str) -> ModelCard:
        return ModelCard.model_validate(
            (await self._client.request("GET", f"/models/{model}")).json()
        )
