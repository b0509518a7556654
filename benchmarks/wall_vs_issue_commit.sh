#!/usr/bin/env bash
# Issue #14's wall-time target on the old run's work: the issue's commit (9f000e0, its 663 s
# default run, 48 knowledge facts) against this checkout's HEAD on the same eval
# (benchmarks/configs/eval_of_2026-11-24.toml), one after the other on this machine, each from
# a fresh clone, base evaluation computed in both. Prints both wall times and their ratio.
#
#   bash benchmarks/wall_vs_issue_commit.sh [OLD_COMMIT]     # ~50 min on a 2-core fp32 CPU
#
# Needs the packages of scripts/install.sh (both commits run on them) and a C++ compiler for
# the old commit's CPU kernels. Each clone is put first on PYTHONPATH, so the editable install
# of this checkout is left alone. Logs and clones: outputs/wall_vs_issue_commit/. Run nothing
# else on the machine meanwhile: the two runs are compared with each other.
set -euo pipefail
cd "$(dirname "$0")/.."
old=${1:-9f000e0}
new=$(git rev-parse --short HEAD)
work=$PWD/outputs/wall_vs_issue_commit
rm -rf "$work" && mkdir -p "$work"
git clone -q . "$work/old" && git -C "$work/old" checkout -q "$old"
git clone -q . "$work/new"
lscpu | grep -E "Model name|CPU family|Model:" | tee "$work/cpu.txt"
(cd "$work/old" && PYTHONPATH=$work/old python -c "from loramoe.cpu_kernels import report; report()")

timed() {  # timed NAME CLONE [flow args...]: wall seconds of one flow run, its log kept
    local name=$1 clone=$2
    shift 2
    # the old commit's steps leave their scratch folders (~5 GB a run, f4bed72 fixed it later):
    # each run gets its own temp folder, removed after it
    local scratch=$work/tmp-$name
    mkdir -p "$scratch"
    local started=$SECONDS
    (cd "$clone" && TMPDIR=$scratch PYTHONPATH=$clone python flows/full_pipeline.py "$@" run) \
        > "$work/$name.log" 2>&1 || { echo "$name run failed: $work/$name.log" >&2; exit 1; }
    echo $((SECONDS - started))
    rm -rf "$scratch"
}
old_s=$(timed old "$work/old")
new_s=$(timed new "$work/new" --config config benchmarks/configs/eval_of_2026-11-24.toml)
python - "$old" "$old_s" "$new" "$new_s" <<'EOF'
import sys

old, old_s, new, new_s = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
print(f"{old} (its default): {old_s} s | {new} (eval_of_2026-11-24.toml): {new_s} s | "
      f"{old_s / new_s:.2f}x faster (target >= 1.5x)")
EOF
