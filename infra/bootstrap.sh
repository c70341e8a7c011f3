#!/usr/bin/env bash
# Install what Portcullis needs on a fresh Debian machine, then sync the locked Python env.
# Idempotent and quick when everything is present. Needs root only for missing system packages.
#   bash infra/bootstrap.sh           what the local stack needs (the demo)
#   bash infra/bootstrap.sh --tests   plus what only the test suite needs (browser, PostgreSQL)
set -euo pipefail
cd "$(dirname "$0")/.."

# binary -> Debian package that provides it
declare -A NEED=(
  [dockerd]=docker.io [docker-registry]=docker-registry [haproxy]=haproxy
  [prometheus]=prometheus [wrk]=wrk [git]=git [file]=file
)
if [[ "${1:-}" == "--tests" ]]; then
  NEED[chromium]=chromium
  # `kubectl kustomize` renders the GitOps overlays in the tests (any kubectl does).
  NEED[kubectl]=kubernetes-client
fi
missing=()
for bin in "${!NEED[@]}"; do command -v "$bin" >/dev/null 2>&1 || missing+=("${NEED[$bin]}"); done
# The base image needs a statically linked busybox; the dynamic one cannot run in FROM scratch.
if ! file -b /bin/busybox 2>/dev/null | grep -q "statically linked"; then missing+=(busybox-static); fi
# The production-like setup's tests run a private PostgreSQL (its binaries are not on PATH).
if [[ "${1:-}" == "--tests" ]] && ! compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; then
  missing+=(postgresql)
fi

if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 || ! -f /etc/debian_version ]]; then
    echo "bootstrap: missing packages ${missing[*]}; install them (needs root on Debian)" >&2
    exit 1
  fi
  echo "bootstrap: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v uv >/dev/null 2>&1 || python3 -m pip install -q uv
uv sync --frozen --quiet
