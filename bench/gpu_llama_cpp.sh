#!/usr/bin/env bash
# llama.cpp on a CUDA GPU (issue 8): build llama-cpp-python with CUDA, make a GGUF from a random-weight checkpoint
# of a real config, and run the llama.cpp GPU test on it.
#
#   bench/gpu_llama_cpp.sh SDIST [PRESET]
#
# SDIST: llama-cpp-python's source archive (.tar.gz; its vendored llama.cpp holds the converter). The device machine
# has nvcc, CMake and ninja but no network: carry the archive and scikit-build-core, pathspec and diskcache wheels
# (installed on PYTHONPATH beforehand). Builds for this GPU's architecture only, without llama.cpp's flash-attention
# kernels (the longest part of the build), into /tmp. PRESET: a bundled preset (default Llama-3.2-1B-Instruct);
# QS_GPU_TOKENIZER names the tokenizer folder, as for tests/test_gpu.py. Writes build.log and convert.log under $OUT
# (or /tmp). To fit a device call's 64 MiB, strip the archive of what the build does not read (77 MB -> 5.6 MB):
#   pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36; tar xzf llama_cpp_python-0.3.36.tar.gz
#   cd llama_cpp_python-0.3.36 && rm -rf .git examples docker .github && cd vendor/llama.cpp &&
#   rm -rf models docs media benches tests examples pocs app && (cd tools && ls | grep -v '^mtmd$' | xargs rm -rf) &&
#   (cd ggml/src && ls -d ggml-*/ | grep -v 'ggml-cpu/\|ggml-cuda/' | xargs rm -rf); cd ../../.. && tar czf SDIST ...
set -euo pipefail
SDIST=${1:?usage: bench/gpu_llama_cpp.sh SDIST [PRESET]}
PRESET=${2:-meta-llama/Llama-3.2-1B-Instruct}
OUT=${OUT:-/tmp}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SITE=${SITE:-/tmp/site}
ARCH=$(python3 -c "import torch; a, b = torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0); print(f'{a}{b}')")
[ "$ARCH" = "00" ] && { echo "gpu_llama_cpp: a run needs a CUDA GPU (none is visible here)"; exit 1; }
t0=$(date +%s)
rm -rf /tmp/qs-lcp && mkdir -p /tmp/qs-lcp/src /tmp/qs-lcp/wheel
tar xzf "$SDIST" -C /tmp/qs-lcp/src
SRC=$(ls -d /tmp/qs-lcp/src/*/)
( cd "$SRC" && CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${ARCH}-real -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF -DLLAVA_BUILD=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) python3 -m pip wheel . --no-build-isolation --no-deps -w /tmp/qs-lcp/wheel \
  > "$OUT/build.log" 2>&1 ) || { tail -40 "$OUT/build.log"; exit 1; }
python3 -m pip install -q --no-index --no-deps --upgrade --target "$SITE" /tmp/qs-lcp/wheel/*.whl
echo "llama-cpp-python built for sm_${ARCH} in $(( $(date +%s) - t0 )) s"
python3 -c "import llama_cpp; assert llama_cpp.llama_supports_gpu_offload(), 'the build has no GPU offload'"
CKPT=$(cd "$ROOT" && python3 -c "
import sys; sys.path.insert(0, 'bench')
from pathlib import Path
from gpu_engine_check import build_checkpoint
print(build_checkpoint('$PRESET', Path('${QS_GPU_TOKENIZER:?set QS_GPU_TOKENIZER to a tokenizer folder}')))" | tail -1)
GGUF=/tmp/qs-lcp/model-q8_0.gguf
# llama.cpp's converter asks transformers for a model's own code when it loads tokenizers; QuantScope never runs
# it, so the converter runs through bench/no_remote_code.py, which answers no to every such request.
PYTHONPATH="$SRC/vendor/llama.cpp/gguf-py:${PYTHONPATH:-}" python3 "$ROOT/bench/no_remote_code.py" \
  "$SRC/vendor/llama.cpp/convert_hf_to_gguf.py" "$CKPT" --outtype q8_0 --outfile "$GGUF" > "$OUT/convert.log" 2>&1 ||
  { tail -30 "$OUT/convert.log"; exit 1; }
echo "GGUF written: $GGUF ($(du -m "$GGUF" | cut -f1) MB) at $(( $(date +%s) - t0 )) s"
cd "$ROOT"
[ -n "${QS_LCP_BUILD_ONLY:-}" ] && exit 0
QS_GPU_GGUF=$GGUF python3 -m pytest -m gpu tests/test_gpu.py -k llama_cpp -q -s -p no:cacheprovider -p no:logging
