#!/usr/bin/env bash
# The cuda target's GPU checks, in ONE script for a lent GPU machine (16 cores, no network, no Rust
# toolchain, one call of at most 10 minutes). benches/gpu_carry.sh brings the binaries and the
# SmolLM2 GGUF there and runs this script (`benches/gpu_carry.sh run`); with cargo at hand it
# builds mlcb itself.
#
#   OUT=/some/dir [MLCB_BIN=…] [GGUF=…] [DEADLINE=480] benches/cuda_gpu_check.sh
#
# Phases, most important first; every phase after the first checks the clock and is skipped,
# saying so, once DEADLINE seconds [480] have passed, so the call ends inside its limit with what
# it finished. Each command has its own timeout (CMD_TIMEOUT [240] s). Defaults in brackets:
#   0. build     [MLCB_BIN: use this binary; its examples are looked up beside it in examples/]
#                else cargo build --release --offline of mlcb + examples (synth_model, cuda_bandwidth)
#   1. bandwidth device-to-device copy bandwidth (examples/cuda_bandwidth), for the decode floor
#   2. FIXTURES  [1] every fixture × scheme built for cpu and cuda (this GPU's architecture);
#                for each reference prompt
#                (extended by its greedy tokens) `mlcb logits` on cuda (one prefill) and on cuda
#                with --decode (one token per call: GEMV kernels, KV cache, replayed CUDA graph)
#                against the CPU's prefill: max|cuda-cpu| / max|cpu| ≤ TOL [1e-3], except f16
#                schemes ≤ TOL_F16 [5e-3] (f16 operands on tensor cores, an f16 KV cache);
#                greedy continuations (`mlcb run --greedy`) cuda vs cpu (reported, not gated: the
#                CPU decodes q4/q8 with int8 activations). JOBS_GPU [6] (fixture, scheme) pairs at once.
#   3. SMOLLM2   [1] if GGUF [dist/models/SmolLM2-135M-Instruct/…Q4_1.gguf] exists: "The capital
#                of France is" must continue with " Paris" on cuda (q0f16, q8f16_1, q4f32_1, and
#                q4f16_1 with GPTQ calibration); q4f16_1 rounded to nearest (which cannot say it,
#                even on the CPU) must give the CPU's tokens.
#   4. BENCH7B   [1] a Llama-2-7B-shaped model with random weights (examples/synth_model, LAYERS [32];
#                HIDDEN, INTERMEDIATE, VOCAB shrink it for a dry run), built for this GPU's
#                architecture; `mlcb bench --device cuda`: decode tok/s (GEN_LEN [256] tokens after
#                DECODE_PROMPT [16]) and prefill tok/s (PREFILL_LEN [512]), with the floor (weight
#                bytes / bandwidth). In this order, the required figures first: q4f16_1;
#                transformers fp16 (HF [1], on the same config, benches/hf_transformers_bench.py;
#                not gated); q0f16 (Q0F16 [1]; skipped, saying so, without twice its weights of
#                free disk). Then q4f16_1's diagnostics: its decode with MLCB_CUDA_PDL=0 (no
#                programmatic dependent launch; reported); the prefill GEMMs on wgmma (sm_90a) and
#                in 64×64 warp tiles (each: prefill tok/s, logits vs the default build's ≤ TOL_F16);
#                the decode GEMVs with a weight ring (decode tok/s, one-token-per-call logits vs
#                the default build's ≤ TOL_F16);
#                its kernel profile (PROFILE [1]: MLCB_CUDA_PROFILE=1, each kernel timed alone;
#                the top rows per phase go to the summary); Nsight Compute (NCU [1], where `ncu`
#                is found) on one decode step's first NCU_KERNELS [5] GEMVs (DRAM throughput,
#                occupancy, warp stalls; logs/ncu-decode-gemv.txt), on decode attention at
#                PREFILL_LEN keys (logs/ncu-decode-attention.txt) and on the first layer's
#                prefill GEMMs at PREFILL_LEN tokens (logs/ncu-prefill-gemm.txt). Then q4f16_1 after
#                `mlcb build --tune on` (TUNE [1]; every candidate's time in its build log, gated
#                on no candidate computing other results than its default configuration, and
#                its kernel profile); q4f16_1 for the vulkan preset through wgpu on the NVIDIA
#                Vulkan driver (VULKAN7B [1], `--adapter $VK_ADAPTER` [nvidia]; not gated;
#                VK_LOADER_DIR: a folder holding libvulkan.so.1 when the image has none).
# NO_GPU_OK [0]: 1 runs the phases on a machine without a GPU (the cuda runs are then expected to
#   fail with exit 3; used to check this script itself).
#
# $OUT gets four files (a lent machine returns at most eight): summary.txt (human), results.jsonl
# (one JSON object per check), env.txt, logs.tar.gz (every command's output and JSON). Work files
# go to WORK [/tmp/mlcb-gpu-work]. Exit status 0 only if every gated check that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
OUT="${OUT:-/tmp/mlcb-cuda-check}"
FIXTURES="${FIXTURES:-1}"; SMOLLM2="${SMOLLM2:-1}"; BENCH7B="${BENCH7B:-1}"
NO_GPU_OK="${NO_GPU_OK:-0}"
TOL="${TOL:-1e-3}"; TOL_F16="${TOL_F16:-5e-3}"
DEADLINE="${DEADLINE:-480}"; CMD_TIMEOUT="${CMD_TIMEOUT:-240}"
LAYERS="${LAYERS:-32}"
HIDDEN="${HIDDEN:-4096}"; INTERMEDIATE="${INTERMEDIATE:-11008}"; VOCAB="${VOCAB:-32000}"
DECODE_PROMPT="${DECODE_PROMPT:-16}"; GEN_LEN="${GEN_LEN:-256}"; PREFILL_LEN="${PREFILL_LEN:-512}"
TUNE="${TUNE:-1}"; HF="${HF:-1}"; PROFILE="${PROFILE:-1}"; VULKAN7B="${VULKAN7B:-1}"; VK_ADAPTER="${VK_ADAPTER:-nvidia}"
NCU="${NCU:-1}"; NCU_KERNELS="${NCU_KERNELS:-5}"; Q0F16="${Q0F16:-1}"
JOBS="${JOBS:-$(nproc)}"; JOBS_GPU="${JOBS_GPU:-6}"
SCHEMES="${SCHEMES:-q0f16 q0f32 q3f16_0 q3f16_1 q4f16_0 q4f16_1 q4f32_0 q4f32_1 q8f16_0 q8f16_1}"
GGUF="${GGUF:-$repo/dist/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf}"
WORK="${WORK:-/tmp/mlcb-gpu-work}"

