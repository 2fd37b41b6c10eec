"""Read-only queries of the checks: what a run will check, report tables, and trends for charts."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db.models import Count, Q, QuerySet

from backends.checks.models import CaseEndpoint, CheckCase, CheckResult, CheckRun, Outcome, RunStatus, RunTrigger
from backends.checks.runner import BackendTarget, CaseSpec, CheckTarget
from backends.models import Backend, BackendState, ModelKind, ServedModel

TREND_RUNS = 30
"""Runs shown by the trend charts."""


class CheckFilterError(ValueError):
    """A run was asked for a model or backend that does not exist."""


def case_spec(case: CheckCase) -> CaseSpec:
    """The runner's plain copy of a case."""
    return CaseSpec(
        id=case.pk,
        name=case.name,
        messages=list(case.messages),
        temperature=case.temperature,
        max_tokens=case.max_tokens,
        stream=case.stream,
        extra_params=dict(case.extra_params or {}),
        expectation=case.expectation,
        expected_text=case.expected_text,
        case_sensitive=case.case_sensitive,
        latency_budget_s=case.latency_budget_s,
        slow_threshold_s=case.slow_threshold_s,
        endpoint=case.endpoint,
        query=case.query,
        documents=[str(d) for d in case.documents or []],
    )


GENERATIVE_KINDS = frozenset({ModelKind.CHAT, ModelKind.COMPLETION})


def endpoint_model_kinds(endpoint: str) -> frozenset[str]:
    """The model kinds a case's endpoint serves: chat models for chat and Responses cases, pooling models (every
    kind that is not generative: embedding, and any pooling kind the registry knows) for rerank cases."""
    if endpoint == CaseEndpoint.RERANK:
        return frozenset(k for k in ModelKind.values if k not in GENERATIVE_KINDS)
    return frozenset({ModelKind.CHAT})


def backend_target(backend: Backend) -> BackendTarget:
    """The runner's plain copy of a backend (with its key and timeouts)."""
    return BackendTarget(
        id=backend.pk,
        name=backend.name,
        base_url=backend.base_url,
        api_key=backend.api_key,
        connect_timeout_s=backend.connect_timeout_s,
        read_timeout_s=backend.read_timeout_s,
    )


def check_filters_validate(*, model_names: Sequence[str] = (), backend_names: Sequence[str] = ()) -> None:
    """Raise CheckFilterError naming any model or backend that does not exist."""
    unknown_models = sorted(
        set(model_names) - set(ServedModel.objects.filter(name__in=model_names).values_list("name", flat=True))
    )
    unknown_backends = sorted(
        set(backend_names) - set(Backend.objects.filter(name__in=backend_names).values_list("name", flat=True))
    )
    problems = []
    if unknown_models:
        problems.append(f"unknown model(s): {', '.join(unknown_models)}")
    if unknown_backends:
        problems.append(f"unknown backend(s): {', '.join(unknown_backends)}")
    if problems:
        raise CheckFilterError("; ".join(problems))


def check_targets_build(*, model_names: Sequence[str] = (), backend_names: Sequence[str] = ()) -> list[CheckTarget]:
    """Every (backend, model, case) to check: enabled models x their pools' usable backends x enabled cases.

    A model is checked on the backends of its pool and of its fallback pools (those not disabled, in enabled
    pools); a case applies to the models of the kinds its endpoint serves (chat models for chat and Responses
    cases, pooling models for rerank cases) that it lists, or to all of them when it lists none.
    """
    check_filters_validate(model_names=model_names, backend_names=backend_names)
    cases = list(CheckCase.objects.filter(enabled=True).prefetch_related("models").order_by("name"))
    kinds = {case.pk: endpoint_model_kinds(case.endpoint) for case in cases}
    wanted: set[str] = set()
    for case_kinds in kinds.values():
        wanted |= case_kinds
    # A model no backend lists (marked by the health probe) is not a backend's failure: it is not checked.
    models = ServedModel.objects.filter(enabled=True, kind__in=sorted(wanted), unavailable_reason="").prefetch_related(
        "fallbacks"
    )
    if model_names:
        models = models.filter(name__in=model_names)
    backends = Backend.objects.exclude(state=BackendState.DISABLED).filter(pool__enabled=True)
    if backend_names:
        backends = backends.filter(name__in=backend_names)
    backends_by_pool: dict[int, list[Backend]] = {}
    for backend in backends.order_by("name"):
        backends_by_pool.setdefault(backend.pool_id, []).append(backend)
    applies = {case.pk: {m.pk for m in case.models.all()} for case in cases}
    specs = {case.pk: case_spec(case) for case in cases}
    targets: list[CheckTarget] = []
    for model in models.order_by("name"):
        pool_ids = [model.pool_id, *(fb.pool_id for fb in model.fallbacks.all())]
        model_cases = [
            c for c in cases if model.kind in kinds[c.pk] and (not applies[c.pk] or model.pk in applies[c.pk])
        ]
        for pool_id in dict.fromkeys(pool_ids):
            for backend in backends_by_pool.get(pool_id, []):
                target_backend = backend_target(backend)
                for case in model_cases:
                    targets.append(
                        CheckTarget(target_backend, model.pk, model.name, model.backend_name, specs[case.pk])
                    )
    targets.sort(key=lambda t: (t.backend.name, t.model_name, t.case.name))
    return targets


