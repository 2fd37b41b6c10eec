"""Command line entry point: serve the mock vLLM with uvicorn (uvloop + httptools).

    python -m backends.mock_vllm --host 127.0.0.1 --port 8101 --model mock-chat --embed-model mock-embed

Every `MockConfig` field is a flag (``--latency-s 0.05``, ``--fail-status 503``, ``--hang`` ...)
and an environment variable (``MOCK_VLLM_LATENCY_S=0.05``); flags win over the environment.
``--model`` / ``--embed-model`` / ``--rerank-model`` may be repeated (env: comma-separated ``MOCK_VLLM_MODELS`` /
``MOCK_VLLM_EMBED_MODELS`` / ``MOCK_VLLM_RERANK_MODELS``); ``--embed-model ''`` serves no embedding model.
Prefix cache: ``--prefix-cache-blocks 4096`` (0: off), ``--prefix-cache-block-size 16`` and
``--prefill-ms-per-token 0.5`` (first-token delay per uncached prompt token).
KV-cache events as vLLM publishes them (ZMQ on 127.0.0.1, announced at GET /kv_event_sources):
``--kv-events-port 5557``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from backends.mock_vllm.app import MockConfig, MockVLLM

ENV_PREFIX = "MOCK_VLLM_"
_LIST_FLAGS = {"models": "--model", "embed_models": "--embed-model", "rerank_models": "--rerank-model"}


def _parse_bool(text: str) -> bool:
    """Parse a boolean flag/env value."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Wrap a parser so that 'none' / '' mean None."""

    def parse_optional(text: str) -> Any:
        return None if text.strip().lower() in ("", "none", "null") else parse(text)

    return parse_optional


def _parse_list(text: str) -> list[str]:
    """Parse a comma-separated list."""
    return [item.strip() for item in text.split(",") if item.strip()]


_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": int,
    "int | None": _optional(int),
    "float": float,
    "bool": _parse_bool,
    "str | None": _optional(str),
    "list[str]": _parse_list,
    "list[str] | None": _optional(_parse_list),
}


def _field_parser(f: dataclasses.Field[Any]) -> Callable[[str], Any]:
    """Return the string parser of a MockConfig field from its annotation."""
    annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return _PARSERS.get(annotation, str)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser (one flag per MockConfig field plus server options)."""
    parser = argparse.ArgumentParser(prog="python -m backends.mock_vllm", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default=os.environ.get(ENV_PREFIX + "HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get(ENV_PREFIX + "PORT", "8000")))
    parser.add_argument("--loop", default="uvloop", help="uvicorn event loop (default uvloop)")
    parser.add_argument("--http", default="httptools", help="uvicorn HTTP protocol (default httptools)")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--model", dest="models", action="append", default=None, help="served chat model")
    parser.add_argument(
        "--embed-model", dest="embed_models", action="append", default=None, help="served embedding model"
    )
    parser.add_argument(
        "--rerank-model", dest="rerank_models", action="append", default=None, help="served reranker (cross-encoder)"
    )
    for f in dataclasses.fields(MockConfig):
        if f.name in _LIST_FLAGS:
            continue
        flag = "--" + f.name.replace("_", "-")
        parse = _field_parser(f)
        if parse is _parse_bool:
            parser.add_argument(flag, dest=f.name, nargs="?", const=True, default=None, type=_parse_bool)
        else:
            parser.add_argument(flag, dest=f.name, default=None, type=parse)
    return parser


def config_from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> MockConfig:
    """Build a MockConfig from parsed flags, falling back to MOCK_VLLM_* environment variables."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(MockConfig):
        flag_value = getattr(args, f.name, None)
        if f.name in _LIST_FLAGS and flag_value is not None:
            flag_value = [item for raw in flag_value for item in _parse_list(raw)]
        if flag_value is not None:
            values[f.name] = flag_value
            continue
        env_value = env.get(ENV_PREFIX + f.name.upper())
        if env_value is not None:
            values[f.name] = _field_parser(f)(env_value)
    return MockConfig(**values)


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and serve the mock until interrupted."""
    import uvicorn

    args = build_parser().parse_args(argv)
    app = MockVLLM(config_from_args(args))
    print(
        f"mock vLLM serving {app.config.models + app.config.embed_models + app.config.rerank_models} on http://{args.host}:{args.port}",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop=args.loop,
        http=args.http,
        ws="none",
        lifespan="on",
        access_log=False,
        log_level=args.log_level,
    )


if __name__ == "__main__":
    main()
