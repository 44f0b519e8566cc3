#!/usr/bin/env bash
# The SDXL run for a lent GPU machine (one command, under 10 minutes): speed.py on SDXL 1.0 base's
# architecture (random weights, a LoRA) at 1024 px, 50 steps, fp16, plain vs full, 2 prompts x 1 seed.
# SDXL's VAE is upcast to fp32 around each decode, as diffusers does. Set-up as in gpu_session.sh;
# results go to $OUT (or benchmarks/results/gpu_session_sdxl/).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu_session_sdxl}
source benchmarks/gpu_setup.sh
timeout 500 python3 benchmarks/speed.py --arch sdxl --device cuda --dtype fp16 --resolution 1024 --steps 50 \
    --prompts 2 --repeats 1 2>&1 | grep -v Warning | tee "$out/sdxl_fp16_1024px_50steps_2prompts.txt"
