# Sourced by scripts/gateway and scripts/test: make .venv match requirements.lock, then use it.
# Installs with --no-deps from the lock so that h11 0.16 can override mitmproxy 11.0.2's pin.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${METERPROXY_VENV:-$ROOT/.venv}"

find_python() {
    for candidate in python3.11 python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
            echo "$candidate"
            return
        fi
    done
    echo "meterproxy needs Python 3.11 (mitmproxy 11.0.2)" >&2
    exit 1
}

wanted="$(cat "$ROOT/requirements.lock" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$VENV/.installed" 2>/dev/null)" != "$wanted" ]; then
    echo "Setting up $VENV ..." >&2
    "$(find_python)" -m venv --clear "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$ROOT/requirements.lock"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e "$ROOT"
    echo "$wanted" > "$VENV/.installed"
fi
export PATH="$VENV/bin:$PATH"
