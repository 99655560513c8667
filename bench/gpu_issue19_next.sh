#!/usr/bin/env bash
# The next H200 call for issue 19 (written in session 8, not run yet): why the streamed 4B run under a 4 GiB cap runs
# out of memory after a few hundred steps, and where 9B under 8 GiB runs out (rows now record oom_at_step, the
# allocator's message and the memory trace). Everything comes back as one tarball (the run tool returns at most 8
# files). The `run` tool's carry is [".comfy", ".whl"]; about 9 minutes.
set -u
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
mkdir -p /tmp/pk && ln -sfn "$PWD" /tmp/pk/klein_lora_studio
export PYTHONPATH=/tmp/site:/tmp/pk:$PWD/.comfy COMFYUI_PATH=$PWD/.comfy
R=/tmp/issue19 && mkdir -p $R
timeout 120 python3 bench/bench_lowvram.py --models klein9b --modes fp8+low_vram+offload --cap klein9b:8 --steps 6 \
    --warm 2 --tag 9b_oom > $R/9b_log.txt 2>&1
timeout 200 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 bench/bench_lowvram.py --models klein4b \
    --modes fp8+low_vram+offload --cap klein4b:4 --steps 500 --warm 10 --sample-every 25 --tag soak_expandable \
    > $R/soak_expandable_log.txt 2>&1
timeout 200 python3 bench/bench_lowvram.py --models klein4b --modes fp8+low_vram+offload --cap klein4b:4 --steps 500 \
    --warm 10 --sample-every 25 --tag soak_default > $R/soak_default_log.txt 2>&1
cp "$OUT"/bench_lowvram_*.json $R/ 2>/dev/null
tar czf "$OUT/issue19.tgz" -C /tmp issue19 && rm -f "$OUT"/bench_lowvram_*.json
grep -h '"mode"' $R/*_log.txt | cut -c1-400
