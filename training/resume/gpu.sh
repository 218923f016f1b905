#!/usr/bin/env bash
# Continues the bundled model's autoencoder run (the newest training/resume/emoji32/checkpoint-*) on a lent GPU
# machine, inside the device tool's limits (/work/.library/device/README.md): one command of at most 10 minutes,
# a working tree of at most 64 MiB that travels, files back of at most 16 MiB each. Four steps:
#
#   bash training/resume/gpu.sh prepare            # here: wheels, dataset copy, what travels (prints the `run` call)
#   run(command="bash training/resume/gpu.sh run", carry=[".whl", ".device"], timeout_s=600)    # on the device
#   bash training/resume/gpu.sh collect FILES_AT   # here: rebuild the checkpoint, undo what `prepare` changed
#   bash training/resume/gpu.sh restore            # here: only undo `prepare` (if the run failed; also deletes
#                                                  # .whl/ and .device/, so a retry starts with `prepare` again)
#
# Why each step is needed:
# - The device has torch, accelerate, peft and safetensors but not diffusers or datasets: `prepare` downloads the
#   versions installed here (pure-Python wheels) into .whl/, and `run` installs them into /tmp/site.
# - The repository's tracked files (about 75 MB: the demo bundle, this checkpoint) are over the 64 MiB that may
#   travel. `prepare` takes the demo bundle and docs/ out of git's index (the files stay where they are) and ignores
#   them through .git/info/exclude, so they stay here; `collect` / `restore` put them back into the index. Commit
#   nothing in between.
# - datasets 5.2 needs pyarrow >= 24, and the device's pyarrow version is not listed in the device notes: `run`
#   imports everything before it trains, so a mismatch costs seconds, not the lease.
# - The dataset is outside the repository (/work/data/emoji32): `prepare` copies it to .device/, which is carried.
# - A checkpoint (41 MB) is over the 16 MiB a returned file may have: `run` tars it and splits the tar.
#
# The run on the device continues the same run (weights, Adam state, EMA, step counter) with settings that suit a
# GPU, all overridable as environment variables of the `run` command:
#   BATCH (256): images per step; the CPU stretches used 32, which leaves a GPU waiting on kernel launches.
#   LR (8.5e-5): 3e-5, the CPU stretches' rate at batch 32, times sqrt(256 / 32), Adam's usual batch scaling.
#   EMA_DECAY (0.996): 0.9995 ** 8, the CPU stretches' EMA window in images at 8x the batch.
#   MINUTES (7): training time, checked every 100 steps (--max_train_minutes); with installation, loading and
#   saving the command takes about a minute more.
set -euo pipefail

cd "$(dirname "$0")/../.."
REPO=$(pwd)
UNTRACK=(src/diffusers_diffae/demo_assets docs)
EXCLUDES=(/.whl/ /.device/ /src/diffusers_diffae/demo_assets/ /docs/)
LIMIT=$((64 * 1024 * 1024))

newest_checkpoint() {
    ls -d training/resume/emoji32/checkpoint-* | sort -t- -k2 -n | tail -n 1
}

restore() {
    # Put the untracked folders back into the index (from HEAD; their files never moved), delete what only travelled
    # (`prepare` remakes it in seconds) and drop the excludes, so that nothing of it can be committed by mistake.
    git reset -q -- "${UNTRACK[@]}"
    rm -rf .whl .device
    if [[ -f .git/info/exclude ]]; then
        for line in "${EXCLUDES[@]}"; do
            grep -vxF "$line" .git/info/exclude > .git/info/exclude.tmp || true
            mv .git/info/exclude.tmp .git/info/exclude
        done
    fi
    if [[ -n "$(git status --porcelain -- "${UNTRACK[@]}")" ]]; then
        echo "error: ${UNTRACK[*]} still differ from HEAD:" >&2
        git status --short -- "${UNTRACK[@]}" >&2
        exit 1
    fi
    echo "restored: ${UNTRACK[*]} are tracked again"
}

prepare() {
    local data=${DATA:-/work/data/emoji32}
    [[ -f "$data/dataset_dict.json" ]] || {
        echo "error: no dataset at $data; make it first (training/README.md) or set DATA" >&2
        exit 1
    }
    if ! git diff --cached --quiet; then
        echo "error: the index holds staged changes; commit or unstage them first (prepare edits the index)" >&2
        exit 1
    fi
    mkdir -p .git/info
    for line in "${EXCLUDES[@]}"; do
        grep -qxF "$line" .git/info/exclude 2> /dev/null || echo "$line" >> .git/info/exclude
    done
    git rm -r -q --cached -- "${UNTRACK[@]}"

    rm -rf .whl .device
    mkdir -p .whl .device
    local specs=()
    for name in diffusers datasets dill multiprocess accelerate fsspec; do
        specs+=("$name==$(python -c "import importlib.metadata as m; print(m.version('$name'))")")
    done
    # The device's Python is 3.12; these are pure-Python wheels, multiprocess one per Python version.
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl "${specs[@]}"
    cp -r "$data" .device/emoji32

    local bytes
    bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2> /dev/null |
        awk '{s += $1} END {print s}')
    bytes=$((bytes + $(du -sb .whl .device | awk '{s += $1} END {print s}')))
    echo "travels: $((bytes / 1024 / 1024)) MiB of at most 64 (checkpoint $(newest_checkpoint))"
    if ((bytes > LIMIT)); then
        echo "error: over the device's limit; nothing was sent. Undo with: bash training/resume/gpu.sh restore" >&2
        exit 1
    fi
    echo 'now: run(command="bash training/resume/gpu.sh run", carry=[".whl", ".device"], timeout_s=600)'
    echo "then: bash training/resume/gpu.sh collect <files_at>   (or restore, if the run failed)"
}

