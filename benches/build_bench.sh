#!/usr/bin/env bash
# Build-pipeline benchmark (not a test): quantize throughput of a synthetic ~1.1B-parameter fp16
# Llama (TinyLlama's shape) at q4f16_1 against the I/O floor (reading the input + writing the
# output), peak RSS of the build, and the median no-op rebuild time.
#
#   benches/build_bench.sh [WORK_DIR]     (needs ~5 GB of free disk; release build)
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-$(mktemp -d /tmp/mlcb-bench.XXXXXX)}"
mkdir -p "$work"
cargo build --release --quiet --bin mlcb --example synth_model
mlcb="$PWD/target/release/mlcb"
model="$work/synth-1b"
if [ ! -f "$model/model.safetensors" ]; then
    ./target/release/examples/synth_model "$model"
fi
cat > "$work/synth.toml" <<TOML
quantization = "q4f16_1"
[model]
name = "synth-1b"
source = "synth-1b"
[target]
preset = "cpu"
TOML
in_bytes=$(stat -c %s "$model/model.safetensors")
rm -rf "$work/cache" "$work/dist"
sync
# I/O floor: read the input once, write an output of the artifact's size once.
t0=$(date +%s.%N); cat "$model/model.safetensors" > /dev/null; t1=$(date +%s.%N)
read_s=$(echo "$t1 - $t0" | bc -l)

/usr/bin/time -v -o "$work/time.txt" "$mlcb" build "$work/synth.toml" --cache-dir "$work/cache" --artifact-path "$work/dist" --json > "$work/report.json"
quant_s=$(python3 -c "import json;r=json.load(open('$work/report.json'));print([s['seconds'] for s in r['stages'] if s['stage']=='quantize'][0])")
total_s=$(python3 -c "import json;print(json.load(open('$work/report.json'))['seconds'])")
out_bytes=$(du -sb "$work/dist/synth-1b-q4f16_1/params" | cut -f1)
t0=$(date +%s.%N); head -c "$out_bytes" /dev/zero > "$work/floor.bin"; sync "$work/floor.bin"; t1=$(date +%s.%N)
write_s=$(echo "$t1 - $t0" | bc -l); rm -f "$work/floor.bin"
rss_kb=$(grep "Maximum resident" "$work/time.txt" | awk '{print $NF}')

# No-op rebuilds: everything cached, dist up to date.
noop=()
for _ in $(seq 1 11); do
    t0=$(date +%s%N); "$mlcb" build "$work/synth.toml" --cache-dir "$work/cache" --artifact-path "$work/dist" >/dev/null 2>&1; t1=$(date +%s%N)
    noop+=($(( (t1 - t0) / 1000000 )))
done
median=$(printf '%s\n' "${noop[@]}" | sort -n | sed -n 6p)

floor=$(echo "$read_s + $write_s" | bc -l)
printf 'input            %.2f GB fp16 (%s)\n' "$(echo "$in_bytes/1000000000" | bc -l)" "$model"
printf 'output params    %.2f GB q4f16_1\n' "$(echo "$out_bytes/1000000000" | bc -l)"
printf 'quantize stage   %.2f s  (%.0f MB/s of input)\n' "$quant_s" "$(echo "$in_bytes/1000000/$quant_s" | bc -l)"
printf 'whole build      %.2f s\n' "$total_s"
printf 'I/O floor        %.2f s  (read %.2f s + write %.2f s)\n' "$floor" "$read_s" "$write_s"
printf 'quantize / floor %.2fx\n' "$(echo "$quant_s / $floor" | bc -l)"
printf 'peak RSS         %.0f MB\n' "$(echo "$rss_kb/1024" | bc -l)"
printf 'no-op rebuild    median %s ms over 11 runs (%s)\n' "$median" "${noop[*]}"
