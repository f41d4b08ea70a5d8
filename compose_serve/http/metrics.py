"""Prometheus metrics with vLLM's names, prefixed ``compose_serve:``, labelled ``model_name``.

Gauges are read from the schedulers at scrape time (``num_requests_running``,
``num_requests_waiting``; any object with ``stats() -> SchedulerStats`` is a source, which is how
the Ray ingress exports the same gauges); everything else is recorded when a request ends (the
scheduler's observer hook, called from its step thread), so an aborted request's tokens count too:
``prompt_tokens_total``, ``generation_tokens_total``, ``request_success_total{finished_reason}``
(stop, length, abort, timeout, error), ``request_rejected_total`` (queue full, HTTP 429),
histograms ``time_to_first_token_seconds``, ``inter_token_latency_seconds``,
``e2e_request_latency_seconds``, ``request_queue_time_seconds``, and per member
``member_weight`` / ``member_gate_mean`` (each request's mean over its tokens; the histogram's
``_sum / _count`` is the mean over requests). Each instance owns its registry, so several apps
can live in one process. For vLLM dashboards the main series are also exported under vLLM's own
names (``VLLM_ALIASES``: ``vllm:num_requests_running``, ``vllm:generation_tokens_total``, ...),
read from the same values at scrape time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..engine.scheduler import RequestRecord, SchedulerStats

P = "compose_serve:"
VLLM = "vllm:"
#: the series also exported under vLLM's names (``vllm:`` + the same suffix, same labels)
VLLM_ALIASES = (
    "num_requests_running",
    "num_requests_waiting",
    "prompt_tokens",
    "generation_tokens",
    "request_success",
    "time_to_first_token_seconds",
    "inter_token_latency_seconds",
    "e2e_request_latency_seconds",
    "request_queue_time_seconds",
)
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
)
WEIGHT_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


class StatsSource(Protocol):
    def stats(self) -> SchedulerStats: ...


class _SchedulerGauges:
    """A collector: running and waiting sizes of each scheduler, read when scraped."""

    def __init__(self, engines: Sequence[StatsSource]) -> None:
        self.engines = list(engines)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        running = GaugeMetricFamily(
            P + "num_requests_running", "Sequences in the running batch.", labels=["model_name"]
        )
        waiting = GaugeMetricFamily(
            P + "num_requests_waiting", "Requests waiting for a slot.", labels=["model_name"]
        )
        for engine in self.engines:
            stats = engine.stats()
            running.add_metric([stats.model], stats.running)
            waiting.add_metric([stats.model], stats.waiting)
        yield running
        yield waiting


class _Aliases:
    """A collector: the ``VLLM_ALIASES`` families of ``collectors`` again, under ``vllm:`` names."""

    def __init__(self, collectors) -> None:
        self.collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            for family in collector.collect():
                if family.name.removeprefix(P) not in VLLM_ALIASES:
                    continue
                alias = Metric(VLLM + family.name.removeprefix(P), family.documentation, family.type)
                alias.samples = [s._replace(name=VLLM + s.name.removeprefix(P)) for s in family.samples]
                yield alias


class ServingMetrics:
    """The scheduler ``Observer`` that feeds a Prometheus registry; ``render()`` for /metrics.

    ``engines``: the gauges' sources, AsyncEngines in process (anything with ``stats()``).
    """

    def __init__(self, engines: Sequence[StatsSource]) -> None:
        self.registry = CollectorRegistry()
        gauges = _SchedulerGauges(engines)
        self.registry.register(gauges)
        model = ["model_name"]
        r = self.registry
        self.prompt_tokens = Counter(
            P + "prompt_tokens", "Prefilled prompt tokens.", model, registry=r
        )
        self.generation_tokens = Counter(
            P + "generation_tokens", "Generated tokens.", model, registry=r
        )
        self.success = Counter(
            P + "request_success",
            "Requests ended, by finish reason.",
            model + ["finished_reason"],
            registry=r,
        )
        self.rejected = Counter(
            P + "request_rejected", "Requests refused: queue full (429).", model, registry=r
        )
        self.ttft = Histogram(
            P + "time_to_first_token_seconds",
            "Submit to first token.",
            model,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            P + "inter_token_latency_seconds",
            "Between consecutive tokens.",
            model,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            P + "e2e_request_latency_seconds",
            "Submit to end.",
            model,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            P + "request_queue_time_seconds",
            "Submit to admission.",
            model,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        member = model + ["member"]
        self.member_weight = Histogram(
            P + "member_weight",
            "A request's mean effective weight per member.",
            member,
            buckets=WEIGHT_BUCKETS,
            registry=r,
        )
        self.member_gate = Histogram(
            P + "member_gate_mean",
            "A request's mean IMSM gate per member.",
            member,
            buckets=WEIGHT_BUCKETS,
            registry=r,
        )

        self.registry.register(
            _Aliases([gauges, self.prompt_tokens, self.generation_tokens, self.success, self.ttft,
                      self.itl, self.e2e, self.queue_time])
        )

    # -- the scheduler's Observer -----------------------------------------------------------
    def request_finished(self, record: RequestRecord) -> None:
        model = record.model
        self.prompt_tokens.labels(model).inc(
            record.prompt_tokens if record.admitted is not None else 0
        )
        self.generation_tokens.labels(model).inc(record.output_tokens)
        self.success.labels(model, record.finish_reason or "unknown").inc()
        for seconds, histogram in (
            (record.ttft, self.ttft),
            (record.e2e, self.e2e),
            (record.queue_time, self.queue_time),
        ):
            if seconds is not None:
                histogram.labels(model).observe(seconds)
        itl = self.itl.labels(model)
        for seconds in record.inter_token:
            itl.observe(seconds)
        means = record.diagnostic_means
        for name, histogram in (("weights", self.member_weight), ("gate_mean", self.member_gate)):
            for member, value in means.get(name, {}).items():
                histogram.labels(model, member).observe(value)

    def request_rejected(self, model: str) -> None:
        self.rejected.labels(model).inc()

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
