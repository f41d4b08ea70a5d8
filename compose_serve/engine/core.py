"""The lockstep engine: every running sequence advances one token per step.

``Engine.step()`` is the data flow:
    1. score   every member decodes its live slots               K x [B_k, V]
    2. fuse    the composition's method                           logprobs [B, V] float32
    3. sample  one token per sequence                              tokens [B]
       (2 and 3 run as one fused kernel, no [B, V] row written, where the fusion kernels run
       Triton and every row is a plain draw: ``_fused_draw``)
    4. append  each sequence takes its token (text, log-probs)
    5. stop    EOS / stop ids / stop strings / max_tokens; finished slots are released at once
    6. emit    one TokenEvent per sequence
``Engine.add(requests)`` admits new sequences at a step boundary: a routed composition first asks
its router which members run for each, reading each prompt through the shared base's first blocks
chunk by chunk under the same budget (``_route_chunk``); then their prompts are prefilled in
chunks under a per-step token budget (``max_prefill_tokens`` at most; while sequences run, what
``StepPacer`` allows from the measured step costs, ``engine/pacing.py``; batched per member,
members on one shared base in one forward), each chunk packed into the decode forward of a
``step`` (``_packed_step``), so running streams keep their pace while a long prompt or a burst
comes in.
While sequences run, ``add`` itself runs no forward: a new request's first chunk rides in the next
step's forward. Prompts are prefilled on trial: if a packed forward that carries chunks fails,
every member rolls back to before it (``Member.rollback``), the step runs again without the
chunks, and each prompt is then tried alone, so a request whose input breaks a forward fails alone
(``take_failures``) and the running ones lose nothing. With nothing running, or members that
cannot roll back (remote ones), ``add`` prefills the first chunk in its own forward and raises if
it fails. A sequence whose prompt
is complete gets its first token from the fused scores of the whole prompt (steps 2-6 on its last
chunk's scores) and joins the running batch.
Prompt log-probs (``params.prompt_logprobs``): when its prompt is complete, a sequence's prompt is
scored by teacher forcing through its members with its weights (``engine/scoring.py``, the path
the distillation teacher uses; one extra forward per member) and the result rides on its first
TokenEvent. With ``max_tokens`` 0 the request finishes in ``add``: scored, nothing prefilled, its
slot freed, one event with no token (``token_id`` None, ``finish_reason`` "length").
Running sequences are never re-prefilled. The scheduler (``engine/scheduler.py``) and the sync
``generate`` below drive these two calls; nothing here knows about threads, HTTP or Ray.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Iterable

import torch

from .. import kernels, structured
from ..composition import Composition
from ..errors import InvalidRequestError, RequestFailedError
from ..members.base import Scores
from ..methods.base import Method
from ..router import FeatureState
from ..sampling import Sampler, SamplerOutput, make_generator
from .admission import check_request
from .detokenizer import Detokenizer
from .pacing import StepPacer
from .scoring import can_teacher_force, score_prompts
from .sequence import Completion, Request, Sequence, TokenEvent

logger = logging.getLogger(__name__)


class Engine:
    """Runs a composition over a batch of at most ``max_batch`` sequences (slots)."""

    def __init__(self, composition: Composition, max_batch: int | None = None,
                 max_prefill_tokens: int | None = None, fused_sampling: bool | None = None,
                 pack_steps: bool | None = None, prefill_slowdown: float | None | str = "config") -> None:
        self.composition = composition
        self.members = composition.members
        self.method = composition.method
        self.max_batch = max_batch or composition.spec.engine.max_batch
        #: prompt tokens prefilled per step at most (0: no limit, every admitted prompt at once)
        self.max_prefill_tokens = (composition.spec.engine.max_prefill_tokens if max_prefill_tokens is None
                                   else max_prefill_tokens)
        #: the per-step prompt budget while sequences run (``engine/pacing.py``); ``prefill_slowdown``
        #: "config": the composition's ``engine.prefill_slowdown``; None: always ``max_prefill_tokens``
        slowdown = composition.spec.engine.prefill_slowdown if prefill_slowdown == "config" else prefill_slowdown
        self.pacer = StepPacer(slowdown, self.max_prefill_tokens)
        self._prompt_tokens = 0  # prompt tokens routed or prefilled in the current step
        self.sampler = Sampler(composition.eos_token_ids)
        self.running: list[Sequence] = []
        self.prefilling: list[Sequence] = []  # admitted, prompt not complete yet (FIFO)
        self._free_slots = list(range(self.max_batch - 1, -1, -1))
        self.device = self.members[0].device
        #: fuse and sample in one kernel (``Method.fuse_sample``) for steps where every row is a
        #: plain draw; None: where the fusion kernels run Triton (CUDA, or COMPOSE_SERVE_KERNELS)
        if fused_sampling is None:
            fused_sampling = kernels.backend_for(self.device, len(self.members)) == "triton"
        self.fused_sampling = fused_sampling and type(self.method).fuse_sample is not Method.fuse_sample
        #: a step's decode and prefill chunk in one forward per model (``_packed_step``)
        self.pack_steps = composition.spec.engine.pack_steps if pack_steps is None else pack_steps
        #: a new request's first chunk rides in the next step's forward (members can roll it back)
        self.packs_admission = self.pack_steps and all(m.can_rollback for m in self.members)
        self._failures: list[tuple[str, Exception]] = []  # requests that failed alone in a step
        for member in self.members:  # this engine owns every slot: rows an earlier engine left go
            member.release(member.live_slots)

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def busy(self) -> bool:
        """Whether ``step`` has work: running sequences, or prompts still being prefilled."""
        return bool(self.running or self.prefilling)

    # -- admission ------------------------------------------------------------------------
    def check(self, request: Request) -> list[float]:
        """Validate a request against this composition; returns its row of method weights."""
        weights = check_request(request, self.method, self.composition.vocab_size, self.composition.max_context)
        if request.params.prompt_logprobs is not None and not can_teacher_force(self.composition):
            raise InvalidRequestError(
                f"prompt_logprobs is not supported by {self.composition.name!r}: its members do not all "
                "run in this process (remote members score one position at a time)",
                param="prompt_logprobs",
            )
        if request.params.structured is not None:  # structured outputs: compiled (and cached) here
            self._grammars().compile(request.params.structured)
        return weights

    def add(self, requests: list[Request]) -> list[TokenEvent]:
        """Admit ``requests`` into free slots. While sequences run (and the members can roll
        back), no forward runs here: the first chunks ride in the next ``step`` (on trial, see the
        module docstring). Otherwise the first chunk is prefilled here in its own forward (an
        exception propagates; the scheduler then frees the new slots). Returns
        events: the first tokens of the sequences whose prompt that chunk completed, and those of
        ``max_tokens`` 0 requests (scored here, at once)."""
        if len(requests) > self.free_slots:
            raise RuntimeError(f"{len(requests)} requests but only {self.free_slots} free slots")
        weights = [self.check(r) for r in requests]  # all checked before any slot is taken
        seqs = [self._admit(r, w) for r, w in zip(requests, weights, strict=True)]
        if self.method.router is not None:  # a request's own weights win
            routed = [s for s in seqs if not s.request.composition]
            self._route([s for s in routed if s.request.params.max_tokens == 0])  # scored now, at once
            for seq in routed:  # the others are routed chunk by chunk, under the prefill budget
                if seq.request.params.max_tokens > 0:
                    seq.routing = FeatureState()
        scored = [s for s in seqs if s.request.params.max_tokens == 0]  # prompt log-probs only
        events = self._score_only(scored) if scored else []
        new = [s for s in seqs if s.request.params.max_tokens > 0]
        self.prefilling.extend(new)
        # prompt log-probs run their own scoring pass at the first token: those stay in add
        if self.packs_admission and self.running and all(
                s.request.params.prompt_logprobs is None for s in new):
            return events  # the next step's packed forward takes their first chunk
        return events + self._prefill_chunk()

    def take_failures(self) -> list[tuple[str, Exception]]:
        """The requests that failed alone since the last call (``(request_id, exception)``; their
        slots are already free): a prompt whose chunk failed again when tried alone, or whose first
        token's work raised."""
        failures, self._failures = self._failures, []
        return failures

    def _prefill_chunk(self, pool: list[Sequence] | None = None) -> list[TokenEvent]:
        """One prefill forward (per member) over the next prompt tokens of the prefilling
        sequences (or of ``pool``), front first, within the budget; completed prompts get their
        first token."""
        seqs, pieces = self._next_chunk(self._route_chunk(pool), pool)
        nll = self.method.uses_prompt_nll
        with self._chunk_undone_on_failure(seqs):
            scores = []
            for k, member in enumerate(self.members):
                rows = [i for i, s in enumerate(seqs) if s.uses[k]]
                call = member.prefill([seqs[i].slot for i in rows], [pieces[i] for i in rows], nll) if rows else None
                scores.append((rows, call))
            scores = resolve(scores)
        return self._finish_chunk(seqs, pieces, scores)

    def _route_chunk(self, pool: list[Sequence] | None = None) -> float:
        """Routing under the budget: the prompts still being routed (front first) are read through
        the shared base's first ``router.layer`` blocks: those that fit the budget left whole, in one
        batched forward (``Composition.prompt_features``), a longer one chunk by chunk across steps
        (``router.FeatureState``, one forward per prompt). A prompt whose features are complete
        gets its weights from the router (``Method.route``: top_k, min_confidence) and is
        prefilled from then on. ``pool``: these prefilling sequences only. Returns the budget left
        for the members' chunk."""
        self.pacer.cap = self.max_prefill_tokens  # an attribute callers (benchmarks) may set
        budget = self.pacer.budget(bool(self.running))
        router = self.method.router
        routing = [s for s in (self.prefilling if pool is None else pool) if s.routing is not None]
        if not routing:
            return budget
        whole, done = [], []
        for seq in routing:
            if budget <= 0:
                break
            state, prompt = seq.routing, seq.request.prompt_ids
            n = int(min(len(prompt) - state.seen, budget))
            budget -= n
            self._prompt_tokens += n
            if state.seen == 0 and n == len(prompt):
                whole.append(seq)
                continue
            try:
                self.composition.prompt_features_chunk(state, prompt[state.seen : state.seen + n], router.layer,
                                                       router.pooling)
            except Exception:
                seq.routing = FeatureState()  # its routing starts over
                raise
            if state.seen == len(prompt):
                done.append(seq)
        self._route(whole)
        if done:
            self._route(done, torch.stack([s.routing.features(router.pooling) for s in done]))
        for seq in whole + done:
            seq.routing = None
        return budget

    def _next_chunk(self, budget: float, pool: list[Sequence] | None = None) -> tuple[list[Sequence], list[list[int]]]:
        """The prefilling sequences (of ``pool``, if given) this step's chunk covers (front
        first) and their next pieces of prompt, within ``budget`` (what routing left of
        ``max_prefill_tokens``); prompts still being routed wait."""
        seqs, pieces = [], []
        for seq in self.prefilling if pool is None else pool:
            if seq.routing is not None:
                continue
            if budget <= 0:
                break
            n = int(min(len(seq.request.prompt_ids) - seq.prefilled, budget))
            self._prompt_tokens += n
            seqs.append(seq)
            pieces.append(seq.request.prompt_ids[seq.prefilled : seq.prefilled + n])
            budget -= n
        return seqs, pieces

    @contextlib.contextmanager
    def _chunk_undone_on_failure(self, seqs: list[Sequence], saved: list | None = None):
        """If the chunk's forward fails, some members took it and some did not: every member rolls
        back to ``saved`` (their checkpoints) where given; else the chunk's prompts start over."""
        try:
            yield
        except Exception:
            if saved is not None:
                for member, checkpoint in zip(self.members, saved, strict=True):
                    member.rollback(checkpoint)
                raise
            for member in self.members:
                member.release([seq.slot for seq in seqs])
            for seq in seqs:
                seq.prefilled = 0
            raise

    def _finish_chunk(self, seqs: list[Sequence], pieces: list[list[int]],
                      scores: list[tuple[list[int], Scores | None]]) -> list[TokenEvent]:
        """After the chunk's forward: count what each prompt took; prompts now complete get their
        first token from their last chunk's scores and join the running batch."""
        for seq, piece in zip(seqs, pieces, strict=True):
            seq.prefilled += len(piece)
        done = [i for i, s in enumerate(seqs) if s.prefilled == len(s.request.prompt_ids)]
        if not done:
            return []
        finished = [seqs[i] for i in done]
        gone = {id(s) for s in finished}
        self.prefilling = [s for s in self.prefilling if id(s) not in gone]
        scores = [_rows_of(rows, sc, done) for rows, sc in scores]
        if self.method.uses_prompt_nll:
            self._prompt_weights(finished, scores)
        prompt_lps = self._prompt_logprobs(finished)  # before the first token: same weights
        self.running.extend(finished)
        events = self._advance(finished, scores)
        by_id = {s.request_id: lps for s, lps in zip(finished, prompt_lps, strict=True) if lps is not None}
        for event in events:
            event.prompt_logprobs = by_id.get(event.request_id)
        return events

    def _admit(self, request: Request, weights: list[float]) -> Sequence:
        params = request.params
        return Sequence(
            request=request,
            slot=self._free_slots.pop(),
            weights=torch.tensor(weights, dtype=torch.float32),
            generator=make_generator(params.seed, device=self.device),
            noise_seed=params.seed if params.seed is not None else random.getrandbits(62),
            detokenizer=Detokenizer(self.composition.tokenizer, request.prompt_ids, params.stop,
                                    params.skip_special_tokens, params.include_stop_str_in_output),
        )

    def _route(self, seqs: list[Sequence], features: torch.Tensor | None = None) -> None:
        """Routing: the router's probabilities over members from the shared base's prompt
        features ``[n, d]`` (computed here, whole prompts in one batch, unless given) become each
        sequence's weights (``Method.route``: top_k, min_confidence)."""
        if not seqs:
            return
        router = self.method.router
        if features is None:
            features = self.composition.prompt_features([s.request.prompt_ids for s in seqs], router.layer,
                                                        router.pooling)
        probs = router.probs(features.float().cpu())  # [n, K]
        for seq, w, p in zip(seqs, self.method.route(probs), probs, strict=True):
            seq.weights, seq.router_probs = w, p

    def _prompt_weights(self, seqs: list[Sequence], scores) -> None:
        """PackLLM: replace default weights by ``softmax(-CE_k(prompt) / tau)``."""
        # A member that did not run for a row (weight 0 in its plan) has no NLL there: +inf, weight 0.
        nll = torch.full((len(seqs), len(scores)), float("inf"))  # [n, K]
        for k, (rows, sc) in enumerate(scores):
            if sc is not None:
                nll[rows, k] = sc.prompt_nll.float().cpu()
        weights = self.method.weights_from_prompt_nll(nll, self.method.tau)
        for i, seq in enumerate(seqs):
            if not seq.request.composition:  # a request's own weights win
                seq.weights = weights[i]

    # -- prompt log-probs (``SamplingParams.prompt_logprobs``) ------------------------------
    def _prompt_logprobs(self, seqs: list[Sequence], from_nll: torch.Tensor | None = None) -> list:
        """Per sequence: its prompt's log-probs under the fused distribution (``engine.scoring``:
        teacher forcing through the members that run for it, with its weights after routing and
        PackLLM, fused by the method), or None when it did not ask. Runs here, on the step thread,
        between forwards: the shared-base members keep per-forward state."""
        want = [i for i, s in enumerate(seqs) if s.request.params.prompt_logprobs is not None]
        out: list = [None] * len(seqs)
        if not want:
            return out
        picked = [seqs[i] for i in want]
        rows, weights = score_prompts(
            self.composition, [s.request.prompt_ids for s in picked], torch.stack([s.weights for s in picked]),
            [s.request.params.prompt_logprobs for s in picked], None if from_nll is None else from_nll[want])
        for i, row, w in zip(want, rows, weights, strict=True):
            out[i] = row
            seqs[i].weights = w  # the PackLLM weights of a row scored with ``from_nll``; else unchanged
        return out

    def _score_only(self, seqs: list[Sequence]) -> list[TokenEvent]:
        """Requests with ``max_tokens`` 0 finish at admission: their prompts are scored (no
        prefill into the cache, no token sampled), their slots freed at once, and each gets one
        event with ``token_id`` None, ``finish_reason`` "length" and its ``prompt_logprobs``."""
        from_nll = None  # PackLLM: the weights come from the NLL of this same forward
        if self.method.uses_prompt_nll:
            from_nll = torch.tensor([not s.request.composition for s in seqs])  # a request's own win
        events = []
        for seq, lps in zip(seqs, self._prompt_logprobs(seqs, from_nll), strict=True):
            seq.finish_reason = "length"
            diag = {"weights": dict(zip(self.method.member_names, seq.weights.tolist(), strict=True))}
            if seq.router_probs is not None:
                diag["router"] = dict(zip(self.method.member_names, seq.router_probs.tolist(), strict=True))
            events.append(TokenEvent(seq.request_id, None, "", None, None, diag, "length", prompt_logprobs=lps))
        self._release(seqs)
        return events

    # -- the step -------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        """Advance every running sequence by one token (steps 1-6 of the class docstring), then
        prefill the next chunk of the prompts coming in; both in one forward per model where the
        members can pack them (``_packed_step``). A step that ran sequences is timed for the
        pacer, with the prompt tokens it carried."""
        started, running, self._prompt_tokens = time.perf_counter(), bool(self.running), 0
        if self.running and self.prefilling and self.pack_steps:
            events = self._packed_step()
        else:
            events = self._decode() if self.running else []
            events = events + self._prefill_chunk() if self.prefilling else events
        if running:
            self.pacer.record(time.perf_counter() - started, self._prompt_tokens)
        return events

    def _decode(self) -> list[TokenEvent]:
        last = torch.tensor([s.output_ids[-1] for s in self.running], device=self.device)  # [B]
        scores = []
        for k, member in enumerate(self.members):
            rows = [i for i, s in enumerate(self.running) if s.uses[k]]
            slots = [self.running[i].slot for i in rows]
            scores.append((rows, member.decode(slots, last[rows]) if rows else None))
        return self._advance(list(self.running), resolve(scores))

    def _packed_step(self) -> list[TokenEvent]:
        """A decode step and the next prefill chunk in one forward per model (vLLM's mixed batch):
        the running rows' tokens and the chunk's tokens packed into one sequence, so the weights are
        read once per step instead of twice. A member that packs (``Member.packs_steps``) does both
        in ``packed``; members on one shared base get every decode call, then every prefill call,
        and their host packs them in its one forward; any other member runs the two in turn.

        Prompts are on trial where the members can roll back (``packs_admission``): if routing or
        the forward fails, the members roll back, the step runs again without the prompts, and
        each is tried alone (``_try_alone``); if the work of a first token raises, the sequences
        that completed their prompt in this step fail alone. The running sequences' tokens are
        kept either way."""
        trial = list(self.prefilling) if self.packs_admission else []
        saved = [m.checkpoint() for m in self.members] if trial else None
        running = list(self.running)
        try:
            seqs, pieces, decode_scores, chunk_scores = self._packed_forward(running, saved)
        except Exception:
            if not trial:
                raise
            logger.warning("a step with %d prompts coming in failed; rolled back, it runs again without them, "
                           "and each is tried alone", len(trial), exc_info=True)
            self.prefilling = []
            events = self.step()
            return events + self._try_alone(trial)
        events = self._advance(running, decode_scores)
        try:
            return events + self._finish_chunk(seqs, pieces, chunk_scores)
        except Exception as exc:
            if not trial:
                raise
            done = [s for s in seqs if s.prefilled == len(s.request.prompt_ids)]
            logger.exception("the first token of %d requests failed; they end, the others go on", len(done))
            self._fail_alone(done, exc)
            return events

    def _try_alone(self, seqs: list[Sequence]) -> list[TokenEvent]:
        """Each of ``seqs`` (prompts coming in, rolled back) gets its next chunk in its own
        forward; one that fails again ends alone (``take_failures``)."""
        events = []
        for seq in seqs:
            self.prefilling.append(seq)
            try:
                events += self._prefill_chunk([seq])
            except Exception as exc:
                logger.error("request %s failed alone too; it ends", seq.request_id, exc_info=True)
                self._fail_alone([seq], exc)
        return events

    def _fail_alone(self, seqs: list[Sequence], exc: Exception) -> None:
        for seq in seqs:
            seq.finish_reason = "error"
            self._failures.append((seq.request_id, exc))
        self._release(seqs)

    def _packed_forward(self, running: list[Sequence], saved: list | None):
        """Routing, then the forward of ``_packed_step``; returns the chunk's sequences and pieces
        and the decode and chunk scores (per member, ``(rows, Scores)``)."""
        seqs, pieces = self._next_chunk(self._route_chunk())
        last = torch.tensor([s.output_ids[-1] for s in running], device=self.device)  # [B]
        nll = self.method.uses_prompt_nll
        plans = [([i for i, s in enumerate(running) if s.uses[k]], [i for i, s in enumerate(seqs) if s.uses[k]])
                 for k in range(len(self.members))]
        decode: list = [None] * len(self.members)
        chunk: list = [None] * len(self.members)
        with self._chunk_undone_on_failure(seqs, saved):
            for k, (member, (d, p)) in enumerate(zip(self.members, plans, strict=True)):
                if d and p and member.packs_steps:
                    decode[k], chunk[k] = member.packed([running[i].slot for i in d], last[d], [seqs[i].slot for i in p],
                                                        [pieces[i] for i in p], nll)
            for k, (member, (d, _)) in enumerate(zip(self.members, plans, strict=True)):
                if d and decode[k] is None:
                    decode[k] = member.decode([running[i].slot for i in d], last[d])
            for k, (member, (_, p)) in enumerate(zip(self.members, plans, strict=True)):
                if p and chunk[k] is None:
                    chunk[k] = member.prefill([seqs[i].slot for i in p], [pieces[i] for i in p], nll)
            decode_scores = resolve([(d, decode[k]) for k, (d, _) in enumerate(plans)])
            chunk_scores = resolve([(p, chunk[k]) for k, (_, p) in enumerate(plans)])
        return seqs, pieces, decode_scores, chunk_scores

    def _advance(self, seqs: list[Sequence], scores: list[tuple[list[int], Scores | None]]) -> list[TokenEvent]:
        member_logits = [self._full_rows(rows, sc, len(seqs)) for rows, sc in scores]  # K x [B, V]
        weights = torch.stack([s.weights for s in seqs]).to(self.device)  # [B, K]
        out, eff_weights = self._fused_draw(seqs, member_logits, weights)  # 2.+3. in one kernel where it applies
        if out is None:
            fused = self.method.fuse(member_logits, weights)  # 2. fuse
            eff_weights = fused.weights
            params = [s.request.params for s in seqs]
            raw_shift = None  # the repetition penalty acts on raw scores (vLLM's rule)
            if any(p.repetition_penalty != 1.0 for p in params):
                raw_shift = self.method.raw_shift(member_logits, fused.weights)
            out = self.sampler(  # 3. sample
                fused.logprobs,
                params,
                [s.generator for s in seqs],
                [s.request.prompt_ids for s in seqs],
                [s.output_ids for s in seqs],
                raw_shift,
                pick_from=self._constrain(seqs, fused.logprobs),  # structured outputs (None: no grammar)
            )
        tokens = out.tokens.tolist()
        chosen = out.chosen_logprobs.tolist()
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        eff = eff_weights.float().cpu().tolist()
        member_diag = self._member_diagnostics(scores)
        events = []
        for i, seq in enumerate(seqs):
            n = seq.request.params.logprobs
            top = None if n is None else list(zip(top_ids[i][:n], top_lps[i][:n], strict=True)) if n else []
            diag = {"weights": dict(zip(self.method.member_names, eff[i], strict=True))}
            if seq.router_probs is not None:
                diag["router"] = dict(zip(self.method.member_names, seq.router_probs.tolist(), strict=True))
            for name, per_member in member_diag.items():
                diag[name] = {m: v[i] for m, v in per_member.items() if i in v}
            events.append(self._append(seq, tokens[i], chosen[i], top, diag))  # 4. append, 5. stop
        self._grammar_accept(seqs, tokens, events)  # structured outputs: a complete grammar stops
        self._release([s for s in seqs if s.finish_reason is not None])
        return events  # 6. emit

    def _fused_draw(self, seqs: list[Sequence], member_logits: list[torch.Tensor],
                    weights: torch.Tensor) -> tuple[SamplerOutput | None, torch.Tensor | None]:
        """Steps 2 and 3 in one pass (``Method.fuse_sample``: no ``[B, V]`` row written) when fused
        sampling is on and every row is a plain draw (``SamplingParams.plain_draw``, no EOS ban of
        ``min_tokens`` left); ``(None, None)`` otherwise. Greedy rows stay argmax; a sampled row
        is an exact draw from ``softmax(fused / T)`` with Philox noise seeded per row and step
        (``Sequence.step_seed``), a different random stream from the torch ``Sampler``'s. If the
        kernel fails, fused sampling is switched off for this engine (logged) and the step goes on
        unfused."""
        if not self.fused_sampling:
            return None, None
        for seq in seqs:
            params = seq.request.params
            if not params.plain_draw or len(seq.output_ids) < params.min_tokens:
                return None, None
        temperature = torch.tensor([0.0 if s.request.params.greedy else s.request.params.temperature for s in seqs],
                                   dtype=torch.float32, device=self.device)
        seeds = torch.tensor([s.step_seed() for s in seqs], dtype=torch.int64, device=self.device)
        try:
            picked = self.method.fuse_sample(member_logits, weights, temperature, seeds)
        except Exception:
            logger.exception("fused sampling failed; this engine fuses and samples separately from now on")
            self.fused_sampling = False
            return None, None
        if picked is None:
            return None, None
        tokens, logprobs, eff_weights = picked
        return SamplerOutput(tokens, logprobs, None, None), eff_weights

    # -- structured outputs (compose_serve.structured) ----------------------------------------
    def _constrain(self, seqs: list[Sequence], logprobs: torch.Tensor) -> torch.Tensor | None:
        """The fused ``logprobs [B, V]`` copied with -inf where a sequence's grammar forbids a token,
        for the sampler to pick from; None (no copy) when no sequence has a grammar."""
        rows = [i for i, s in enumerate(seqs) if s.request.params.structured is not None]
        if not rows:
            return None
        for i in rows:
            if seqs[i].grammar is None:  # its first token: the grammar was compiled at check()
                seqs[i].grammar = self._grammars().matcher(seqs[i].request.params.structured)
        return structured.mask_rows(logprobs, rows, [seqs[i].grammar for i in rows])

    def _grammar_accept(self, seqs: list[Sequence], tokens: list[int], events: list[TokenEvent]) -> None:
        """Each constrained sequence's matcher takes its token; a grammar that is complete (nothing
        but EOS can follow) ends its sequence with "stop", releasing any text held back."""
        for seq, token, event in zip(seqs, tokens, events, strict=True):
            if seq.grammar is None:
                continue
            if not seq.grammar.accept(token):  # cannot happen when the mask was applied
                logger.warning("request %s: token %d is outside its grammar; ending it", seq.request_id, token)
            if seq.grammar.finished and seq.finish_reason is None:
                event.text += seq.detokenizer.flush()
                seq.finish_reason = event.finish_reason = "stop"

    def _grammars(self) -> structured.GrammarCompiler:
        """This composition's grammar compiler (one per process and tokenizer, made on first use)."""
        c = self.composition
        return structured.compiler_for(c.tokenizer, c.vocab_size, c.eos_token_ids)

    def _full_rows(self, rows: list[int], scores: Scores | None, batch: int) -> torch.Tensor:
        """A member's logits as ``[B, V]``: zeros where the member did not run (its weight is 0)."""
        vocab = self.composition.vocab_size
        if scores is None:
            return torch.zeros((batch, vocab), device=self.device)
        logits = scores.logits[:, :vocab]
        if len(rows) == batch:
            return logits
        full = torch.zeros((batch, vocab), dtype=logits.dtype, device=logits.device)
        full[rows] = logits
        return full

    def _member_diagnostics(self, scores) -> dict[str, dict[str, dict[int, float]]]:
        """``{diagnostic: {member: {row: value}}}`` from the members' own Scores (e.g. gate_mean)."""
        out: dict[str, dict[str, dict[int, float]]] = {}
        for member, (rows, sc) in zip(self.members, scores, strict=True):
            for name, values in (sc.diagnostics if sc is not None else {}).items():
                out.setdefault(name, {})[member.name] = dict(zip(rows, values.float().cpu().tolist(), strict=True))
        return out

    def _append(self, seq: Sequence, token: int, logprob: float, top, diag) -> TokenEvent:
        params = seq.request.params
        seq.output_ids.append(token)
        eos = token in self.composition.eos_token_ids and not params.ignore_eos
        stop_reason = None  # vLLM's: the stop token id or stop string that ended it (None: EOS)
        if eos or token in params.stop_token_ids:  # the sampler bans both before min_tokens
            text, seq.finish_reason = seq.detokenizer.flush(), "stop"
            stop_reason = None if eos else token
        else:
            text, stop_reason = seq.detokenizer.push(token, len(seq.output_ids) >= params.min_tokens)
            if stop_reason is not None:
                seq.finish_reason = "stop"
            elif len(seq.output_ids) >= params.max_tokens:
                text, seq.finish_reason = text + seq.detokenizer.flush(), "length"
        return TokenEvent(seq.request_id, token, text, logprob, top, diag, seq.finish_reason,
                          stop_reason=stop_reason)

    # -- leaving --------------------------------------------------------------------------
    def _release(self, finished: Iterable[Sequence]) -> None:
        finished = list(finished)
        if not finished:
            return
        gone = {s.slot for s in finished}
        for member in self.members:
            member.release([slot for slot in member.live_slots if slot in gone])
        self.running = [s for s in self.running if s.slot not in gone]
        self.prefilling = [s for s in self.prefilling if s.slot not in gone]
        self._free_slots.extend(gone)

    def abort(self, request_id: str) -> bool:
        """Stop a running request now and free its slot; False if it is not running."""
        for seq in self.running + self.prefilling:
            if seq.request_id == request_id:
                seq.finish_reason = "abort"
                self._release([seq])
                return True
        return False

    def discard(self, request_ids: set[str]) -> None:
        """Forget the sequences ``request_ids`` and free every slot no running sequence holds.

        For the scheduler after ``add`` raised: the running batch was not touched, so it goes on;
        the slots ``add`` took for the new requests (in the engine and in every member) are freed.
        """
        self.running = [s for s in self.running if s.request_id not in request_ids]
        self.prefilling = [s for s in self.prefilling if s.request_id not in request_ids]
        held = {s.slot for s in self.running + self.prefilling}
        for member in self.members:
            member.release([slot for slot in member.live_slots if slot not in held])
        self._free_slots = [slot for slot in range(self.max_batch - 1, -1, -1) if slot not in held]

    def reset(self) -> None:
        """Forget every sequence and free every slot in every member.

        For the scheduler after a step raised: ``add`` may have taken slots (or a member may have
        extended its cache) before the failure, so the bookkeeping is rebuilt from nothing.
        """
        for member in self.members:
            member.release(member.live_slots)
        self.running, self.prefilling = [], []
        self._free_slots = list(range(self.max_batch - 1, -1, -1))

    # -- the library's one-call driver ----------------------------------------------------
    def generate(self, requests: list[Request], on_event=None) -> list[Completion]:
        """Run ``requests`` to completion, admitting waiting ones as slots free up.

        Returns one Completion per request, in order. ``on_event`` sees every TokenEvent.
        """
        for r in requests:
            self.check(r)  # fail before any work is done
        results = {r.request_id: Completion(r.request_id, list(r.prompt_ids)) for r in requests}
        waiting = deque(requests)
        while waiting or self.busy:
            if waiting and self.free_slots:
                admit = [waiting.popleft() for _ in range(min(self.free_slots, len(waiting)))]
                events = self.add(admit)
            else:
                events = self.step()
            for request_id, exc in self.take_failures():  # a request that failed alone: as add would
                raise RequestFailedError(f"request {request_id} failed ({type(exc).__name__}: {exc})") from exc
            for event in events:
                results[event.request_id].add(event)
                if on_event is not None:
                    on_event(event)
        return [results[r.request_id] for r in requests]


def _rows_of(rows: list[int], scores: Scores | None, keep: list[int]) -> tuple[list[int], Scores | None]:
    """The part of a member's chunk scores that belongs to the sequences ``keep`` (indices into
    the chunk), re-indexed to their positions in ``keep``."""
    position = {i: p for p, i in enumerate(keep)}
    picked = [(j, position[i]) for j, i in enumerate(rows) if i in position]
    if scores is None or not picked:
        return [], None
    index = torch.tensor([j for j, _ in picked], device=scores.logits.device)

    def take(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.index_select(0, index.to(t.device))

    return [p for _, p in picked], Scores(take(scores.logits), take(scores.hidden), take(scores.prompt_nll),
                                          {name: take(v) for name, v in scores.diagnostics.items()})


def resolve(scores: list[tuple[list[int], object]]) -> list[tuple[list[int], Scores | None]]:
    """Wait for members that answered with a future (remote members): every member's call was
    issued before the first wait, so they run in parallel."""
    return [(rows, sc.result() if hasattr(sc, "result") else sc) for rows, sc in scores]
