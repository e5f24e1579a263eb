#!/usr/bin/env bash
# The GPU check of issue 14: one command, under 10 minutes on one H100 / H200, nothing from a
# package registry. Stages (benchmarks/gpu/check.py; each has its own time limit, a failing
# stage does not stop the others):
#   env      the device, torch / triton / transformers / peft / bitsandbytes versions
#   kernels  tests/test_lora_triton.py compiled for real on the GPU (the interpreter grid's shapes)
#   engine   lorad's engine on CUDA, bf16 compute, against PEFT on SmolLM2 (tests/test_oracle.py's
#            oracle; NF4 too when bitsandbytes travelled), then a real server's /metrics device
#            memory gauges read back and checked against torch.cuda
#   sweep    the LoRA add-on at Llama-3.1-8B shapes, 1 to 64 distinct adapters at batch 64
#   serving  benchmarks/bench_serving.py at batch 32 on CUDA
# Results: summary.json and summary.md (plus each stage's own files) in $OUT when set, else in
# the folder given with --out.
#
#   bash benchmarks/gpu/run.sh --out /tmp/gpu-check          # on the GPU machine
#   bash benchmarks/gpu/run.sh --dry-run --out /tmp/plan      # anywhere: imports, arguments, the plan
#   bash benchmarks/gpu/run.sh --stages kernels,sweep         # a subset
#
# The model and the wheels the GPU image lacks travel as .gpu_payload/ pieces, built here by
# benchmarks/gpu/prepare.sh (its header shows the device calls). Without the payload, the
# stages that need it are skipped with a reason and the others run.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
DRY=0
for arg in "$@"; do [[ "$arg" == "--dry-run" ]] && DRY=1; done

WORK=${LORAD_GPU_WORK:-/tmp/lorad-gpu-check}
mkdir -p "$WORK/shim"
# `import lorad` from this checkout without installing it, in every process of the check
cat > "$WORK/shim/sitecustomize.py" <<PYEOF
import sys
sys.path.insert(0, "$REPO/benchmarks/gpu")
try:
    import lorad_path
    lorad_path.install("$REPO")
finally:
    sys.path.pop(0)
PYEOF
if ! "$PY" -c "import lorad.server" 2>/dev/null; then
  export PYTHONPATH="$WORK/shim${PYTHONPATH:+:$PYTHONPATH}"
fi

if [[ $DRY == 0 && -f .gpu_payload/MANIFEST ]]; then
  missing=$(cd .gpu_payload && sha256sum --quiet -c MANIFEST 2>&1 | grep -o 'payload.tar.[0-9]*' | sort -u | tr '\n' ' ')
  if [[ -z "$missing" ]]; then
    rm -rf "$WORK/payload" && mkdir -p "$WORK/payload" "$WORK/site"
    cat .gpu_payload/payload.tar.* | tar -x -C "$WORK/payload"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        "$WORK"/payload/wheels/*.whl; then
      export LORAD_GPU_PAYLOAD=complete
    else
      export LORAD_GPU_PAYLOAD="the payload's wheels did not install (pip's message above)"
    fi
    export PYTHONPATH="$WORK/site:$WORK/payload${PYTHONPATH:+:$PYTHONPATH}"
  else
    export LORAD_GPU_PAYLOAD="missing pieces: $missing(the machine went cold between the calls?)"
  fi
elif [[ $DRY == 0 ]]; then
  export LORAD_GPU_PAYLOAD="no .gpu_payload/MANIFEST: run benchmarks/gpu/prepare.sh and carry the pieces"
fi
export LORAD_CACHE_DIR=${LORAD_CACHE_DIR:-$WORK/cache}
exec "$PY" benchmarks/gpu/check.py "$@"
