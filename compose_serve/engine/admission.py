"""Admission checks: is a request servable by a composition, before it takes a slot?

``check_request(request, method, vocab_size, max_context) -> weights [K]`` raises
InvalidRequestError / ContextLengthError naming the field, or returns the request's row of method
weights (its plan: a member at weight 0 does not run for it). It is pure: the engine calls it at
``submit`` and again in ``add``, and an HTTP front end that has no engine (the Ray ingress) calls
it with the composition's method to refuse a bad request before any part of it is queued.
"""

from __future__ import annotations

from ..errors import ContextLengthError, InvalidRequestError
from .sequence import Request


def check_request(request: Request, method, vocab_size: int, max_context: int) -> list[float]:
    """Validate ``request`` (prompt ids, lengths, sampling ids, plan); returns its weights row."""
    ids = request.prompt_ids
    if not ids:
        raise InvalidRequestError("the prompt is empty", param="prompt")
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise InvalidRequestError(
            f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})", param="prompt"
        )
    if len(ids) >= max_context:  # the prompt alone leaves no room for one generated token
        raise ContextLengthError(
            f"the prompt ({len(ids)} tokens) does not fit the context length {max_context}, which must "
            f"also hold at least one generated token",
            param="prompt",
        )
    total = len(ids) + request.params.max_tokens
    if total > max_context:
        raise ContextLengthError(
            f"prompt ({len(ids)} tokens) + max_tokens ({request.params.max_tokens}) = {total} exceeds "
            f"the context length {max_context}",
            param="max_tokens",
        )
    request.params.check_vocab(vocab_size)
    return method.row_weights(request.composition)
