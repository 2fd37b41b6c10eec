"""Record a real vLLM's observations of every contract case as golden files.

    python -m tests.contract.capture --url http://127.0.0.1:18001 --embed-url http://127.0.0.1:18003

The model names are read from each server's /v1/models unless given (--model, --embed-model). Only shapes,
statuses, media types and the compared values are written (no ids, no text, no addresses).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx

from tests.contract.cases import CASES, EMBEDDING_CASES, Engine

GOLDEN = Path(__file__).with_name("golden")


def first_model(http: httpx.Client, url: str) -> str:
    """The first model id a server lists."""
    return str(http.get(f"{url}/v1/models").json()["data"][0]["id"])


def main(argv: list[str] | None = None) -> int:
    """Capture every case (or those named with --case) into tests/contract/golden/<case>.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="a real vLLM chat server (base URL, no /v1)")
    parser.add_argument("--model", help="served model name (default: the first of /v1/models)")
    parser.add_argument(
        "--embed-url", help="a real vLLM embedding server (embedding cases are left as they are without it)"
    )
    parser.add_argument("--embed-model")
    parser.add_argument("--case", action="append", help="capture only this case (repeatable)")
    parser.add_argument("--out", type=Path, default=GOLDEN)
    args = parser.parse_args(argv)
    url = args.url.rstrip("/").removesuffix("/v1")
    embed_url = args.embed_url.rstrip("/").removesuffix("/v1") if args.embed_url else None
    with httpx.Client(timeout=120) as http:
        version = http.get(f"{url}/version").json().get("version", "?")
        engine = Engine(
            name="vllm",
            url=url,
            model=args.model or first_model(http, url),
            embed_url=embed_url,
            embed_model=args.embed_model or (first_model(http, embed_url) if embed_url else None),
        )
        args.out.mkdir(parents=True, exist_ok=True)
        for name, case in CASES.items():
            if args.case and name not in args.case:
                continue
            if name in EMBEDDING_CASES and not embed_url:
                print(f"skip {name}: no --embed-url", file=sys.stderr)
                continue
            golden = {"case": name, "captured_from": f"vllm {version}", **case(engine, http).golden()}
            (args.out / f"{name}.json").write_text(json.dumps(golden, indent=1, sort_keys=False) + "\n")
            print(f"{name}: {golden['status']} {golden['media_type']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
