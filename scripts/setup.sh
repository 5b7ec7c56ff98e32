#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its test extras, showing pip's progress.
# Skipped when .venv is current: .venv/.amct-setup-stamp holds the SHA-256 of pyproject.toml and of this
# script as of the last install that succeeded (delete the stamp to force a reinstall).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
STAMP=.venv/.amct-setup-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "setup: .venv is current (pyproject.toml unchanged since the last install)"
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
fi
rm -f "$STAMP"
echo "setup: installing into .venv: torch (CPU build) first, then amct-core with its test extras"
echo "setup: (the first time this downloads torch and the other dependencies: a few minutes)"
.venv/bin/python -m pip install --disable-pip-version-check -q --upgrade pip
# torch is pinned exactly in pyproject.toml; install that pin first so nothing resolves another build.
.venv/bin/python -m pip install --disable-pip-version-check "$(grep -o 'torch==[0-9.]*' pyproject.toml | head -1)"
.venv/bin/python -m pip install --disable-pip-version-check -e ".[test]"
echo "$want" > "$STAMP"
echo "setup: .venv is ready"
