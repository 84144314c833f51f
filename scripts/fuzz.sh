#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ (see README, "Fuzzing").
#
#   scripts/fuzz.sh [--replay] [TARGET...]
#
# Exploration (`make fuzz`): every target (or the ones named) runs for FUZZ_SECONDS seconds
# (default 60) with a random seed, which libFuzzer prints ("Seed: N"; FUZZ_SEED=N repeats a run).
# The seeds in fuzz/corpus/<target> are read but never written: what a run discovers goes to
# fuzz/target/corpus/<target> (git-ignored, kept between runs), a crash to fuzz/artifacts/<target>,
# and the script then fails.
#
# --replay (`make test`): deterministic. Each target runs every committed input of
# fuzz/corpus/<target> (the seeds and every crash found so far, kept there as regression inputs)
# once, under the fixed seed FUZZ_SEED (default 1), and nothing else: no mutation, since a
# fixed seed does not make libFuzzer's exploration repeatable (its coverage feedback differs
# from run to run, so two runs from seed 1 reach different inputs), and the scratch corpus of
# earlier explorations is not read. The same commit gives the same verdict on any machine.
#
# cargo-fuzz is installed with `cargo install --locked cargo-fuzz` when missing. It passes -Z flags
# to rustc, which the stable toolchain accepts under RUSTC_BOOTSTRAP=1 (set here, for the fuzz
# build only). The targets are built without a sanitizer (all of aimesh is safe Rust, so ASan
# would find little that libFuzzer's own crash and overflow detection does not) and with debug
# assertions and overflow checks on; see fuzz/Cargo.toml for the profile.
set -euo pipefail

cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}

replay=false
targets=()
for arg in "$@"; do
  case "$arg" in
    --replay) replay=true ;;
    -h | --help) sed -n '2,23p' "$0"; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $arg" >&2; exit 2 ;;
    *) targets+=("$arg") ;;
  esac
done
seconds=${FUZZ_SECONDS:-60}
seed_flags=()
if $replay; then
  seed_flags=("-seed=${FUZZ_SEED:-1}")
  echo "fuzz.sh: replay of the committed corpora, seed ${FUZZ_SEED:-1}"
elif [ -n "${FUZZ_SEED:-}" ]; then
  seed_flags=("-seed=$FUZZ_SEED")
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
  [ -d "$seeds" ] || { echo "fuzz.sh: no seed corpus $seeds" >&2; exit 1; }
  dictionary=()
  [ -f "fuzz/dictionaries/$target.dict" ] && dictionary=("-dict=fuzz/dictionaries/$target.dict")
  # The first corpus directory is where libFuzzer writes new inputs: a scratch one.
  if $replay; then
    found=$(mktemp -d)
    # -runs=0: execute the corpus, then stop.
    budget=(-runs=0)
    echo "fuzz.sh: $target: $(find "$seeds" -type f | wc -l) committed inputs"
  else
    found=fuzz/target/corpus/$target
    mkdir -p "$found"
    budget=(-max_total_time="$seconds")
    echo "fuzz.sh: $target for ${seconds} s"
  fi
  if ! $CARGO fuzz run "${fuzz_flags[@]}" "$target" "$found" "$seeds" -- \
      "${budget[@]}" "${seed_flags[@]}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "${dictionary[@]}"; then
    failed+=("$target")
  fi
  if $replay; then rm -rf "$found"; fi
done

echo "fuzz.sh: ${#targets[@]} targets in $((SECONDS - started)) s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: failed: ${failed[*]} (inputs in fuzz/artifacts/<target>; replay with" \
       "RUSTC_BOOTSTRAP=1 cargo fuzz run ${fuzz_flags[*]} <target> <file>; once fixed, keep the input" \
       "in fuzz/corpus/<target>/ as a regression input and its fix in a unit test)" >&2
  exit 1
fi
