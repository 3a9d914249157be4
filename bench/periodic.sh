#!/usr/bin/env bash
# Periodic protection versus restic and borg on one mixed disk image (default 8 GiB): the initial
# seed and the incremental after changing 1% of its 64 KiB blocks, by Ferry's periodic mode
# (qemu-storage-daemon dirty bitmaps + fleecing, real `ferry process-server` and
# `ferry master-target` on loopback) versus `restic backup` and `borg create --chunker-params
# fixed,4194304` of the same image file into local repositories. Prints wall time, CPU time and
# bytes stored, and the targets of issue 3 as pass/MISS (never fails on a miss).
#
#   bash bench/periodic.sh                             # 8 GiB: needs ~30 GB free in /tmp
#   FERRY_BENCH_PERIODIC_GIB=1 bash bench/periodic.sh  # a quick try
#
# Knobs (environment): FERRY_BENCH_PERIODIC_GIB (image size in GiB, default 8),
# FERRY_BENCH_PERIODIC_VERIFY (default 1: export Ferry's last point and compare it with the image),
# FERRY_BENCH_TMP (scratch parent; default a fresh /tmp/ferry-bench-periodic.* this script removes).
#
# Installs restic, borgbackup and qemu-utils (qemu-img, qemu-storage-daemon) with apt-get only
# when missing. Traffic goes only over loopback and unix sockets; every process the
# benchmark starts is stopped and every scratch file removed, also when the run times out.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

missing=()
command -v restic >/dev/null 2>&1 || missing+=(restic)
command -v borg >/dev/null 2>&1 || missing+=(borgbackup)
# qemu-img and qemu-storage-daemon both come with qemu-utils (Debian 12 backports and later).
{ command -v qemu-img && command -v qemu-storage-daemon; } >/dev/null 2>&1 || missing+=(qemu-utils)
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

cargo build --release -p ferry -p ferry-bench --bins
export FERRY_EXE="$PWD/target/release/ferry"

scratch="$(mktemp -d /tmp/ferry-bench-periodic.XXXXXX)"
trap 'rm -rf "$scratch"' EXIT
export FERRY_BENCH_TMP="${FERRY_BENCH_TMP:-$scratch}"

# timeout signals its whole process group, so a stuck run also takes its ferry/qemu children.
gib="${FERRY_BENCH_PERIODIC_GIB:-8}"
timeout $((900 + 600 * gib)) "$PWD/target/release/periodic"
