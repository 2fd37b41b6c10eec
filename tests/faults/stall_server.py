"""A TCP server that accepts connections and never reads from them (a backend that stops reading mid-request).

    python -m tests.faults.stall_server --host 10.200.2.2 --port 8000

Its receive buffer is made small before listening (accepted sockets inherit it), so a large POST fills the
window at once and the sender's write stalls. At most 64 connections are held; older ones are closed.
"""

from __future__ import annotations

import argparse
import socket


def main() -> None:
    """Serve until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    server.bind((args.host, args.port))
    server.listen(16)
    held: list[socket.socket] = []
    while True:
        conn, _ = server.accept()
        held.append(conn)
        if len(held) > 64:
            held.pop(0).close()


if __name__ == "__main__":
    main()
