#!/usr/bin/env bash
# The cuda target's kernels as the GPU would run them, without a GPU: builds a one-layer
# Llama-2-7B-shaped model (random weights; the shapes decide the kernels) for the cuda target,
# assembles each kernel's PTX with ptxas and disassembles it with nvdisasm (both from NVIDIA's
# pip wheels), and prints per kernel: registers, spilled bytes, shared memory, SASS
# instructions, tensor-core instructions (HMMA; HGMMA for wgmma), and the same two counts inside the kernel's
# main loop (`largest_loop`) — the figures that say whether a kernel can keep up with the memory (decode) or
# the tensor cores (prefill). Static counts, not timings: they say what a kernel issues, not how
# long it waits.
#
#   benches/cuda_sass_profile.sh [SCHEMES (q4f16_1 q0f16)] [ARCHS (sm_80 sm_90)]
#
# Environment: WORK (/tmp/mlcb-sass) for the model, libraries and tools; MLCB_BIN (else a
# release build here); TUNING_FILE (a pinned tuning file, e.g. a build's debug/tuning-cuda.json
# with `"weight_ring": 8` added to its decode matmul records; else the preset defaults);
# TOOLS_DIR with ptxas and nvdisasm already unpacked (else the wheels nvidia-cuda-nvcc and
# nvidia-cuda-nvdisasm are fetched with pip into WORK).
#
# Reading the loop columns: the prefill GEMM's loop is one K step of its 128×128 tile (32 HMMA
# per warp); the tensor-core decode GEMV's loop is BATCH (4) steps of 32 weight bytes per lane
# (8 HMMA each), so instructions per weight byte = loop instructions / (loop HMMA × 4); the
# tensor-core prefill attention's loop is one 64-key tile of a warp's 16 queries (128 HMMA at
# head_dim 128: scores, then probabilities times values).
set -euo pipefail
cd "$(dirname "$0")/.."
SCHEMES=${1:-"q4f16_1 q0f16"}
ARCHS=${2:-"sm_80 sm_90"}
WORK=${WORK:-/tmp/mlcb-sass}
mkdir -p "$WORK"

if [ -z "${MLCB_BIN:-}" ]; then
    cargo build --release --bin mlcb --example synth_model >&2
    MLCB_BIN=target/release/mlcb
fi
MLCB_BIN=$(realpath "$MLCB_BIN")
SYNTH=${SYNTH:-$(dirname "$MLCB_BIN")/examples/synth_model}

