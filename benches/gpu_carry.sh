#!/usr/bin/env bash
# Gets what benches/cuda_gpu_check.sh needs onto a lent GPU machine that has no Rust toolchain and
# no network, when each call there may take only a 64 MiB working tree (this repository's tracked
# files included). Two halves:
#
#   benches/gpu_carry.sh pack     (here) builds the release mlcb and the two bench examples,
#                                 strips and packs them with the Vulkan loader's .deb, splits the
#                                 SmolLM2 GGUF so every call stays under the limit, and writes
#                                 .gpucarry/call1 … callN (git-ignored) plus the plan of calls;
#   benches/gpu_carry.sh unpack   (there, every call) moves the parts it finds in .gpucarry/ to
#                                 CARRY_HOME [/root/mlcb-carry] (kept while the machine stays
#                                 warm), unpacks the binaries, reassembles the GGUF once every part
#                                 arrived (sha256-checked) and prints what is still missing;
#   benches/gpu_carry.sh run      (there, last call) unpack, then cuda_gpu_check.sh with MLCB_BIN,
#                                 GGUF and the Vulkan loader set from CARRY_HOME;
#   benches/gpu_carry.sh slim     (here, before pack) moves tracked files the check does not need
#                                 (fuzz/corpus: ~7000 small files, 9 MiB as a tar; the Vicuna
#                                 delta fixtures, 7 MiB) to .gpucarry-stash/, so every call
#                                 carries ~16 MiB more of the GGUF (3 calls instead of 4);
#   benches/gpu_carry.sh restore  (here, after the last call) moves them back.
#
# Each call carries one folder `.gpucarry/callK`; calls 1 … N-1 run `unpack`, call N runs `run`
# (with OUT, DEADLINE, … in its environment). Budget per call: LIMIT_MIB [64] minus the bytes of
# the tree that travels anyway, minus MARGIN_MIB [2].
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
CARRY_HOME="${CARRY_HOME:-/root/mlcb-carry}"
gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf"
part() { printf '%s/gguf.part%02d' "$1" "$2"; } # folder, part number

pack() {
    local dir="$repo/.gpucarry" limit=$(( ${LIMIT_MIB:-64} << 20 )) margin=$(( ${MARGIN_MIB:-2} << 20 ))
    cargo build --release --locked --bin mlcb --example synth_model --example cuda_bandwidth >&2
    rm -rf "$dir"; mkdir -p "$dir/call1"
    local stage; stage="$(mktemp -d)"
    trap 'rm -rf "$stage"' RETURN
    mkdir -p "$stage/bin/examples" "$stage/vk"
    cp target/release/mlcb "$stage/bin/"
    cp target/release/examples/synth_model target/release/examples/cuda_bandwidth "$stage/bin/examples/"
    strip "$stage/bin/mlcb" "$stage/bin/examples/"*
    # The device image may lack the Vulkan loader (wgpu dlopens libvulkan.so.1) and the GL
    # dispatch libraries NVIDIA's Vulkan driver (libGLX_nvidia) needs: without them the first
    # H200 run found no adapter. (The device's README names the same packages.)
    (cd "$stage/vk" && apt-get download libvulkan1 libglvnd0 libglx0 libgl1 libegl1 libopengl0 libgles2 >/dev/null 2>&1) \
        || echo "note: apt-get download of the Vulkan loader failed; the Vulkan 7B figure needs the device's own" >&2
    tar -C "$stage" -cJf "$dir/call1/bin.tar.xz" bin vk
    # What travels anyway: tracked files and untracked files git does not ignore, measured as a
    # tar of them (the transfer counts each file's header and padding: fuzz/corpus alone has
    # ~7000 small files, ~6 MiB more than their bytes).
    local tree
    tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | tar -cf - --null -T - 2>/dev/null | wc -c || true)
    local budget=$(( limit - tree - margin ))
    local first=$(( budget - $(stat -c %s "$dir/call1/bin.tar.xz") ))
    [ "$first" -gt 0 ] || { echo "error: the tree ($tree bytes) leaves no room under the limit" >&2; exit 2; }
    local gguf="${GGUF:-$repo/dist/models/SmolLM2-135M-Instruct/$gguf_name}"
    if [ -f "$gguf" ]; then
        local size off=0 k=1 n
        size=$(stat -c %s "$gguf")
        sha256sum "$gguf" | cut -d' ' -f1 > "$dir/call1/gguf.sha256"
        while [ "$off" -lt "$size" ]; do
            n=$budget; [ "$k" = 1 ] && n=$first
            mkdir -p "$dir/call$k"
            dd if="$gguf" of="$(part "$dir/call$k" "$k")" bs=1M iflag=skip_bytes,count_bytes \
                skip="$off" count="$n" status=none
            off=$((off + n)); k=$((k + 1))
        done
        echo "$((k - 1))" > "$dir/call1/gguf.parts"
    else
        echo "note: $gguf not found (scripts/fetch-smollm2.sh fetches it); the SmolLM2 check will be skipped" >&2
    fi
    local calls
    calls=$(find "$dir" -mindepth 1 -maxdepth 1 -name 'call*' | wc -l)
    echo "tree $((tree >> 20)) MiB travels with every call; per-call budget $((budget >> 20)) MiB"
    for ((k = 1; k <= calls; k++)); do
        local verb=unpack; [ "$k" = "$calls" ] && verb=run
        echo "call $k: carry [\".gpucarry/call$k\"] ($(du -sh "$dir/call$k" | cut -f1)), command: benches/gpu_carry.sh $verb"
    done
}