run() {
    local batch=${BATCH:-256} lr=${LR:-8.5e-5} ema_decay=${EMA_DECAY:-0.996} minutes=${MINUTES:-7}
    local work=${WORK:-/tmp/diffae-run}
    if [[ -d .whl ]]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
    # Fail in seconds, not after the training, when something is missing.
    python3 -c "import torch, diffusers, datasets, accelerate, diffusers_diffae as d; \
print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'datasets', datasets.__version__, \
'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available()); \
assert torch.cuda.is_available() or '${ALLOW_CPU:-}', 'no GPU (set ALLOW_CPU=1 to try the script on a CPU)'"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

    local checkpoint
    checkpoint=$(newest_checkpoint)
    rm -rf "$work" && mkdir -p "$work" && cp -r "$checkpoint" "$work/"
    echo "continuing $checkpoint: batch $batch, lr $lr, EMA decay $ema_decay, $minutes minutes"
    python3 training/train_diffae.py --dataset_name .device/emoji32 --dataset_split train --image_column image \
        --resolution 32 --random_flip --model_config training/configs/emoji32.json --train_batch_size "$batch" \
        --max_train_steps 100000000 --learning_rate "$lr" --lr_scheduler constant_with_warmup --lr_warmup_steps 200 \
        --use_ema --ema_warmup --ema_decay "$ema_decay" --ema_power 0.6667 --checkpointing_steps 2000 \
        --checkpoints_total_limit 1 --resume_from_checkpoint latest --validation_steps 0 --num_validation_images 8 \
        --validation_inference_steps 10 --logging_steps 100 --seed 0 --mixed_precision bf16 --allow_tf32 \
        --dataloader_num_workers "${WORKERS:-6}" --max_train_minutes "$minutes" --output_dir "$work"

    local newest
    newest=$(ls -d "$work"/checkpoint-* | sort -t- -k2 -n | tail -n 1)
    tar -C "$work" -cf "$work/checkpoint.tar" "$(basename "$newest")"
    split -b 15M -d "$work/checkpoint.tar" "$OUT/checkpoint.tar.part-"
    echo "checkpoint $(basename "$newest"): sha256 $(sha256sum "$work/checkpoint.tar" | cut -d' ' -f1)"
    cp "$work/README.md" "$OUT/pipeline-README.md"
    cp "$(ls "$work"/validation/*reconstruction.png | tail -n 1)" "$OUT/reconstruction.png"
    ls -la "$OUT"
}

collect() {
    local files=${1:?usage: gpu.sh collect FILES_AT (the folder where the files of the run came back)}
    local dest=${DEST:-/work/data/diffae-emoji32-v2}
    local expected tarball=/tmp/diffae-gpu-checkpoint.tar
    expected=$(sed -n 's/^checkpoint checkpoint-[0-9]*: sha256 \([0-9a-f]*\)$/\1/p' "$files/run.log" | tail -n 1)
    [[ -n "$expected" ]] || {
        echo "error: $files/run.log names no checkpoint; the run failed (see its log). Undo: gpu.sh restore" >&2
        exit 1
    }
    cat "$files"/checkpoint.tar.part-* > "$tarball"
    [[ "$(sha256sum "$tarball" | cut -d' ' -f1)" == "$expected" ]] || {
        echo "error: the rebuilt checkpoint's sha256 differs from the run's ($expected)" >&2
        exit 1
    }
    mkdir -p "$dest"
    tar -C "$dest" -xf "$tarball"
    echo "unpacked $(tar -tf "$tarball" | head -n 1) into $dest"
    restore
}

case "${1:-}" in
    prepare) prepare ;;
    run)
        : "${OUT:?run this on the device machine, where OUT is set}"
        run 2>&1 | tee "$OUT/run.log"
        ;;
    collect) collect "${2:-}" ;;
    restore) restore ;;
    *)
        echo "usage: bash training/resume/gpu.sh prepare|run|collect FILES_AT|restore" >&2
        exit 2
        ;;
esac
