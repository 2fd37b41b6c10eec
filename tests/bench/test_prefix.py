"""bench/prefix.py's pure parts: seeded workloads, per-run tags, aggregation and the target checks."""

from __future__ import annotations

from pathlib import Path

from bench.prefix import (
    PA,
    PA2,
    RR,
    SINGLE,
    RunResult,
    aggregate,
    load_table,
    overlap_table,
    tagged,
    targets,
    turn_table,
    write_raw,
)
from bench.prefix_workloads import Sizes, multi_turn, no_sharing, shared_documents


def test_workloads_are_reproducible_from_their_seed() -> None:
    # given the same seed twice and another seed
    # when the workloads are built
    # then the same seed gives the same text, the other seed shares no document
    sizes = Sizes.quick()
    assert shared_documents(1, sizes) == shared_documents(1, sizes)
    docs_1 = {c.system for c in shared_documents(1, sizes).conversations}
    docs_2 = {c.system for c in shared_documents(2, sizes).conversations}
    assert len(docs_1) == sizes.docs and not docs_1 & docs_2


def test_workload_shapes_follow_the_sizes() -> None:
    # given the quick sizes
    sizes = Sizes.quick()
    # when each workload is built
    shared, chats, unique = shared_documents(3, sizes), multi_turn(3, sizes), no_sharing(3, sizes)
    # then the request counts and the session keys are as documented
    assert shared.requests == sizes.docs * sizes.questions_per_doc
    assert chats.requests == sizes.conversations * sizes.turns
    assert all(len(c.turns) == sizes.turns for c in chats.conversations)
    assert len({c.session for c in shared.conversations}) == shared.requests  # every reader on their own
    assert len({c.system for c in unique.conversations}) == sizes.unique_prompts  # no prompt shared


def test_a_tag_starts_every_prompt_of_a_run() -> None:
    # given a workload
    workload = shared_documents(4, Sizes.quick())
    # when it is tagged for a run
    run = tagged(workload, "run 1 x")
    # then every system message starts with the tag and nothing else changed
    assert all(c.system.startswith("[run 1 x] ") for c in run.conversations)
    assert [c.turns for c in run.conversations] == [c.turns for c in workload.conversations]


def _run(system: str, ttft: float, wall_s: float, hits: float, failures: int = 0) -> RunResult:
    return RunResult(
        system, "shared documents", 1, 10, ttfts=[ttft] * 10, failures=failures, wall_s=wall_s, hits=hits, queries=100
    )


def test_targets_are_checked_against_the_issue_thresholds() -> None:
    # given prefix_aware at the single server's hit rate, half round robin's TTFT, 2x its rate; 2 workers close
    results = [
        _run(SINGLE, 1.0, 10.0, 70),
        _run(RR, 4.0, 20.0, 35),
        _run(PA, 2.0, 10.0, 66),
        _run(PA2, 2.2, 10.0, 64),
    ]
    # when the rows are aggregated and the targets checked
    checks = {what: ok for what, _, ok in targets(aggregate(results))}
    # then every target present is met
    assert checks and all(checks.values()), checks
    # and one failed request, or a 2-worker TTFT 20 % worse, misses its target
    results[3] = _run(PA2, 2.4, 10.0, 64, failures=1)
    missed = [what for what, _, ok in targets(aggregate(results)) if not ok]
    assert any("2 workers" in m for m in missed) and any("failed" in m for m in missed)


def test_multi_turn_ttfts_are_split_into_first_and_later_turns(tmp_path: Path) -> None:
    # given a multi-turn run with slow first turns and fast later ones, and a shared-documents run
    run = RunResult("platform prefix_aware", "multi-turn", 1, 6)
    run.samples = [("a", 0, 0.0, 2.0, "x", 2.1), ("a", 1, 2.1, 0.2, "x", 2.4), ("a", 2, 2.4, 0.4, "x", 2.9)]
    run.samples += [("b", 0, 0.0, 3.0, "y", 3.1), ("b", 1, 3.1, 0.6, "y", 3.8), ("b", 2, 3.8, 0.8, "y", 4.7)]
    other = RunResult("platform prefix_aware", "shared documents", 1, 1)
    other.samples = [("c", 0, 0.0, 9.0, "", 9.1)]
    # when the by-turn table is rendered and the raw samples written
    lines = turn_table([run, other])
    raw = tmp_path / "raw.jsonl"
    write_raw(raw, [run, other])
    # then the first turns' median is 2.5 s and the later turns' 0.5 s, shared documents left out
    assert lines[-1].startswith("| platform prefix_aware | 2.50 | 0.50 |")
    assert sum("platform prefix_aware" in line for line in lines) == 1
    assert len(raw.read_text().splitlines()) == 7
    assert turn_table([other]) == []


