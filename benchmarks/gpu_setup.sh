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
