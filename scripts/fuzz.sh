#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ (see README, "Fuzzing").
#
#   scripts/fuzz.sh [--smoke] [TARGET...]
#
# Every target (or the ones named) runs for FUZZ_SECONDS seconds (default 60); --smoke runs each
# for FUZZ_SMOKE_SECONDS (default 10), as `make test` does. The seeds in fuzz/corpus/<target> are
# read but never written: what a run discovers goes to fuzz/target/corpus/<target> (git-ignored,
# kept between runs), a crash to fuzz/artifacts/<target>, and the script then fails.
#
# cargo-fuzz is installed with `cargo install --locked cargo-fuzz` when missing. It passes -Z flags
# to rustc, which the stable toolchain accepts under RUSTC_BOOTSTRAP=1 (set here, for the fuzz
# build only). The targets are built without a sanitizer (all of aimesh is safe Rust, so ASan
# would find little that libFuzzer's own crash and overflow detection does not) and with debug
# assertions and overflow checks on; see fuzz/Cargo.toml for the profile.
set -euo pipefail

cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}

smoke=false
targets=()
for arg in "$@"; do
  case "$arg" in
    --smoke) smoke=true ;;
    -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $arg" >&2; exit 2 ;;
    *) targets+=("$arg") ;;
  esac
done
if $smoke; then
  seconds=${FUZZ_SMOKE_SECONDS:-10}
else
  seconds=${FUZZ_SECONDS:-60}
fi

if ! $CARGO fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: cargo-fuzz is missing; installing it (cargo install --locked cargo-fuzz)"
  $CARGO install --locked cargo-fuzz
fi

export RUSTC_BOOTSTRAP=1
fuzz_flags=(--sanitizer none --debug-assertions --fuzz-dir fuzz)

if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <($CARGO fuzz list --fuzz-dir fuzz)
fi

started=$SECONDS
# One build of every target first, so the runs below only run.
$CARGO fuzz build "${fuzz_flags[@]}"
echo "fuzz.sh: built in $((SECONDS - started)) s"

failed=()
for target in "${targets[@]}"; do
  seeds=fuzz/corpus/$target
  found=fuzz/target/corpus/$target
  [ -d "$seeds" ] || { echo "fuzz.sh: no seed corpus $seeds" >&2; exit 1; }
  mkdir -p "$found"
  dictionary=()
  [ -f "fuzz/dictionaries/$target.dict" ] && dictionary=("-dict=fuzz/dictionaries/$target.dict")
  echo "fuzz.sh: $target for ${seconds} s"
  # The first corpus directory is where libFuzzer writes new inputs: the scratch one.
  if ! $CARGO fuzz run "${fuzz_flags[@]}" "$target" "$found" "$seeds" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "${dictionary[@]}"; then
    failed+=("$target")
  fi
done

echo "fuzz.sh: ${#targets[@]} targets in $((SECONDS - started)) s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: failed: ${failed[*]} (inputs in fuzz/artifacts/<target>; replay with" \
       "RUSTC_BOOTSTRAP=1 cargo fuzz run ${fuzz_flags[*]} <target> <file>)" >&2
  exit 1
fi
