#!/usr/bin/env bash
# The test command: installs what is missing, builds, runs every test (unit, crate integration
# and end-to-end with real QEMU), then the formatting and lint gates.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo nextest run --workspace --no-fail-fast --profile ci
