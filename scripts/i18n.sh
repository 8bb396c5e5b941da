#!/usr/bin/env bash
# Re-extract translatable strings and update the catalogs: `bash scripts/i18n.sh` (then translate, then
# `bash scripts/i18n.sh compile`). Compiled .mo files are committed, so running the app needs no build step.
set -euo pipefail
cd "$(dirname "$0")/.."
BABEL=.venv/bin/pybabel
if [ "${1:-}" != "compile" ]; then
  $BABEL extract -F babel.cfg --ignore-dirs=".venv tests load migrations node_modules scripts" -k "gettext:2" -k _ -k N_ \
    --no-location --sort-output -o locales/messages.pot . >/dev/null
  for lang in de fr es; do
    if [ -f "locales/$lang/LC_MESSAGES/messages.po" ]; then
      $BABEL update -i locales/messages.pot -d locales -l "$lang" --no-fuzzy-matching >/dev/null
    else
      $BABEL init -i locales/messages.pot -d locales -l "$lang" >/dev/null
    fi
  done
fi
$BABEL compile -d locales --statistics
