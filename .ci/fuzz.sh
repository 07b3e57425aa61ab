#!/usr/bin/env bash
# Runs every fuzz target under libFuzzer for SECONDS each (default 80; eight
# targets, so 80 s each is a little over ten minutes in all). Needs the
# nightly toolchain; installs cargo-fuzz on first use. Logs and corpora go to
# target/fuzz/; the last lines of each log (executions, coverage) are
# gathered into target/fuzz/summary.txt. A crash or a time-out stops the run
# with libFuzzer's report and the input that caused it.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET="${1:-80}"
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "make fuzz needs the nightly toolchain (rustup toolchain install nightly)" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
out=target/fuzz
mkdir -p "$out/logs"
cargo run --quiet -p lmspec-fuzz --bin fuzz-seeds -- "$out/corpus"
# Templates and expansions are bounded; keep one input's work short.
export LMSPEC_TEMPLATE_FUEL=1000000
: > "$out/summary.txt"
for t in expr spec_yaml config_bind safetensors_header gguf_header chat_template tool_calls tokenizer image image_processor; do
  echo "== $t (${SECONDS_PER_TARGET}s)"
  cargo +nightly fuzz run --fuzz-dir engine/fuzz/cargo-fuzz --sanitizer none --debug-assertions \
    "$t" "$out/corpus/$t" -- -max_total_time="$SECONDS_PER_TARGET" -timeout=10 \
    -rss_limit_mb=4096 -print_final_stats=1 >"$out/logs/$t.log" 2>&1 || {
      tail -40 "$out/logs/$t.log"; exit 1; }
  {
    echo "$t: $(grep -E '^#[0-9]+.*DONE' "$out/logs/$t.log" | tail -1)"
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$out/logs/$t.log" | sed 's/^/  /'
  } >> "$out/summary.txt"
done
cat "$out/summary.txt"
