#!/usr/bin/env bash
# Install daptq into ./.venv: system libraries for offscreen MuJoCo rendering (EGL/Mesa), then the pinned
# Python packages (CPU torch; constraints.txt keeps every version reproducible).
set -euo pipefail
cd "$(dirname "$0")"

need=()
for pkg in libegl1 libgl1 libegl-mesa0 libgl1-mesa-dri libglib2.0-0; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
    echo "setup: installing system packages for rendering: ${need[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
# LIBERO (the libero extra) is installed too unless DAPTQ_LIBERO=0: ~0.7 GB download and ~1.5 minutes
# (docs/benchmark.md, "LIBERO"); without it the libero suite and its tests are skipped with that reason.
extras="dev"; [ "${DAPTQ_LIBERO:-1}" = "0" ] || extras="dev,libero"
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[$extras]"
# torchao was a test dependency of older versions; `import transformers` imports it when present, and every
# process then prints its native-library failures and torch deprecation warnings.
if .venv/bin/python -m pip show -q torchao >/dev/null 2>&1; then
    .venv/bin/python -m pip uninstall -y -q torchao
fi
echo "setup: daptq installed in $(pwd)/.venv"
