#!/bin/bash
# issue 28, session 9, call 5: the final tree (stages measure their step costs; speculation sizes steps by them) on
# the LAN and WAN links, 1 and 64 concurrent, beside llama-server -bs; the stages' step tables
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
B="python3 tests/bench/gpu_pipeline.py --lib /tmp/cuda --model /tmp/l8b.gguf --gpus 0 --stages 2 --stage-output graph --part gateway --conc 1,64 --ignore-eos --micro-batches A --ttft-prompt 256"
timeout 110 $B --codec f16 --delay-ms 0.5 --rate-mbit 1000 --baseline layer-split-bs --workdir $R/wd_lan --deadline 105 --json $R/lan.json > $R/lan.log 2>&1; step "lan"
timeout 110 $B --codec auto --delay-ms 10 --rate-mbit 100 --workdir $R/wd_wan --deadline 105 --json $R/wan.json > $R/wan.log 2>&1; step "wan"
timeout 100 $B --codec f16 --delay-ms 0.5 --rate-mbit 1000 --baseline layer-split-bs --deadline 95 --json $R/lan2.json > $R/lan2.log 2>&1; step "lan 2"
tar czf $OUT/results.tgz -C /tmp r
for n in lan wan lan2; do echo "== $n"; grep -E "concurrent:|chose|speculat" $R/$n.log | head -8; done
grep -rh "step ms by rows" $R/wd_lan $R/wd_wan 2>/dev/null | head -4
