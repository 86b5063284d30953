#!/usr/bin/env bash
# `make test`: install what the tests need, start PostgreSQL and Orthanc on loopback, run lint,
# types, the import contracts and pytest, and stop the services whatever the outcome.
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
scripts/bootstrap.sh test
export PATH="$PWD/.venv/bin:$PATH"

envfile=$(mktemp /tmp/medinfer-test-env.XXXXXX)
trap 'scripts/test-services.sh stop "$envfile"' EXIT
scripts/test-services.sh start "$envfile"
set -a; . "$envfile"; set +a

echo "== ruff format --check"; ruff format --check .
echo "== ruff check"; ruff check .
echo "== mypy --strict app"; mypy app migrations
echo "== import contracts"; lint-imports
echo "== bandit"; bandit -c pyproject.toml -r app migrations -q
echo "== pytest"
status=0
python -m pytest "$@" || status=$?
echo "make test: wall time $(( $(date +%s) - started ))s"
exit $status
