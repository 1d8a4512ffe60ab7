// Copies the browser build (dist/kasagi-client.js) into the Python package, which serves it
// at /kasagi-client.js (kasagi_relay/inspector.py). The copy is committed, so a fresh clone's
// `pip install -e .` and the wheel serve it without Node; `npm run build` (and so
// scripts/test-js.sh) refreshes it, and the JS tests check that it matches the build.
import { copyFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
copyFileSync(join(here, "../dist/kasagi-client.js"), join(here, "../../../kasagi_relay/static/kasagi-client.js"));
