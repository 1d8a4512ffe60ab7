"""`python -m kasagi_relay.client URL watch ROOM | send ROOM DELTA-JSON | state ROOM`."""

import sys

from kasagi_relay.client.cli import main

sys.exit(main())
