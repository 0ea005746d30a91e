#!/bin/bash
# issue 28, session 8, call 4: one KV stream per sequence (kv_unified off) against the unified cache, stages and
# llama-server alike: the one-GPU step ratio and the LAN-like link beside llama-server -bs
set -o pipefail
T0=$(date +%s); step() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/progress.txt; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p /tmp/py && tar xzf .dev/carry5/llama_cpp_py.tgz -C /tmp/py && tar xJf .dev/carry5/cudalib.tar.xz -C /tmp
export PYTHONPATH=/tmp/site:/tmp/py:$PWD PATH=/tmp/site/bin:$PATH NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
R=/tmp/r; mkdir -p $R
nvidia-smi -L | tee -a $OUT/progress.txt
python3 -c "
import sys; sys.path[:0] = ['tests']
from testmodels import write_random_gguf
write_random_gguf('/tmp/l8b.gguf', 'llama', variant='llama3', qtype='q8_0', n_ctx_train=8192, n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256)
" > $R/models.log 2>&1 || { step "MODEL FAILED"; tail -20 $R/models.log; exit 1; }
step "model written"
B="python3 tests/bench/gpu_pipeline.py --lib /tmp/cuda --model /tmp/l8b.gguf --gpus 0 --stages 2 --stage-output graph"
for v in 1 0; do
  MOLINK_KV_UNIFIED=$v timeout 70 $B --part pipeline --seqs 1,64 --steps 64 --micro-batches 1,2 --codec f16 --ttft-prompt 512 --deadline 65 --json $R/pipe_u$v.json > $R/pipe_u$v.log 2>&1
  step "pipeline unified=$v done"
done
for v in 0 1; do
  MOLINK_KV_UNIFIED=$v timeout 110 $B --part gateway --conc 1,64 --ignore-eos --micro-batches A --codec f16 --delay-ms 0.5 --rate-mbit 1000 --baseline layer-split-bs --ttft-prompt 512 --deadline 105 --json $R/lan_u$v.json > $R/lan_u$v.log 2>&1
  step "lan unified=$v done"
done
LEFT=$(( 560 - ($(date +%s) - T0) ))
if [ $LEFT -gt 45 ]; then
MOLINK_KV_UNIFIED=0 timeout $LEFT $B --part gateway --conc 1,64 --ignore-eos --micro-batches A --codec auto --delay-ms 10 --rate-mbit 100 --ttft-prompt 256 --deadline $(( LEFT - 5 )) --json $R/wan_u0.json > $R/wan_u0.log 2>&1
step "wan done"
fi
tar czf $OUT/results.tgz -C /tmp r
for f in $R/pipe_u1.log $R/pipe_u0.log; do echo "== $f"; grep -E "whole engine|round" $f | head -20; done
for f in $R/lan_u0.log $R/lan_u1.log $R/wan_u0.log; do echo "== $f"; grep -v "^\[" $f | grep -E "^ +[0-9]|TTFT|concurrent|x " | head -20; done