def test_later_turns_are_split_by_a_first_turn_prefilled_beside_them() -> None:
    # given a multi-turn run where one later turn ran on engine x while a first turn was prefilled there, and two
    # did not (one on the other engine, one after that first turn had its first token), and a round 2 at clock 0
    run = RunResult("platform prefix_aware", "multi-turn", 0, 5)
    run.samples = [
        ("a", 0, 0.0, 2.0, "x", 2.1),
        ("b", 1, 1.0, 1.5, "x", 2.6),
        ("c", 1, 1.0, 0.3, "y", 1.4),
        ("d", 1, 2.5, 0.2, "x", 2.8),
    ]
    later = RunResult("platform prefix_aware", "multi-turn", 1, 1)
    later.samples = [("e", 1, 0.5, 0.25, "x", 0.85)]  # round 2: not beside round 1's first turn
    peer = RunResult("vllm-router cache_aware", "multi-turn", 0, 2)
    peer.samples = [("a", 0, 0.0, 2.0, "", 2.1), ("b", 1, 1.0, 1.5, "", 2.6)]
    single = RunResult("single server", "multi-turn", 0, 2)
    single.samples = [("a", 0, 0.0, 2.0, "", 2.1), ("b", 1, 1.0, 1.5, "", 2.6)]
    # when the overlap table is rendered
    lines = overlap_table([run, later, peer, single])
    # then one later turn is overlapped (1.5 s) and three are not (median 0.25 s); vllm-router, whose answers name
    # no backend, is left out; the single server's one engine is known
    assert "| platform prefix_aware | 1 | 1.50 / 1.50 | 3 | 0.25 / " in lines[-2]
    assert lines[-1].startswith("| single server | 1 | 1.50 / 1.50 | 0 | nan / nan |")
    assert not any("vllm-router" in line for line in lines)
    assert overlap_table([peer]) == []


def test_later_turns_are_grouped_by_the_requests_open_on_their_engine_and_the_other() -> None:
    # given a two-engine run where one later turn was sent while two requests were open on its engine (x) and one
    # on the other (y), one was sent with nothing else open, and a single server whose later turn had one beside it
    run = RunResult("platform prefix_aware", "multi-turn", 0, 5)
    run.samples = [("a", 0, 0.0, 1.0, "x", 2.0), ("b", 0, 0.0, 1.0, "x", 2.0), ("c", 0, 0.0, 1.0, "y", 2.0)]
    run.samples += [("d", 1, 1.5, 0.4, "x", 1.9), ("a", 1, 3.0, 0.2, "x", 3.5)]
    single = RunResult("single server", "multi-turn", 0, 2)
    single.samples = [("a", 0, 0.0, 1.0, "", 2.0), ("b", 1, 1.0, 0.3, "", 1.5)]
    peer = RunResult("vllm-router cache_aware", "multi-turn", 0, 1)
    peer.samples = [("a", 1, 0.0, 1.0, "", 2.0)]
    # when the load table is rendered
    lines = load_table([run, single, peer])
    # then the columns are the (own, other) counts seen, each cell the TTFT median and count; the peer is left out
    assert lines[3] == "| system | 0 + 0 | 1 + 0 | 2 + 1 |"
    assert lines[5] == "| platform prefix_aware | 0.20 (1) |  | 0.40 (1) |"
    assert lines[6] == "| single server |  | 0.30 (1) |  |"
    assert not any("vllm-router" in line for line in lines)
    assert load_table([peer]) == []
