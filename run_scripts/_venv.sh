# Sourced by the run scripts: create or update the repo's .venv, then put it first on PATH.
# Re-installs only when pyproject.toml or constraints.txt changed (a stamp holds their hash).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO_ROOT/.venv"
PYTHON_BIN="${PYTHON:-python3.11}"
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV" >&2
    "$PYTHON_BIN" -m venv "$VENV"
fi
want="$(cat "$REPO_ROOT/pyproject.toml" "$REPO_ROOT/constraints.txt" | sha256sum | cut -d' ' -f1)"
have="$(cat "$VENV/.telechat2-stamp" 2>/dev/null || true)"
if [ "$want" != "$have" ]; then
    echo "[setup] installing telechat2 and its pinned dependencies into $VENV (first run takes a few minutes)" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        -c "$REPO_ROOT/constraints.txt" -e "$REPO_ROOT[test]" >&2
    echo "$want" > "$VENV/.telechat2-stamp"
fi
export PATH="$VENV/bin:$PATH"
export PYTHONNOUSERSITE=1
# MindSpore logs its own INFO/WARNING lines to stderr; keep errors only unless the user asks for more
export GLOG_v="${GLOG_v:-3}"
cd "$REPO_ROOT"
