# Sourced by the GPU-machine scripts (gpu_check.sh, quality_on_gpu.sh) from the repository root: makes lightly and
# faiss importable on a machine without internet (from the copies carried in $PKGS, see gpu_check.sh's header)
# and BatchSSL's packages importable without installing them.
PKGS=${PKGS:-.devpkgs}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
if ! python3 -c "import lightly, faiss" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$PKGS"/faiss_cpu-*.whl
  cp -r "$PKGS/lightly" /tmp/site/
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/ssl:$PWD
