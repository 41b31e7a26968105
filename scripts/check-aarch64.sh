#!/usr/bin/env bash
# The CPU runtime on aarch64, checked from an x86-64 machine: cross-compiles mlcb's unit tests and
# release binary for aarch64-unknown-linux-gnu and runs them under qemu user-mode emulation, on an
# emulated CPU with the dot-product extension (qemu's "max") and on one without it (Cortex-A53,
# ARMv8.0), so both int8 paths run (`sdot`, and widening multiplies). Then it builds the tiny
# fixture models at every scheme with this machine's binary and checks that the aarch64 binary
# computes the same logits as this machine (x86-64 with AVX2), byte for byte, after one prefill
# and token by token (each NEON kernel repeats its AVX2 one lane for lane, and the f32 paths sum
# in one order everywhere).
# Last, a GPTQ-calibrated build on aarch64 must write the same artifact as one here.
# Correctness only: timings under qemu say nothing about an ARM CPU.
#
#   scripts/check-aarch64.sh [WORK (/tmp/mlcb-aarch64)]
#
# ARM_TARGET_DIR (WORK/target) is the cargo target folder of the aarch64 builds.
#
# Needs (Debian/Ubuntu): apt-get install qemu-user-static gcc-aarch64-linux-gnu
# libc6-dev-arm64-cross; rustup target add aarch64-unknown-linux-gnu. Takes ~20 min on 2 cores
# (two builds for aarch64). Exit 0 when every check passes, 1 when one fails, 3 when a tool is
# missing.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/mlcb-aarch64}
mkdir -p "$WORK"
TARGET=aarch64-unknown-linux-gnu

for tool in qemu-aarch64-static aarch64-linux-gnu-gcc python3; do
    command -v "$tool" >/dev/null || {
        echo "error: $tool is missing (apt-get install qemu-user-static gcc-aarch64-linux-gnu libc6-dev-arm64-cross python3)" >&2
        exit 3
    }
done
rustup target list --installed 2>/dev/null | grep -qx "$TARGET" || {
    echo "error: the Rust target $TARGET is missing (rustup target add $TARGET)" >&2
    exit 3
}

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
ARM_TARGET_DIR=${ARM_TARGET_DIR:-$WORK/target}
repo=$(pwd)
qemu() { qemu-aarch64-static -L /usr/aarch64-linux-gnu "$@"; }
failed=0

# Unit tests. The CUDA emulator's tests compile kernels with the host's g++ and load them, which
# an emulated process cannot; everything else runs.
tests=$(CARGO_TARGET_DIR=$ARM_TARGET_DIR cargo test --target "$TARGET" --lib --no-run 2>&1 |
    grep -oE "$ARM_TARGET_DIR/$TARGET/[a-z]+/deps/mlcb-[0-9a-f]+" | tail -1)
for cpu in max cortex-a53; do
    echo "== unit tests on an emulated $cpu"
    if ! qemu -cpu "$cpu" "$tests" --test-threads 2 --skip cuda::emulate >"$WORK/tests-$cpu.log" 2>&1; then
        echo "FAILED (log: $WORK/tests-$cpu.log)"
        failed=1
    fi
    grep -E "^test result" "$WORK/tests-$cpu.log" || true
done

echo "== logits of the fixtures, aarch64 against $(uname -m)"
cargo build --release --bin mlcb >&2
CARGO_TARGET_DIR=$ARM_TARGET_DIR cargo build --release --target "$TARGET" --bin mlcb >&2
host=$repo/target/release/mlcb
arm=$ARM_TARGET_DIR/$TARGET/release/mlcb
cat >"$WORK/compare.py" <<'EOF'
import array, json, struct, sys
def load(path):
    b = open(path, 'rb').read()
    n = struct.unpack('<Q', b[:8])[0]
    m = json.loads(b[8:8 + n])['logits']
    s, e = m['data_offsets']
    a = array.array('f')
    a.frombytes(b[8 + n + s:8 + n + e])
    return a
