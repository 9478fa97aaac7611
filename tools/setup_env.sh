#!/usr/bin/env bash
# Set up the Python environment for the collection, idempotently.
#   bash tools/setup_env.sh         runtime packages (bundles, tools, demo)
#   bash tools/setup_env.sh --dev   plus the test and lint tools
# The environment is .venv at the repository root, or the interpreter named by $PYTHON (for example a conda env that
# already has a CUDA build of torch). torch itself is installed only when none is importable, and then as the CPU
# wheel torch==2.13.0: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
requirements="$root/requirements.txt"
[ "${1:-}" = "--dev" ] && requirements="$root/requirements-dev.txt"

if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
else
  [ -x "$root/.venv/bin/python" ] || python3 -m venv "$root/.venv"
  py="$root/.venv/bin/python"
fi
pip=("$py" -m pip install --quiet --disable-pip-version-check)
"$py" -c "import torch" 2>/dev/null || "${pip[@]}" torch==2.13.0
"${pip[@]}" -r "$requirements"
# the shared package, editable so that the bundles always use this checkout's code; checked from / so that the
# checkout itself (the current folder) does not pass for an installed package
(cd / && "$py" -c "import swin_unetr_kit, sys; sys.exit(not swin_unetr_kit.__file__.startswith('$root/'))") 2>/dev/null ||
  "${pip[@]}" --no-deps -e "$root"
# tcmalloc, the fastest CPU allocator measured for the bundles (docs/performance.md), used by the demo and the
# benchmark and by runs started with LD_PRELOAD=libtcmalloc_minimal.so.4; best effort: only where apt-get runs as root
if ! ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -qq libtcmalloc-minimal4 || { apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4; }; } \
      >/dev/null 2>&1 || echo "note: libtcmalloc-minimal4 not installed; the bundles run with glibc's allocator"
  else
    echo "note: install libtcmalloc-minimal4 (apt) or gperftools (conda) for faster CPU runs (docs/performance.md)"
  fi
fi
echo "environment ready: $py"
