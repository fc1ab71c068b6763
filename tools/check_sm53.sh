#!/usr/bin/env bash
# Prove that every CUDA kernel under csrc/ compiles for the Jetson Nano
# (sm_53, C++14). nvcc >= 12 dropped sm_53, so we compile device code with
# clang's CUDA front end against the CUDA 11.8 headers, libdevice and ptxas
# that NVIDIA ships as pip wheels (no CUDA 11 install or GPU needed).
#
# Usage: tools/check_sm53.sh [FILE.cu ...]   (default: every csrc/**/*.cu)
# Cache: $DA2EXT_SM53_CACHE (default ~/.cache/da2ext-sm53), reused across runs.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${DA2EXT_SM53_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/da2ext-sm53}
root=$cache/cuda-11.8
cxx=clang++-16  # new enough for CUDA 11.8 headers, old enough to still know sm_53

tmp=$(mktemp -d)
stage=
trap 'rm -rf "$tmp" "$stage"' EXIT

# --- toolchain: clang-16 (+ python3-venv, missing on a bare Debian) --------
pkgs=()
command -v "$cxx" >/dev/null || pkgs+=(clang-16)
python3 -c 'import ensurepip' 2>/dev/null || pkgs+=(python3-venv)
if ((${#pkgs[@]})); then
  sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
  export DEBIAN_FRONTEND=noninteractive
  # Only refresh the package lists when needed: it is the slow part.
  $sudo apt-get install -y -qq "${pkgs[@]}" >/dev/null ||
    { $sudo apt-get update -qq && $sudo apt-get install -y -qq "${pkgs[@]}" >/dev/null; }
fi

# --- CUDA 11.8 root assembled from the wheels --------------------------------
# Built in a staging dir and moved into place at the end, so an interrupted or
# concurrent run never leaves a half-assembled root that later runs would trust.
if [ ! -f "$root/version.txt" ]; then
  echo "assembling CUDA 11.8 root in $root ..."
  mkdir -p "$cache"
  stage=$(mktemp -d "$cache/stage.XXXXXX")  # removed by the EXIT trap
  python3 -m venv "$stage/venv"
  "$stage/venv/bin/pip" install -q --disable-pip-version-check \
    nvidia-cuda-nvcc-cu11==11.8.89 nvidia-cuda-runtime-cu11==11.8.89
  nv=$("$stage/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia
  r=$stage/cuda
  mkdir -p "$r/include" "$r/bin" "$r/nvvm/libdevice"
  cp -r "$nv/cuda_runtime/include/." "$nv/cuda_nvcc/include/." "$r/include/"
  cp -p "$nv/cuda_nvcc/bin/ptxas" "$r/bin/"
  cp "$nv/cuda_nvcc/nvvm/libdevice/libdevice.10.bc" "$r/nvvm/libdevice/"
  # clang's CUDA wrapper includes this curand header, which the wheels lack.
  : >"$r/include/curand_mtgp32_kernel.h"
  # clang reads the CUDA version from here to pick supported features.
  echo "CUDA Version 11.8.89" >"$r/version.txt"
  mv -T "$r" "$root" 2>/dev/null || true  # a concurrent run may have won
fi

# Device code only (clang -> PTX -> ptxas): host code needs no CUDA install.
# -Wno-unknown-cuda-version: clang 16 flags 11.8 as "partially supported".
compile() {
  "$cxx" -x cuda --cuda-path="$root" --cuda-gpu-arch=sm_53 -std=c++14 \
    --cuda-device-only -Wall -Wno-unknown-cuda-version -I "$repo/csrc" -c "$1" -o /dev/null 2>&1
}

# --- self-test: the check must be able to fail -------------------------------
cat >"$tmp/good.cu" <<'EOF'
__global__ void k(float* p) {
  float v = __shfl_down_sync(0xffffffffu, p[threadIdx.x], 1);
  atomicAdd(p, v);
}
EOF
cat >"$tmp/bad.cu" <<'EOF'
__global__ void k(double* p) { atomicAdd(p, 1.0); }  // needs sm_60
EOF
if ! out=$(compile "$tmp/good.cu"); then
  printf 'self-test FAIL: valid sm_53 kernel does not compile:\n%s\n' "$out" >&2
  exit 1
fi
if compile "$tmp/bad.cu" >/dev/null; then
  echo "self-test FAIL: double atomicAdd compiled; toolchain does not enforce sm_53" >&2
  exit 1
fi
echo "self-test OK (sm_53 enforced)"

# --- the real kernels --------------------------------------------------------
if (($#)); then
  files=("$@")
else
  mapfile -t files < <(find "$repo/csrc" -type f -name '*.cu' 2>/dev/null | sort)
fi
if ((${#files[@]} == 0)); then
  echo "FAIL: no .cu files found under $repo/csrc" >&2
  exit 1
fi

fails=0
for f in "${files[@]}"; do
  name=${f#"$repo"/}
  if out=$(compile "$f"); then
    echo "OK    $name"
    [ -z "$out" ] || printf '%s\n' "$out" | sed 's/^/      /'  # warnings only
  else
    echo "FAIL  $name"
    printf '%s\n' "$out" | sed 's/^/      /'
    fails=$((fails + 1))
  fi
done
((fails == 0)) || { echo "$fails of ${#files[@]} file(s) failed for sm_53" >&2; exit 1; }
echo "all ${#files[@]} file(s) compile for sm_53"
