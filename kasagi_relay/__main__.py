"""`python -m kasagi_relay`: the same as the `kasagi-relay` command."""

from kasagi_relay.cli import main

raise SystemExit(main())
