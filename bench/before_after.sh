#!/usr/bin/env bash
# Before/after in one run: the same benchmark command in another checkout of this repository (the
# "before", e.g. `git worktree add ../before main~5`) and in this one, in turns, so that a drifting load
# on a shared machine hits both alike. Each turn's output is printed under its label; with --json FILE
# on a bench script, point each side at its own file (the command may use {side}: before | after).
#
#   bash bench/before_after.sh ../before 3 python bench/bench_generate.py --models gpt2 --repeats 1
#   bash bench/before_after.sh ../before 2 python bench/bench_serve.py --clients 1 4 --json /tmp/{side}.jsonl
#   bash bench/before_after.sh ../before 3 python bench/vs_nanogpt.py ~/src/nanoGPT --shapes cpu --rounds 1
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: bash bench/before_after.sh OTHER_CHECKOUT ROUNDS COMMAND..." >&2
    exit 2
fi
before=$(cd "$1" && pwd)
after=$(cd "$(dirname "$0")/.." && pwd)
rounds=$2
shift 2
for round in $(seq 1 "$rounds"); do
    for side in before after; do
        dir=$before
        [ "$side" = after ] && dir=$after
        echo "=== round $round, $side ($(git -C "$dir" rev-parse --short HEAD), $dir)"
        # each side imports its own gpt/: the checkout first on the path, whatever is installed
        (cd "$dir" && PYTHONPATH="$dir" "${@//\{side\}/$side}")
    done
done
