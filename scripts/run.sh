#!/usr/bin/env bash
# `make run`: the service on its embedded defaults (SQLite, generated dev keys, the reference
# models) on 127.0.0.1:8000. Prints a working example call once the service is ready.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/bootstrap.sh run
export MEDINFER_ENV=${MEDINFER_ENV:-dev}
export MEDINFER_DATA_DIR=${MEDINFER_DATA_DIR:-var}
export MEDINFER_HOST=${MEDINFER_HOST:-127.0.0.1}
export MEDINFER_PORT=${MEDINFER_PORT:-8000}
mi=.venv/bin/medinfer

$mi migrate
$mi keys dev-init
$mi serve &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server' INT TERM

base="http://$MEDINFER_HOST:$MEDINFER_PORT"
for _ in $(seq 1 240); do
  if ! kill -0 $server 2>/dev/null; then wait $server; exit $?; fi
  if .venv/bin/python -c "import urllib.request; urllib.request.urlopen('$base/readyz', timeout=1)" 2>/dev/null; then
    key=$(.venv/bin/python -c "import json; print(json.load(open('$MEDINFER_DATA_DIR/dev-credentials.json'))['api_key'])")
    cat <<MSG

medinfer is ready on $base (dev mode; credentials in $MEDINFER_DATA_DIR/dev-credentials.json)
Try:
  curl -s -H 'Authorization: Bearer $key' $base/v1/models
API reference: $base/docs   OpenAPI: $base/openapi.json   Stop: Ctrl-C

MSG
    break
  fi
  sleep 0.5
done
wait $server
