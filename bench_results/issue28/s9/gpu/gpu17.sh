#!/bin/bash
# issue 28, session 9, call 4: the gateway sends the next step before the streams' readers run (hold.patch), A/B
# on the LAN link at 1 and 64 concurrent, twice, beside llama-server -bs; then the new order with CUDA MPS
set -o pipefail
T0=$(date +%s); step() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/progress.txt; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p /tmp/py && tar xzf .dev/carry5/llama_cpp_py.tgz -C /tmp/py && tar xJf .dev/carry5/cudalib.tar.xz -C /tmp
export PYTHONPATH=/tmp/site:/tmp/py:$PWD PATH=/tmp/site/bin:$PATH NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
R=/tmp/r; mkdir -p $R
nvidia-smi -L | tee -a $OUT/progress.txt
rm -rf /tmp/before && cp -r . /tmp/before && (cd /tmp/before && patch -s -R -p1 < .dev/carry5/hold.patch) || { step "PATCH FAILED"; exit 2; }
python3 -c "
import sys; sys.path[:0] = ['tests']
from testmodels import write_random_gguf
write_random_gguf('/tmp/l8b.gguf', 'llama', variant='llama3', qtype='q8_0', n_ctx_train=8192, n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256)
" > $R/models.log 2>&1 || { step "MODEL FAILED"; tail -20 $R/models.log; exit 1; }
step "model written"
A="--lib /tmp/cuda --model /tmp/l8b.gguf --gpus 0 --stages 2 --stage-output graph --part gateway --conc 1,64 --ignore-eos --micro-batches A --codec f16 --delay-ms 0.5 --rate-mbit 1000 --ttft-prompt 256"
run() {  # name dir extra...
  local n=$1 d=$2; shift 2
  (cd $d && PYTHONPATH=/tmp/site:/tmp/py:$d timeout 80 python3 tests/bench/gpu_pipeline.py $A "$@" --deadline 75 --json $R/$n.json > $R/$n.log 2>&1); step "$n"
}
run after1 $PWD --baseline layer-split-bs
run before1 /tmp/before
run after2 $PWD
run before2 /tmp/before --baseline layer-split-bs
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
nvidia-cuda-mps-control -d; step "mps daemon rc=$?"
run after_mps $PWD --baseline layer-split-bs
run before_mps /tmp/before
echo quit | nvidia-cuda-mps-control; step "mps quit"
tar czf $OUT/results.tgz -C /tmp r
for n in after1 before1 after2 before2 after_mps before_mps; do echo "== $n"; grep -E "concurrent:" $R/$n.log | head -4; done
