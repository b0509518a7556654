#!/usr/bin/env bash
# Wheels the bare GPU machine lacks, built here (online) for its Python 3.12: DeepSpeed's for
# the ZeRO-3 launch check (gpu_requirements_deepspeed.txt) and the smoke flow's with gpu = 1
# (gpu_requirements_flow.txt), in two folders each small enough for one device call's carry
# (64 MiB): DeepSpeed's all in benchmarks/wheels/2, the flow's spread over both.
#
#   bash benchmarks/gpu_wheels.sh        # -> benchmarks/wheels/1 and benchmarks/wheels/2
#   run(command="bash benchmarks/gpu_install.sh", carry=["benchmarks/wheels/1"])
#   run(command="bash benchmarks/gpu_check.sh", carry=["benchmarks/wheels/2"])   # at once:
#                                        # the warm machine keeps what the first installed
#
# gpu_check.sh with only folder 2 (one call, as before the flow was added) or none still runs
# everything but the parts whose packages are missing, and says which. GPU_PYTHON=3.11
# builds them for Python 3.11, to rehearse the install in a virtual environment here
# (docs/benchmarks.md §4).
set -euo pipefail
cd "$(dirname "$0")"
rm -rf wheels && mkdir -p wheels/1 wheels/2 wheels/flow
pins() { grep -v '^#' "$1" | grep -v '^$'; }
download() {  # binary wheels for the GPU machine's Python into folder $1
    local folder=$1; shift
    python -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version "${GPU_PYTHON:-3.12}" --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64 -d "$folder" "$@"
}
deepspeed=$(pins gpu_requirements_deepspeed.txt)
DS_BUILD_OPS=0 python -m pip wheel --quiet --no-deps -w wheels/2 \
    $(echo "$deepspeed" | grep '^deepspeed==')
download wheels/2 $(echo "$deepspeed" | grep -v '^deepspeed==')
download wheels/flow $(pins gpu_requirements_flow.txt)
# the flow's wheels, largest first, each into the lighter folder (DeepSpeed's already in 2)
python - <<'PY'
from pathlib import Path

parts = {part: sum(w.stat().st_size for w in part.iterdir())
         for part in (Path("wheels/1"), Path("wheels/2"))}
for wheel in sorted(Path("wheels/flow").iterdir(), key=lambda w: -w.stat().st_size):
    if (Path("wheels/2") / wheel.name).exists():  # pydantic's: DeepSpeed's too
        wheel.unlink()
        continue
    lighter = min(parts, key=parts.get)
    parts[lighter] += wheel.stat().st_size
    wheel.rename(lighter / wheel.name)
for part, size in parts.items():
    print(f"{part}: {len(list(part.iterdir()))} wheels, {size / 2**20:.1f} MiB")
    assert size < 60 * 2**20, f"{part} is over what one device call can carry"
PY
rmdir wheels/flow
