#!/usr/bin/env bash
# Install what Ferry needs to build and to run its demo and tests on Debian 12, as root.
# Idempotent: skips what is already there.
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-img || need+=(qemu-utils)
have qemu-storage-daemon || need+=(qemu-utils qemu-system-common)
have qemu-io || need+=(qemu-utils)
have cc || need+=(gcc libc6-dev)
have ip || need+=(iproute2)
have python3 || need+=(python3)
# The console tests drive `ferry console` in tmux and change networks inside namespaces.
have tmux || need+=(tmux)
# The update tests install into a GPT disk image (sfdisk --part-uuid, as on the appliance).
have sfdisk || need+=(fdisk)
# ... from update media made as the image build makes them.
have xorriso || need+=(xorriso)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
if ! have cargo; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    echo "install-deps: no Rust toolchain (cargo) found; install rustup's stable toolchain first" >&2
    exit 1
  fi
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
