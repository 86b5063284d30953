#!/usr/bin/env bash
# Install what `make run` (runtime) or `make test` (everything) needs on a bare machine.
# Idempotent: each step is skipped when its result is already there and up to date.
#
#   scripts/bootstrap.sh run    .venv with the service
#   scripts/bootstrap.sh test   + apt packages (postgresql, orthanc, orthanc-dicomweb, dcmtk),
#                               dev and train extras, and checkov in its own .venv-checkov
set -euo pipefail
cd "$(dirname "$0")/.."

profile=${1:-run}
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

stamp_of() { cat pyproject.toml "$@" 2>/dev/null | sha256sum | cut -c1-16; }

ensure_venv() {
  local extras=$1 stamp
  stamp=".venv/.stamp-$(stamp_of)-${extras:-base}"
  [ -f "$stamp" ] && return 0
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  .venv/bin/pip install -q --upgrade pip setuptools wheel
  # onnxruntime-gpu only: plain onnxruntime would overwrite it (and lose CUDA).
  .venv/bin/pip install -q -e ".${extras:+[$extras]}"
  if .venv/bin/pip show onnxruntime >/dev/null 2>&1; then
    echo "plain onnxruntime was pulled in beside onnxruntime-gpu; refusing" >&2
    exit 1
  fi
  rm -f .venv/.stamp-*
  touch "$stamp"
}

ensure_apt() {
  local missing=()
  command -v storescu >/dev/null || missing+=(dcmtk)
  command -v Orthanc >/dev/null || missing+=(orthanc)
  [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
  command -v promtool >/dev/null || missing+=(prometheus)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    echo "missing apt packages: ${missing[*]} (run as root, or install them)" >&2
    exit 1
  fi
  echo "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  # policy-rc.d keeps the packages' own daemons from starting; tests start their own.
  local own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    own_policy=1
  fi
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  return 0
}

ensure_checkov() {
  [ -x .venv-checkov/bin/checkov ] && return 0
  "$PYTHON" -m venv .venv-checkov
  .venv-checkov/bin/pip install -q --upgrade pip
  .venv-checkov/bin/pip install -q "checkov==3.3.30"
}

case "$profile" in
  run) ensure_venv "" ;;
  test) ensure_apt; ensure_venv "dev,train"; ensure_checkov ;;
  *) echo "usage: $0 run|test" >&2; exit 2 ;;
esac
