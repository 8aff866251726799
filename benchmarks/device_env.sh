# Sourced from the repository root by the GPU scripts (gpu_check.sh, quality_on_gpu.sh): chooses the Python to run
# and checks, before anything starts, that it has a CUDA GPU and the packages BatchSSL needs.
#
#   PYTHON   the interpreter (default: .venv/bin/python when `make setup` made one, else python3). Any Python with a
#            CUDA build of torch works: install the rest with `python -m pip install -r requirements.txt` (on a
#            machine without internet: `pip download -r requirements.txt -d WHEELS` elsewhere, copy WHEELS, then
#            `pip install --no-index --find-links WHEELS -r requirements.txt`).
#
# BatchSSL itself is put on PYTHONPATH (the same as its editable install), so the repository needs no install step.
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/ssl:$PWD${PYTHONPATH:+:$PYTHONPATH}"
_missing=$("$PYTHON" - <<'EOF' 2>/dev/null || echo "a working $PYTHON"
import importlib.util
need = ["torch", "torchvision", "lightly", "faiss", "accelerate", "yaml", "safetensors", "tqdm"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
EOF
)
if [ -n "$_missing" ]; then
  echo "$(basename "$0"): $PYTHON lacks $_missing: run make setup, or install requirements.txt into it (see" \
    "benchmarks/device_env.sh)" >&2
  exit 2
fi
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "$(basename "$0"): no CUDA GPU visible to $PYTHON's torch; this script measures a GPU" >&2
  exit 2
fi
unset _missing
