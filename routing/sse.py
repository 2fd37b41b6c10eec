"""Server-sent events from a backend: framing, model-name rewriting and usage extraction, at byte level.

The router asks vLLM for usage on every streamed chunk (`stream_options.continuous_usage_stats`), so that a
client who disconnects mid-stream is still charged for the tokens generated up to then (the final usage chunk
never comes in that case). The client sees only what it asked for: the per-chunk `usage` member and the final
usage-only chunk are cut out of the bytes unless requested. Only the last usage object is kept (as bytes) and
parsed once, at the end, so the per-chunk cost stays a couple of byte searches.
"""

from __future__ import annotations

from typing import Any

import orjson

MAX_UNFRAMED_BYTES = 1 << 20
"""Bytes held while waiting for the end of an SSE event; past it they are passed through as they are."""

_USAGE_OPEN = b'"usage":{'


class StreamState:
    """Frames SSE events out of raw chunks, rewrites the model name, keeps the last usage seen, strips usage
    members and chunks the client did not ask for."""

    __slots__ = (
        "buffer",
        "events",
        "public_pattern",
        "served_pattern",
        "strip_continuous",
        "strip_final",
        "usage_raw",
    )

    def __init__(self, *, served: str, requested: str, strip_final: bool, strip_continuous: bool = False) -> None:
        self.served_pattern = b'"model":' + orjson.dumps(served)
        self.public_pattern = b'"model":' + orjson.dumps(requested)
        if self.served_pattern == self.public_pattern:
            self.served_pattern = b""
        self.strip_final = strip_final
        self.strip_continuous = strip_continuous
        self.buffer = b""
        self.usage_raw = b""
        self.events = 0

    def feed(self, chunk: bytes) -> bytes:
        """Take raw bytes; return the complete events ready for the client (possibly empty)."""
        buffer = self.buffer + chunk if self.buffer else chunk
        end = buffer.rfind(b"\n\n")
        if end < 0:
            if len(buffer) > MAX_UNFRAMED_BYTES:  # not SSE framing we understand: pass it on rather than hold it
                self.buffer = b""
                return buffer
            self.buffer = buffer
            return b""
        complete, self.buffer = buffer[: end + 2], buffer[end + 2 :]
        self.events += complete.count(b"\n\n")
        if self.served_pattern:
            complete = complete.replace(self.served_pattern, self.public_pattern)
        if _USAGE_OPEN in complete:
            complete = self._usage(complete)
        return complete

    def flush(self) -> bytes:
        """What is left when the upstream ends: an unterminated last event, framed."""
        if not self.buffer:
            return b""
        return self.feed(b"\n\n")

    def usage(self) -> dict[str, Any] | None:
        """The last usage object the backend sent (None if none, or not JSON)."""
        if not self.usage_raw:
            return None
        try:
            usage = orjson.loads(self.usage_raw)
        except orjson.JSONDecodeError:
            return None
        return usage if isinstance(usage, dict) else None

    def _usage(self, events: bytes) -> bytes:
        kept: list[bytes] = []
        for event in events.split(b"\n\n"):
            if not event:
                continue
            start = event.find(_USAGE_OPEN)
            if start < 0:
                kept.append(event + b"\n\n")
                continue
            value_start = start + len(_USAGE_OPEN) - 1
            value_end = _object_end(event, value_start)
            if value_end < 0:  # not a usage object we can delimit: leave the event alone
                kept.append(event + b"\n\n")
                continue
            self.usage_raw = event[value_start:value_end]
            if b'"choices":[]' in event:  # the final usage-only chunk
                if not self.strip_final:
                    kept.append(event + b"\n\n")
                continue
            if self.strip_continuous:
                event = _cut_member(event, start, value_end)
            kept.append(event + b"\n\n")
        return b"".join(kept)


def _object_end(data: bytes, start: int) -> int:
    """The index just past the JSON object opening at `start`, or -1 (usage objects are small and their strings
    hold no braces; a backend that breaks this only garbles its own usage, which is then not trusted)."""
    depth = 0
    for index in range(start, min(len(data), start + 4096)):
        byte = data[index]
        if byte == 0x7B:  # {
            depth += 1
        elif byte == 0x7D:  # }
            depth -= 1
            if depth == 0:
                return index + 1
    return -1


def _cut_member(event: bytes, start: int, end: int) -> bytes:
    """Remove the member `"usage":{...}` spanning [start, end) and its separating comma."""
    if start > 0 and event[start - 1 : start] == b",":
        return event[: start - 1] + event[end:]
    if event[end : end + 1] == b",":
        return event[:start] + event[end + 1 :]
    return event[:start] + event[end:]


def sse_data(event: bytes) -> bytes | None:
    """The data of one SSE event (its `data:` lines joined), or None for a comment or keep-alive."""
    lines = [
        line[6:] if line.startswith(b"data: ") else line[5:] for line in event.split(b"\n") if line.startswith(b"data:")
    ]
    if not lines:
        return None
    return b"\n".join(line.rstrip(b"\r") for line in lines)
