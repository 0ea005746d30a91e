#!/bin/bash
# issue 28, session 10, call 4: the ring in the engine chain (last stage -> first stage without the gateway): the step
# ratio at 1 and 64 sequences, ring off/on, with and without CUDA MPS; the LAN behind the gateway, ring off/on, MPS
set -o pipefail
T0=$(date +%s); step() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/progress.txt; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p /tmp/src && tar xzf .dev/carry6/lcp-slim.tar.gz -C /tmp/src
export PYTHONPATH=/tmp/site:/tmp/src/llama_cpp_python-0.3.36:$PWD PATH=/tmp/site/bin:$PATH NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
R=/tmp/r4; mkdir -p $R
nvidia-smi -L | tee -a $OUT/progress.txt
python3 -c "
import sys; sys.path[:0] = ['tests']
from testmodels import write_random_gguf
write_random_gguf('/tmp/l8b.gguf', 'llama', variant='llama3', qtype='q8_0', n_ctx_train=8192, n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256)
" > $R/models.log 2>&1 &
MP=$!
python3 kernels/build.py --backend cuda --cuda-arch 90 --with-tools --src /tmp/src/llama_cpp_python-0.3.36 --out /tmp/cuda --build-dir /tmp/cuda-build -j 16 > $R/build.log 2>&1 || { step "BUILD FAILED"; tail -40 $R/build.log; exit 1; }
step "build: $(grep -E 'configure .* build' $R/build.log)"
wait $MP; step "model written"
B="python3 tests/bench/gpu_pipeline.py --lib /tmp/cuda --model /tmp/l8b.gguf --gpus 0 --stages 2 --stage-output graph"
P="--part pipeline --seqs 1,64 --steps 48 --micro-batches 1,2 --codec f16 --ttft-prompt 512 --ring off,on"
L="--part gateway --conc 1,64 --ignore-eos --micro-batches A --ttft-prompt 256 --codec f16 --delay-ms 0.5 --rate-mbit 1000 --ring off,on --baseline layer-split-bs"
timeout 70 $B $P --deadline 65 --json $R/pipe_nomps.json > $R/pipe_nomps.log 2>&1; step "pipeline, no MPS"
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
nvidia-cuda-mps-control -d; step "mps on"
timeout 70 $B $P --deadline 65 --json $R/pipe_mps.json > $R/pipe_mps.log 2>&1; step "pipeline, MPS"
LEFT=$(( 560 - ($(date +%s) - T0) ))
[ $LEFT -gt 50 ] && { timeout $LEFT $B $L --deadline $(( LEFT - 6 )) --json $R/lan_mps.json > $R/lan_mps.log 2>&1; step "lan, MPS"; }
echo quit | nvidia-cuda-mps-control; step "mps off"
find $R -name '*.gguf' -delete
tar czf $OUT/results4.tgz -C /tmp r4
for f in $R/pipe_*.log; do echo "== $f"; grep -v "^\[" $f | grep -E "^(whole|2x)" | head -10; grep -E "ring rounds" $f | head -8 | cut -c1-160; done
echo "== lan"; grep -E "concurrent:|ring:" $R/lan_mps.log | head -10; grep -E "^ +(1|64) +[0-9.]+x" $R/lan_mps.log | head -2