a, b = load(sys.argv[1]), load(sys.argv[2])
diff = max(abs(x - y) for x, y in zip(a, b)) / max(abs(x) for x in a)
print('%.3g of the largest logit' % diff)
EOF
ids=1,17,300,42,511,7,99,256,3,128
for model in tiny-llama tiny-neox tiny-rwkv; do
    for scheme in q0f16 q0f32 q3f16_0 q3f16_1 q4f16_0 q4f16_1 q4f32_0 q4f32_1 q8f16_0 q8f16_1; do
        dist=$WORK/dist
        # From WORK: a --model build writes its mlcb.lock in the current folder.
        (cd "$WORK" && "$host" build --model "$repo/tests/fixtures/$model" --quantization "$scheme" \
            --artifact-path "$dist" --cache-dir "$WORK/cache" >"$WORK/build.log" 2>&1) || {
            echo "FAILED: build of $model $scheme (log: $WORK/build.log)"
            failed=1
            continue
        }
        lib=$dist/$model-$scheme
        for mode in prefill decode; do
            flag=$([ "$mode" = decode ] && echo --decode || true)
            "$host" logits "$lib" --input-ids "$ids" $flag --out "$WORK/host.st" >/dev/null 2>&1
            qemu "$arm" logits "$lib" --input-ids "$ids" $flag --out "$WORK/arm.st" >/dev/null 2>&1 || {
                echo "FAILED: $model $scheme $mode did not run on aarch64"
                failed=1
                continue
            }
            if cmp -s "$WORK/host.st" "$WORK/arm.st"; then
                echo "$model $scheme $mode: identical"
            else
                echo "FAILED: $model $scheme $mode differs by $(python3 "$WORK/compare.py" "$WORK/host.st" "$WORK/arm.st")"
                failed=1
            fi
        done
    done
done
# The artifact itself: a GPTQ-calibrated build (the model runs in f32 on the CPU runtime during
# quantize) must give the same files on aarch64, all but the stage timings in the manifest.
echo "== a calibrated build on aarch64 against $(uname -m)"
for arch in host arm; do
    rm -rf "$WORK/build-$arch" && mkdir -p "$WORK/build-$arch"
    bin=$([ "$arch" = host ] && echo "$host" || echo "qemu-aarch64-static -L /usr/aarch64-linux-gnu $arm")
    (cd "$WORK/build-$arch" && $bin build --model "$repo/tests/fixtures/tiny-llama" --quantization q4f16_1 \
        --calibration gptq --artifact-path dist --cache-dir cache >build.log 2>&1) || {
        echo "FAILED: the calibrated build on $arch (log: $WORK/build-$arch/build.log)"
        failed=1
    }
done
strip_timings() { python3 -c 'import json, sys
def strip(v):
    if isinstance(v, dict): return {k: strip(x) for k, x in v.items() if k != "seconds"}
    if isinstance(v, list): return [strip(x) for x in v]
    return v
print(json.dumps(strip(json.load(open(sys.argv[1]))), sort_keys=True))' "$1"; }
lib=dist/tiny-llama-q4f16_1
if diff -r -x build-manifest.json "$WORK/build-host/$lib" "$WORK/build-arm/$lib" >/dev/null &&
    [ "$(strip_timings "$WORK/build-host/$lib/build-manifest.json")" = \
        "$(strip_timings "$WORK/build-arm/$lib/build-manifest.json")" ]; then
    echo "tiny-llama q4f16_1 gptq: identical artifacts (manifest timings aside)"
else
    echo "FAILED: the calibrated artifacts differ (diff -r $WORK/build-host/$lib $WORK/build-arm/$lib)"
    failed=1
fi

[ "$failed" = 0 ] && echo "all aarch64 checks passed" || echo "some aarch64 checks FAILED"
exit "$failed"