mkdir -p "$OUT" "$WORK/logs" "$WORK/rec"
OUT="$(cd "$OUT" && pwd)"; WORK="$(cd "$WORK" && pwd)"
# Computed once per run (pinned_variant), never taken from an earlier one.
rm -f "$WORK"/logits-7b-default-*.st
logs="$WORK/logs"
summary="$OUT/summary.txt"; results="$OUT/results.jsonl"
: > "$summary"; : > "$results"
failures=0
t_start=$(date +%s)
elapsed() { echo $(( $(date +%s) - t_start ))s; }
say() { echo "== [$(elapsed)] $*" | tee -a "$summary" >&2; }
record() { echo "$1" >> "$results"; }
fail() { failures=$((failures + 1)); say "FAIL: $*"; }
# Whether there is time for a phase; says which one is skipped when not.
in_time() {
    if [ $(( $(date +%s) - t_start )) -ge "$DEADLINE" ]; then
        say "skipped (DEADLINE ${DEADLINE}s reached): $*"; record "{\"skipped\":\"$*\"}"; return 1
    fi
}
# Pack the logs into one file on every exit (the machine returns only a few files).
pack_logs() { tar -C "$WORK" -czf "$OUT/logs.tar.gz" logs 2>/dev/null; }
trap pack_logs EXIT
run_t() { timeout --kill-after=10 "$CMD_TIMEOUT" "$@"; }

# --- environment -----------------------------------------------------------------------------
{
    date -u; uname -a; echo "cores: $(nproc)"; df -h "$WORK" 2>&1
    nvidia-smi 2>&1 || echo "nvidia-smi: not available"
    python3 --version 2>&1 || echo "python3: not available"
    ldconfig -p 2>/dev/null | grep -E 'libcuda\.so|libnvrtc|libvulkan' || echo "ldconfig: no libcuda/libnvrtc/libvulkan"
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"; echo "MLCB_NVRTC=${MLCB_NVRTC:-}"
} > "$OUT/env.txt" 2>&1
command -v python3 >/dev/null || { say "python3 is needed for the comparisons"; exit 3; }
have_gpu=0
nvidia-smi -L >/dev/null 2>&1 && have_gpu=1
say "GPU present: $have_gpu (details in env.txt)"
if [ "$have_gpu" = 0 ] && [ "$NO_GPU_OK" != 1 ]; then
    say "no GPU (nvidia-smi -L fails); set NO_GPU_OK=1 to run the non-GPU parts anyway"; exit 3
fi
# A cuda command that exits 3 without a GPU is what a dry run expects.
cuda_ok_rc() { [ "$1" = 0 ] || { [ "$have_gpu" = 0 ] && [ "$1" = 3 ]; }; }

# --- 0. build -----------------------------------------------------------------------------------
if [ -n "${MLCB_BIN:-}" ]; then
    mlcb="$(cd "$(dirname "$MLCB_BIN")" && pwd)/$(basename "$MLCB_BIN")"
    exdir="$(dirname "$mlcb")/examples"
else
    say "building release mlcb with $JOBS jobs"
    if ! cargo build --release --offline -j "$JOBS" --bin mlcb --example synth_model \
        --example cuda_bandwidth > "$logs/build.txt" 2>&1; then
        say "release build failed (logs/build.txt)"; tail -20 "$logs/build.txt" >&2; exit 1
    fi
    mlcb="$repo/target/release/mlcb"; exdir="$repo/target/release/examples"
fi
say "mlcb: $mlcb ($("$mlcb" --version 2>&1))"
export XDG_RUNTIME_DIR="$WORK/xdg"; mkdir -p -m 0700 "$XDG_RUNTIME_DIR"

# --- 1. bandwidth ---------------------------------------------------------------------------------
if [ "$have_gpu" = 1 ]; then
    if run_t "$exdir/cuda_bandwidth" 1024 20 > "$WORK/bandwidth.json" 2> "$logs/bandwidth.txt"; then
        say "bandwidth: $(cat "$WORK/bandwidth.json")"; record "{\"check\":\"bandwidth\",\"result\":$(cat "$WORK/bandwidth.json")}"
    else
        fail "bandwidth example failed ($(tail -1 "$logs/bandwidth.txt"))"
    fi
fi

