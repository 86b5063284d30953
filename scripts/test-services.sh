#!/usr/bin/env bash
# Start or stop the real services the integration tests use, on loopback, in a temporary
# directory: PostgreSQL (initdb as the postgres user, never as root) and Orthanc with its
# DICOMweb plugin. dcmtk's storescu is used directly by the tests.
#
#   scripts/test-services.sh start ENVFILE   writes MEDINFER_TEST_* variables to ENVFILE
#
# Two PostgreSQL roles, as in production: `medinfer` owns the tables and runs the migrations
# (MEDINFER_TEST_PG_URL); `medinfer_app` is the service role, which owns nothing and gets only
# the grants `medinfer migrate` gives it with MEDINFER_DATABASE_SERVICE_ROLE=medinfer_app
# (MEDINFER_TEST_PG_SERVICE_URL, the same database as the service role).
#   scripts/test-services.sh stop ENVFILE    stops what ENVFILE describes and removes its directory
set -euo pipefail

cmd=${1:?start|stop}
envfile=${2:?env file}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

pg_bin() {
  local d
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && { echo "$d"; return; }
  done
  echo "PostgreSQL server binaries not found (apt-get install postgresql)" >&2
  exit 1
}

as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start() {
  local root pg_port orthanc_http orthanc_dicom bin i
  root=$(mktemp -d /tmp/medinfer-test-services.XXXXXX)
  chmod 755 "$root"
  pg_port=$(free_port); orthanc_http=$(free_port); orthanc_dicom=$(free_port)

  # Record what will need stopping before starting anything, so a failed start still cleans up.
  cat > "$envfile" <<ENV
MEDINFER_TEST_SERVICES_DIR=$root
MEDINFER_TEST_PG_URL=postgresql+psycopg://medinfer@127.0.0.1:$pg_port/medinfer_test
MEDINFER_TEST_PG_SERVICE_URL=postgresql+psycopg://medinfer_app@127.0.0.1:$pg_port/medinfer_test
MEDINFER_TEST_PG_ADMIN_URL=postgresql+psycopg://postgres@127.0.0.1:$pg_port/postgres
MEDINFER_TEST_PG_DATA=$root/pg
MEDINFER_TEST_PG_BIN=$(pg_bin)
MEDINFER_TEST_ORTHANC_URL=http://127.0.0.1:$orthanc_http
MEDINFER_TEST_ORTHANC_DICOM_PORT=$orthanc_dicom
MEDINFER_TEST_ORTHANC_AET=ORTHANC
ENV

  bin=$(pg_bin)
  mkdir -p "$root/pg" "$root/pg-sock"
  if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$root/pg" "$root/pg-sock"; fi
  as_postgres "$bin/initdb" -D "$root/pg" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$root/initdb.log" 2>&1 \
    || { cat "$root/initdb.log" >&2; exit 1; }
  as_postgres "$bin/pg_ctl" -D "$root/pg" -l "$root/pg-sock/pg.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $pg_port -k $root/pg-sock -c fsync=off" start >/dev/null \
    || { cat "$root/pg-sock/pg.log" >&2; exit 1; }
  as_postgres "$bin/psql" -h 127.0.0.1 -p "$pg_port" -U postgres -q -v ON_ERROR_STOP=1 \
    -c "CREATE ROLE medinfer LOGIN" -c "CREATE DATABASE medinfer_test OWNER medinfer" \
    -c "CREATE ROLE medinfer_app LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT" >/dev/null

  mkdir -p "$root/orthanc/db"
  # Auto-routing, as a hospital PACS does it, with the very script the compose stack deploys:
  # every stored image (not SR, not our own results) is forwarded by C-STORE to the modality
  # "medinfer", which the imaging tests register over Orthanc's REST API with the port their
  # medinfer listens on. Without it, nothing is routed.
  cp "$repo/deploy/compose/orthanc-route-to-medinfer.lua" "$root/orthanc/route.lua"
  cat > "$root/orthanc/orthanc.json" <<JSON
{
  "Name": "medinfer-test-pacs",
  "StorageDirectory": "$root/orthanc/db",
  "IndexDirectory": "$root/orthanc/db",
  "HttpPort": $orthanc_http,
  "DicomPort": $orthanc_dicom,
  "DicomAet": "ORTHANC",
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false,
  "DicomAlwaysAllowStore": true,
  "DicomCheckCalledAet": false,
  "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
  "DicomWeb": {"Enable": true, "Root": "/dicom-web/"},
  "LuaScripts": ["$root/orthanc/route.lua"]
}
JSON
  Orthanc --logdir="$root/orthanc" "$root/orthanc/orthanc.json" >/dev/null 2>&1 &
  echo "MEDINFER_TEST_ORTHANC_PID=$!" >> "$envfile"
  for i in $(seq 1 120); do
    if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$orthanc_http/system', timeout=1)" 2>/dev/null; then
      echo "test services up: PostgreSQL :$pg_port, Orthanc http :$orthanc_http dicom :$orthanc_dicom ($root)"
      return 0
    fi
    sleep 0.5
  done
  echo "Orthanc did not start; its log:" >&2
  cat "$root"/orthanc/*.log >&2 || true
  exit 1
}

stop() {
  [ -f "$envfile" ] || return 0
  # shellcheck disable=SC1090
  set -a; . "$envfile"; set +a
  if [ -n "${MEDINFER_TEST_ORTHANC_PID:-}" ] && kill -0 "$MEDINFER_TEST_ORTHANC_PID" 2>/dev/null; then
    kill "$MEDINFER_TEST_ORTHANC_PID"
    # Orthanc 1.10 must be fully gone before anything reuses its storage or ports.
    for _ in $(seq 1 100); do kill -0 "$MEDINFER_TEST_ORTHANC_PID" 2>/dev/null || break; sleep 0.2; done
  fi
  if [ -f "${MEDINFER_TEST_PG_DATA:-/nonexistent}/postmaster.pid" ]; then
    as_postgres "$MEDINFER_TEST_PG_BIN/pg_ctl" -D "$MEDINFER_TEST_PG_DATA" -m fast -w stop >/dev/null || true
  fi
  case "${MEDINFER_TEST_SERVICES_DIR:-}" in
    /tmp/medinfer-test-services.*) rm -rf "$MEDINFER_TEST_SERVICES_DIR" ;;
  esac
  rm -f "$envfile"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop ENVFILE" >&2; exit 2 ;;
esac
