#!/usr/bin/env bash
# Set up .venv with everything the demo, the tools and the tests need; --gpu adds the CUDA stack.
# torch first, pinned, so nothing re-resolves it to another build; this project last (pip install -e .
# --no-deps: the qwenvl package and the qwenvl-* commands, without resolving anything again).
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bash scripts/install.sh [--gpu [--no-flash-attn]] [--dry-run] [--help]

Makes .venv (if missing) and installs into it:
  (default)        CPU: torch==2.13.0, requirements.txt, requirements-dev.txt, then this project
                   (pip install -e . --no-deps: the qwenvl-* commands). CI runs this route.
  --gpu            CUDA: a CUDA build of torch==2.13.0 with torchvision 0.28.x (replacing a CPU torch),
                   requirements.txt, requirements-dev.txt, requirements-gpu.txt (liger-kernel,
                   bitsandbytes), flash-attn built against the installed torch, then this project.
  --no-flash-attn  with --gpu: leave flash-attn out (without a prebuilt wheel for this torch and CUDA,
                   it compiles from source: nvcc needed, up to an hour; MAX_JOBS limits the parallel jobs).
  --dry-run        print the install commands instead of running them.
  --help           this text.

Environment:
  PYTHON           interpreter that makes .venv (default: python3; 3.11 is tested)
  TORCH_INDEX_URL  with --gpu: the wheel index of the CUDA build of torch/torchvision to install
                   (default: the package index, whose Linux x86_64 torch wheels are CUDA builds)
EOF
}

GPU=0
FLASH_ATTN=1
DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --gpu) GPU=1 ;;
        --no-flash-attn) FLASH_ATTN=0 ;;
        --dry-run) DRY_RUN=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: error: unknown option $arg (expected --gpu, --no-flash-attn, --dry-run or --help)" >&2
           exit 2 ;;
    esac
done
if [ "$GPU" = 0 ] && [ "$FLASH_ATTN" = 0 ]; then
    echo "install.sh: error: --no-flash-attn only applies with --gpu" >&2
    exit 2
fi

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PY=.venv/bin/python

run() {  # run (or, with --dry-run, print) one command
    if [ "$DRY_RUN" = 1 ]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi
}

# The versions CI tests (CPU) and their CUDA counterparts; requirements.txt has torch>=2.13,<2.14.
TORCH="torch==2.13.0"
TORCHVISION="torchvision>=0.28,<0.29"   # 0.28.x requires torch==2.13.0 exactly
FLASH_ATTN_SPEC="flash-attn>=2.8.3,<2.9"
BUILD_TOOLS=("setuptools>=77" "wheel>=0.42,<1" "packaging>=24" "ninja>=1.11,<1.14" "psutil>=7,<8")

[ -x "$PY" ] || run "$PYTHON" -m venv .venv
run "$PY" -m pip install -q --upgrade pip
if [ "$GPU" = 1 ]; then
    # An installed CPU torch 2.13.0(+cpu) satisfies torch==2.13.0, so pip would keep it: remove it first.
    if [ "$DRY_RUN" = 0 ] && "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda is None else 1)" 2>/dev/null
    then
        echo "install.sh: replacing the CPU build of torch with a CUDA build"
        run "$PY" -m pip uninstall -y torch torchvision
    fi
    run "$PY" -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH" "$TORCHVISION"
    if [ "$DRY_RUN" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)"; then
        echo "install.sh: error: the torch that got installed is a CPU build (torch.version.cuda is None);" \
             "set TORCH_INDEX_URL to the wheel index of a CUDA build and run again" >&2
        exit 1
    fi
else
    run "$PY" -m pip install -q "$TORCH"
fi
run "$PY" -m pip install -q -r requirements.txt -r requirements-dev.txt
if [ "$GPU" = 1 ]; then
    run "$PY" -m pip install -q -r requirements-gpu.txt
    if [ "$FLASH_ATTN" = 1 ]; then
        # flash-attn is source-only on the index: its setup.py fetches a wheel prebuilt for this torch and
        # CUDA when one exists, else compiles; both need the installed torch, hence no build isolation.
        run "$PY" -m pip install -q "${BUILD_TOOLS[@]}"
        run "$PY" -m pip install --no-build-isolation "$FLASH_ATTN_SPEC"
    fi
fi
run "$PY" -m pip install -q "setuptools>=77"
run "$PY" -m pip install -q --no-deps --no-build-isolation -e .
if [ "$GPU" = 1 ] && [ "$DRY_RUN" = 0 ]; then
    "$PY" - <<'EOF'
import importlib

import torch

print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA device visible: {torch.cuda.is_available()}")
for name in ("torchvision", "flash_attn", "liger_kernel", "bitsandbytes"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '(no __version__)')}")
    except Exception as exc:  # report every package, not only the first one that fails
        print(f"{name}: not importable ({type(exc).__name__}: {exc})")
EOF
fi
