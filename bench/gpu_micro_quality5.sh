#!/usr/bin/env bash
# One H200 call (session 8), after gpu_micro_phase5.sh: the tuned taef2 pair regenerated (the first call's encoder
# did not come back: the `run` tool returns at most 8 files, so everything now comes back as one tarball) and
# installed into microworld/weights beside the phase-5 diffusion model, then the quality benchmark of the style,
# object and character recipes on it, over-trained (10 checkpoints), three processes side by side (nothing here is
# timed against anything). The `run` tool's carry is [".comfy", ".whl"].
set -u
source bench/gpu_env.sh
STEPS=${STEPS:-480} EVERY=${EVERY:-48} PROMPTS=${PROMPTS:-24} LIMIT=${LIMIT:-440}
python3 -m klein_lora_studio.microworld.tune_vae --out /tmp/tv --steps 800 --batch 16 --into microworld/weights \
    > /tmp/tune_vae_log.txt 2>&1
tail -1 /tmp/tune_vae_log.txt
for r in style object character; do
  (timeout "$LIMIT" python3 bench/quality.py --models micro --recipes "$r" --steps "$STEPS" --every "$EVERY" \
      --images 24 --prompts "$PROMPTS" --sample-steps 8 --lr-scale 5 --tag "gpu5_$r" --docs "/tmp/docs_$r" \
      > "/tmp/quality_$r.txt" 2>&1; echo "$r rc $?" >> /tmp/quality_rc.txt) &
done
wait; cat /tmp/quality_rc.txt
tar czf "$OUT/quality5.tgz" microworld/weights/taef2_*.safetensors microworld/weights/manifest.json /tmp/tv/tune_vae.json \
    /tmp/tune_vae_log.txt /tmp/quality_*.txt /tmp/docs_* bench/results/quality_gpu5_* 2>/dev/null
ls -la "$OUT"
