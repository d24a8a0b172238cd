#!/usr/bin/env bash
# Replays every committed corpus input of every fuzz target, then fuzzes each for
# SMOKE_SECONDS (default 15). New inputs go to a scratch directory, so the committed corpora
# stay as they are. Needs cargo-fuzz (`cargo install cargo-fuzz`); the toolchain may be stable
# (RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its flags, and `-s none` needs no sanitizer runtime).
# A crash stops the run with libFuzzer's report; the input is left under fuzz/artifacts/.
set -euo pipefail
cd "$(dirname "$0")"
secs=${SMOKE_SECONDS:-15}
export RUSTC_BOOTSTRAP=1
cargo fuzz build -s none
for target in $(cargo fuzz list); do
  scratch=$(mktemp -d)
  log=$(mktemp)
  echo "== fuzz $target: replay corpus/$target, then ${secs}s"
  status=0
  cargo fuzz run -s none "$target" "$scratch" "corpus/$target" -- \
    -max_total_time="$secs" -rss_limit_mb=4096 -print_final_stats=1 >"$log" 2>&1 || status=$?
  grep -E "INITED|DONE|stat::number_of_executed_units" "$log" || true
  rm -rf "$scratch"
  if [ "$status" -ne 0 ]; then
    tail -n 60 "$log" >&2
    echo "fuzz target $target failed (exit $status); the input is under fuzz/artifacts/$target/" >&2
    exit "$status"
  fi
  rm -f "$log"
done
