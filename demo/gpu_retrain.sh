#!/usr/bin/env bash
# The demo model trained again on one GPU, in one device call (< 9 minutes on one H200): the shape-keeping VAE
# (`--vae-recipe sharp`), the UNet and text encoder on its latents, then the product adapters (two training seeds
# each), the night style and the backdrop on it. Results come back as tarballs in $OUT (docs/DEMO_MODEL.md).
#
# From a session with a device machine (Python 3.12 there, no diffusers, no pydantic, no open-clip-torch):
#   python -c "from demo.tokenizer import write_clip_tokenizer_files as w; w('.cache/gpu/work/tokenizer', 16)"
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 peft==0.21.2 \
#     pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
#     googleapis-common-protos==1.76.0 grpcio-status==1.85.3 importlib_metadata
#   run(command="bash demo/gpu_retrain.sh", carry=[".whl", ".cache/gpu/work/tokenizer"], timeout_s=585)
# At stop 29 (one H200) the VAE and UNet took 440 s and the adapters did not finish in the 100 s left: they were
# trained on the CPU afterwards (docs/DEMO_MODEL.md); lower VAE_MIN/UNET_MIN to give them time.
# Each stage has its own time limit and the base model is packed before the adapters start, so a slow stage
# cannot cost the earlier ones. On a machine without CUDA it runs the same stages on the CPU (a smoke test with
# SMOKE=1: minutes, meaningless weights).
set -u
OUT=${OUT:-.cache/gpu/out-files}
W=.cache/gpu
mkdir -p "$OUT" "$W/logs"
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error DIFFUSERS_VERBOSITY=error HF_HUB_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
PY=${PYTHON:-python3}
started=$(date +%s)
elapsed() { echo $(($(date +%s) - started)); }
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $W/logs/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s, $(elapsed)s in)"
  timeout "$limit" "$@" >"$W/logs/$name.log" 2>&1
  echo "== $name: exit $? after $(elapsed)s"
  grep -v "shard\|torchvision" "$W/logs/$name.log" | tail -n 4
}
pack() {  # pack NAME PATHS...: a tarball into $OUT (the device tool brings back at most 8 files)
  local name=$1
  shift
  tar -czf "$OUT/$name.tar.gz" --exclude='*/checkpoint*' --exclude='*.pt' --exclude='*.pkl' "$@" 2>/dev/null
  ls -la "$OUT/$name.tar.gz"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
DEV=$("$PY" -c "import diffusers, peft, torch, transformers, pydantic, demo.make_products, services.generator.pipeline; \
print('cuda' if torch.cuda.is_available() else 'cpu')") || exit 1
"$PY" -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'device', '$DEV')" | tee -a "$OUT/gpu.txt"

if [ "${SMOKE:-0}" = 1 ]; then
  N=600 VAE_MIN=0.05 UNET_MIN=0.3 STEPS=30 STYLE=20 BATCH=8 LIMIT_VAE=200 LIMIT_UNET=200 END=900
else
  # STEPS empty: each product its own steps (demo.make_products.PRODUCT_RECIPE)
  N=40000 VAE_MIN=2.6 UNET_MIN=3.3 STEPS= STYLE=1200 BATCH=256 LIMIT_VAE=230 LIMIT_UNET=250 END=540
fi

# 1. The shape-keeping VAE: 20,000 world scenes and as many clutter scenes, batch 64 (32 on the CPU recipe).
step vae "$LIMIT_VAE" "$PY" -m demo.train_sd --stage vae --vae-recipe sharp --device "$DEV" --work "$W/work" \
  --n-images "$N" --vae-images "$N" --sharp-batch 64 --vae-steps 1000000 --vae-minutes "$VAE_MIN" --threads 8
# 2. UNet and text encoder from scratch on its latents; the cosine fitted to the time, best EMA by sampled accuracy.
step unet "$LIMIT_UNET" "$PY" -m demo.train_sd --stage unet --device "$DEV" --work "$W/work" --out "$W/base" \
  --n-images "$N" --batch "$BATCH" --steps 1000000 --fit-to-time --max-minutes "$UNET_MIN" --lr 1.5e-3 \
  --warmup 200 --eval-every 1000 --threads 8
cp -r models/demo-sd/judge "$W/base/" 2>/dev/null
pack base -C "$W" base/model_index.json base/scheduler base/text_encoder base/unet base/vae base/training.json \
  work/vae/ceiling.json

# 3. On it, in parallel (the GPU trains, the CPU validates): each product with two training seeds, the style and
#    the backdrop, with what is left of the time.
left=$((END - $(elapsed)))
run_products() {  # NAME ARGS...
  local name=$1
  shift
  timeout "$left" "$PY" -m demo.make_products --base "$W/base" --work-root "$W/$name/work" --threads 2 \
    ${STEPS:+--steps "$STEPS"} --style-steps "$STYLE" --backdrop-steps $((2 * STYLE)) \
    --train-arg=--device="$DEV" --train-arg=--gradient-checkpointing=off "$@" >"$W/logs/$name.log" 2>&1
  echo "== $name: exit $? after $(elapsed)s"
}
if [ "$left" -gt 60 ] && [ -f "$W/base/unet/diffusion_pytorch_model.safetensors" ]; then
  echo "== adapters ($left s left)"
  for pid in split-star striped-mug; do
    for seed in 0 1; do
      # Validated afterwards, off the device: --no-select-scale keeps the GPU's minutes for training.
      run_products "$pid-seed$seed" --only "$pid" --train-seeds "$seed" --products-dir "$W/products-seed$seed" \
        --no-select-scale &
    done
  done
  run_products night --only night --adapters-dir "$W/adapters" &
  run_products empty --only empty --adapters-dir "$W/adapters" &
  wait
  pack adapters -C "$W" $(cd "$W" && ls -d products-seed* adapters 2>/dev/null)
fi
pack logs -C "$W" logs
echo "done in $(elapsed)s"
