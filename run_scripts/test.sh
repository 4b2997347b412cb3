#!/usr/bin/env bash
# Run the whole test suite (creates/updates .venv first). Extra arguments go to pytest.
# Two pytest workers, one test file each at a time (--dist loadfile keeps a file's shared runs in one worker):
# the multi-worker msrun jobs keep both CPUs busy, the single-process tests leave one idle.
source "$(dirname "$0")/_venv.sh"
exec python -m pytest tests -n 2 --dist loadfile --durations=25 "$@"
