#!/bin/bash
# issue 28, session 8: the inline step path (stage/runner.py) on an H100, off / on side by side in one call:
# the one-GPU step ratio (pipeline part), the LAN-like link beside llama-server -bs (with py-spy profiles), the WAN link
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
for v in 0 1; do
  MOLINK_INLINE_STEPS=$v timeout 75 $B --part pipeline --seqs 1,64 --steps 64 --codec f16 --deadline 70 --json $R/pipe_i$v.json > $R/pipe_i$v.log 2>&1
  step "pipeline inline=$v done"
done
MOLINK_INLINE_STEPS=1 timeout 130 $B --part gateway --conc 1,64 --ignore-eos --micro-batches A --codec f16 --delay-ms 0.5 --rate-mbit 1000 --baseline layer-split-bs --profile $R/prof --deadline 125 --json $R/lan_i1.json > $R/lan_i1.log 2>&1
step "lan inline=1 done"
MOLINK_INLINE_STEPS=0 timeout 70 $B --part gateway --conc 1,64 --ignore-eos --micro-batches A --codec f16 --delay-ms 0.5 --rate-mbit 1000 --deadline 65 --ttft-prompt 256 --json $R/lan_i0.json > $R/lan_i0.log 2>&1
step "lan inline=0 done"
LEFT=$(( 545 - ($(date +%s) - T0) ))
if [ $LEFT -gt 45 ]; then
MOLINK_INLINE_STEPS=1 timeout $LEFT $B --part gateway --conc 1,64 --ignore-eos --micro-batches A --codec auto --delay-ms 10 --rate-mbit 100 --ttft-prompt 256 --deadline $(( LEFT - 5 )) --json $R/wan_i1.json > $R/wan_i1.log 2>&1
step "wan done"
fi
tar czf $OUT/results.tgz -C /tmp r
grep -h -E "concurrent:|chose|ring:|TTFT|FAILED|vs |ratio|step|round" $R/pipe_i0.log $R/pipe_i1.log $R/lan_i1.log $R/lan_i0.log $R/wan_i1.log 2>/dev/null | grep -v "^\[" | head -90
grep -h "round" $R/pipe_i*.log | head
