#!/bin/bash
# issue 28, session 8, call 6: the relay's accuracy on the H100 host (0.5 ms asked), and the LAN link beside
# llama-server -bs with the learned-lead relay (prebuilt lib of call 5; kv-pad off)
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
" > $R/models.log 2>&1 &
MP=$!
python3 .dev/carry5/ws.py s & ES=$!
python3 -m molink_lite.cli link --listen 127.0.0.1:8766 --to 127.0.0.1:8765 --delay-ms 0.5 > $R/relay.log 2>&1 & RL=$!
sleep 3
for p in 8765 8766 8765 8766; do echo -n "port $p: "; P=$p python3 .dev/carry5/ws.py c; done 2>&1 | tee $R/relay_accuracy.txt
kill $ES $RL
wait $MP; step "model written"
B="python3 tests/bench/gpu_pipeline.py --lib /tmp/cuda --model /tmp/l8b.gguf --gpus 0 --stages 2 --stage-output graph"
timeout 100 $B --part gateway --conc 1,64 --ignore-eos --micro-batches A --codec f16 --delay-ms 0.5 --rate-mbit 1000 --baseline layer-split-bs --ttft-prompt 512 --deadline 95 --json $R/lan.json > $R/lan.log 2>&1
step "lan done"
timeout 80 $B --part gateway --conc 1,64 --ignore-eos --micro-batches A --codec f16 --delay-ms 0.5 --rate-mbit 1000 --gateway-delay-ms 0.5 --ring off,auto --ttft-prompt 256 --deadline 75 --json $R/lan_gw.json > $R/lan_gw.log 2>&1
step "lan, gateway on its own host, done"
tar czf $OUT/results.tgz -C /tmp r
cat $R/relay_accuracy.txt
for f in $R/lan.log $R/lan_gw.log; do echo "== $f"; grep -v "^\[" $f | grep -E "^ +[0-9]|TTFT|concurrent|x " | head -12; grep -E "chose|ring:" $f | head -4; done