unpack() {
    mkdir -p "$CARRY_HOME/parts"
    if [ -d "$repo/.gpucarry" ]; then
        find "$repo/.gpucarry" -type f -exec mv -f {} "$CARRY_HOME/parts/" \;
    fi
    if [ -f "$CARRY_HOME/parts/bin.tar.xz" ]; then
        tar -C "$CARRY_HOME" -xJf "$CARRY_HOME/parts/bin.tar.xz" && rm -f "$CARRY_HOME/parts/bin.tar.xz"
        local deb
        for deb in "$CARRY_HOME"/vk/*.deb; do
            [ -f "$deb" ] && dpkg -x "$deb" "$CARRY_HOME/vk/root"
        done
    fi
    [ -x "$CARRY_HOME/bin/mlcb" ] && echo "mlcb: $("$CARRY_HOME/bin/mlcb" --version 2>&1)" || echo "mlcb: not here yet (call 1 carries it)"
    local want="$CARRY_HOME/parts/gguf.parts"
    if [ -f "$CARRY_HOME/$gguf_name" ]; then
        echo "SmolLM2: assembled"
    elif [ -f "$want" ]; then
        local n have=0 k
        n=$(cat "$want")
        for ((k = 1; k <= n; k++)); do [ -f "$(part "$CARRY_HOME/parts" "$k")" ] && have=$((have + 1)); done
        if [ "$have" = "$n" ]; then
            for ((k = 1; k <= n; k++)); do cat "$(part "$CARRY_HOME/parts" "$k")"; done > "$CARRY_HOME/$gguf_name.tmp"
            if [ "$(sha256sum "$CARRY_HOME/$gguf_name.tmp" | cut -d' ' -f1)" = "$(cat "$CARRY_HOME/parts/gguf.sha256")" ]; then
                mv "$CARRY_HOME/$gguf_name.tmp" "$CARRY_HOME/$gguf_name"; rm -f "$CARRY_HOME"/parts/gguf.part*
                echo "SmolLM2: assembled from $n parts, sha256 ok"
            else
                rm -f "$CARRY_HOME/$gguf_name.tmp"; echo "SmolLM2: parts do not match the checksum"
            fi
        else
            echo "SmolLM2: $have of $n parts here"
        fi
    else
        echo "SmolLM2: no parts yet"
    fi
}

# Tracked paths the GPU check does not read.
SLIM_PATHS=(fuzz/corpus tests/fixtures/tiny-vicuna-base tests/fixtures/tiny-vicuna-delta)

slim() {
    local p
    for p in "${SLIM_PATHS[@]}"; do
        [ -e "$repo/$p" ] || continue
        mkdir -p "$(dirname "$repo/.gpucarry-stash/$p")"
        mv "$repo/$p" "$repo/.gpucarry-stash/$p"
    done
    echo "moved ${SLIM_PATHS[*]} to .gpucarry-stash/ (benches/gpu_carry.sh restore puts them back)"
}

restore() {
    local p
    for p in "${SLIM_PATHS[@]}"; do
        [ -e "$repo/.gpucarry-stash/$p" ] && [ ! -e "$repo/$p" ] && mv "$repo/.gpucarry-stash/$p" "$repo/$p"
    done
    git -C "$repo" status --short -- "${SLIM_PATHS[@]}" | head -5
    echo "restored ${SLIM_PATHS[*]}"
}

case "${1:-}" in
    pack) pack ;;
    slim) slim ;;
    restore) restore ;;
    unpack) unpack ;;
    run)
        unpack
        [ -x "$CARRY_HOME/bin/mlcb" ] || { echo "no mlcb binary in $CARRY_HOME (call 1 of the plan carries it)"; exit 3; }
        vk_lib="$CARRY_HOME/vk/root/usr/lib/x86_64-linux-gnu"
        # The driver's own loader first; the carried one only where the image has none.
        if ! ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1' && [ -d "$vk_lib" ]; then
            export VK_LOADER_DIR="$vk_lib"
        fi
        MLCB_BIN="$CARRY_HOME/bin/mlcb" GGUF="${GGUF:-$CARRY_HOME/$gguf_name}" exec benches/cuda_gpu_check.sh
        ;;
    *) echo "usage: benches/gpu_carry.sh slim|pack|unpack|run|restore" >&2; exit 2 ;;
esac
