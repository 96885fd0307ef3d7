# Sourced by scripts/gateway, scripts/test and scripts/meterproxy: make .venv match
# requirements.lock, then use it. `bash scripts/bootstrap.sh --which-python` only prints the
# Python it would build .venv with (a test checks that choice).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${METERPROXY_VENV:-$ROOT/.venv}"

# mitmproxy 12 needs Python 3.12 or newer. The newest usable one wins: first on PATH, then in
# pyenv's versions folder (where current machines keep the Pythons that are not the system's).
find_python() {
    local candidate
    local -a found=()
    for candidate in python3.14 python3.13 python3.12 python3 python; do
        command -v "$candidate" >/dev/null 2>&1 && found+=("$(command -v "$candidate")")
    done
    for candidate in $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/*/bin/python3.* 2>/dev/null | grep -E 'python3\.[0-9]+$' | sort -t. -k2,2nr -k3,3nr); do
        found+=("$candidate")
    done
    local best="" best_minor=0 minor
    for candidate in "${found[@]}"; do
        minor="$("$candidate" -c 'import sys; print(sys.version_info[1] if sys.version_info[0] == 3 else 0)' 2>/dev/null)" || continue
        if [ "$minor" -ge 12 ] && [ "$minor" -gt "$best_minor" ]; then
            best="$candidate" best_minor="$minor"
        fi
    done
    if [ -z "$best" ]; then
        echo "meterproxy needs Python 3.12 or newer (mitmproxy 12): none on PATH or under ${PYENV_ROOT:-$HOME/.pyenv}/versions." >&2
        echo "Install one (e.g. 'apt-get install python3.12' or 'pyenv install 3.12'), then run this again." >&2
        return 1
    fi
    echo "$best"
}

if [ "${1:-}" = "--which-python" ]; then
    find_python
    exit $?
fi

wanted="$(cat "$ROOT/requirements.lock" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$VENV/.installed" 2>/dev/null)" != "$wanted" ]; then
    python="$(find_python)"
    echo "Setting up $VENV with $python ..." >&2
    "$python" -m venv --clear "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$ROOT/requirements.lock"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e "$ROOT"
    echo "$wanted" > "$VENV/.installed"
fi
export PATH="$VENV/bin:$PATH"
