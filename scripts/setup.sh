# Shared set-up for scripts/run-daemon and scripts/run-tests (sourced, not run).
# Installs the Debian packages named in $APT_PACKAGES that are missing, then a venv in .venv with
# containerkit installed (editable) and the pip extras named in $PIP_EXTRAS.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${CONTAINERKIT_VENV:-$REPO/.venv}
PYTHON=${PYTHON:-python3}

ensure_apt_packages() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing Debian packages: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_venv() {
    local extras=${1:-}
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "containerkit needs Python >= 3.11 ($PYTHON is $($PYTHON --version 2>&1))" >&2
        exit 1
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        "$PYTHON" -m venv "$VENV" 2>/dev/null || { ensure_apt_packages python3-venv; "$PYTHON" -m venv "$VENV"; }
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$REPO${extras:+[$extras]}"
}
