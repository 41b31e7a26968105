#!/usr/bin/env bash
# Runtime benchmark (not a test): prefill and decode tokens/s and peak RSS of SmolLM2-135M on the
# CPU, side by side:
#   - mlcb at q4f16_1, q8f16_1 and q0f16 (artifacts built from the GGUF with `mlcb build`,
#     measured with `mlcb bench --json`, each run a fresh process under /usr/bin/time -v);
#   - llama.cpp on the same GGUF through llama-cpp-python (compiled from source by pip into a venv
#     under WORK_DIR on the first run; later runs reuse it);
#   - Hugging Face transformers on the CPU, only if torch and transformers already import.
# Every engine gets the same synthetic prompt length, generation length and thread count: one
# prefill call of PROMPT_LEN tokens, then GEN_LEN greedy single-token decode calls. Each figure is
# the median of RUNS runs. Decode is also measured at 1 thread.
#
#   benches/runtime_bench.sh [WORK_DIR]        (default WORK_DIR: /tmp/mlcb-runtime-bench)
#
# Environment knobs (defaults in brackets):
#   PROMPT_LEN [64]  GEN_LEN [128]  THREADS [2]  RUNS [3]
#   SCHEMES ["q4f16_1 q8f16_1 q0f16"]   MODEL [dist/models/SmolLM2-135M-Instruct/...Q4_1.gguf]
#   SINGLE_THREAD [1]   0 skips the 1-thread pass
#   LLAMA_CPP [1]       0 skips llama.cpp (and its install)
#   LLAMA_CPP_PYTHON_SPEC [llama-cpp-python]  pip requirement to install
#   OMP_WAIT_POLICY [passive]  for llama.cpp's OpenMP threads (active spinning collapses on busy cores)
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"

PROMPT_LEN="${PROMPT_LEN:-64}"
GEN_LEN="${GEN_LEN:-128}"
THREADS="${THREADS:-2}"
RUNS="${RUNS:-3}"
SCHEMES="${SCHEMES:-q4f16_1 q8f16_1 q0f16}"
SINGLE_THREAD="${SINGLE_THREAD:-1}"
LLAMA_CPP="${LLAMA_CPP:-1}"
LLAMA_CPP_PYTHON_SPEC="${LLAMA_CPP_PYTHON_SPEC:-llama-cpp-python}"
MODEL="${MODEL:-$repo/dist/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf}"
work="${1:-/tmp/mlcb-runtime-bench}"

die() { echo "runtime_bench: error: $*" >&2; exit "${2:-1}"; }
say() { echo "== $*" >&2; }

for v in PROMPT_LEN GEN_LEN THREADS RUNS; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'" 2
done
[ -x /usr/bin/time ] || die "/usr/bin/time is missing (Debian/Ubuntu: apt-get install time)" 3
command -v python3 >/dev/null || die "python3 is needed (for the llama.cpp runner and the table)" 3
[ -f "$MODEL" ] || die "model not found: $MODEL (run scripts/fetch-smollm2.sh, or set MODEL=)" 3

mkdir -p "$work"
work="$(cd "$work" && pwd)"
results="$work/results.jsonl"
: > "$results"
threads_list="$THREADS"
if [ "$SINGLE_THREAD" = 1 ] && [ "$THREADS" != 1 ]; then threads_list="$THREADS 1"; fi

# --- mlcb -------------------------------------------------------------------------------------
if command -v cargo >/dev/null; then
    say "cargo build --release --bin mlcb"
    cargo build --release --quiet --bin mlcb || die "cargo build --release failed" 3
fi
mlcb="$repo/target/release/mlcb"
[ -x "$mlcb" ] || die "$mlcb is missing and cargo is not on PATH" 3

# Appends one result line from an engine's JSON (stdin file $1) and /usr/bin/time -v output ($2).
record() {
    python3 - "$@" >> "$results" <<'PY'
import json, sys
out, timef, engine, scheme = sys.argv[1:5]
r = json.load(open(out))
max_rss_kb = None
for line in open(timef):
    if "Maximum resident set size" in line:
        max_rss_kb = int(line.split()[-1])
print(json.dumps({
    "engine": engine, "scheme": scheme, "threads": r["threads"],
    "prefill_tok_s": r["prefill_tok_s"], "decode_tok_s": r["decode_tok_s"],
    "self_peak_rss_bytes": r.get("peak_rss_bytes"),
    "process_peak_rss_bytes": None if max_rss_kb is None else max_rss_kb * 1024,
    "baseline_rss_bytes": r.get("baseline_rss_bytes"),
}))
PY
}

