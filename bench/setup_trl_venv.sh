#!/usr/bin/env bash
# Create bench/.trl-venv: a separate environment holding TRL, used only by bench/trl_peer.py
# (python -m bench.learner_vs_trl runs it as a subprocess). TRL stays out of the project venv.
#
#   bash bench/setup_trl_venv.sh [TRL_SPEC]      # default: trl==1.16.0, else the newest that installs
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.trl-venv"
py="${PYTHON:-python3}"
cons="$(mktemp)"
trap 'rm -f "$cons"' EXIT
echo "torch==2.13.0" > "$cons"   # keep the CPU wheel: never let TRL's deps swap in a CUDA torch

[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q "torch==2.13.0"
# the project's deps that trl_peer.py needs (transformers 5.x, as in the main venv)
"$venv/bin/python" -m pip install -q -c "$cons" numpy safetensors "transformers>=5,<6"
if [ $# -gt 0 ]; then
    "$venv/bin/python" -m pip install -q -c "$cons" "$1"
elif ! "$venv/bin/python" -m pip install -q -c "$cons" "trl==1.16.0"; then
    echo "trl==1.16.0 did not install; trying the newest trl compatible with transformers 5.x" >&2
    "$venv/bin/python" -m pip install -q -c "$cons" "trl" "transformers>=5,<6"
fi
"$venv/bin/python" -m pip check
"$venv/bin/python" -c "import torch, transformers, trl; print('trl', trl.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__)"
