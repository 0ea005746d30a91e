#!/bin/bash
# issue 28, session 9, call 3: lanes and micro-batches on one GPU, with and without CUDA MPS (user-space daemon;
# the GPU's settings are not touched), LAN link, 64 concurrent; the pipeline's step ratio at 64
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
L="--part gateway --conc 1,64 --ignore-eos --micro-batches A --codec f16 --delay-ms 0.5 --rate-mbit 1000 --ttft-prompt 256"
timeout 110 $B $L --lanes 1,2 --baseline layer-split-bs --deadline 105 --json $R/lan_nomps.json > $R/lan_nomps.log 2>&1; step "lan lanes 1,2, no MPS"
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
nvidia-cuda-mps-control -d; step "mps daemon rc=$?"
timeout 110 $B $L --lanes 1,2 --baseline layer-split-bs --deadline 105 --json $R/lan_mps.json > $R/lan_mps.log 2>&1; step "lan lanes 1,2, MPS"
timeout 70 $B --part pipeline --seqs 1,64 --steps 48 --micro-batches 2,3 --codec f16 --ttft-prompt 512 --deadline 65 --json $R/pipe_mps.json > $R/pipe_mps.log 2>&1; step "pipeline mb 2,3, MPS"
echo quit | nvidia-cuda-mps-control; step "mps quit"
tar czf $OUT/results.tgz -C /tmp r
for f in $R/lan_nomps.log $R/lan_mps.log; do echo "== $f"; grep -E "concurrent:|gateway --|chose" $f | head -12; grep -v "^\[" $f | grep -E "x |^ +[0-9]" | head -6; done
for f in $R/pipe_mps.log; do echo "== $f"; grep -v "^\[" $f | grep -E "^(whole|1x|2x)" | head -12; done
