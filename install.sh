#!/usr/bin/env bash
# Install crlft (editable) and its dependencies into the current Python environment.
#
#   ./install.sh          the package: enough to run ./launch.sh and the crlft command
#   ./install.sh --dev    also the test and lint tools
#   ./install.sh --help   this text
#
# An installed torch is reused as it is (GPU users: install the torch build for your CUDA first). Only when no
# torch is importable does this install torch==2.13.0; on a CPU-only machine that provides a local CPU wheel,
# this avoids pulling gigabytes of CUDA packages from the registry. The interpreter is $PYTHON, else python, else
# python3. Without CUDA, DeepSpeed's CPU communication op is built once, into this environment's own directory
# (crlft.dist.torch_extensions_dir), so environments never rebuild each other's.
set -euo pipefail
cd "$(dirname "$0")"
usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}
extra=""
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  --dev) extra="[dev]" ;;
  "") ;;
  *) usage >&2; echo "install.sh: unknown option $1" >&2; exit 2 ;;
esac
source scripts/python.sh
PYTHON="$(crlft_python)"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  echo "install.sh: no torch found; installing torch==2.13.0"
  "$PYTHON" -m pip install -q "torch==2.13.0"
fi

"$PYTHON" -m pip install -q -e ".${extra}"
if [[ -n "$extra" ]]; then
  # OpenChat's own package is the oracle of the token-parity tests. --no-deps: only its pure-Python template
  # code is used, and its full dependency set (vllm, flash-attn, ...) is neither needed nor installable here.
  "$PYTHON" -m pip install -q --no-deps "ochat==3.6.1"
fi
# On a machine without CUDA, DeepSpeed's CPU accelerator JIT-compiles its shared-memory all-reduce op the first time
# ranks start (about 2 minutes). Build it now, once, where this environment's ranks will look for it.
"$PYTHON" - <<'PY' 2>&1 | grep -v "real_accelerator" || true
import os
import torch
from crlft.dist import torch_extensions_dir
os.environ["TORCH_EXTENSIONS_DIR"] = torch_extensions_dir()
if not torch.cuda.is_available():
    from deepspeed.accelerator import get_accelerator
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and builder.is_compatible():
        builder.load(verbose=False)
        print(f"install.sh: DeepSpeed CPU communication op ready in {os.environ['TORCH_EXTENSIONS_DIR']}")
PY
"$PYTHON" -c "import crlft, torch, deepspeed, transformers; print(f'install.sh: crlft {crlft.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {deepspeed.__version__}')" 2>&1 | grep -v "real_accelerator" || true
