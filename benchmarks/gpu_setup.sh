# Sourced by the GPU session scripts, with $out set: the machine's own torch, plus wheels it lacks and
# cannot download (it has no network) from .whl/ when that folder is there (see gpu_session.sh); the
# device and versions recorded in $out/device.txt.
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" \
    | tee -a "$out/device.txt"

# The toy world's DreamBooth recipe (models/README-personalized.md) on a GPU: toy_dreambooth BASE OUTPUT WORK_DIR,
# with $device, DB_STEPS (default 1500) and CLASS_IMAGES (default 50); the caller redirects and times it.
# Trained on the method's wording (`a photo of a sks star`, P_n), as the shipped one is since issue 14's ninth session.
toy_dreambooth() {
    python3 -m layout_retouch.cli personalize --method dreambooth --base "$1" \
        --photos layout_retouch/toyworld/models/references --class-word star --seed 0 --batch-size 10 --token sks \
        --prompt-template "a photo of a {token} {class_word}" --train-text-encoder \
        --with-prior-preservation --class-prompt "a photo of a star" \
        --num-class-images "${CLASS_IMAGES:-50}" --class-inference-steps 30 --class-guidance-scale 5 \
        --max-steps "${DB_STEPS:-1500}" --lr 2e-4 --checkpoint-every 500 --save-dtype float16 --omit-unchanged \
        --device "$device" --no-progress --work-dir "$3" --output "$2"
}