declare -A artifact
for q in $SCHEMES; do
    say "mlcb build $q"
    "$mlcb" build --model "$MODEL" --quantization "$q" --artifact-path "$work/dist" \
        --cache-dir "$work/cache" --json > "$work/build-$q.json" \
        || die "mlcb build --quantization $q failed (see the messages above)"
    artifact[$q]="$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['artifacts'][0])" "$work/build-$q.json")"
done

for t in $threads_list; do
    for q in $SCHEMES; do
        for i in $(seq 1 "$RUNS"); do
            say "mlcb bench $q threads=$t run $i/$RUNS"
            /usr/bin/time -v -o "$work/time.txt" "$mlcb" bench "${artifact[$q]}" \
                --prompt-len "$PROMPT_LEN" --gen-len "$GEN_LEN" --threads "$t" --json \
                > "$work/run.json" || die "mlcb bench ${artifact[$q]} failed"
            record "$work/run.json" "$work/time.txt" mlcb "$q"
        done
    done
done

# --- llama.cpp (llama-cpp-python) --------------------------------------------------------------
venv="$work/venv"
llama_ok=0
if [ "$LLAMA_CPP" = 1 ]; then
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import llama_cpp, numpy" 2>/dev/null; then
        llama_ok=1
    else
        say "installing $LLAMA_CPP_PYTHON_SPEC into $venv (compiles llama.cpp; several minutes on 2 cores)"
        t0=$(date +%s)
        if { [ -x "$venv/bin/python" ] || python3 -m venv "$venv"; } \
            && CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
                "$venv/bin/pip" install "$LLAMA_CPP_PYTHON_SPEC" numpy > "$work/llama-install.log" 2>&1 \
            && "$venv/bin/python" -c "import llama_cpp, numpy"; then
            llama_ok=1
            say "llama-cpp-python installed in $(( $(date +%s) - t0 )) s"
        else
            echo "runtime_bench: llama-cpp-python could not be installed (log: $work/llama-install.log);" \
                "llama.cpp is left out of the table" >&2
            tail -n 15 "$work/llama-install.log" >&2 || true
        fi
    fi
fi

# The runner: one fresh process per run, like `mlcb bench`. It uses llama.cpp's C API through
# llama_cpp's ctypes bindings (the high-level Llama.eval no longer keeps logits): one llama_decode
# of the prompt, then one per greedy token (argmax of the last row), timed with perf_counter. The
# prompt is mlcb's synthetic formula (src/cli/bench.rs). argv[5] = use_extra_bufts (1/0): llama.cpp's
# extra CPU weight buffers (AMX, repacking); on VMs that advertise AMX without letting a process use
# it, AMX matmul segfaults, so the script probes once and turns them off if needed.
cat > "$work/llama_cpp_runner.py" <<'PY'
import ctypes, json, sys, time

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None

import numpy as np
import llama_cpp as L

model, prompt_len, gen_len, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
extra_bufts = sys.argv[5] == "1"
baseline = rss("VmRSS")  # the Python interpreter + numpy + llama_cpp, before the model loads
quiet = L.llama_log_callback(lambda level, text, user: None)  # kept alive: C holds the pointer
L.llama_log_set(quiet, ctypes.c_void_p())
L.llama_backend_init()
mp = L.llama_model_default_params()
mp.n_gpu_layers = 0
mp.use_extra_bufts = extra_bufts
m = L.llama_model_load_from_file(model.encode(), mp)
if not m:
    sys.exit(f"llama.cpp could not load {model}")
cp = L.llama_context_default_params()
cp.n_ctx = ((prompt_len + gen_len + 1 + 255) // 256) * 256
cp.n_batch = cp.n_ubatch = max(512, prompt_len)  # the prompt is one decode call, as in mlcb
cp.n_threads = cp.n_threads_batch = threads
ctx = L.llama_init_from_model(m, cp)
if not ctx:
    sys.exit("llama.cpp could not create a context")
vocab_p = L.llama_model_get_vocab(m)
vocab = L.llama_vocab_n_tokens(vocab_p)
stops = {L.llama_vocab_eos(vocab_p), L.llama_vocab_bos(vocab_p)}
prompt = []
for i in range(prompt_len):
    tok = (i * 7919 + 13) % vocab
    while tok in stops:
        tok = (tok + 1) % vocab
    prompt.append(tok)

def decode(tokens):
    arr = (L.llama_token * len(tokens))(*tokens)
    rc = L.llama_decode(ctx, L.llama_batch_get_one(arr, len(tokens)))
    if rc != 0:
        sys.exit(f"llama_decode returned {rc}")
    return np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(vocab,))

