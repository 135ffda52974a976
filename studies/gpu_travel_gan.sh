#!/bin/bash
# The gan lever of `bench travel` with a GAN a GPU can afford: defaults against gan=1000 with the
# shipped GAN preset at 128 px, Derm7pt held out (the source where the 2-core GAN lost most: -0.074),
# on the lossy copy of studies/device_sources.py. Run on an H200 at STEPS=2400 (incomplete) and at
# STEPS=1500 (the comparison; README, "Models that travel").
# Here, once:
#   python studies/device_sources.py ../shared/data .gpu/shared/data
#   printf '/.gpu/\n/.whl/\n' >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl pydantic==2.14.4 pydantic_core==2.50.5 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 lightning-fabric==2.6.6
# (the packages the device image lacks; versions as in .venv). On the device, carrying .gpu and .whl:
#   STEPS=1500 LIMIT=550 bash studies/gpu_travel_gan.sh
# STEPS: measured on an H200 (2026-11-28, STEPS=2400): prepare + the defaults' 1-minute classifier and
# its evaluation 2.7 minutes, the 128 px GAN 8.7 generator steps/s (2,400 steps in 4.6 minutes), and
# generating 2 x 1,000 images + the GAN arm's classifier + its evaluation more than the 1.75 minutes
# that were left, so that run ended without its GAN row. 1,500 steps (2.9 minutes) leaves about 3.5
# minutes for them. The JSON is written after each variant, so a run cut by the time limit keeps the
# defaults row; the watcher below keeps the GAN's stats and sample grid.
ACC=${ACC:-cuda}; STEPS=${STEPS:-1500}; MIN=${MIN:-1}; LIMIT=${LIMIT:-550}; OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if [ -d .whl ] && [ -z "$NOWHL" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TMPDIR=/tmp/t-$$; mkdir -p "$TMPDIR"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null; nproc
python3 -c "import torch, pydantic, lightning_fabric; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1
# the GAN's sample grid and stats leave with $OUT although the bench deletes its folder at the end
( while sleep 5; do
    for d in "$TMPDIR"/melanogan-bench-travel-*/gan-*; do
      case $d in *synthetic*) continue;; esac
      [ -f "$d/stats.jsonl" ] && cp "$d/stats.jsonl" "$OUT/gan-stats.jsonl" 2>/dev/null
      for f in "$d"/samples/*.png; do [ -f "$f" ] && cp "$f" "$OUT/gan-$(basename "$f")" 2>/dev/null; done
      [ -f "$d/run.json" ] && cp "$d/run.json" "$OUT/gan-run.json" 2>/dev/null
    done
  done ) &
W=$!
set -o pipefail
timeout "$LIMIT" python3 -m melanogan.cli bench travel --shared .gpu/shared --minutes "$MIN" --holdout derm7pt \
  --vary "gan=1000+gan_steps=$STEPS+gan_resolution=128+gan_preset=default" --seed 10000 --accelerator "$ACC" \
  --json "$OUT/travel-gpu.json" 2>&1 | tee "$OUT/travel-gpu.log"
echo "rc=$?"
kill $W 2>/dev/null
ls -la "$OUT"
