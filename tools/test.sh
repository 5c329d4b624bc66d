#!/usr/bin/env bash
# The test suite in one command, on Debian with Python 3.11: sets up what the tests need, then runs pytest with
# the arguments given (`tools/test.sh`, `tools/test.sh -m "not slow"`, `tools/test.sh -q tests/test_rest.py`).
#   .venv          created if missing; the locked versions (requirements/test.lock, every hash checked), then the
#                  project, installed again whenever the lock or pyproject.toml has changed since.
#   apt-get        what the tests run, when missing: Debian's chromium (the board), wrk (the soak), prometheus
#                  (promtool: the alert rules and metrics), redis-server (tests start their own), nodejs and npm.
#   tools/npm      `npm ci` when its lock file is newer than what is installed (AsyncAPI parser, Lighthouse, axe-core).
#   services       PostgreSQL on 127.0.0.1:5432 (trust auth) and Redis at TEST_REDIS_URL (127.0.0.1:6379 unless
#                  set) started when they are not up, and the database `test` the tests connect to created.
# Installing packages and starting PostgreSQL need root (or sudo). pytest's exit status is this script's: 5 when
# it collected no test.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "tools/test.sh: $*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    say "needs root (or sudo) for: $*"
    return 1
  fi
}

wait_for() { # wait_for NAME COMMAND...: up to 30 s for COMMAND to succeed
  local name=$1
  shift
  for _ in $(seq 1 60); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  say "$name did not come up"
  return 1
}

# Debian packages

python=$(command -v python3.11 || command -v python3 || true)
if [ -z "$python" ] || ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  say "Python 3.11 is needed (python3.11 or python3 on the PATH)"
  exit 1
fi
missing=()
if [ ! -x .venv/bin/python ] && ! "$python" -c 'import ensurepip' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
{ command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; } || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    say "the tests need ${missing[*]} (Debian's names); install them, then run this again"
    exit 1
  fi
  say "installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Python: the lock files' versions

if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $python"
  "$python" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
stamp=.venv/.fxrates-installed # what was installed from: skips pip when neither file has changed
installed_from=$(cat requirements/test.lock pyproject.toml | sha256sum)
if [ "$(cat "$stamp" 2>/dev/null)" != "$installed_from" ]; then
  say "installing requirements/test.lock and the project into .venv"
  .venv/bin/python -m pip install --quiet --require-hashes -r requirements/test.lock
  .venv/bin/python -m pip install --quiet --no-deps -e .
  echo "$installed_from" >"$stamp"
fi

# Node tools, pinned by tools/npm/package-lock.json

if [ ! tools/npm/node_modules/.package-lock.json -nt tools/npm/package-lock.json ]; then
  say "npm ci in tools/npm"
  (cd tools/npm && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error)
fi

# Services

if [ -z "${TEST_POSTGRES_DSN:-}" ]; then # the tests' default: postgresql://postgres@127.0.0.1:5432/test
  if ! command -v pg_isready >/dev/null 2>&1; then
    say "PostgreSQL is needed on 127.0.0.1:5432 with trust auth (or set TEST_POSTGRES_DSN)"
    exit 1
  fi
  if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
    say "starting PostgreSQL"
    if ! read -r version cluster < <(pg_lsclusters --no-header 2>/dev/null | awk '$3 == 5432 { print $1, $2; exit }'); then
      say "PostgreSQL does not answer on 127.0.0.1:5432 and no cluster for that port was found to start"
      exit 1
    fi
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" "$cluster" start
  fi
  wait_for PostgreSQL pg_isready -h 127.0.0.1 -p 5432 -q
  if ! psql -h 127.0.0.1 -U postgres -d test -q -c '' >/dev/null 2>&1; then
    say "creating the database test"
    createdb -h 127.0.0.1 -U postgres test
  fi
fi

redis_url=${TEST_REDIS_URL:-redis://127.0.0.1:6379/9}
redis_up() { [ "$(redis-cli -u "$redis_url" ping 2>/dev/null)" = PONG ]; }
if ! redis_up; then
  if [[ ! $redis_url =~ ^redis://(127\.0\.0\.1|localhost)(:([0-9]+))?(/.*)?$ ]]; then
    say "Redis does not answer at $redis_url (TEST_REDIS_URL)"
    exit 1
  fi
  port=${BASH_REMATCH[3]:-6379}
  say "starting Redis on 127.0.0.1:$port"
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$port" --save "" --appendonly no \
    --dir "${TMPDIR:-/tmp}" --logfile "${TMPDIR:-/tmp}/fxrates-test-redis-$port.log"
fi
wait_for Redis redis_up

exec .venv/bin/python -m pytest "$@"
