#!/usr/bin/env bash
# On the GPU machine: loramoe without dependencies, then the wheels of each carried folder
# (benchmarks/wheels/1, benchmarks/wheels/2: benchmarks/gpu_wheels.sh) that the machine lacks.
# Unpinned and without dependencies, so a package the machine already has is kept as it is.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
python -m pip install --quiet --no-deps --no-build-isolation -e . || status=1
for folder in benchmarks/wheels/*/; do
    [ -d "$folder" ] || continue
    names=$(ls "$folder" | grep '\.whl$' | cut -d- -f1)
    echo "installing what is missing of ${folder}: $(echo $names | wc -w) wheels"
    python -m pip install --quiet --no-index --no-deps --find-links "$folder" $names || status=1
done
exit $status
