"""Runs the repository's Redis + Sentinel test topology (kit/topology.py: 1 master, 2 replicas,
3 Sentinels) for the JavaScript tests, which cannot import Python.

Prints one JSON line once ready: {"sentinels": "h:p,h:p,h:p", "master_name": ..., "master":
"h:p"}. Then reads commands from stdin, one a line:
- `kill-master`: SIGKILL the master, wait until the Sentinels have promoted another, print
  {"master": "h:p"};
- end of input: stop every process by PID and exit.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
from pathlib import Path

from kit.topology import start_topology


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="kasagi-js-sentinel-") as tmp:
        topo = start_topology(Path(tmp))
        try:
            host, port = topo.master_addr()
            sentinels = ",".join(f"{h}:{p}" for h, p in topo.sentinel_addrs)
            print(
                json.dumps(
                    {
                        "sentinels": sentinels,
                        "master_name": topo.master_name,
                        "master": f"{host}:{port}",
                    }
                ),
                flush=True,
            )
            for line in sys.stdin:
                if line.strip() == "kill-master":
                    old = topo.master_addr()
                    topo.signal(topo.node_at(old), signal.SIGKILL)
                    h, p = topo.wait_master_change(old)
                    print(json.dumps({"master": f"{h}:{p}"}), flush=True)
        finally:
            topo.stop()


if __name__ == "__main__":
    main()
