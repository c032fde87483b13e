#!/usr/bin/env bash
# Virtual environments for the peers compared in benchmarks/quality.py, one per tool so that their pins
# never meet ours: under $SALIENCE_PEERS (default ~/.cache/salience/peers). CPU torch 2.13.0 in each.
set -euo pipefail
PY=${PYTHON:-python3}
DIR=${SALIENCE_PEERS:-$HOME/.cache/salience/peers}
mkdir -p "$DIR"
mk() {  # name, packages...
  local name=$1; shift
  [ -x "$DIR/$name/bin/python" ] || "$PY" -m venv "$DIR/$name"
  "$DIR/$name/bin/pip" install -q torch==2.13.0 "$@"
}
mk llmc llmcompressor==0.14.0.1
mk hqq hqq==0.2.8.post1 transformers accelerate safetensors
echo "peer environments in $DIR"
