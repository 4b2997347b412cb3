#!/usr/bin/env bash
# Run the whole test suite (creates/updates .venv first). Extra arguments go to pytest. Without a test path
# among them the suite runs as two pytest processes side by side, one per core (run_scripts/test_shards.py).
source "$(dirname "$0")/_venv.sh"
exec python "$REPO_ROOT/run_scripts/test_shards.py" "$@"
