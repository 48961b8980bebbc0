#!/usr/bin/env bash
# A snapshot of another commit's code, to run beside this tree in one device call (gpu_session.sh:
# STEP_VARIANTS="name@DIR:..." or TREES="DIR ."):
#   bash benchmarks/snapshot_tree.sh COMMIT [DIR]     # DIR defaults to _ab/<short commit>
# Only what the engine, the probes and Triton's models need (no results, tests or docs: ~1 MB). _ab/ is
# ignored by git here (.git/info/exclude), so name it in the device call's carry.
set -euo pipefail
commit=$(git rev-parse --short "${1:?usage: snapshot_tree.sh COMMIT [DIR]}")
dir=${2:-_ab/$commit}
grep -qx '/_ab/' .git/info/exclude 2>/dev/null || echo '/_ab/' >>.git/info/exclude
rm -rf "$dir" && mkdir -p "$dir"
paths=(engine build_engine model_repository client pyproject.toml)
mapfile -t probes < <(git ls-tree --name-only "$commit" benchmarks/ | grep '\.py$')
git archive "$commit" "${paths[@]}" "${probes[@]}" | tar x -C "$dir"
echo "$commit" >"$dir/SNAPSHOT_COMMIT"  # what the benchmarks record as the commit run (benchmarks.results)
echo "$dir: $(du -sh "$dir" | cut -f1) of $commit"
