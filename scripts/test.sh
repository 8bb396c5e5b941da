#!/usr/bin/env bash
# The whole test suite: lint, types, unit, integration (real localstripe + aiosmtpd + SQLite files),
# PostgreSQL where a server answers, and browser tests in Debian's Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv

echo "== ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "== mypy (strict)"; "$VENV/bin/mypy" .
echo "== architecture contract (.importlinter)"; "$VENV/bin/lint-imports" --no-cache

# PostgreSQL: the database-facing tests run again on it when it answers.
if [ -z "${TEST_POSTGRES_URL:-}" ]; then
  if "$VENV/bin/python" - <<'PY' 2>/dev/null
import asyncio, asyncpg
async def main():
    conn = await asyncio.wait_for(asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test"), 3)
    await conn.close()
asyncio.run(main())
PY
  then
    export TEST_POSTGRES_URL="postgresql+asyncpg://postgres@127.0.0.1:5432/test"
    echo "== PostgreSQL answers at 127.0.0.1:5432: database tests run on it too"
  else
    echo "== PostgreSQL does not answer at 127.0.0.1:5432: database tests run on SQLite only"
  fi
fi

# Browser tests use Debian's Chromium (no browser download).
if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing chromium from Debian's packages"
  if [ "$(id -u)" = "0" ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

# PDF documents: WeasyPrint needs pango, and HarfBuzz's subsetter (without it WeasyPrint warns on every
# PDF, and the suite treats warnings as errors); the documents name DejaVu Sans (embedded in every PDF).
if ! ldconfig -p 2>/dev/null | grep -q libpango-1.0 || ! ldconfig -p 2>/dev/null | grep -q libharfbuzz-subset || [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
  echo "== installing pango and the DejaVu fonts from Debian's packages (PDF documents)"
  if [ "$(id -u)" = "0" ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0 fonts-dejavu-core >/dev/null
fi

# axe-core for the accessibility checks, from the npm registry (pinned in tests/browser/package-lock.json).
if [ ! -f tests/browser/node_modules/axe-core/axe.min.js ]; then
  echo "== installing axe-core (npm ci)"
  (cd tests/browser && npm ci --no-audit --no-fund --silent)
fi

# Two test processes (pytest-xdist): most tests wait on servers, localstripe and the databases, so two
# share the 2 cores well (~5.5 min instead of ~11). Each process has its own localstripe, SMTP servers,
# ports and databases (tests/conftest.py). PYTEST_WORKERS=0 runs them in this one process.
echo "== pytest (${PYTEST_WORKERS:-2} processes)"
exec "$VENV/bin/python" -m pytest -n "${PYTEST_WORKERS:-2}" "$@"