def check_run_results(*, run: CheckRun) -> QuerySet[CheckResult]:
    """A run's results, ordered backend, model, case."""
    return run.results.order_by("backend_name", "model_name", "case_name")


@dataclass(slots=True)
class ReportRow:
    """One row of a run's report table: a (backend, model) pair and its result per case (None: not run)."""

    backend_name: str
    model_name: str
    cells: list[CheckResult | None] = field(default_factory=list)


def check_run_matrix(*, run: CheckRun) -> tuple[list[str], list[ReportRow]]:
    """A run's results as a backend x case table: (case names, rows)."""
    results = list(check_run_results(run=run))
    case_names = sorted({r.case_name for r in results})
    rows: dict[tuple[str, str], dict[str, CheckResult]] = {}
    for result in results:
        rows.setdefault((result.backend_name, result.model_name), {})[result.case_name] = result
    table = [
        ReportRow(backend, model, [cells.get(name) for name in case_names])
        for (backend, model), cells in sorted(rows.items())
    ]
    return case_names, table


@dataclass(frozen=True, slots=True)
class TrendPoint:
    """Aggregates of one run for one backend or model."""

    run_id: int
    label: str
    total: int
    passed: int
    latency_p50_ms: float | None
    latency_max_ms: float | None
    ttft_p50_ms: float | None

    @property
    def pass_rate(self) -> float:
        """Passed share of the checks, 0..1."""
        return self.passed / self.total if self.total else 0.0


def _trend(results: QuerySet[CheckResult], limit: int) -> list[TrendPoint]:
    """Aggregate results per run over the last `limit` runs that have any, oldest first."""
    run_ids = list(results.order_by("-run_id").values_list("run_id", flat=True).distinct()[:limit])
    if not run_ids:
        return []
    rows = results.filter(run_id__in=run_ids).values_list(
        "run_id", "outcome", "latency_ms", "ttft_ms", "run__started_at", "run__created_at"
    )
    grouped: dict[int, list[tuple[Any, ...]]] = {}
    for row in rows:
        grouped.setdefault(row[0], []).append(row)
    points = []
    for run_id in sorted(grouped):
        group = grouped[run_id]
        latencies = [float(r[2]) for r in group if r[2] is not None]
        ttfts = [float(r[3]) for r in group if r[3] is not None]
        when = group[0][4] or group[0][5]
        points.append(
            TrendPoint(
                run_id=run_id,
                label=f"#{run_id} {when:%m-%d %H:%M}" if when else f"#{run_id}",
                total=len(group),
                passed=sum(1 for r in group if r[1] == "pass"),
                latency_p50_ms=round(statistics.median(latencies), 1) if latencies else None,
                latency_max_ms=round(max(latencies), 1) if latencies else None,
                ttft_p50_ms=round(statistics.median(ttfts), 1) if ttfts else None,
            )
        )
    return points


def check_trend_for_backend(*, backend: Backend, limit: int = TREND_RUNS) -> list[TrendPoint]:
    """Pass rate and latency of a backend over its last `limit` runs, oldest first."""
    return _trend(CheckResult.objects.filter(backend=backend), limit)


def check_trend_for_model(*, model: ServedModel, limit: int = TREND_RUNS) -> list[TrendPoint]:
    """Pass rate and latency of a model (all its backends) over its last `limit` runs, oldest first."""
    return _trend(CheckResult.objects.filter(model=model), limit)


def check_failures(results: Iterable[CheckResult]) -> list[CheckResult]:
    """The failed results among some results."""
    return [r for r in results if not r.passed]


@dataclass(frozen=True, slots=True)
class RunSummary:
    """The latest finished check run (the nightly one when there is one) and its results per backend."""

    run: CheckRun
    per_backend: dict[str, tuple[int, int]]  # backend name -> (passed, total)


def check_run_latest_summary() -> RunSummary | None:
    """The latest finished scheduled run (else the latest finished run of any trigger), with (passed, total) per
    backend: two small queries (the run, then its results grouped by backend)."""
    finished = CheckRun.objects.filter(status__in=[RunStatus.PASSED, RunStatus.FAILED, RunStatus.ERROR])
    run = finished.filter(trigger=RunTrigger.SCHEDULE).order_by("-id").first() or finished.order_by("-id").first()
    if run is None:
        return None
    rows = (
        run.results.values("backend_name")
        .annotate(total=Count("id"), passes=Count("id", filter=Q(outcome=Outcome.PASS)))
        .order_by()
    )
    return RunSummary(run=run, per_backend={r["backend_name"]: (r["passes"], r["total"]) for r in rows})
