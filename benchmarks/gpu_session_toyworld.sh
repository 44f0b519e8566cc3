#!/usr/bin/env bash
# One prepared call for a lent GPU machine (issue 14; prepared on the CPU, not yet run on a GPU): train a
# toy-world UNet candidate from scratch on the GPU, its DreamBooth, and the probes that decide whether its
# self-attention carries the subject's place (P6 routing, P1, P1b, P2), the vanilla quality report (an
# architecture is judged once its class accuracy is >= 0.9) and what its self-attention maps hold
# (toyworld/attention_maps.py), in under 10 minutes.
#   ARCH=v3 STEPS=8000 bash benchmarks/gpu_session_toyworld.sh      (ARCH: a name in components.UNET_ARCHITECTURES)
# INIT=layout_retouch/toyworld/models/vanilla continues the shipped v2 UNet instead (with ARCH=v2); TEXTURE=20 trains
# on textured renders (render.texture_field; toyworld/README.md, "the textured pilot"). The VAE and text
# encoder are the shipped ones, frozen (ARCH=v4, the 32x32 latent, takes the factor-2 VAE of VAE_FROM, default
# checkpoints/toyworld_v4/vanilla); the recipe is toyworld/README.md's (batch 32, scene left out of 40%
# of captions). The weights stay on the machine (too large to come back); probes.md/json, the quality report
# and the logs come back in $OUT. Same wheels set-up as gpu_session.sh (sources gpu_setup.sh).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu_session_toyworld}
source benchmarks/gpu_setup.sh
arch=${ARCH:-v3}
steps=${STEPS:-8000}
device=${DEVICE:-cuda}  # DEVICE=cpu STEPS=3 DB_STEPS=2 SEEDS=1 PROBE_STEPS=2: the smoke test on a CPU
db_steps=${DB_STEPS:-1500}
init=${INIT:+--init-from $INIT}
M=layout_retouch/toyworld/models
if [ "$arch" = v4 ]; then vae_from=${VAE_FROM:-checkpoints/toyworld_v4/vanilla}; else vae_from=${VAE_FROM:-$M/vanilla}; fi
if [ ! -f "$vae_from/vae/config.json" ]; then
    echo "no VAE in $vae_from/vae: ARCH=v4 needs the factor-2 VAE (toyworld/README.md, 'The 32x32 candidate')" >&2
    exit 2
fi
W=/tmp/toyworld_$arch
mkdir -p $W/models
start=$(date +%s)
python3 -m layout_retouch.toyworld.train_vanilla --stage unet --arch "$arch" --scene-drop 0.4 --max-minutes 5 \
    --texture "${TEXTURE:-0}" \
    --text-encoder-from $M/vanilla --vae-from "$vae_from" $init --seed 0 --threads 8 --unet-batch 32 \
    --unet-steps "$steps" --pool 15000 --device "$device" --work $W/work --out $W/models/vanilla \
    > "$out/train.log" 2>&1
python3 -m layout_retouch.toyworld.train_vanilla --export --arch "$arch" --text-encoder-from $M/vanilla \
    --vae-from "$vae_from" --work $W/work --out $W/models/vanilla 2>&1 | tail -1 | tee "$out/summary.txt"
echo "vanilla: $(( $(date +%s) - start )) s" | tee -a "$out/summary.txt"
timeout 90 python3 -m layout_retouch.toyworld.quality --model $W/models/vanilla --threads 16 \
    --out "$out/quality" > "$out/quality.log" 2>&1
timeout 60 python3 -m layout_retouch.toyworld.attention_maps --model $W/models/vanilla --threads 16 \
    --json "$out/attention_maps.json" 2>/dev/null > "$out/attention_maps.md"
echo "quality, maps: $(( $(date +%s) - start )) s" | tee -a "$out/summary.txt"
(export device; export -f toy_dreambooth; DB_STEPS=$db_steps timeout 120 bash -c \
    'toy_dreambooth "$0" "$1" "$2"' $W/models/vanilla $W/models/sks_star_dreambooth $W/db_work) \
    > "$out/dreambooth.log" 2>&1
echo "dreambooth: $(( $(date +%s) - start )) s" | tee -a "$out/summary.txt"
timeout 200 python3 -m layout_retouch.cli toy-probes --models $W/models --probes P6,P1,P1b,P2 \
    --steps "${PROBE_STEPS:-20}" --seeds "${SEEDS:-16}" --threads 16 --out "$out/probes" --overwrite 2>&1 | grep -v Warn | tee "$out/probes.log"
echo "probes: $(( $(date +%s) - start )) s" | tee -a "$out/summary.txt"
