"""kasagi-relay against Centrifuge, Nchan and python-socketio: `python -m benches.peers`
(see __main__.py; issue #15, docs/benchmarks.md "Peers")."""
