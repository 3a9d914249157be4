#!/usr/bin/env bash
# Periodic protection versus restic and borg on one mixed disk image (default 8 GiB): the initial
# seed and the incremental after changing 1% of its 64 KiB blocks, by Ferry's periodic mode
# (qemu-storage-daemon dirty bitmaps + fleecing, real `ferry process-server` and
# `ferry master-target` on loopback) versus `restic backup` and `borg create --chunker-params
# fixed,4194304` of the same image file into local repositories. Prints wall time, CPU time and
# bytes stored, and the targets of issue 3 as pass/MISS (never fails on a miss). Extra rows:
# borg with zstd level 1 (Ferry's default compressor) and a second Ferry seed with the lz4
# policy (borg's default compressor), each compressor against its like.
#
#   bash bench/periodic.sh                             # 8 GiB: needs ~40 GB free in /tmp
#   FERRY_BENCH_PERIODIC_GIB=1 bash bench/periodic.sh  # a quick try
#
# Knobs (environment): FERRY_BENCH_PERIODIC_GIB (image size in GiB, default 8),
# FERRY_BENCH_PERIODIC_VERIFY (default 1: export Ferry's last point and compare it with the image),
# FERRY_BENCH_PERIODIC_PEERS (default 1; 0 runs Ferry alone, judging no target: for work on Ferry),
# FERRY_EXE (the ferry binary to measure; default this tree's release build: compare two builds),
# FERRY_BENCH_PERIODIC_FRESH_FS (default 1: as root, each tool's repository, Ferry's lab too, on
# a fresh ext4 of its own, a sparse file in $TMPDIR on a loop device: a store's speed depends on
# what its filesystem held before; 0: all on the one scratch filesystem below),
# FERRY_BENCH_TMP (scratch parent; default a fresh journaled ext4 on a loop device, made and
# removed by this script, see below; without root a fresh /tmp/ferry-bench-periodic.*).
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

: no build
export FERRY_EXE="${FERRY_EXE:-$PWD/target/release/ferry}"

scratch="$(mktemp -d /tmp/ferry-bench-periodic.XXXXXX)"
cleanup() {
  if mountpoint -q "$scratch/fs"; then umount "$scratch/fs" || umount -l "$scratch/fs"; fi
  rm -rf "$scratch"
}
trap cleanup EXIT
gib="${FERRY_BENCH_PERIODIC_GIB:-8}"

# Every tool's repository (and the image) goes on one fresh ext4 filesystem made as the appliance
# makes its /var and cache (`mkfs.ext4` defaults: with a journal), on a loop device. Not the
# host's /tmp: this machine's root is ext4 WITHOUT a journal, where creating a file next to
# recently deleted ones (every cargo build, the previous run) makes ext4 scan for an inode it
# may reuse (`recently_deleted`, journal-less only) and a file-per-object store pays for it per
# object, so the figures would measure the host's filesystem. FERRY_BENCH_TMP overrides (e.g.
# /dev/shm); without root or mkfs.ext4 the scratch stays in /tmp.
if [ -z "${FERRY_BENCH_TMP:-}" ] && [ "$(id -u)" = 0 ] && command -v mkfs.ext4 >/dev/null \
  && truncate -s $((4 * gib + 8))G "$scratch/fs.img" && mkfs.ext4 -q -F "$scratch/fs.img" \
  && mkdir "$scratch/fs" && mount -o loop "$scratch/fs.img" "$scratch/fs"; then
  echo "scratch filesystem: a fresh ext4 with a journal (mkfs.ext4 defaults, as the appliance's) on a loop device"
  export FERRY_BENCH_TMP="$scratch/fs"
fi
export FERRY_BENCH_TMP="${FERRY_BENCH_TMP:-$scratch}"

# timeout signals its whole process group, so a stuck run also takes its ferry/qemu children.
timeout $((900 + 600 * gib)) "$PWD/target/release/periodic"
