"""Tracing's cost on the hot path: the platform with tracing off, on at 100 % and on at 1 % sampling, in one run.

    .venv/bin/python bench/tracing.py                 # 3 rounds of 5 s runs, ~2 minutes; prints a Markdown table
    .venv/bin/python bench/tracing.py --rounds 1 --duration 2

It starts what bench/run.py starts (the mock vLLM, a fresh SQLite state, `setup_platform`, an unlimited API key,
uvicorn with the flags of `make run`), but three platform processes on the same database, one per variant, each
with its own environment: no OTEL_* variable (off, the default), `OTEL_TRACES_SAMPLER=parentbased_traceidratio`
with `OTEL_TRACES_SAMPLER_ARG=1.0` and `0.01`, both exporting OTLP/HTTP to a receiver in this process
(tests/otlp.py, counting only). Placement as bench/run.py's `pinned`: the platforms on one core, the mock, the
clients and the receiver on the other. Every round measures each variant in turn (the order rotates every round):
wrk at c64 (non-streaming chat) and the stream client at c16, and the platform process's CPU time per answered
request. The result is the median per variant and its ratio to "off" from the same run: on a loaded machine the
absolute figures move with the load, ratios within one run much less. docs/performance.md "Tracing" has a run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import (  # noqa: E402
    QUIET_CORES,
    RESULTS,
    Scenario,
    Stack,
    cpu_seconds,
    ensure_wrk,
    log,
    other_load,
    pinned,
    placement_from,
    process_tree,
    run_streams,
    run_wrk,
)
from bench.run import parse_args as run_args  # noqa: E402
from core.procs import free_port, wait_http  # noqa: E402
from tests.otlp import OtlpReceiver  # noqa: E402

VARIANTS: dict[str, dict[str, str]] = {
    "off": {},
    "on, 100 %": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.0"},
    "on, 1 %": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
}
SCENARIOS = (
    Scenario("chat c64", "chat", 64, {"token_delay_s": 0.0}),
    Scenario("stream c16", "stream", 16, {"token_delay_s": 0.005}),
)


def start_variant(stack: Stack, name: str, env: dict[str, str], cpu: int | None) -> tuple[str, subprocess.Popen[bytes]]:
    """Another platform process on the stack's database, with `env` added; returns its URL and process."""
    port = free_port()
    argv = list(stack.web_argv)
    argv[argv.index("--port") + 1] = str(port)
    logfile = (stack.tmp / f"platform-{name.replace(' ', '').replace(',', '-').replace('%', '')}.log").open("wb")
    proc = subprocess.Popen(
        pinned(cpu, argv),
        cwd=ROOT,
        env={**stack.env, **env},
        stdout=logfile,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    stack.procs.append((f"platform {name}", proc))
    url = f"http://127.0.0.1:{port}"
    if not wait_http(f"{url}/readyz", 60, proc):
        raise RuntimeError(f"the platform ({name}) did not become ready")
    return url, proc


def measure(
    stack: Stack, wrk: str, scenario: Scenario, url: str, proc: subprocess.Popen[bytes], args: argparse.Namespace
) -> dict[str, Any]:
    """One client run against one variant: rate and the platform process's CPU per answered request."""
    stack.mock_configure(scenario.mock_config)
    tree = process_tree(proc.pid)
    cpu0, t0 = cpu_seconds(tree), time.monotonic()
    if scenario.kind == "chat":
        client = run_wrk(wrk, args.client_cpu, url, stack.key, scenario, args.duration)
        rate = client["rate"]
        errors = client["sent"] - client["answered"] + sum(client["socket_errors"].values())
    else:
        client = run_streams(args.client_cpu, url, stack.key, scenario, args.duration, "raw")
        rate = client["streams_per_s"]
        errors = sum(client["errors"].values()) + client["sent"] - client["answered"]
    cpu = cpu_seconds(tree) - cpu0
    answered = client["answered"]
    return {
        "rate": rate,
        "cpu_ms_per_request": cpu * 1000 / answered if answered else None,
        "answered": answered,
        "errors": errors,
        "wall_s": time.monotonic() - t0,
    }


def table(results: dict[str, dict[str, list[dict[str, Any]]]], meta: dict[str, Any]) -> str:
    """Medians per variant and scenario, with ratios to "off"."""
    lines = [
        f"Run {meta['date']}, {meta['rounds']} rounds of {meta['duration']:g} s per run, other load "
        f"{meta['other_load_cores']:.2f} cores before the run (median {meta['other_load_median']:.2f} during it; "
        f"> {QUIET_CORES} = loaded), OTLP receiver: {meta['export_requests']} export requests, "
        f"{meta['export_mib']:.1f} MiB.",
        "",
        "| workload | tracing | rate | platform CPU per request | CPU vs off | rate vs off |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for scenario in SCENARIOS:
        base_cpu = base_rate = None
        for variant in VARIANTS:
            runs = results[scenario.name][variant]
            cpu = statistics.median(r["cpu_ms_per_request"] for r in runs if r["cpu_ms_per_request"] is not None)
            rate = statistics.median(r["rate"] for r in runs)
            if variant == "off":
                base_cpu, base_rate = cpu, rate
            unit = "req/s" if scenario.kind == "chat" else "streams/s"
            cpu_ratio = f"{cpu / base_cpu:.2f}x" if base_cpu else "-"
            rate_ratio = f"{rate / base_rate:.2f}x" if base_rate else "-"
            lines.append(
                f"| {scenario.name} | {variant} | {rate:,.0f} {unit} | {cpu:.3f} ms | {cpu_ratio} | {rate_ratio} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per client run")
    parser.add_argument("--out", type=Path, default=RESULTS / "tracing.json")
    args = parser.parse_args(argv)
    base = run_args(["--quick", "--no-docs", "--placement", "pinned"])
    placement = placement_from(base)
    args.client_cpu = placement["client"]
    if args.client_cpu is not None:  # this script (the OTLP receiver's threads) shares the clients' core
        os.sched_setaffinity(0, [args.client_cpu])
    wrk = ensure_wrk()
    load_before = other_load(2.0)
    log(f"other processes use {load_before:.2f} cores")
    receiver = OtlpReceiver(decode=False).start()
    stack = Stack(base, placement)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {s.name: {v: [] for v in VARIANTS} for s in SCENARIOS}
    loads: list[float] = []
    try:
        stack.start()  # the mock and the "off" platform
        assert stack.web is not None
        targets = {"off": (stack.url, stack.web)}
        for variant, env in VARIANTS.items():
            if variant != "off":
                traced = {**env, "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
                targets[variant] = start_variant(stack, variant, traced, placement["platform"])
        for url, proc in targets.values():  # warm-up
            for scenario in SCENARIOS:
                measure(stack, wrk, scenario, url, proc, argparse.Namespace(**{**vars(args), "duration": 1.0}))
        names = list(VARIANTS)
        for round_no in range(args.rounds):
            order = names[round_no % len(names) :] + names[: round_no % len(names)]
            for variant in order:
                url, proc = targets[variant]
                for scenario in SCENARIOS:
                    busy = other_load(0.2)
                    loads.append(busy)
                    run = measure(stack, wrk, scenario, url, proc, args)
                    results[scenario.name][variant].append(run)
                    cpu = run["cpu_ms_per_request"] or 0.0
                    log(
                        f"round {round_no + 1} {scenario.name:<10} {variant:<10} {run['rate']:8.0f}/s  "
                        f"cpu {cpu:.3f} ms/req  errors {run['errors']}  other load {busy:.2f}"
                    )
    finally:
        stack.stop()
        receiver.stop()
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rounds": args.rounds,
        "duration": args.duration,
        "other_load_cores": load_before,
        "other_load_median": statistics.median(loads) if loads else 0.0,
        "export_requests": receiver.requests,
        "export_mib": receiver.bytes / 2**20,
        "cpus": os.cpu_count(),
    }
    text = table(results, meta)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    log(f"results in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
