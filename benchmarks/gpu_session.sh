#!/usr/bin/env bash
# One prepared run for a lent GPU machine, in two parts of under 10 minutes each on an H100 (PART=1 or
# PART=2 runs one; by default both): part 1 the GPU checks, then speed.py at 512 px, 50 steps, fp16, with one
# seed per prompt (also with fused attention projections); part 2 with four seeds per prompt (issue 19's bar:
# full <= 2.2x plain, <= 3 s/image, peak memory <= 1.3x) and with the UNets compiled (--compile; the first
# repeat pays the compilation: of its 3 repeats, read the median and the later ones).
# Results go to $OUT (or benchmarks/results/gpu_session/). The machine's own torch is
# used; wheels the machine lacks and cannot download (it has no network) are installed from .whl/ when
# that folder is there:
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp -d .whl diffusers==0.42.1 importlib_metadata==8.7.0
set -u
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu_session}
source benchmarks/gpu_setup.sh
part=${PART:-all}
if [ "$part" = all ] || [ "$part" = 1 ]; then
    timeout 140 python3 benchmarks/gpu_checks.py 2>&1 | grep -v Warning | tee "$out/gpu_checks.txt"
    timeout 170 python3 benchmarks/speed.py --device cuda --dtype fp16 --resolution 512 --steps 50 --repeats 3 \
        2>&1 | grep -v Warning | tee "$out/fp16_512px_50steps_4prompts.txt"
    timeout 100 python3 benchmarks/speed.py --device cuda --dtype fp16 --resolution 512 --steps 50 --repeats 2 \
        --fuse-qkv 2>&1 | grep -v Warning | tee "$out/fp16_512px_50steps_4prompts_fused_qkv.txt"
fi
if [ "$part" = all ] || [ "$part" = 2 ]; then
    timeout 140 python3 benchmarks/speed.py --device cuda --dtype fp16 --resolution 512 --steps 50 --repeats 2 \
        --seeds 4 2>&1 | grep -v Warning | tee "$out/fp16_512px_50steps_4prompts_4seeds.txt"
    timeout 400 python3 benchmarks/speed.py --device cuda --dtype fp16 --resolution 512 --steps 50 --repeats 3 \
        --seeds 4 --compile 2>&1 | grep -v Warning | tee "$out/fp16_512px_50steps_4prompts_4seeds_compile.txt"
fi
