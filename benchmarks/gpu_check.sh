#!/usr/bin/env bash
# A prepared GPU check: population GRPO (HF backend, bf16) on SmolLM2-135M's architecture on one GPU,
# offline, in well under 8 minutes on one H200. It prints step time, generated tokens/s and peak GPU
# memory, and fails (exit 1) unless only LoRA parameters moved. It has never run on a GPU here.
#
#   bash benchmarks/gpu_check.sh --prepare   # here, with PyPI reachable: fills benchmarks/gpu_carry/
#   bash benchmarks/gpu_check.sh             # on the GPU machine, no network: installs the carried
#                                            # wheels into a temporary folder, runs the check
#
# The GPU machine has torch, transformers, peft and accelerate, but not gymnasium or datasets (llm_gym
# needs only gymnasium on this path). benchmarks/gpu_carry/ (gitignored, ~4 MiB, carried to the device)
# holds: wheels/ (gymnasium, farama-notifications, cloudpickle; llm_gym itself is laid out from this
# tree at run time) and smollm2/ (SmolLM2-135M-Instruct's config.json and tokenizer with its chat template, taken
# from the smollm2 extra). Its weights do NOT fit: the GGUF is 98 MB against a 64 MiB carry, so the
# check runs the SmolLM2-135M architecture with random weights unless GPU_CHECK_MODEL names a folder
# with weights on that machine; the output says which. Extra arguments go to benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=${GPU_CHECK_CARRY:-benchmarks/gpu_carry}

if [[ "${1:-}" == "--prepare" ]]; then
    PY=${PYTHON:-.venv/bin/python}
    rm -rf "$CARRY"
    mkdir -p "$CARRY/wheels" "$CARRY/smollm2"
    "$PY" -m pip download -q --no-deps -d "$CARRY/wheels" "gymnasium==1.4.0" "farama-notifications==0.0.4" \
        "cloudpickle>=3"
    src=$("$PY" -c "from llm_gym.models import resolve_model; print(resolve_model('smollm2-135m'))")
    for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
        cp "$src/$f" "$CARRY/smollm2/"
    done
    ls -l "$CARRY"/wheels "$CARRY"/smollm2
    du -sh "$CARRY"
    exit 0
fi

PY=${PYTHON:-python3}
if [[ ! -d "$CARRY/wheels" ]]; then
    echo "gpu_check.sh: $CARRY is missing: run 'bash benchmarks/gpu_check.sh --prepare' where PyPI is reachable, then carry $CARRY" >&2
    exit 2
fi
SITE=$(mktemp -d /tmp/gpu_check_site.XXXXXX)
"$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$CARRY"/wheels/*.whl
# llm_gym from this very tree (no build step, never stale): the layout pyproject's package-dir maps
mkdir -p "$SITE/llm_gym"
cp -r llm_gym/. "$SITE/llm_gym/"
ln -s "$PWD/algorithms" "$SITE/llm_gym/algorithms"
ln -s "$PWD/tasks" "$SITE/llm_gym/tasks"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
OUT_JSON=${OUT:-/tmp}/gpu_check.json
# run as a file, not -m: the repository's llm_gym/ folder must not shadow the installed wheel
timeout "${GPU_CHECK_TIMEOUT:-420}" "$PY" benchmarks/gpu_check.py --model "${GPU_CHECK_MODEL:-$CARRY/smollm2}" \
    --device cuda --dtype bf16 --population 4 --json "$OUT_JSON" "$@"
