#!/usr/bin/env bash
# Regenerates the lock files from pyproject.toml, the source of truth for dependencies:
#   requirements/service.lock  what the service runs on (the Dockerfile installs it)
#   requirements/test.lock     the same plus the test extra (tools/test.sh, the README's test command, installs it)
# Both pin every package, with the hashes of every file PyPI has for it, for Python 3.11 on any platform.
# Run it after adding, removing or changing a dependency; pins already in the lock files are kept unless
# pyproject.toml no longer allows them. `tools/lock.sh --upgrade` moves every pin to the newest allowed.
set -euo pipefail
cd "$(dirname "$0")/.."

uv=$(command -v uv || true)
if [ -z "$uv" ] && [ -x .venv/bin/uv ]; then uv=.venv/bin/uv; fi
if [ -z "$uv" ]; then
  # uv from PyPI into a throw-away venv: nothing else needs it.
  tools_venv=$(mktemp -d)
  trap 'rm -rf "$tools_venv"' EXIT
  python3 -m venv "$tools_venv"
  "$tools_venv/bin/python" -m pip install --quiet "uv>=0.5,<1"
  uv="$tools_venv/bin/uv"
fi

common=(--generate-hashes --universal --python-version 3.11 --custom-compile-command tools/lock.sh --quiet "$@")
mkdir -p requirements
"$uv" pip compile pyproject.toml "${common[@]}" -o requirements/service.lock
"$uv" pip compile pyproject.toml --extra test "${common[@]}" -o requirements/test.lock
echo "lock files updated: requirements/service.lock requirements/test.lock"
