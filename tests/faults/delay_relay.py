"""A TCP relay that delays every byte by a fixed time in each direction: added latency where tc netem is missing.

    python -m tests.faults.delay_relay --listen 10.200.2.2:8000 --target 127.0.0.1:8001 --delay-ms 200

Run inside the backend's namespace in front of the mock. Each chunk is forwarded `delay` after it arrived, in order
(pipelined, like a long link, not a slow one); end-of-stream is delayed the same way. Connection set-up is not
delayed (the relay accepts at once), so loss of SYNs is injected apart (iptables `statistic`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=1024)

    async def forward() -> None:
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    task = asyncio.ensure_future(forward())
    try:
        while True:
            data = await reader.read(65536)
            await queue.put((loop.time() + delay, data))
            if not data:
                break
        await task
    except (OSError, asyncio.IncompleteReadError):
        task.cancel()
    finally:
        writer.close()


async def _serve(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(*target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pump(client_r, up_w, delay), _pump(up_r, client_w, delay), return_exceptions=True)

    server = await asyncio.start_server(handle, *listen)
    async with server:
        await server.serve_forever()


def main() -> None:
    """Relay until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--delay-ms", type=float, default=200.0)
    args = parser.parse_args()
    lhost, lport = args.listen.rsplit(":", 1)
    thost, tport = args.target.rsplit(":", 1)
    asyncio.run(_serve((lhost, int(lport)), (thost, int(tport)), args.delay_ms / 1000.0))


if __name__ == "__main__":
    main()
