"""What one small loopback TCP send costs the sender's CPU, on this machine: to a reader that
is busy reading (it is awake when the bytes come) and to one that sleeps between sends (the
send must wake it, on the other core). A presence event to a member that is only listening
is the second kind; the relay's writes to members in the middle of their own requests (acks,
`joined`, `left`) are nearer the first. docs/benchmarks.md, presence.

    .venv/bin/python -m benches.send_cost [--sends 50000] [--bytes 120] [--pause-us 500]

The sender runs on core 0 and the reader on core 1 (when there are two); the sender's CPU
per `send` is its thread's CPU time around the call (kernel time included), averaged.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import threading
import time


def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client, server


def _read_all(sock: socket.socket, core: int | None) -> None:
    if core is not None:
        os.sched_setaffinity(0, {core})
    while sock.recv(65536):
        pass


def send_cpu_us(sends: int, size: int, pause_s: float) -> float:
    """The sender's CPU per send (µs), with `pause_s` between sends (0: back to back)."""
    two = hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1
    client, server = _pair()
    reader = threading.Thread(target=_read_all, args=(server, 1 if two else None), daemon=True)
    reader.start()
    if two:
        os.sched_setaffinity(0, {0})
    message = b"x" * size
    cpu = 0.0
    try:
        time.sleep(0.1)
        for _ in range(sends):
            if pause_s:
                time.sleep(pause_s)  # the reader has gone back to sleep by the next send
            t0 = time.thread_time()
            client.sendall(message)
            cpu += time.thread_time() - t0
    finally:
        client.close()
        reader.join(5)
        server.close()
    return cpu / sends * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sends", type=int, default=50_000)
    ap.add_argument("--bytes", type=int, default=120)
    ap.add_argument("--pause-us", type=float, default=500.0)
    a = ap.parse_args()
    busy = send_cpu_us(a.sends, a.bytes, 0.0)
    # Fewer paced sends: each waits the pause.
    asleep = send_cpu_us(max(1, a.sends // 10), a.bytes, a.pause_us / 1e6)
    out = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "bytes": a.bytes,
        "send_cpu_us_reader_busy": round(busy, 2),
        "send_cpu_us_reader_asleep": round(asleep, 2),
        "ratio_asleep_busy": round(asleep / busy, 2),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
