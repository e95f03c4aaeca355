#!/usr/bin/env bash
# Set up a fresh machine and run every test: pytest, then the iotests.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for pair in qemu-img:qemu-utils qemu-io:qemu-utils qemu-nbd:qemu-utils \
            qemu-storage-daemon:qemu-system-common fio:fio nbdinfo:libnbd-bin nbdkit:nbdkit strace:strace; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi

PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test]' \
    --config-settings editable_mode=compat

status=0
python3 -m mypy blockd || status=$?
python3 -m pytest -q tests || status=$?
python3 iotests/check || status=$?
exit $status
