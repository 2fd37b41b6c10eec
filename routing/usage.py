"""Usage events of the /v1 requests: defined in governance.events (routing sits above governance), re-exported here."""

from __future__ import annotations

from governance.events import MemoryUsageSink, UsageEvent, UsageSink

__all__ = ["MemoryUsageSink", "UsageEvent", "UsageSink"]
