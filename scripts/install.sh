#!/usr/bin/env bash
# Installs everything the project needs into ./.venv on a Debian machine with Python 3.11:
# the packaged text corpora (Debian packages), torch 2.13.0 (first, so no CUDA build is pulled),
# DeepSpeed without C++ op builds, and this project (editable) with the extras given as $1 (e.g. "dev").
# Re-running is quick: nothing is reinstalled unless setup.py, this script or the extras changed.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
PYTHON="${PYTHON:-python3}"
DEBIAN_CORPORA=(bible-kjv anarchism dict-gcide fortunes)

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
for pkg in "${DEBIAN_CORPORA[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [[ ",$EXTRAS," == *",dev,"* ]] && ! command -v g++ >/dev/null; then
  missing+=(g++)  # the tests compile blocks with torch.compile, whose CPU code generation builds C++
fi
if ! "$PYTHON" -c "import ensurepip, venv" >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "[install] Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate

hash="$(cat setup.py scripts/install.sh | sha256sum | cut -c1-16)"
stamp=".venv/.installed-${hash}-${EXTRAS:-base}"
if [ -f "$stamp" ]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -c "import torch" >/dev/null 2>&1 || { echo "[install] torch 2.13.0"; pip install -q torch==2.13.0; }
echo "[install] project${EXTRAS:+ [$EXTRAS]} (DeepSpeed without op builds)"
DS_BUILD_OPS=0 pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
find .venv -maxdepth 1 -name '.installed-*' ! -name ".installed-${hash}-*" -delete  # stale: setup changed
touch "$stamp"