if [ -z "${TOOLS_DIR:-}" ]; then
    TOOLS_DIR=$WORK/tools
    if [ ! -x "$TOOLS_DIR/ptxas" ] || [ ! -x "$TOOLS_DIR/nvdisasm" ]; then
        mkdir -p "$WORK/wheels" "$TOOLS_DIR"
        python3 -m pip download -q --no-deps -d "$WORK/wheels" \
            'nvidia-cuda-nvcc==13.0.*' nvidia-cuda-nvdisasm >&2
        for w in "$WORK"/wheels/*.whl; do
            python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$w" "$WORK/wheels/x"
        done
        cp "$(find "$WORK/wheels/x" -name ptxas -type f | head -1)" "$TOOLS_DIR/"
        cp "$(find "$WORK/wheels/x" -name nvdisasm -type f | head -1)" "$TOOLS_DIR/"
        chmod +x "$TOOLS_DIR/ptxas" "$TOOLS_DIR/nvdisasm"
    fi
fi

model=$WORK/llama7b-1layer
if [ ! -f "$model/config.json" ]; then
    "$SYNTH" "$model" --hidden 4096 --intermediate 11008 --layers 1 --heads 32 --kv-heads 32 \
        --vocab 32000 >&2
fi

# The kernel's main loop (a branch back to an earlier label): the one with the most HMMA (a
# kernel may hold copies of its loop: the f16 GEMM's for a short last row tile issues fewer
# HMMA), then the fewest instructions (the innermost: the decode GEMV's loop over its batches
# sits inside a loop over its tiles, which holds as many HMMA); without HMMA, the most
# instructions.
largest_loop() {
    awk '
        /^\.L_x_[0-9]+:/ { label[substr($1, 1, length($1) - 1)] = n; next }
        /\/\*[0-9a-f]+\*\/ / {
            n++; line[n] = $0
            if (match($0, /BRA `\(\.L_x_[0-9]+\)/)) {
                t = substr($0, RSTART + 6, RLENGTH - 7)
                if (t in label && label[t] < n) {
                    h = 0
                    for (i = label[t] + 1; i <= n; i++) if (line[i] ~ /HG?MMA/) h++
                    len = n - label[t]
                    if (h > best_h || (h == best_h && (h > 0 ? len < best : len > best))) { best = len; best_h = h }
                }
            }
        }
        END { printf "%d %d\n", best, best_h }' "$1"
}

printf '%-8s %-6s %-34s %5s %6s %6s %6s %5s %10s %9s\n' scheme arch kernel regs spill smem instr hmma loop_instr loop_hmma
for scheme in $SCHEMES; do
    for arch in $ARCHS; do
        out=$WORK/dist-$scheme-$arch
        rm -rf "$out"
        # From WORK: a --model build writes its mlcb.lock in the current folder. With
        # TUNING_FILE, a recipe pins its records (knobs no preset default sets, such as the
        # decode GEMV's `weight_ring`).
        if [ -n "${TUNING_FILE:-}" ]; then
            printf 'quantization = "%s"\nmax_seq_len = 2048\ntuning_file = "%s"\n[model]\nname = "llama7b-1layer"\nsource = "%s"\n[target]\npreset = "cuda"\n' \
                "$scheme" "$(realpath "$TUNING_FILE")" "$model" > "$WORK/profile-$scheme.toml"
            (cd "$WORK" && "$MLCB_BIN" build "$WORK/profile-$scheme.toml" --cuda-arch "$arch" \
                --calibration none --debug-dump --artifact-path "$out" --cache-dir "$WORK/cache" >&2)
        else
            (cd "$WORK" && "$MLCB_BIN" build --model "$model" --target cuda --quantization "$scheme" \
                --cuda-arch "$arch" --calibration none --debug-dump --artifact-path "$out" \
                --cache-dir "$WORK/cache" >&2)
        fi
        for ptx in "$out"/*/debug/kernels/cuda/*.ptx; do
            name=$(basename "$ptx" .ptx)
            cubin=$WORK/k.cubin
            # The PTX's own target: sm_90a for a wgmma kernel of an sm_90 library.
            target=$(grep -m1 -oE '^\.target sm_[0-9]+a?' "$ptx" | cut -d' ' -f2)
            info=$("$TOOLS_DIR/ptxas" -arch="${target:-$arch}" -v "$ptx" -o "$cubin" 2>&1)
            regs=$(grep -oE 'Used [0-9]+ registers' <<<"$info" | grep -oE '[0-9]+' || echo 0)
            spill=$(grep -oE '[0-9]+ bytes spill stores' <<<"$info" | grep -oE '^[0-9]+' || echo 0)
            smem=$(grep -oE '[0-9]+ bytes smem' <<<"$info" | grep -oE '^[0-9]+' || echo 0)
            sass=$WORK/k.sass
            "$TOOLS_DIR/nvdisasm" -c "$cubin" >"$sass"
            instr=$(grep -cE '/\*[0-9a-f]+\*/ ' "$sass" || true)
            hmma=$(grep -cE 'HMMA|HGMMA' "$sass" || true)
            read -r loop loop_hmma < <(largest_loop "$sass")
            # The kernel's role: its name in the source's first line.
            kind=$(head -1 "${ptx%.ptx}.cu" | grep -oE '`[a-z_0-9]+`' | tr -d '`' | sed 's/^mlcb_//')
            printf '%-8s %-6s %-34s %5s %6s %6s %6s %5s %10s %9s\n' "$scheme" "$arch" "$name:$kind" \
                "$regs" "$spill" "$smem" "$instr" "$hmma" "$loop" "$loop_hmma"
        done
    done
done
