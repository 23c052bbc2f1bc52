#!/usr/bin/env bash
# The GPU benchmarks in one prepared run (about 12 minutes on one H100/H200), each printing ratios:
#   1. CIFAR ConvNet samples/s, ours (training.data.onDevice) vs the PyTorch tutorial's loop, fp32 and bf16
#   2. BERT-base fine-tuning tokens/s and MFU in bf16, ours vs a plain Hugging Face loop (goal MFU >= 40%)
#   3. DDP over NCCL and FSDP2 with world size 1 vs the plain model
#   4. checkpoint save/load GB/s to local disk vs torch.save/load, and the sync vs async stall
#   5. causal-lm on a ~1B Llama-shaped model (random weights, no download), bf16: LoRA and full
#      fine-tuning tokens/s, MFU (goal >= 40% for full) and peak GPU memory, ours vs a plain
#      transformers + peft loop; then vLLM loads our export and generates (where vllm is installed)
#
#   bash benchmarks/gpu_suite.sh            # PYTHON=... to pick the interpreter (default .venv/bin/python)
#
# It needs an environment with CUDA torch, transformers and this package installed (the CUDA image
# built from images/Dockerfile has all three). Without a GPU it runs the CPU-safe parts at small
# sizes, to check the scripts, and says so: those figures say nothing about a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  GPU=1
  "$PY" -c 'import torch; print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)'
else
  GPU=0
  echo "device: no CUDA GPU here: running the CPU-safe parts at small sizes (not GPU figures)"
fi
section() { printf '\n===== %s (%s)\n' "$1" "$(date +%T)"; }

section "1. CIFAR ConvNet: ours vs the tutorial loop"
if [ "$GPU" = 1 ]; then
  for precision in fp32 bf16; do
    "$PY" benchmarks/loop_vs_plain.py --device cuda --precision "$precision" --on-device --threads 1 \
      --steps 400 --batch 256 --repeats 5
  done
else
  "$PY" benchmarks/loop_vs_plain.py --threads 1 --steps 20 --repeats 2
fi

section "2. BERT-base bf16: tokens/s and MFU"
if [ "$GPU" = 1 ]; then
  "$PY" benchmarks/bert_throughput.py --steps 60 --repeats 3 --batch 64 --seq 128 --workers 4
else
  "$PY" benchmarks/bert_throughput.py --tiny --steps 10 --repeats 2 --batch 8 --seq 32 --workers 0
fi

section "3. DDP and FSDP2 with world size 1"
if [ "$GPU" = 1 ]; then
  "$PY" benchmarks/parallel_overhead.py --width 4096 --layers 8 --steps 30 --repeats 5 --precision bf16
else
  "$PY" benchmarks/parallel_overhead.py --width 256 --layers 4 --steps 5 --repeats 3 --precision fp32
fi

section "4. Checkpoints to local disk"
if [ "$GPU" = 1 ]; then
  "$PY" benchmarks/checkpoint_disk.py --device cuda --mb 2000 --repeats 3
else
  "$PY" benchmarks/checkpoint_disk.py --device cpu --mb 100 --repeats 3
fi
section "5. causal-lm ~1B: LoRA and full, tokens/s, MFU, peak memory; vLLM serves the export"
if [ "$GPU" = 1 ]; then
  "$PY" benchmarks/llm_throughput.py --size 1b --method lora --steps 30 --repeats 3 --batch 8 --seq 1024
  "$PY" benchmarks/llm_throughput.py --size 1b --method full --steps 30 --repeats 3 --batch 8 --seq 1024 --vllm
else
  "$PY" benchmarks/llm_throughput.py --size tiny --method lora --steps 10 --repeats 2 --batch 4 --seq 64
fi
section "done"
