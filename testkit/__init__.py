"""What the tests and the benchmarks share to drive real relays: `testkit.relay` (relays
in-process or as subprocesses, WebSocket clients, raw frames) and `testkit.failover` (a stream
of writers and members through relays while something breaks, and the checks after it).

Redis and Sentinel processes come from the launcher in kit/topology.py, which the deployment
kit shares. Import from the repository root (`python -m pytest`, `python -m benches...`; the
editable install puts the root on sys.path too); tests/ keeps thin modules under the old names.
"""
