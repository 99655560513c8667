#!/usr/bin/env bash
# One H200 call (session 8): the micro taef2 taught the pastel style (tune_vae.py), then phase 5 of the micro
# diffusion model from the committed weights at 256 px (every 4th step 128 px) with caption noise, evaluated at
# both sizes and with the untrained style trigger. Beside it, issue 19's streamed-block GPU tests (correctness only:
# nothing here is timed against anything). Outputs in $OUT; the `run` tool's carry is [".comfy", ".whl"].
set -u
source bench/gpu_env.sh
BUDGET=${BUDGET:-360}
(timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_block_stream.py -k cuda > "$OUT/block_stream_gpu.txt" 2>&1) &
python3 -m klein_lora_studio.microworld.tune_vae --out "$OUT/tv" --steps 800 --batch 16 > "$OUT/tune_vae_log.txt" 2>&1
tail -2 "$OUT/tune_vae_log.txt"
python3 -m klein_lora_studio.microworld.pretrain --out "$OUT/run5" --resume "$OUT/tv" --px 256 --mix-px 128 \
    --dit-steps 6000 --dit-batch 128 --dit-lr 5e-4 --dit-warmup 100 --time-budget-s "$BUDGET" --probe-heldout 0 \
    --caption-noise 0.25 --noise-captions 3000 --eval-prompts 144 --workers 14 > "$OUT/pretrain5_log.txt" 2>&1
grep -E "budget|eval" "$OUT/pretrain5_log.txt" | tail -5
rm -rf "$OUT/run5/comfy" "$OUT/tv/klein-micro.safetensors"
wait; tail -3 "$OUT/block_stream_gpu.txt"
