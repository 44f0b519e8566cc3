#!/usr/bin/env bash
# One call on a lent GPU machine (issue 14): train several toy-world UNet candidates side by side on the one
# GPU (each is far too small to fill it), then a DreamBooth on each, and bring the weights back; they are judged
# on the CPU afterwards (quality.py, attention_maps.py, toy-probes), where the judging code has always run.
#   CANDIDATES="v4c:v4:0:.gpu_carry/v4_step6051 v4t:v4:20: v2t:v2:20:" bash benchmarks/gpu_train_toyworlds.sh
# A candidate is NAME:ARCH:TEXTURE:INIT (INIT: a pipeline folder to continue, as --init-from, or empty for
# from scratch). The recipe is the toy world README's (scene left out of 40% of captions, AdamW 4e-4, EMA
# 0.999, the shipped text encoder frozen) except the batch (BATCH, default 128: on a GPU a step of 128 costs
# about what a step of 32 does); each trains for MINUTES of wall time. Comes back in $OUT: vanilla_NAME.tar
# (the EMA UNet and its step count), dreambooth_NAME.tar for the names in DB (default: all; three candidates'
# weights make about 63 of the 64 MiB a call brings back), logs.tar. Wheels the machine lacks (diffusers) from .whl/.
# DEVICE=cpu MINUTES=0.05 POOL=64 DB_STEPS=2 CLASS_IMAGES=2: the smoke test on a CPU.
# Before the call, here (both folders are git-ignored, so name them in the device tool's `carry`):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==10.2.0
#   mkdir -p .gpu_carry/v4_step6051 && cp -r FOLDER/unet FOLDER/trained_steps.txt .gpu_carry/v4_step6051/
# (FOLDER: a v4 pipeline folder exported by `train_vanilla --export`; an INIT only where a candidate names one.)
# Issue 14's seventh session ran it as: MINUTES=4.5 DB_SECONDS=190, the default candidates (502 s of command).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu_train_toyworlds}
logs=/tmp/toyworld_logs
mkdir -p "$logs"
out_real=$out; out=$logs; source benchmarks/gpu_setup.sh; out=$out_real; mkdir -p "$out"
candidates=${CANDIDATES:-"v4c:v4:0:.gpu_carry/v4_step6051 v4t:v4:20: v2t:v2:20:"}
device=${DEVICE:-cuda}
M=layout_retouch/toyworld/models
started=$(date +%s)
export device CLASS_IMAGES DB_STEPS
export -f toy_dreambooth  # run under `timeout` in a child shell
train() {  # NAME ARCH TEXTURE INIT
    local name=$1 arch=$2 texture=$3 init=$4 vae_from=$M/vanilla W=/tmp/toyworld_$1
    [ "$arch" = v4 ] && vae_from=checkpoints/toyworld_v4/vanilla
    python3 -m layout_retouch.toyworld.train_vanilla --stage unet --arch "$arch" --scene-drop 0.4 \
        --max-minutes "${MINUTES:-5}" --texture "$texture" ${init:+--init-from $init} \
        --text-encoder-from $M/vanilla --vae-from "$vae_from" --seed 0 --threads 4 \
        --unet-batch "${BATCH:-128}" --unet-steps 100000 --pool "${POOL:-15000}" --device "$device" \
        --work $W/work --out $W/vanilla > "$logs/train_$name.log" 2>&1
    cp $W/work/unet_steps.txt $W/vanilla/trained_steps.txt
    tar -C $W -cf "$out/vanilla_$name.tar" vanilla/unet vanilla/trained_steps.txt
    echo "$name: $(cat $W/vanilla/trained_steps.txt) steps, done at $(( $(date +%s) - started )) s" | tee -a "$logs/summary.txt"
}
dreambooth() {  # NAME
    local W=/tmp/toyworld_$1
    timeout "${DB_SECONDS:-170}" bash -c 'toy_dreambooth "$0" "$1" "$2"' $W/vanilla $W/sks_star_dreambooth \
        $W/db_work > "$logs/dreambooth_$1.log" 2>&1 && tar -C $W -cf "$out/dreambooth_$1.tar" sks_star_dreambooth
    echo "$1 dreambooth: rc $?, done at $(( $(date +%s) - started )) s" | tee -a "$logs/summary.txt"
}
for c in $candidates; do
    IFS=: read -r name arch texture init <<< "$c"
    train "$name" "$arch" "$texture" "$init" &
done
wait
db=${DB:-$(echo "$candidates" | tr ' ' '\n' | cut -d: -f1)}
for name in $db; do dreambooth "$name" & done
wait
nvidia-smi --query-gpu=memory.used --format=csv >> "$logs/summary.txt" 2>&1
tar -C "$logs" -cf "$out/logs.tar" .