# Compare two logits files: prints one JSON object (max abs diff, scale, relative error).
compare_py='
import json, struct, sys
def load(p):
    b = open(p, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    t = h["logits"]; s, e = t["data_offsets"]
    d = b[8 + n + s: 8 + n + e]
    return t["shape"], struct.unpack("<%df" % (len(d) // 4), d)
sa, a = load(sys.argv[1]); sb, b = load(sys.argv[2])
if sa != sb:
    print(json.dumps({"error": "shapes differ: %s vs %s" % (sa, sb)})); sys.exit(0)
diff = max(abs(x - y) for x, y in zip(a, b))
scale = max(abs(y) for y in b) or 1.0
finite = all(x == x and abs(x) != float("inf") for x in a)
vocab = sa[1]
argmax = lambda v, r: max(range(vocab), key=lambda i: v[r * vocab + i])
same_top = sum(argmax(a, r) == argmax(b, r) for r in range(sa[0]))
print(json.dumps({"shape": sa, "max_abs": diff, "scale": scale, "rel": diff / scale, "finite": finite, "same_argmax_rows": same_top}))
'
rel_ok() { python3 -c 'import json,sys; r=json.loads(sys.argv[1]); sys.exit(0 if r.get("finite") and r.get("rel", 1) <= float(sys.argv[2]) else 1)' "$1" "$2" 2>/dev/null; }

# One fixture × scheme on cuda against the cpu: its records go to rec/FX-Q.jsonl, its failures
# (one line each) to rec/FX-Q.fail. Runs in the background, JOBS_GPU at a time.
check_scheme() { # fixture scheme
    local fx="$1" q="$2" i mode flag log rc r tol
    local dist="$WORK/dist-cuda/$fx-$q" cdist="$WORK/dist-cpu/$fx-$q" ldir="$WORK/logits/$fx-$q"
    local rec="$WORK/rec/$fx-$q.jsonl" bad="$WORK/rec/$fx-$q.fail" ref="$repo/tests/fixtures/$fx/reference.json"
    mkdir -p "$ldir"; : > "$rec"; : > "$bad"
    local nprompts
    nprompts=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["prompts"]))' "$ref")
    for ((i = 0; i < nprompts; i++)); do
        local ids
        ids=$(python3 -c 'import json,sys; p=json.load(open(sys.argv[1]))["prompts"][int(sys.argv[2])]; print(",".join(map(str, p["input_ids"] + p["greedy"])))' "$ref" "$i")
        run_t "$mlcb" logits "$cdist" --input-ids "$ids" --out "$ldir/$i-cpu.st" --device cpu > "$logs/logits-$fx-$q-$i-cpu.txt" 2>&1 \
            || { echo "$fx $q prompt $i: cpu logits failed" >> "$bad"; continue; }
        for mode in prefill decode; do
            flag=""; [ "$mode" = decode ] && flag="--decode"
            # f16 schemes multiply f16 operands on tensor cores (prefill GEMMs, decode GEMVs of
            # 4- and 8-bit codes) and keep an f16 KV cache; everything else is f32.
            tol="$TOL"
            [[ "$q" == *f16* ]] && tol="$TOL_F16"
            log="$logs/logits-$fx-$q-$i-cuda-$mode.txt"
            run_t "$mlcb" logits "$dist" --input-ids "$ids" --out "$ldir/$i-cuda-$mode.st" --device cuda $flag > "$log" 2>&1
            rc=$?
            if [ "$rc" != 0 ]; then
                echo "{\"check\":\"logits\",\"fixture\":\"$fx\",\"scheme\":\"$q\",\"prompt\":$i,\"mode\":\"$mode\",\"exit\":$rc}" >> "$rec"
                cuda_ok_rc "$rc" || echo "$fx $q prompt $i $mode: cuda exit $rc ($(tail -1 "$log"))" >> "$bad"
                continue
            fi
            r=$(python3 -c "$compare_py" "$ldir/$i-cuda-$mode.st" "$ldir/$i-cpu.st")
            echo "{\"check\":\"logits\",\"fixture\":\"$fx\",\"scheme\":\"$q\",\"prompt\":$i,\"mode\":\"$mode\",\"tol\":$tol,\"result\":$r}" >> "$rec"
            rel_ok "$r" "$tol" || echo "$fx $q prompt $i $mode: $r (tolerance $tol)" >> "$bad"
        done
    done
    # Greedy continuation of the first prompt, cuda vs cpu (reported).
    local text dev d g
    text=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["prompts"][0]["text"])' "$ref")
    for dev in cpu cuda; do
        d="$dist"; [ "$dev" = cpu ] && d="$cdist"
        run_t "$mlcb" run "$d" --prompt "$text" --greedy --max-tokens 24 --json --device "$dev" \
            > "$ldir/greedy-$dev.json" 2> "$logs/greedy-$fx-$q-$dev.txt" || true
    done
    g=$(python3 -c '
import json, sys
def ids(p):
    try: return json.load(open(p))["generated_ids"]
    except Exception: return None
a, b = ids(sys.argv[1]), ids(sys.argv[2])
same = 0
if a is not None and b is not None:
    for x, y in zip(a, b):
        if x != y: break
        same += 1
print(json.dumps({"cuda": a, "cpu": b, "same_prefix": same}))' "$ldir/greedy-cuda.json" "$ldir/greedy-cpu.json")
    echo "{\"check\":\"greedy\",\"fixture\":\"$fx\",\"scheme\":\"$q\",\"result\":$g}" >> "$rec"
}

# --- 2. fixtures --------------------------------------------------------------------------------
gpu_arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
if [ "$FIXTURES" = 1 ] && in_time "fixtures"; then
    fixtures=(tiny-llama tiny-neox tiny-rwkv)
    say "fixtures ${fixtures[*]}: building ${SCHEMES// /,} for cpu and cuda"
    # One dist folder per target: a folder holding both libraries opens with the first.
    for t in cpu cuda; do
        recipes=()
        for fx in "${fixtures[@]}"; do
            mkdir -p "$WORK/recipes/$fx"
            for q in $SCHEMES; do
                printf 'quantization = "%s"\n[model]\nname = "%s"\nsource = "%s"\n[target]\npreset = "%s"\n' \
                    "$q" "$fx" "$repo/tests/fixtures/$fx" "$t" > "$WORK/recipes/$fx/$q-$t.toml"
                # For this GPU's architecture (sm_90: decode with programmatic dependent launch);
                # SmolLM2 keeps the preset's sm_80 (PTX the driver JIT-compiles).
                [ "$t" = cuda ] && [ -n "$gpu_arch" ] && echo "cuda_arch = \"sm_$gpu_arch\"" >> "$WORK/recipes/$fx/$q-$t.toml"
                recipes+=("$WORK/recipes/$fx/$q-$t.toml")
            done
        done
        run_t "$mlcb" build "${recipes[@]}" -j "$JOBS" --cache-dir "$WORK/cache" \
            --artifact-path "$WORK/dist-$t" > "$logs/build-fixtures-$t.txt" 2>&1 \
            || fail "fixtures: $t build failed (logs/build-fixtures-$t.txt: $(tail -1 "$logs/build-fixtures-$t.txt"))"
    done
    say "fixtures built; comparing cuda with cpu, $JOBS_GPU at a time"
    for fx in "${fixtures[@]}"; do
        for q in $SCHEMES; do
            [ -d "$WORK/dist-cuda/$fx-$q" ] && [ -d "$WORK/dist-cpu/$fx-$q" ] || continue
            while [ "$(jobs -rp | wc -l)" -ge "$JOBS_GPU" ]; do wait -n; done
            check_scheme "$fx" "$q" &
        done
    done
    wait
    for fx in "${fixtures[@]}"; do
        for q in $SCHEMES; do
            [ -f "$WORK/rec/$fx-$q.jsonl" ] && cat "$WORK/rec/$fx-$q.jsonl" >> "$results"
            if [ -s "$WORK/rec/$fx-$q.fail" ]; then
                while read -r line; do fail "$line"; done < "$WORK/rec/$fx-$q.fail"
            fi
        done
    done
    # The first failing pair once more under compute-sanitizer (memcheck), for the logs: an
    # out-of-bounds access or a misaligned load is then named by kernel and address.
    san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
    first_bad=$(cat "$WORK"/rec/*.fail 2>/dev/null | head -1)
    if [ -n "$first_bad" ] && [ -n "$san" ] && [ "$have_gpu" = 1 ]; then
        read -r fx q _ <<< "$first_bad"
        ids=$(python3 -c 'import json,sys; p=json.load(open(sys.argv[1]))["prompts"][0]; print(",".join(map(str, p["input_ids"] + p["greedy"])))' "$repo/tests/fixtures/$fx/reference.json")
        for flag in "" --decode; do
            timeout 120 "$san" --tool memcheck --print-limit 20 "$mlcb" logits "$WORK/dist-cuda/$fx-$q" --input-ids "$ids" \
                --out "$WORK/sanitizer.st" --device cuda $flag > "$logs/sanitizer-$fx-$q${flag:+-decode}.txt" 2>&1
            say "compute-sanitizer on $fx $q ${flag:-prefill}: exit $? ($(grep -m1 -E 'ERROR SUMMARY|Invalid|Misaligned' "$logs/sanitizer-$fx-$q${flag:+-decode}.txt"))"
        done
    fi
    # Worst relative error per scheme and mode over fixtures and prompts, and greedy agreement.
    python3 - "$results" <<'EOF' | tee -a "$summary" >&2
import json, sys
worst, greedy = {}, {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("check") == "logits" and "result" in r and "rel" in r["result"]:
        k = (r["scheme"], r["mode"])
        worst[k] = max(worst.get(k, 0.0), r["result"]["rel"])
    if r.get("check") == "greedy":
        g = r["result"]; n = len(g["cpu"] or [])
        greedy.setdefault(r["scheme"], []).append("%s %d/%d" % (r["fixture"], g["same_prefix"], n))
for q in sorted({k[0] for k in worst}):
    print("   %-8s prefill %.2e  decode %.2e  greedy same prefix: %s" % (
        q, worst.get((q, "prefill"), float("nan")), worst.get((q, "decode"), float("nan")), ", ".join(greedy.get(q, []))))
EOF
    say "fixtures done"
fi

# --- 3. SmolLM2 ---------------------------------------------------------------------------------
if [ "$SMOLLM2" = 1 ] && [ -f "$GGUF" ] && in_time "SmolLM2"; then
    say "SmolLM2: building for cuda (and q4f16_1 for cpu)"
    # name scheme preset extra-toml: a recipe file.
    smol_recipe() {
        printf 'quantization = "%s"\n%s[model]\nname = "%s"\nsource = { gguf = "%s" }\n[target]\npreset = "%s"\n' \
            "$2" "$4" "$1" "$GGUF" "$3" > "$WORK/$1-$2-$3.toml"
        echo "$WORK/$1-$2-$3.toml"
    }
    recipes=()
    for q in q4f16_1 q0f16 q8f16_1 q4f32_1; do recipes+=("$(smol_recipe smollm2 "$q" cuda "")"); done
    # q4f16_1 rounded to nearest cannot say " Paris" even on the CPU (tests/smollm2.rs): it must
    # give the CPU's tokens; the GPTQ-calibrated q4f16_1 must say " Paris".
    recipes+=("$(smol_recipe smollm2-gptq q4f16_1 cuda $'[calibration]\nmethod = "gptq"\n')")
    mkdir -p "$WORK/dist-smol-cpu"
    if run_t "$mlcb" build "${recipes[@]}" -j "$JOBS" --cache-dir "$WORK/cache" --artifact-path "$WORK/dist" > "$logs/build-smollm2.txt" 2>&1 \
        && run_t "$mlcb" build "$(smol_recipe smollm2 q4f16_1 cpu "")" -j "$JOBS" --cache-dir "$WORK/cache" \
            --artifact-path "$WORK/dist-smol-cpu" >> "$logs/build-smollm2.txt" 2>&1; then
        smol_run() { # dist label device
            run_t "$mlcb" run "$1" --prompt "The capital of France is" --greedy --max-tokens 4 --json --device "$3" \
                > "$logs/smollm2-$2.json" 2> "$logs/smollm2-$2.txt"
        }
        smol_run "$WORK/dist-smol-cpu/smollm2-q4f16_1" q4f16_1-cpu cpu
        for q in q4f16_1 q0f16 q8f16_1 q4f32_1 gptq-q4f16_1; do
            d="$WORK/dist/smollm2-$q"; [ "$q" = gptq-q4f16_1 ] && d="$WORK/dist/smollm2-gptq-q4f16_1"
            smol_run "$d" "$q" cuda
            rc=$?
            t=$(python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["text"]))' "$logs/smollm2-$q.json" 2>/dev/null || echo null)
            record "{\"check\":\"smollm2\",\"scheme\":\"$q\",\"exit\":$rc,\"text\":$t}"
            if [ "$q" = q4f16_1 ] && [ "$rc" = 0 ]; then
                same=$(python3 -c 'import json,sys; a, b = (json.load(open(p))["generated_ids"] for p in sys.argv[1:]); print(int(a == b))' \
                    "$logs/smollm2-q4f16_1.json" "$logs/smollm2-q4f16_1-cpu.json" 2>/dev/null || echo 0)
                if [ "$same" = 1 ]; then
                    say "SmolLM2 q4f16_1 (rounded to nearest): $t, the CPU's tokens"
                else
                    fail "SmolLM2 q4f16_1: $t, not the CPU's tokens (logs/smollm2-q4f16_1*.json)"
                fi
            elif [[ "$t" == '" Paris'* ]]; then
                say "SmolLM2 $q: $t"
            elif [ "$rc" != 0 ] && cuda_ok_rc "$rc"; then
                say "SmolLM2 $q: exit $rc without a GPU, as expected"
            else
                fail "SmolLM2 $q: $t (exit $rc; $(tail -1 "$logs/smollm2-$q.txt"))"
            fi
        done
    else
        fail "SmolLM2 build failed (logs/build-smollm2.txt: $(tail -1 "$logs/build-smollm2.txt"))"
    fi
elif [ "$SMOLLM2" = 1 ] && [ ! -f "$GGUF" ]; then
    say "SmolLM2: skipped, $GGUF not found"
fi

# --- 4. Llama-2-7B-shaped benchmark -------------------------------------------------------------
# One bench call per figure, in the issue's shapes: decode = GEN_LEN tokens after a DECODE_PROMPT-
# token prompt, prefill = a PREFILL_LEN-token prompt. Prints "rc_decode rc_prefill decode prefill".
# bench_env: VAR=value words for the bench processes (the Vulkan loader's).
bench_env=()
json_field() { # file key: the JSON file's top-level field, or null
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2" 2>/dev/null || echo null
}
bench_pair() { # dist label [device args…; default --device cuda]
    local dist="$1" label="$2" rc1 rc2 d p
    shift 2
    local dev=("$@"); [ ${#dev[@]} = 0 ] && dev=(--device cuda)
    run_t env "${bench_env[@]}" "$mlcb" bench "$dist" --prompt-len "$DECODE_PROMPT" --gen-len "$GEN_LEN" --json "${dev[@]}" \
        > "$logs/bench-$label-decode.json" 2> "$logs/bench-$label-decode.txt"; rc1=$?
    run_t env "${bench_env[@]}" "$mlcb" bench "$dist" --prompt-len "$PREFILL_LEN" --gen-len 1 --json "${dev[@]}" \
        > "$logs/bench-$label-prefill.json" 2> "$logs/bench-$label-prefill.txt"; rc2=$?
    d=$(json_field "$logs/bench-$label-decode.json" decode_tok_s)
    p=$(json_field "$logs/bench-$label-prefill.json" prefill_tok_s)
    echo "$rc1 $rc2 $d $p"
}
# Build SCHEME of the synthetic model for PRESET (extra build flags after): dist path on stdout.
cache7b="$WORK/cache7b"; dist7b="$WORK/dist7b"
build_7b() { # scheme preset label [flags…]
    local q="$1" preset="$2" label="$3"
    shift 3
    printf 'quantization = "%s"\nmax_seq_len = 2048\n[model]\nname = "synth-7b-%s"\nsource = "%s"\n[target]\npreset = "%s"\n' \
        "$q" "$preset" "$model" "$preset" > "$WORK/synth-$preset-$q.toml"
    run_t "$mlcb" build "$WORK/synth-$preset-$q.toml" "$@" -j "$JOBS" --cache-dir "$cache7b" \
        --artifact-path "$dist7b" > "$logs/build-7b-$label.txt" 2>&1 || return 1
    echo "$dist7b/synth-7b-$preset-$q"
}
floor_json() { # dist: weight bytes, bandwidth, floor
    python3 -c '
import json, sys
try: bw = json.load(open(sys.argv[1]))["d2d_gb_s"]
except Exception: bw = None
w = int(sys.argv[2])
print(json.dumps({"weight_bytes": w, "d2d_gb_s": bw, "decode_floor_ms": (w / (bw * 1e9) * 1e3) if bw else None, "decode_ceiling_tok_s": (bw * 1e9 / w) if bw else None}))' \
        "$WORK/bandwidth.json" "$(du -sb "$1/params" | cut -f1)"
}
bench_cuda() { # scheme dist label tuned
    local q="$1" dist="$2" label="$3" tuned="$4" floor rc1 rc2 dec pre
    floor=$(floor_json "$dist")
    read -r rc1 rc2 dec pre <<< "$(bench_pair "$dist" "$label")"
    record "{\"check\":\"bench7b\",\"scheme\":\"$q\",\"tuned\":$tuned,\"layers\":$LAYERS,\"exit\":[$rc1,$rc2],\"decode_tok_s\":$dec,\"prefill_tok_s\":$pre,\"floor\":$floor}"
    say "7B $q (tuned: $tuned): decode $dec tok/s, prefill $pre tok/s (exit $rc1/$rc2); floor $floor"
    cuda_ok_rc "$rc1" || fail "7B $q decode bench exit $rc1 ($(tail -1 "$logs/bench-$label-decode.txt"))"
    cuda_ok_rc "$rc2" || fail "7B $q prefill bench exit $rc2 ($(tail -1 "$logs/bench-$label-prefill.txt"))"
}

# Nsight Compute on one `mlcb bench` of the q4f16_1 library (kernels launched one by one: no
# graph; the clocks left alone), where ncu is found and a GPU is present:
#   ncu_phase WHAT LOG LINES PATTERN NCU-ARGS… -- BENCH-ARGS…
# The report goes to logs/LOG; its first LINES lines matching PATTERN to the summary.
ncu_phase() {
    local what="$1" log="$2" lines="$3" pattern="$4" ncu_args=()
    shift 4
    while [ "$1" != -- ]; do ncu_args+=("$1"); shift; done
    shift
    { [ "$NCU" = 1 ] && [ -n "$ncu_bin" ] && [ "$have_gpu" = 1 ] && in_time "ncu $what"; } || return 0
    MLCB_CUDA_GRAPHS=0 run_t "$ncu_bin" --clock-control none "${ncu_args[@]}" \
        "$mlcb" bench "$q4" "$@" --device cuda > "$logs/$log" 2>&1
    say "ncu on the $what: exit $? (logs/$log):"
    grep -E "$pattern" "$logs/$log" | head -"$lines" | tee -a "$summary" >&2
}
# The 7B q4f16_1 built again with the records of its PHASE's matmuls (prefill: the GEMMs;
# decode: the GEMVs) pinned — a tuning file from the first build's debug/tuning-cuda.json, with
# each FIELD=VALUE of SETTINGS (comma-separated) — and the same weights (cached stages): that
# phase's tok/s against the default, and its logits against the default build's (prefill: a
# prompt of 300 tokens, two full 128-row tiles and a short one; decode: the same tokens one per
# call), gated at TOL_F16.
pinned_variant() { # name phase settings label
    local name=$1 phase=$2 settings=$3 label=$4
    { [ "$have_gpu" = 1 ] && [ -f "$q4/debug/tuning-cuda.json" ] && in_time "$phase matmuls: $label"; } || return 0
    python3 - "$q4/debug/tuning-cuda.json" "$WORK/$name.json" "$settings" "$label" "$phase" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
pin = {k: int(v) for k, v in (kv.split("=") for kv in sys.argv[3].split(","))}
recs = {s: dict(c, **pin) for s, c in t["records"].items()
    if s.startswith(sys.argv[5] + ":") and ("matmul" in s or "logits" in s)}
json.dump({"device": "gpu check: " + sys.argv[5] + " matmuls, " + sys.argv[4], "tuned": False, "records": recs},
      open(sys.argv[2], "w"))
PY
    printf 'quantization = "q4f16_1"\nmax_seq_len = 2048\ntuning_file = "%s"\n[model]\nname = "synth-7b-%s"\nsource = "%s"\n[target]\npreset = "cuda"\n' \
        "$WORK/$name.json" "$name" "$model" > "$WORK/synth-$name.toml"
    local dist="$dist7b/synth-7b-$name-q4f16_1"
    if ! run_t "$mlcb" build "$WORK/synth-$name.toml" "${arch_flag[@]}" -j "$JOBS" --cache-dir "$cache7b" \
        --artifact-path "$dist7b" > "$logs/build-7b-$name.txt" 2>&1; then
        say "7B q4f16_1, $phase matmuls with $label: build failed (logs/build-7b-$name.txt; not gated)"
        return 0
    fi
    local ids mode=()
    [ "$phase" = decode ] && mode=(--decode)
    ids=$(python3 -c 'import json, sys; v = json.load(open(sys.argv[1]))["vocab_size"]; print(",".join(str((i * 7919 + 13) % v) for i in range(300)))' "$model/config.json")
    # The default build's logits, once per phase for every pinned variant.
    [ -f "$WORK/logits-7b-default-$phase.st" ] || run_t "$mlcb" logits "$q4" --input-ids "$ids" "${mode[@]}" \
        --out "$WORK/logits-7b-default-$phase.st" --device cuda > "$logs/logits-7b-default-$phase.txt" 2>&1
    run_t "$mlcb" logits "$dist" --input-ids "$ids" "${mode[@]}" --out "$WORK/logits-7b-$name.st" --device cuda \
        > "$logs/logits-7b-$name.txt" 2>&1
    local r
    r=$(python3 -c "$compare_py" "$WORK/logits-7b-$name.st" "$WORK/logits-7b-default-$phase.st" 2>&1 | tail -1)
    # Not a JSON object (a missing logits file): the error as one.
    case "$r" in
        "{"*) ;;
        *) r=$(python3 -c 'import json, sys; print(json.dumps({"error": sys.argv[1] or "no comparison"}))' "$r") ;;
    esac
    if rel_ok "$r" "$TOL_F16"; then
        say "7B q4f16_1, $phase matmuls with $label: logits match the default build's ($r)"
    else
        fail "7B q4f16_1, $phase matmuls with $label: logits differ from the default build's ($r; logs/logits-7b-$name.txt)"
    fi
    local key=prefill_tok_s bench=(--prompt-len "$PREFILL_LEN" --gen-len 1)
    [ "$phase" = decode ] && key=decode_tok_s bench=(--prompt-len "$DECODE_PROMPT" --gen-len "$GEN_LEN")
    run_t "$mlcb" bench "$dist" "${bench[@]}" --json --device cuda \
        > "$logs/bench-$name-$phase.json" 2> "$logs/bench-$name-$phase.txt"
    local p pd
    p=$(json_field "$logs/bench-$name-$phase.json" "$key")
    pd=$(json_field "$logs/bench-q4f16_1-$phase.json" "$key")
    record "{\"check\":\"bench7b_$name\",\"scheme\":\"q4f16_1\",\"$key\":$p,\"default_$key\":$pd,\"logits_vs_default\":$r}"
    say "7B q4f16_1 $phase with $label (pinned): $p tok/s; default: $pd tok/s"
    rm -rf "$dist" "$WORK/logits-7b-$name.st"
}
# The q4f16_1 diagnostics, after the required figures (q4f16_1, transformers, q0f16): the wgmma
# prefill A/B, decode without PDL, the 64×64 warp-tile A/B, the decode weight-ring A/B, the
# kernel profile, Nsight Compute on the decode GEMVs, decode attention and the prefill GEMMs.
q4_diagnostics() {
    # A/B: the prefill GEMMs on wgmma (sm_90a warpgroup MMA, codegen::cuda::gemm_wgmma; a
    # tuning record with rows_per_block 4), then in 4 warps of 64×64 tiles (threads 128,
    # gemm_f16::WarpTiles) instead of the default 8 warps of 64×32 on mma.sync.
    pinned_variant wgmma prefill rows_per_block=4 "wgmma (sm_90a warpgroup MMA)"
    if [ "$have_gpu" = 1 ] && in_time "decode without PDL"; then
        # A/B: the decode graph without programmatic dependent launch (sm_90 kernels).
        run_t env MLCB_CUDA_PDL=0 "$mlcb" bench "$q4" --prompt-len "$DECODE_PROMPT" --gen-len "$GEN_LEN" --json \
            --device cuda > "$logs/bench-nopdl-decode.json" 2> "$logs/bench-nopdl-decode.txt"
        nopdl=$(json_field "$logs/bench-nopdl-decode.json" decode_tok_s)
        record "{\"check\":\"bench7b_no_pdl\",\"scheme\":\"q4f16_1\",\"decode_tok_s\":$nopdl}"
        say "7B q4f16_1 decode with MLCB_CUDA_PDL=0 (no programmatic dependent launch): $nopdl tok/s"
    fi
    pinned_variant tiles128 prefill threads_per_block=128 "64×64 warp tiles (128 threads)"
    # A/B: the decode GEMVs with their weights through a cp.async ring (gemv_mma::ring_depth;
    # 4 warps a block, so the down projection's ring holds 5 steps, the others 8).
    pinned_variant ring decode weight_ring=8,threads_per_block=128 "a weight ring (4 warps)"
    if [ "$PROFILE" = 1 ] && in_time "kernel profile"; then
        # Where a token's GPU time goes: each kernel timed alone (no graph), by signature.
        MLCB_CUDA_PROFILE=1 run_t "$mlcb" bench "$q4" --prompt-len "$PREFILL_LEN" --gen-len 32 --device cuda \
            > "$logs/profile-7b-q4f16_1.json" 2> "$logs/profile-7b-q4f16_1.txt"
        say "7B q4f16_1 kernel profile (exit $?; prefill $PREFILL_LEN tokens, 32 decode steps):"
        sed -n '/cuda kernel profile/,$p' "$logs/profile-7b-q4f16_1.txt" | grep -v '^mlcb: cuda kernel profile' \
            | awk '/^  [a-z]+:/ {n=0} {if (n++ < 14) print}' | tee -a "$summary" >&2
    fi
    ncu_bin=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    # Hardware counters of the decode GEMVs. Prefill runs GEMMs, so the first matches are one
    # decode step's. L1 requests, sectors and wavefronts per kernel: row blocks
    # (codegen::cuda::row_blocks) are meant to cut the global ones per weight byte ~3×.
    ncu_phase "decode GEMVs" ncu-decode-gemv.txt 90 \
        '^  mlcb_|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Duration|Block Limit Reg|Theoretical Occupancy|l1tex__|smsp__inst_executed' \
        -k regex:gemv -c "$NCU_KERNELS" \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section LaunchStats --section WarpStateStats --section SchedulerStats \
        --metrics l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__throughput.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum \
        -- --prompt-len "$DECODE_PROMPT" --gen-len 2
    # Decode attention at PREFILL_LEN cached keys (the prefill's LAYERS attention launches
    # skipped): latency-bound, so the warp stall reasons say which round trip (query load and
    # rotary, the key scan, the split merge's fence and atomic) waits.
    ncu_phase "decode attention at $PREFILL_LEN keys" ncu-decode-attention.txt 40 \
        '^  mlcb_|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Duration|Stall|Warp Cycles Per' \
        -k regex:attention -s "$LAYERS" -c 2 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        --section LaunchStats --section WarpStateStats \
        -- --prompt-len "$PREFILL_LEN" --gen-len 2
    # The prefill GEMMs of the first layer at PREFILL_LEN tokens (qkv, o, gate/up, down): what
    # bounds them — the tensor pipe's share of its peak, the issue slots, the shared memory
    # wavefronts, or stalls waiting on loads (long scoreboard) or at barriers — decides between
    # a deeper copy ring, larger tiles and wgmma.
    ncu_phase "first prefill GEMMs at $PREFILL_LEN tokens" ncu-prefill-gemm.txt 60 \
        '^  mlcb_|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Duration|Issue Slots Busy|Shared Memory Configuration Size|sm__pipe_tensor|bank_conflicts|stalled_' \
        -k regex:gemm -c 4 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
        --metrics sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,smsp__average_warp_latency_issue_stalled_long_scoreboard.ratio,smsp__average_warp_latency_issue_stalled_barrier.ratio,smsp__average_warp_latency_issue_stalled_mio_throttle.ratio,smsp__average_warp_latency_issue_stalled_math_pipe_throttle.ratio \
        -- --prompt-len "$PREFILL_LEN" --gen-len 1
}

if [ "$BENCH7B" = 1 ] && in_time "7B benchmark"; then
    model="$WORK/synth-7b"
    if [ ! -f "$model/config.json" ]; then
        say "writing a Llama-2-7B-shaped random model, $LAYERS layers"
        run_t "$exdir/synth_model" "$model" --hidden "$HIDDEN" --intermediate "$INTERMEDIATE" --layers "$LAYERS" \
            --heads 32 --kv-heads 32 --vocab "$VOCAB" > "$logs/synth.txt" 2>&1 || fail "synth_model failed"
    fi
    arch_flag=(); [ -n "$gpu_arch" ] && arch_flag=(--cuda-arch "sm_$gpu_arch")
    say "7B q4f16_1: building for ${gpu_arch:+sm_$gpu_arch}"
    # --debug-dump: its tuning records (debug/tuning-cuda.json) seed the warp-tile A/B below.
    if q4=$(build_7b q4f16_1 cuda q4f16_1 "${arch_flag[@]}" --debug-dump); then
        bench_cuda q4f16_1 "$q4" q4f16_1 false
        grep -h "capturing without it" "$logs"/bench-q4f16_1-*.txt 2>/dev/null | head -1 | sed 's/^/note: /' | tee -a "$summary" >&2
    else
        fail "7B q4f16_1: build failed (logs/build-7b-q4f16_1.txt: $(tail -1 "$logs/build-7b-q4f16_1.txt"))"; q4=""
    fi
    if [ "$HF" = 1 ] && [ "$have_gpu" = 1 ] && in_time "transformers fp16"; then
        say "transformers fp16 on the same config"
        if run_t python3 benches/hf_transformers_bench.py "$model" --prefill "$PREFILL_LEN" --prompt "$DECODE_PROMPT" \
            --gen "$GEN_LEN" > "$WORK/hf-7b.json" 2> "$logs/hf-7b.txt"; then
            record "{\"check\":\"hf7b\",\"result\":$(cat "$WORK/hf-7b.json")}"
            say "transformers: $(cat "$WORK/hf-7b.json")"
        else
            say "transformers benchmark failed or unavailable (logs/hf-7b.txt: $(tail -1 "$logs/hf-7b.txt"); not gated)"
        fi
    fi
    # q0f16 (the issue's second scheme) before the optional phases. It needs its weights twice
    # (cache blob and dist copy) in folders of its own; the q4f16_1 files go first only when the
    # disk is short (the tuned build then quantizes again).
    if [ "$Q0F16" = 1 ] && in_time "q0f16"; then
        need=$(( $(du -sb "$model" | cut -f1) * 2 + (2 << 30) ))
        free=$(( $(df -Pk "$WORK" | awk 'NR == 2 {print $4}') * 1024 ))
        if [ "$free" -lt "$need" ]; then
            rm -rf "$WORK/dist7b" "$WORK/cache7b"
            free=$(( $(df -Pk "$WORK" | awk 'NR == 2 {print $4}') * 1024 ))
        fi
        if [ "$free" -lt "$need" ]; then
            say "7B q0f16: skipped, $((free >> 30)) GiB free, $((need >> 30)) GiB needed"
            record "{\"skipped\":\"q0f16: disk\",\"free\":$free,\"need\":$need}"
        else
            say "7B q0f16: building"
            cache7b="$WORK/cache7b-q0"; dist7b="$WORK/dist7b-q0"
            if q0=$(build_7b q0f16 cuda q0f16 "${arch_flag[@]}"); then
                bench_cuda q0f16 "$q0" q0f16 false
            else
                fail "7B q0f16: build failed (logs/build-7b-q0f16.txt: $(tail -1 "$logs/build-7b-q0f16.txt"))"
            fi
            rm -rf "$cache7b" "$dist7b"
            cache7b="$WORK/cache7b"; dist7b="$WORK/dist7b"
        fi
    fi
    if [ -n "$q4" ] && [ -d "$q4" ]; then
        q4_diagnostics
    elif [ -n "$q4" ]; then
        say "7B q4f16_1 diagnostics: skipped (its files made room for q0f16)"
    fi
    if [ -n "$q4" ] && [ "$TUNE" = 1 ] && [ "$have_gpu" = 1 ] && in_time "tuned q4f16_1"; then
        say "7B q4f16_1: --tune on for sm_$gpu_arch"
        t0=$(date +%s)
        # mlcb's debug log: every candidate's time goes to the build log.
        if RUST_LOG=mlcb=debug build_7b q4f16_1 cuda q4f16_1-tuned "${arch_flag[@]}" --tune on > /dev/null; then
            tune_s=$(( $(date +%s) - t0 ))
            tuned=$(python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))["tuned"]))' "$q4/build-manifest.json" 2>/dev/null || echo null)
            say "tuned build took ${tune_s}s (manifest tuned: $tuned); the matmuls' candidates (decode GEMVs; prefill GEMMs' warp tilings, 16 + 512 tokens):"
            grep -E 'tune (decode|prefill):(matmul|logits)' "$logs/build-7b-q4f16_1-tuned.txt" | sed -E 's/^.*tune (decode|prefill)/  \1/' \
                | head -110 | tee -a "$summary" >&2
            # Candidates whose results were not the default's on this GPU (each an mlcb bug in
            # a non-default kernel: the tuner did not use it).
            refused=$(grep -c 'computes other results' "$logs/build-7b-q4f16_1-tuned.txt")
            if [ "$refused" != 0 ]; then
                grep 'computes other results' "$logs/build-7b-q4f16_1-tuned.txt" | head -20 | tee -a "$summary" >&2
                fail "7B q4f16_1 tuning: $refused candidate configurations computed other results than the defaults"
            fi
            record "{\"check\":\"tune7b_refused\",\"count\":$refused}"
            bench_cuda q4f16_1 "$q4" q4f16_1-tuned "$tuned"
            if [ "$PROFILE" = 1 ] && in_time "tuned kernel profile"; then
                # Beside the untuned profile: which kernels the tuned choices made faster or slower.
                MLCB_CUDA_PROFILE=1 run_t "$mlcb" bench "$q4" --prompt-len "$PREFILL_LEN" --gen-len 32 --device cuda \
                    > "$logs/profile-7b-q4f16_1-tuned.json" 2> "$logs/profile-7b-q4f16_1-tuned.txt"
                say "7B q4f16_1 tuned kernel profile (exit $?; decode rows):"
                sed -n '/^  decode:/,/^  prefill:/p' "$logs/profile-7b-q4f16_1-tuned.txt" | grep -v '^  prefill:' \
                    | head -12 | tee -a "$summary" >&2
            fi
        else
            fail "7B q4f16_1: tuned build failed (logs/build-7b-q4f16_1-tuned.txt: $(tail -1 "$logs/build-7b-q4f16_1-tuned.txt"))"
        fi
    fi
    # Issue 4's GPU figure: the same model through wgpu on the NVIDIA Vulkan driver (f16 kernels).
    if [ "$VULKAN7B" = 1 ] && in_time "vulkan q4f16_1"; then
        say "7B q4f16_1 vulkan: building"
        if vk=$(build_7b q4f16_1 vulkan vk-q4f16_1); then
            vk_env=()
            [ -n "${VK_LOADER_DIR:-}" ] && vk_env+=("LD_LIBRARY_PATH=$VK_LOADER_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}")
            icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
            [ -f "$icd" ] && [ -z "${VK_DRIVER_FILES:-}" ] && vk_env+=("VK_DRIVER_FILES=$icd")
            read -r rc1 rc2 dec pre <<< "$(bench_env=("${vk_env[@]}"); bench_pair "$vk" 7b-vk --device wgpu --adapter "$VK_ADAPTER")"
            adapter=$(grep -h -m1 'wgpu adapter' "$logs/bench-7b-vk-decode.txt" 2>/dev/null)
            record "{\"check\":\"vulkan7b\",\"scheme\":\"q4f16_1\",\"exit\":[$rc1,$rc2],\"decode_tok_s\":$dec,\"prefill_tok_s\":$pre,\"adapter\":$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$adapter")}"
            if [ "$rc1" = 0 ]; then
                say "7B q4f16_1 vulkan (wgpu): decode $dec tok/s, prefill $pre tok/s ($adapter)"
            else
                say "7B vulkan: no run (exit $rc1/$rc2: $(tail -1 "$logs/bench-7b-vk-decode.txt")); not gated"
            fi
            rm -rf "$vk"
        else
            say "7B vulkan: build failed (logs/build-7b-vk-q4f16_1.txt; not gated)"
        fi
    fi
fi

say "done in $(elapsed); $failures failed gated checks"
[ "$failures" = 0 ]
