#!/usr/bin/env bash
# Issue 11's GPU measurements, prepared for a lent device as two calls of under 7 minutes each (a call may
# run 10; a session gets 15 minutes of device time in all, starts included). Part 1 comes first:
#
#   run (device tool), from the repository root:
#     KVLAB_GIT_COMMIT=<git rev-parse HEAD here> bash benchmarks/gpu_check.sh 1
#     KVLAB_GIT_COMMIT=<git rev-parse HEAD here> bash benchmarks/gpu_check.sh 2
#
# The device gets a copy of the working tree without .git, so the commit the JSON records comes from
# KVLAB_GIT_COMMIT (kvlab.checkpoint.environment_info). It uses the machine's own python3 (PyTorch,
# transformers, pytest, safetensors, tiktoken: nothing to install) with PYTHONPATH=src. Everything lands
# in $OUT (the device tool's return folder; else benchmarks/results): the GPU tests' log and one JSON per
# benchmark. Each step has its own time limit so one slow step cannot eat the others' share; a step that
# fails or runs out of time is reported and the rest still run.
#
# Part 1 (step limits 400 s in all):
#   tests    pytest -m gpu: bf16 cached decoding (GPT.forward and the Decoder fast path, every structure),
#            ragged batches, an fp32 model over a bf16 cache, flash SDPA, compiled and CUDA-graph steps
#   static   gpt2-124m mha batch-1 decode, static cache + CUDA graphs     (target: >= 2,000 tok/s at b1)
#   decode   gpt2-124m mha / gqa / mla decode, batch 1 and 64 at context 896, compiled (dynamic shapes)
#   narrow   attention over a bf16 cache under fp32 queries, widened against attended in bf16, batch 64
# Part 2 (step limits 380 s):
#   roofline batch 64, gpt2-124m shape, compiled: mha / gqa / mla               (>= 60% of HBM; MLA >= GQA)
#   train    gpt2-124m training tokens/s, bf16 autocast + compile, against nanoGPT's model compiled the
#            same way          (>= 500k tok/s, >= 1.2x nanoGPT; MLA, Matryoshka >= 0.8x MHA, Context-KV >= 0.7x)
set -uo pipefail
part="${1:-1}"
if [ "$part" != 1 ] && [ "$part" != 2 ]; then
  echo "usage: bash benchmarks/gpu_check.sh 1|2 (part 1 first)" >&2
  exit 2
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
tag="$(printf '%s' "${KVLAB_GIT_COMMIT:-nocommit}" | cut -c1-7)"

step() {  # step SECONDS NAME COMMAND...: run with a time limit, report how it ended
  local limit=$1 name=$2
  shift 2
  echo "== [$name] $* (limit ${limit}s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "== [$name] exit $rc after $((SECONDS - t0))s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

if [ "$part" = 1 ]; then
  step 150 tests "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
  step 100 static "$PY" benchmarks/decode_speed.py --shapes gpt2-124m --structures mha --batch-sizes 1 \
    --contexts 896 --new-tokens 64 --no-nocache --compile --static --out "$OUT/decode_speed_gpu_static_$tag.json"
  step 120 decode "$PY" benchmarks/decode_speed.py --shapes gpt2-124m --structures mha gqa mla \
    --batch-sizes 1 64 --contexts 896 --new-tokens 64 --no-nocache --compile \
    --out "$OUT/decode_speed_gpu_$tag.json"
  step 30 narrow "$PY" benchmarks/narrow_cache.py --batch-size 64 --contexts 1024 4096 --kv-heads 12 3 1 \
    --n-head 12 --out "$OUT/narrow_cache_gpu_$tag.json"
elif [ "$part" = 2 ]; then
  step 140 roofline "$PY" benchmarks/decode_roofline.py --structures mha gqa mla --batch-size 64 \
    --contexts 1024 --n-layer 12 --n-embd 768 --n-head 12 --vocab-size 50304 --steps 16 --rounds 3 \
    --compile --tag "_gpu_b64_$tag" --out-dir "$OUT"
  step 240 train "$PY" benchmarks/train_throughput.py --preset gpt2-124m --vocab-size 50304 \
    --structures mha mla matryoshka-32 context-32 --batch-size 16 --rounds 3 --steps 5 --no-hf \
    --no-logits-row --compile --out "$OUT/train_throughput_gpu_$tag.json"
fi
ls -l "$OUT"
