#!/usr/bin/env bash
# Wheels the bare GPU machine lacks (benchmarks/gpu_requirements.txt: DeepSpeed for the ZeRO-3
# launch check, mlflow/metaflow/great-expectations and the rest for the smoke flow with
# gpu = 1), built here (online) for its Python 3.12 and split in two folders, each small
# enough for one device call's carry (64 MiB):
#
#   bash benchmarks/gpu_wheels.sh        # -> benchmarks/wheels/1 and benchmarks/wheels/2
#   run(command="bash benchmarks/gpu_install.sh", carry=["benchmarks/wheels/1"])
#   run(command="bash benchmarks/gpu_check.sh", carry=["benchmarks/wheels/2"])   # at once:
#                                        # the warm machine keeps what the first installed
#
# gpu_check.sh with only one folder installed (or none) still runs everything but the parts
# whose packages are missing, and says which. GPU_PYTHON=3.11 builds them for Python 3.11,
# to rehearse the install in a virtual environment here (docs/benchmarks.md §4).
set -euo pipefail
cd "$(dirname "$0")"
rm -rf wheels && mkdir -p wheels/all
requirements=$(grep -v '^#' gpu_requirements.txt | grep -v '^$')
DS_BUILD_OPS=0 python -m pip wheel --quiet --no-deps -w wheels/all \
    $(echo "$requirements" | grep '^deepspeed==')
python -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "${GPU_PYTHON:-3.12}" \
    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64 -d wheels/all \
    $(echo "$requirements" | grep -v '^deepspeed==')
# largest first, each into the lighter folder: two halves of ~50 MiB
python - <<'PY'
from pathlib import Path
parts = {Path("wheels/1"): 0, Path("wheels/2"): 0}
for part in parts:
    part.mkdir()
for wheel in sorted(Path("wheels/all").iterdir(), key=lambda w: -w.stat().st_size):
    lighter = min(parts, key=parts.get)
    parts[lighter] += wheel.stat().st_size
    wheel.rename(lighter / wheel.name)
for part, size in parts.items():
    print(f"{part}: {len(list(part.iterdir()))} wheels, {size / 2**20:.1f} MiB")
    assert size < 60 * 2**20, f"{part} is over what one device call can carry"
PY
rmdir wheels/all