t = time.perf_counter()
logits = decode(prompt)
prefill_s = time.perf_counter() - t
t = time.perf_counter()
for _ in range(gen_len):
    logits = decode([int(np.argmax(logits))])
decode_s = time.perf_counter() - t
print(json.dumps({
    "threads": threads, "prompt_len": prompt_len, "gen_len": gen_len,
    "prefill_s": prefill_s, "decode_s": decode_s,
    "prefill_tok_s": prompt_len / prefill_s, "decode_tok_s": gen_len / decode_s,
    "peak_rss_bytes": rss("VmHWM"), "baseline_rss_bytes": baseline,
    "extra_bufts": extra_bufts,
}))
L.llama_free(ctx)
L.llama_model_free(m)
PY

# llama.cpp's OpenMP workers spin-wait by default; on a 2-core machine shared with other jobs that
# makes 2 threads ~10x slower than 1. Passive waiting (what rayon does after a short spin) unless
# the caller chose otherwise.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-passive}"
if [ "$llama_ok" = 1 ]; then
    llama_ver="$("$venv/bin/python" -c "import llama_cpp; print(llama_cpp.__version__)")"
    extra=1
    if ! "$venv/bin/python" "$work/llama_cpp_runner.py" "$MODEL" "$PROMPT_LEN" 2 "$THREADS" 1 \
        > /dev/null 2> "$work/llama-probe.log"; then
        if "$venv/bin/python" "$work/llama_cpp_runner.py" "$MODEL" "$PROMPT_LEN" 2 "$THREADS" 0 \
            > /dev/null 2>> "$work/llama-probe.log"; then
            extra=0
            echo "llama.cpp: crashed with its extra CPU buffer types (AMX/repack; see" \
                "$work/llama-probe.log); measuring with use_extra_bufts=false" >&2
        else
            echo "llama.cpp: the runner fails even without extra buffer types; left out" \
                "(log: $work/llama-probe.log)" >&2
            llama_ok=0
        fi
    fi
fi
if [ "$llama_ok" = 1 ]; then
    for t in $threads_list; do
        for i in $(seq 1 "$RUNS"); do
            say "llama.cpp (llama-cpp-python $llama_ver, extra_bufts=$extra) threads=$t run $i/$RUNS"
            /usr/bin/time -v -o "$work/time.txt" "$venv/bin/python" "$work/llama_cpp_runner.py" \
                "$MODEL" "$PROMPT_LEN" "$GEN_LEN" "$t" "$extra" > "$work/run.json" \
                || die "the llama.cpp runner failed ($work/llama_cpp_runner.py)"
            record "$work/run.json" "$work/time.txt" llama.cpp "gguf Q4_1"
        done
    done
fi

# --- transformers (only if already installed; never installed here) -----------------------------
hf_python=""
for py in python3 "$venv/bin/python"; do
    if [ -x "$(command -v "$py" 2>/dev/null)" ] && "$py" -c "import torch, transformers, gguf" 2>/dev/null; then
        hf_python="$py"; break
    fi
done
if [ -z "$hf_python" ]; then
    echo "transformers: unavailable (torch, transformers and gguf do not all import; not installed by this script)" >&2
else
    cat > "$work/hf_runner.py" <<'PY'
import json, os, sys, time
import torch
from transformers import AutoModelForCausalLM

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None

model, prompt_len, gen_len, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
baseline = rss("VmRSS")
m = AutoModelForCausalLM.from_pretrained(os.path.dirname(model), gguf_file=os.path.basename(model),
                                         torch_dtype=torch.float32).eval()
vocab = m.config.vocab_size
stops = {m.config.eos_token_id, m.config.bos_token_id}
prompt = []
for i in range(prompt_len):
    tok = (i * 7919 + 13) % vocab
    while tok in stops:
        tok = (tok + 1) % vocab
    prompt.append(tok)
