#!/usr/bin/env bash
# Build dist/edge-agent (one file) and dist/edge-agent-onedir/ (one folder, for the .deb)
# with PyInstaller, from one analysis (packaging/edge-agent.spec).
#
#   packaging/build_binary.sh                  # fresh build venv in build/venv (CI, release)
#   packaging/build_binary.sh --use-current    # the active/project venv (fast, for tests)
#   PYTHON=/usr/bin/python3.11 packaging/build_binary.sh   # base of the build venv
#   (with --use-current, PYTHON names the interpreter whose environment is bundled)
#   packaging/build_binary.sh --use-current --dist DIR --work DIR   # elsewhere (tests)
#
# The binary links against the build machine's glibc: build on the oldest distribution you
# deploy to (Debian 12 builds run on Debian 12 and newer).
# Output: dist/edge-agent and dist/edge-agent-onedir/edge-agent (+ _internal/).
set -euo pipefail

PYINSTALLER_VERSION="6.22.3"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

use_current=0
DIST="$ROOT/dist"
WORK="$ROOT/build/pyinstaller"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --use-current) use_current=1; shift ;;
    --dist) DIST="$(realpath -m "$2")"; shift 2 ;;
    --work) WORK="$(realpath -m "$2")"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "build_binary.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
done

if [[ $use_current == 1 ]]; then
  if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
  elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
    PY="$VIRTUAL_ENV/bin/python"
  elif [[ -x "$ROOT/.venv/bin/python" ]]; then
    PY="$ROOT/.venv/bin/python"
  else
    echo "build_binary.sh: --use-current needs an active venv or $ROOT/.venv" >&2
    exit 1
  fi
else
  base="${PYTHON:-python3}"
  "$base" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' || {
    echo "build_binary.sh: $base must be Python 3.11 or newer (set PYTHON=...)" >&2; exit 1; }
  rm -rf build/venv
  "$base" -m venv build/venv
  PY="$ROOT/build/venv/bin/python"
  "$PY" -m pip install --quiet --upgrade pip
  "$PY" -m pip install --quiet "$ROOT"
fi

# PyInstaller needs a Python built with --enable-shared (Debian's and pyenv's
# PYTHON_CONFIGURE_OPTS=--enable-shared are).
"$PY" - <<'PYCHECK'
import sys, sysconfig
if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
    sys.exit(f"build_binary.sh: {sys.executable} has no libpython shared library; "
             "use Debian's python3 or rebuild with --enable-shared")
PYCHECK

if ! "$PY" -m PyInstaller --version 2>/dev/null | grep -qx "$PYINSTALLER_VERSION"; then
  "$PY" -m pip install --quiet "pyinstaller==$PYINSTALLER_VERSION"
fi

"$PY" -m PyInstaller --noconfirm --clean --log-level WARN \
  --distpath "$DIST" --workpath "$WORK" \
  "$ROOT/packaging/edge-agent.spec"

echo "built $DIST/edge-agent ($(du -h "$DIST/edge-agent" | cut -f1))" \
  "and $DIST/edge-agent-onedir/ ($(du -sh "$DIST/edge-agent-onedir" | cut -f1))"
