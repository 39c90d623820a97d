#!/usr/bin/env bash
# Every pending GPU measurement of docs/PERFORMANCE.md in one run (< 8 minutes on one H100/H200), JSON into $OUT.
#
# From a session with a device machine (see docs/PERFORMANCE.md, "GPU session"):
#   run(command="bash benchmarks/gpu_session.sh", carry=["productinaction", ".whl"], timeout_s=560)
# .whl holds the wheels the device image lacks (diffusers, peft version, pydantic-settings, grpcio extras…),
# downloaded here with the command in docs/PERFORMANCE.md; productinaction/ holds the generated gRPC stubs.
# Each step has its own time limit, so one slow step cannot eat the others; the plots come last.
set -u
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
PY=${PYTHON:-python3}
started=$(date +%s)
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s, $(($(date +%s) - started))s in)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: exit $? after $(($(date +%s) - started))s"
  tail -n 3 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# Fail fast (seconds, not minutes) when a package or the stubs did not travel.
"$PY" -c "import diffusers, peft, torch, services.generator.app; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'peft', peft.__version__)" || exit 1

# 1. The generator: service overhead (8 images via gRPC vs direct, compiled, batch 4), eager against compiled
#    (reduce-overhead) with a product LoRA at batch 1 and 4, switch cost and recompilations, each switch on/off
#    while the budget lasts, batched vs single renders, and a restart from the compile cache.
step generator 420 "$PY" -m benchmarks.generator --fullsize --device cuda:0 \
  --skip simulated_devices product_switching first_image_and_batching components \
  --warm-shapes 512x512x4 --batches 1,4 --budget-s 200 --repeats 3 \
  --variants off reduce-overhead off+channels_last off+bf16 off+nosdpa off+fuse_qkv default \
  reduce-overhead+vae max-autotune-no-cudagraphs \
  --out "$OUT/generator-cuda.json"

# 2. The upscaler: fp16 (the default on CUDA) against bf16, channels_last and compile, 512² in tiles of 256.
step upscaler 100 "$PY" -m benchmarks.upscaler --devices cuda:0 --sizes 512 --tiles 256:32 --timeout 90 \
  --variants default channels_last bf16 compile \
  --out "$OUT/upscaler-cuda.json"

# 3. The plot: seconds per image against batch size, eager against compiled.
step plots 60 "$PY" -m benchmarks.plots "$OUT" "$OUT"
echo "done in $(($(date +%s) - started))s"