with torch.inference_mode():
    t = time.perf_counter()
    out = m(torch.tensor([prompt]), use_cache=True)
    prefill_s = time.perf_counter() - t
    past, logits = out.past_key_values, out.logits[0, -1]
    t = time.perf_counter()
    for _ in range(gen_len):
        nxt = int(torch.argmax(logits))
        out = m(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
    decode_s = time.perf_counter() - t
print(json.dumps({
    "threads": threads, "prefill_tok_s": prompt_len / prefill_s, "decode_tok_s": gen_len / decode_s,
    "peak_rss_bytes": rss("VmHWM"), "baseline_rss_bytes": baseline,
}))
PY
    for t in $threads_list; do
        for i in $(seq 1 "$RUNS"); do
            say "transformers ($hf_python) threads=$t run $i/$RUNS"
            if /usr/bin/time -v -o "$work/time.txt" "$hf_python" "$work/hf_runner.py" \
                "$MODEL" "$PROMPT_LEN" "$GEN_LEN" "$t" > "$work/run.json"; then
                record "$work/run.json" "$work/time.txt" transformers "fp32 (from GGUF)"
            else
                echo "transformers: the run failed; left out of the table" >&2
                break 2
            fi
        done
    done
fi

# --- table -------------------------------------------------------------------------------------
python3 - "$results" "$PROMPT_LEN" "$GEN_LEN" "$RUNS" "$threads_list" "$SCHEMES" <<'PY'
import json, statistics, sys
path, P, G, runs, threads_list, schemes = sys.argv[1:7]
order = {"mlcb": 0, "llama.cpp": 1, "transformers": 2}
scheme_order = schemes.split()
rows = [json.loads(l) for l in open(path) if l.strip()]
groups = {}
for r in rows:
    groups.setdefault((r["engine"], r["scheme"], r["threads"]), []).append(r)

def med(rs, key):
    vals = [r[key] for r in rs if r.get(key) is not None]
    return statistics.median(vals) if vals else None

def mib(b):
    return "-" if b is None else f"{b / 2**20:.1f}"

def ratio(a, b):
    return "-" if a is None or not b else f"{a / b:.2f}"

print()
import os
print(f"SmolLM2-135M-Instruct, prompt {P} tokens (one prefill call), {G} greedy decode steps, "
      f"median of {runs} runs; llama.cpp OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
for t in [int(x) for x in threads_list.split()]:
    keys = [k for k in groups if k[2] == t]
    if not keys:
        continue
    ref = groups.get(("llama.cpp", "gguf Q4_1", t))
    ref_pre = med(ref, "prefill_tok_s") if ref else None
    ref_dec = med(ref, "decode_tok_s") if ref else None
    print()
    print(f"threads = {t}")
    head = (f"{'engine':<13}{'scheme':<18}{'prefill tok/s':>14}{'decode tok/s':>13}"
            f"{'RSS MiB':>9}{'self MiB':>10}{'decode/llama':>14}{'prefill/llama':>15}")
    print(head)
    print("-" * len(head))
    for k in sorted(keys, key=lambda k: (order.get(k[0], 9), scheme_order.index(k[1]) if k[1] in scheme_order else 0)):
        rs = groups[k]
        pre, dec = med(rs, "prefill_tok_s"), med(rs, "decode_tok_s")
        is_mlcb = k[0] == "mlcb"
        print(f"{k[0]:<13}{k[1]:<18}{pre:>14.1f}{dec:>13.2f}"
              f"{mib(med(rs, 'process_peak_rss_bytes')):>9}{mib(med(rs, 'self_peak_rss_bytes')):>10}"
              f"{ratio(dec, ref_dec) if is_mlcb else '':>14}{ratio(pre, ref_pre) if is_mlcb else '':>15}")
base = [r["baseline_rss_bytes"] for r in rows if r.get("baseline_rss_bytes")]
print()
print("RSS MiB: whole process, /usr/bin/time -v 'Maximum resident set size'. self MiB: the process's")
print("own VmHWM at the end of the run (mlcb bench's peak_rss_bytes).")
if base:
    print(f"The Python engines' RSS includes the interpreter and imports: ~{mib(statistics.median(base))} MiB "
          "before the model loads.")
if not any(k[0] == "llama.cpp" for k in groups):
    print("llama.cpp: not measured (see the messages above); ratios are '-'.")
PY
echo
echo "raw results: $results"
