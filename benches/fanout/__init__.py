"""Fan-out load harness for kasagi-relay: see `harness.py` (`python -m benches.fanout.harness`)."""
