#!/bin/bash
# issue 28, session 10, call 3 (same machine as call 2): the engine chain and the LAN without MPS, then with MPS, twice
set -o pipefail
T0=$(date +%s); step() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/progress.txt; }
export PYTHONPATH=/tmp/site:/tmp/src/llama_cpp_python-0.3.36:$PWD PATH=/tmp/site/bin:$PATH NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
R=/tmp/r3; mkdir -p $R
B="python3 tests/bench/gpu_pipeline.py --lib /tmp/cuda --model /tmp/l8b.gguf --gpus 0 --stages 2 --stage-output graph"
P="--part pipeline --seqs 1,64 --steps 48 --micro-batches 1,2 --codec f16 --ttft-prompt 512"
L="--part gateway --conc 1,64 --ignore-eos --micro-batches A --ttft-prompt 256 --codec f16 --delay-ms 0.5 --rate-mbit 1000 --baseline layer-split-bs"
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
for round in 1 2; do
  timeout 60 $B $P --deadline 55 --json $R/pipe_nomps$round.json > $R/pipe_nomps$round.log 2>&1; step "pipeline, no MPS $round"
  timeout 60 $B $L --deadline 55 --json $R/lan_nomps$round.json > $R/lan_nomps$round.log 2>&1; step "lan, no MPS $round"
  nvidia-cuda-mps-control -d; step "mps on"
  timeout 60 $B $P --deadline 55 --json $R/pipe_mps$round.json > $R/pipe_mps$round.log 2>&1; step "pipeline, MPS $round"
  timeout 60 $B $L --deadline 55 --json $R/lan_mps$round.json > $R/lan_mps$round.log 2>&1; step "lan, MPS $round"
  echo quit | nvidia-cuda-mps-control; sleep 1; step "mps off"
done
tar czf $OUT/results3.tgz -C /tmp r3
for f in $R/pipe_*.log; do echo "== $f"; grep -v "^\[" $f | grep -E "^(whole|2x)" | head -6; done
for f in $R/lan_*.log; do echo "== $f"; grep -E "^ +(1|64) +[0-9.]+x" $f | head -2; grep -E "concurrent:" $f | head -4; done
