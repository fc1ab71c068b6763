#!/usr/bin/env bash
# Everything da2ext checks on a CUDA GPU, in one go, for a short lease of a GPU machine:
# build, the kernels against the reference, the CUDA tests, the GPU benchmark
# tables, compute-sanitizer, the CUDA graph table (most important first).
#
#   OUT=/some/dir TAG=h100 ARCH=9.0 bash benchmarks/gpu_checks.sh
#
# The committed benchmarks/results/*_h100.* came from
#   CXX=/usr/bin/g++ CC=/usr/bin/gcc OUT=$OUT TAG=h100 ARCH=9.0 PEAK_GBPS=3350 bash benchmarks/gpu_checks.sh
# on a lent H100 whose image sets CXX=/opt/gcc/bin/g++, a wrapper that links
# libstdc++ statically into the extension: every error message the extension
# formats (TORCH_CHECK) then segfaults, on the CPU as on CUDA. Build with the
# system compiler there.
#
# Writes gpu_checks.log (everything printed), memcheck.log, racecheck.log and the
# tables nano_<TAG>, adaptor_<TAG> (and both again as <TAG>-one-op), launch_count_<TAG>, cuda_graph_<TAG> and compile_<TAG> (.json and .md),
# the pytest-benchmark results packed_activation_<TAG>.json and nccl_train_<TAG>.log into $OUT (17 files: a lent
# machine returns 8, so tar them there). Every step has
# its own time limit, so a slow one cannot starve the rest; the exit status is the
# number of failed steps.
set -u -o pipefail
OUT=${OUT:-benchmarks/results}
TAG=${TAG:-gpu}
ARCH=${ARCH:-}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_checks.log") 2>&1
export PYTHONUNBUFFERED=1
start=$(date +%s)
failed=0
step() { echo; echo "=== $1 (t=$(( $(date +%s) - start )) s)"; }
check() { local rc=$?; echo "--- rc=$rc"; [ $rc -eq 0 ] || failed=$((failed + 1)); }

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
$PY -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
nvcc --version | tail -2
${CXX:-c++} --version | head -1

step "build (TORCH_CUDA_ARCH_LIST=${ARCH:-visible GPU})"
TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=${MAX_JOBS:-16} FORCE_CUDA=1 timeout 400 \
  $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
check
if ! $PY -c "import da2ext, sys; print('backend:', da2ext.backend('cuda')); sys.exit(da2ext.backend('cuda') != 'cuda')"; then
  tail -40 "$OUT/build.log"; exit 99
fi
rm -f "$OUT/build.log"
ldd da2ext/_C*.so | grep -E "stdc|gomp|cudart"

step "kernels against the reference, odd shapes, fp32 and fp16"
timeout 90 $PY tools/exercise_cuda_kernels.py | grep -v " ok$"
check

step "CUDA tests"
# pytest-xdist, where present, also keeps one crashing test from hiding the rest.
xdist=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
timeout 180 $PY -m pytest tests -k cuda -q -ra -p no:cacheprovider --continue-on-collection-errors --tb=short $xdist
check

step "nano table (ResNet-50, MobileNetV2, EfficientNet-Lite0; batch 8 and 32)"
timeout 150 $PY benchmarks/nano_table.py --device cuda --tag "$TAG" --out-dir "$OUT"
check

step "the one-op CUDA adaptor (eight launches; opt-in until this passes): adaptor and nano tables"
DA2EXT_CUDA_ONE_OP=1 timeout 150 $PY benchmarks/adaptor_table.py --device cuda --tag "$TAG-one-op" --out-dir "$OUT" \
  ${PEAK_GBPS:+--peak-gbps $PEAK_GBPS}
check
DA2EXT_CUDA_ONE_OP=1 timeout 150 $PY benchmarks/nano_table.py --device cuda --tag "$TAG-one-op" --out-dir "$OUT"
check

step "adaptor table (fused kernels against the PyTorch reference)"
timeout 150 $PY benchmarks/adaptor_table.py --device cuda --tag "$TAG" --out-dir "$OUT" ${PEAK_GBPS:+--peak-gbps $PEAK_GBPS}
check

step "kernels per adaptor forward + backward (launch count), fused and reference"
timeout 120 $PY benchmarks/launch_count.py --device cuda --tag "$TAG" --out-dir "$OUT"
check

step "packed activation benchmark (fused bits against torch's relu, CUDA)"
timeout 120 $PY -m pytest benchmarks/test_packed_activation_benchmark.py --benchmark-only -k cuda -q \
  -p no:cacheprovider --benchmark-columns min,median,max,rounds --benchmark-json "$OUT/packed_activation_$TAG.json"
check

step "compute-sanitizer memcheck"
timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 $PY tools/exercise_cuda_kernels.py \
  > "$OUT/memcheck.log" 2>&1
check
grep -E "ERROR SUMMARY|mismatches" "$OUT/memcheck.log"

step "compute-sanitizer racecheck (da2ext kernels only)"
timeout 90 compute-sanitizer --tool racecheck --error-exitcode 9 $PY tools/exercise_cuda_kernels.py --kernels-only \
  > "$OUT/racecheck.log" 2>&1
check
grep -E "RACECHECK SUMMARY|ERROR SUMMARY|mismatches" "$OUT/racecheck.log"

step "step time eager and as one CUDA graph (CUDAGraphStep)"
timeout 240 $PY benchmarks/cuda_graph_table.py --tag "$TAG" --out-dir "$OUT"
check

step "torch.compile against eager, mode reduce-overhead (CUDA graphs), ResNet-18 and Lite0"
timeout 300 $PY benchmarks/compile_table.py --device cuda --mode reduce-overhead --steps 20 --tag "$TAG" \
  --out-dir "$OUT"
check

step "one domain through torchrun on 1 GPU (nccl), two epochs on a small mnist"
timeout 240 $PY -m da2ext prepare-digits "$OUT/digits" --domains mnist --train-per-domain 256 --val-per-domain 64 \
  --no-progress > /dev/null && \
  timeout 240 $PY -m torch.distributed.run --nproc-per-node 1 -m da2ext train --data "$OUT/digits/mnist" \
  --workdir "$OUT/nccl_runs" --device cuda --epochs 2 --no-progress 2>&1 | tee "$OUT/nccl_train_$TAG.log"
check

step "the same domain with the training step replayed from a CUDA graph (train --cuda-graph)"
timeout 240 $PY -m da2ext train --data "$OUT/digits/mnist" --workdir "$OUT/graph_runs" --device cuda --epochs 2 \
  --cuda-graph --no-progress 2>&1 | tee "$OUT/cuda_graph_train_$TAG.log" && \
  $PY -c "import json, sys; m = json.load(open(sys.argv[1])); print('cuda_graph:', m['cuda_graph'])" \
  "$OUT/graph_runs/metrics/mnist-da2.json" | tee -a "$OUT/cuda_graph_train_$TAG.log"
check
rm -rf "$OUT/digits" "$OUT/nccl_runs" "$OUT/graph_runs"

step "compute-sanitizer initcheck (uninitialised reads; informational)"
timeout 90 compute-sanitizer --tool initcheck $PY tools/exercise_cuda_kernels.py --kernels-only \
  > "$OUT/initcheck.log" 2>&1
grep -E "ERROR SUMMARY|mismatches" "$OUT/initcheck.log"
grep -A1 -m1 "Uninitialized" "$OUT/initcheck.log"

step "run-to-run reproducibility, eager and graphed (informational)"
timeout 90 $PY tools/cuda_determinism_check.py 2>&1 | grep -v -i warn

step "done: $failed failed steps"
exit $failed
