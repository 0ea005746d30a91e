#!/bin/bash
# issue 28, session 10, call 2: the final tree with CUDA MPS (one GPU context for both stage processes): the engine
# chain's step ratio (1 and 64 sequences), the LAN and the WAN behind the gateway beside llama-server -bs
set -o pipefail
T0=$(date +%s); step() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/progress.txt; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p /tmp/src && tar xzf .dev/carry6/lcp-slim.tar.gz -C /tmp/src llama_cpp_python-0.3.36/llama_cpp
[ -d /tmp/cuda ] || tar xJf .dev/carry6/cudalib.tar.xz -C /tmp
export PYTHONPATH=/tmp/site:/tmp/src/llama_cpp_python-0.3.36:$PWD PATH=/tmp/site/bin:$PATH NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
R=/tmp/r2; mkdir -p $R
nvidia-smi -L | tee -a $OUT/progress.txt
[ -f /tmp/l8b.gguf ] || python3 -c "
import sys; sys.path[:0] = ['tests']
from testmodels import write_random_gguf
write_random_gguf('/tmp/l8b.gguf', 'llama', variant='llama3', qtype='q8_0', n_ctx_train=8192, n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256)
" > $R/models.log 2>&1
step "model ready"
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
nvidia-cuda-mps-control -d; step "mps daemon rc=$?"
B="python3 tests/bench/gpu_pipeline.py --lib /tmp/cuda --model /tmp/l8b.gguf --gpus 0 --stages 2 --stage-output graph"
timeout 80 $B --part pipeline --seqs 1,64 --steps 48 --micro-batches 1,2 --codec f16 --ttft-prompt 512 --deadline 75 --json $R/pipe.json > $R/pipe.log 2>&1; step "pipeline, MPS"
L="--part gateway --conc 1,64 --ignore-eos --micro-batches A --ttft-prompt 256"
timeout 100 $B $L --codec f16 --delay-ms 0.5 --rate-mbit 1000 --baseline layer-split-bs --workdir $R/wd_lan --deadline 95 --json $R/lan.json > $R/lan.log 2>&1; step "lan, MPS"
LEFT=$(( 560 - ($(date +%s) - T0) ))
[ $LEFT -gt 60 ] && { timeout $LEFT $B $L --codec auto --delay-ms 10 --rate-mbit 100 --baseline layer-split-bs --workdir $R/wd_wan --deadline $(( LEFT - 8 )) --json $R/wan.json > $R/wan.log 2>&1; step "wan, MPS"; }
echo quit | nvidia-cuda-mps-control; step "mps quit"
find $R -name '*.gguf' -delete
tar czf $OUT/results2.tgz -C /tmp r2
grep -v "^\[" $R/pipe.log | grep -E "^(whole|1x|2x)" | head -12
for n in lan wan; do echo "== $n"; grep -E "concurrent:|chose|speculat|ring:|vs layer" $R/$n.log | head -12; done
grep -rh "step ms by rows" $R/wd_lan $R/wd_wan 2>/dev/null | head -4
