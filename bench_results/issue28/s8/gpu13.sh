#!/bin/bash
# issue 28, session 8, call 8: the final state (event-loop steps with the backlog rule, the relay's lead): LAN link
# beside llama-server -bs, twice
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
" > $R/models.log 2>&1
step "model written"
B="python3 tests/bench/gpu_pipeline.py --lib /tmp/cuda --model /tmp/l8b.gguf --gpus 0 --stages 2 --stage-output graph --part gateway --conc 1,64 --ignore-eos --micro-batches A --codec f16 --delay-ms 0.5 --rate-mbit 1000 --ttft-prompt 256"
timeout 90 $B --baseline layer-split-bs --deadline 85 --json $R/lan1.json > $R/lan1.log 2>&1
step "lan 1 done"
timeout 60 $B --deadline 55 --json $R/lan2.json > $R/lan2.log 2>&1
step "lan 2 done"
tar czf $OUT/results.tgz -C /tmp r
for f in $R/lan1.log $R/lan2.log; do echo "== $f"; grep -E "concurrent:" $f | head -4; done
grep -v "^\[" $R/lan1.log | grep -E "^ +[0-9]|x " | head -6
