#!/usr/bin/env bash
# The GPU checks of issue 19, as one command for a session with a lent GPU (none was lent when it
# was written; nothing here has been run on a GPU yet):
#   bash benchmarks/gpu_suite.sh [out_dir]        # default benchmarks/results/gpu
# 1. ATen ops, CUDA kernels and host syncs per warm step of the MLP in every mode (p="auto" with its propagated
#    gradients drawing at every step too: grad="both", budget 50), bf16, with the
#    step run under torch.cuda.set_sync_debug_mode("error"); exact with and without
#    mode="reduce-overhead" (ubcompile refuses reduce-overhead: README "Compile options").
# 2. The benchmark suite on CUDA, bf16: step and backward time against exact, 5 rounds.
# 3. One sampled weight-gradient product, one convolution's and p="auto"'s controlled calls (GEMM, conv), against
#    exact by size (where sampling starts to pay), each with the cost model fitted to it: the constants to enter in
#    ubcompile/cost_model.py's MODELS["cuda"] (until then the cost rule keeps nothing exact on a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu}
mkdir -p "$out"
{
  python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
  for options in exact '{}' '{"grad": "both"}' '{"grad": "both", "sketch": "uniform"}' \
                 '{"sketch": "activation"}' '{"p": "auto"}' '{"p": "auto", "grad": "both", "budget": 50}'; do
    python benchmarks/step_ops.py "$options" --device cuda --dtype bfloat16 --sync-debug || echo "FAILED: $options"
  done
  python benchmarks/step_ops.py exact --device cuda --dtype bfloat16 --mode reduce-overhead || echo "FAILED: exact reduce-overhead"
} 2>&1 | tee "$out/step_ops.txt"
python benchmarks/bench.py --device cuda --dtype bfloat16 --rounds 5 \
  --variant "grad=weight,sketch=norm,p=0.25" --variant "grad=both,sketch=uniform,p=0.25" --variant "p=auto" \
  --csv "$out/gpu_suite.csv" --json "$out/gpu_suite.json" 2>&1 | tee "$out/bench.txt"
python benchmarks/break_even.py --device cuda --dtype bfloat16 --rows 1024 4096 16384 65536 \
  --widths 256 512 1024 2048 4096 768x3072 3072x768 --fit \
  --json "$out/break_even.json" 2>&1 | tee "$out/break_even.txt"
python benchmarks/break_even.py --device cuda --dtype bfloat16 --fit \
  --conv 128,3,64,224,7,2 64,64,64,56,3 64,128,128,28,3 64,256,256,14,3 64,512,512,7,3 256,64,64,28,3 \
  --json "$out/break_even_conv.json" 2>&1 | tee "$out/break_even_conv.txt"
python benchmarks/break_even.py --device cuda --dtype bfloat16 --auto --rows 1024 4096 16384 \
  --widths 256 1024 4096 768x3072 --fit --json "$out/break_even_auto.json" 2>&1 | tee "$out/break_even_auto.txt"
python benchmarks/break_even.py --device cuda --dtype bfloat16 --auto --p 0.25 0.5 --fit \
  --conv 128,3,64,224,7,2 64,64,64,56,3 64,64,256,56,1 64,128,128,28,3 64,256,256,14,3 64,512,512,7,3 \
  --json "$out/break_even_conv_auto.json" 2>&1 | tee "$out/break_even_conv_auto.txt"
