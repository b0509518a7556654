#!/usr/bin/env bash
# Wheels the bare GPU machine lacks for the ZeRO-3 launch check, built here (online) for its
# Python 3.12: DeepSpeed (pure Python, ops built just in time) and what it needs beyond the
# machine's torch/accelerate packages. Then carry the folder to the device run:
#
#   bash benchmarks/gpu_wheels.sh          # -> benchmarks/wheels/ (ignored by git)
#   run(command="bash benchmarks/gpu_check.sh", carry=["benchmarks/wheels"])
#
# gpu_check.sh installs them when the folder is there, and the launch check adds full SFT
# under infra/accelerate/deepspeed_zero3.yaml.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p wheels
DS_BUILD_OPS=0 python -m pip wheel --quiet --no-deps -w wheels "deepspeed==0.19.8"
# pydantic pins its core exactly: keep the pair together
python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d wheels \
    einops hjson msgpack ninja py-cpuinfo "pydantic==2.13.4" "pydantic-core==2.46.4" \
    annotated-types typing-inspection typing-extensions
du -sh wheels
