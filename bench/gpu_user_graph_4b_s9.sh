#!/usr/bin/env bash
# The user graph, klein 4B within 4 GiB only (what the session's last 270 device seconds allow): 10 steps, the suite
# sampled at the base and every 5 steps (6 sampling steps). carry [".comfy", ".whl"]; ~4.5 minutes.
set -u
source bench/gpu_env.sh
R=/tmp/graph && mkdir -p $R
timeout 200 python3 bench/bench_user_graph.py --res 1024 --offload auto --steps 10 --every 5 --sample-steps 6 \
    --model klein4b --cap-gib 4 --tag i19_4b > $R/graph_4b_log.txt 2>&1
cp "$OUT"/bench_user_graph_*.json $R/ 2>/dev/null
tar czf "$OUT/graph.tgz" -C /tmp graph && rm -f "$OUT"/bench_user_graph_*.json
grep -h '^ROW' $R/*_log.txt | cut -c1-1500
tail -n 6 $R/graph_4b_log.txt | cut -c1-400
