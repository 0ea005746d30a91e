#!/bin/bash
# issue 28, session 9, call 2: two stage processes on one GPU, with and without CUDA MPS (one shared GPU context:
# no time-slicing between the stages' contexts). MPS is a user-space daemon; the GPU's settings are not touched.
set -o pipefail
T0=$(date +%s); step() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/progress.txt; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p /tmp/py && tar xzf .dev/carry5/llama_cpp_py.tgz -C /tmp/py && tar xJf .dev/carry5/cudalib.tar.xz -C /tmp
export PYTHONPATH=/tmp/site:/tmp/py:$PWD PATH=/tmp/site/bin:$PATH NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
R=/tmp/r; mkdir -p $R
nvidia-smi -L | tee -a $OUT/progress.txt
command -v nvidia-cuda-mps-control | tee -a $OUT/progress.txt || { step "NO MPS BINARY"; ls /usr/bin | grep -i nvidia | tee -a $OUT/progress.txt; exit 3; }
python3 -c "
import sys; sys.path[:0] = ['tests']
from testmodels import write_random_gguf
write_random_gguf('/tmp/l8b.gguf', 'llama', variant='llama3', qtype='q8_0', n_ctx_train=8192, n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256)
" > $R/models.log 2>&1 || { step "MODEL FAILED"; tail -20 $R/models.log; exit 1; }
step "model written"
B="python3 tests/bench/gpu_pipeline.py --lib /tmp/cuda --model /tmp/l8b.gguf --gpus 0 --stages 2 --stage-output graph"
P="--part pipeline --seqs 1,64 --steps 48 --micro-batches 1,2 --codec f16 --ttft-prompt 512"
L="--part gateway --conc 1,64 --ignore-eos --micro-batches A --codec f16 --delay-ms 0.5 --rate-mbit 1000 --ttft-prompt 256"
W="--part gateway --conc 64 --ignore-eos --micro-batches 4,8 --codec int8 --delay-ms 10 --rate-mbit 100 --ttft-prompt 256"
timeout 75 $B $P --deadline 70 --json $R/pipe_nomps.json > $R/pipe_nomps.log 2>&1; step "pipeline, no MPS"
timeout 90 $B $L --baseline layer-split-bs --deadline 85 --json $R/lan_nomps.json > $R/lan_nomps.log 2>&1; step "lan, no MPS"
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
nvidia-cuda-mps-control -d; step "mps daemon rc=$?"
timeout 75 $B $P --deadline 70 --json $R/pipe_mps.json > $R/pipe_mps.log 2>&1; step "pipeline, MPS"
echo get_server_list | nvidia-cuda-mps-control 2>&1 | tee -a $OUT/progress.txt
timeout 90 $B $L --baseline layer-split-bs --deadline 85 --json $R/lan_mps.json > $R/lan_mps.log 2>&1; step "lan, MPS"
timeout 75 $B $W --deadline 70 --json $R/wan_mps.json > $R/wan_mps.log 2>&1; step "wan, MPS"
echo quit | nvidia-cuda-mps-control; step "mps quit"
cp -r $CUDA_MPS_LOG_DIRECTORY $R/mps-log 2>/dev/null
tar czf $OUT/results.tgz -C /tmp r
for f in $R/pipe_nomps.log $R/pipe_mps.log; do echo "== $f"; grep -v "^\[" $f | grep -E "^(whole|1x|2x)" | head -12; grep -E "per hop" $f | head -4; done
for f in $R/lan_nomps.log $R/lan_mps.log $R/wan_mps.log; do echo "== $f"; grep -E "concurrent:" $f | head -8; grep -v "^\[" $f | grep -E "x |^ +[0-9]" | head -6; done
