#!/usr/bin/env bash
# Idempotent setup for QuantScope on a fresh Debian machine (Python >= 3.11).
#
#   bash scripts/setup.sh           # .venv with the app's dependencies (editable install + dev extra)
#   bash scripts/setup.sh --test    # same, and Debian's chromium for the browser tests
#
# Re-running is cheap: pip runs only when pyproject.toml changed since the last successful install
# (its sha256 is kept in .venv/.quantscope-setup.sha256). Delete .venv to start over.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

want_browser=0
for arg in "$@"; do
  case "$arg" in
    --test) want_browser=1 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

log() { echo "[setup] $*"; }

# --- 1. virtual environment -------------------------------------------------------------------
venv=.venv
if [ ! -x "$venv/bin/python" ]; then
  py="${PYTHON:-}"
  if [ -z "$py" ]; then
    for cand in python3.11 python3.12 python3.13 python3 python; do
      if command -v "$cand" >/dev/null 2>&1 \
         && "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
        py="$cand"; break
      fi
    done
  fi
  if [ -z "$py" ]; then
    echo "setup.sh: need Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
    exit 1
  fi
  log "creating $venv with $("$py" --version 2>&1)"
  "$py" -m venv "$venv"
fi

# --- 2. Python dependencies (skipped while pyproject.toml is unchanged) -----------------------
stamp="$venv/.quantscope-setup.sha256"
want_hash="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want_hash" ]; then
  log "Python dependencies up to date (pyproject.toml unchanged)"
else
  pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  # A local wheel folder (e.g. a prebuilt llama-cpp-python) is used when present.
  if [ -d .whl ]; then pip+=(--find-links .whl); fi
  # llama-cpp-python compiles from source where no wheel is cached: use every core.
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"
  # torch first and exactly pinned: the CPU wheel on disk, not a multi-GB CUDA build.
  log "installing torch==2.13.0"
  "${pip[@]}" "torch==2.13.0"
  log "installing quantscope (editable) with the dev extra; the first build of llama-cpp-python takes ~6 min on 2 cores"
  "${pip[@]}" -e ".[dev]"
  echo "$want_hash" > "$stamp"
  log "Python dependencies installed"
fi

# --- 3. Debian chromium for the browser tests (only with --test) ------------------------------
if [ "$want_browser" = 1 ]; then
  if [ -x /usr/bin/chromium ]; then
    log "chromium present: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
  else
    sudo_cmd=()
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo_cmd=(sudo -n)
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
      log "NOTE: no apt-get on this machine: cannot install chromium; browser tests will be skipped"
    elif [ "$(id -u)" != 0 ] && [ ${#sudo_cmd[@]} -eq 0 ]; then
      log "NOTE: not root and no passwordless sudo: cannot install chromium; browser tests will be skipped"
    else
      log "installing Debian's chromium (apt-get)"
      export DEBIAN_FRONTEND=noninteractive
      "${sudo_cmd[@]}" apt-get update
      "${sudo_cmd[@]}" apt-get install -y chromium </dev/null
      log "chromium installed: $(/usr/bin/chromium --version 2>/dev/null || echo '?')"
    fi
  fi
fi

log "done"
