#!/usr/bin/env bash
# Issue 19, session 9, first H200 call: the streamer now copies into two fixed device buffers (no allocation per
# fetch). Its GPU tests, where klein 9B under an 8 GiB cap runs out (oom_at_step, the allocator's message, the memory
# trace), and the 500-step 4B soak under 4 GiB that ran out of memory after ~140 s with per-fetch allocations.
# Everything comes back as one tarball (the run tool returns at most 8 files). carry [".comfy", ".whl"]; ~8 minutes.
set -u
source bench/gpu_env.sh
R=/tmp/issue19 && mkdir -p $R
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_block_stream.py > $R/gpu_tests.txt 2>&1
tail -3 $R/gpu_tests.txt
timeout 130 python3 bench/bench_lowvram.py --models klein9b --modes fp8+low_vram+offload --cap klein9b:8 --steps 6 \
    --warm 2 --tag 9b_s9 > $R/9b_log.txt 2>&1
timeout 230 python3 bench/bench_lowvram.py --models klein4b --modes fp8+low_vram+offload --cap klein4b:4 --steps 500 \
    --warm 10 --sample-every 25 --tag soak500_s9 > $R/soak_log.txt 2>&1
cp "$OUT"/bench_lowvram_*.json $R/ 2>/dev/null
tar czf "$OUT/issue19.tgz" -C /tmp issue19 && rm -f "$OUT"/bench_lowvram_*.json
grep -h '"mode"' $R/*_log.txt | cut -c1-600
