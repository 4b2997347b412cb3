#!/usr/bin/env bash
# Run the whole test suite (creates/updates .venv first). Extra arguments go to pytest.
source "$(dirname "$0")/_venv.sh"
exec python -m pytest tests --durations=20 "$@"
