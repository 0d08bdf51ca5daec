# Shared by the launch scripts (sourced, not run): find a launcher binary and count local GPUs.

# find_tool VAR NAME: keep $VAR if set, else NAME on PATH, else the repo's .venv/bin/NAME; else fail (exit 2).
find_tool() {
    local var=$1 name=$2
    if [[ -n "${!var:-}" ]]; then
        return
    fi
    if command -v "$name" >/dev/null 2>&1; then
        printf -v "$var" '%s' "$name"
    elif [[ -x ".venv/bin/$name" ]]; then
        printf -v "$var" '%s' ".venv/bin/$name"
    else
        echo "error: $name not found; install it (make venv) or set $var" >&2
        exit 2
    fi
}

# default_nproc LAUNCHER: the number of visible GPUs (respects CUDA_VISIBLE_DEVICES), or 2 without GPUs.
# Asks the python next to LAUNCHER, so it sees the same torch the ranks will import.
default_nproc() {
    local path python gpus
    path=$(command -v "$1" || true)
    python="$(dirname "$path")/python"
    [[ -x "$python" ]] || python=python3
    gpus=$("$python" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    if [[ "$gpus" =~ ^[0-9]+$ ]] && (( gpus > 0 )); then
        echo "$gpus"
    else
        echo 2
    fi
}
