#!/usr/bin/env bash
# Ferry benchmarks: run them in sequence and print their figures (they are not tests: they
# report targets as pass/MISS but never fail on a miss).
#
#   bash bench/run.sh            # from anywhere; about 3-4 minutes on 2 cores
#
# 1. pipeline  one core, mixed 256 MiB image in memory (1/4 ELF binaries from /usr, 1/4 text,
#              1/4 zeros, 1/4 random) in 64 KiB blocks: MB/s of zero check, keyed BLAKE3,
#              zstd, lz4, AES-256-GCM, seal, the whole per-block pipeline with zstd (the
#              default) and with lz4 (a policy's choice), and checkpoint::Builder; compression
#              and dedup ratios, and Debian's `zstd -b1 -B64K` and `lz4 -b1 -B65536` on the same
#              image as peers. Targets: AES-256-GCM >= 2000 MB/s, pipeline >= 500.
# 2. ingest    sequential 1 MiB and random 4 KiB NBD writes (no FUA, queue depth 1 and 16) into
#              the real `ferry process-server` (+ master-target, shipping live) versus a plain
#              `qemu-nbd --cache=writeback` raw file: MB/s, IOPS, p50/p99/max latency per write.
#              Targets: >= 80% of qemu-nbd throughput, <= 1 ms added p99 for 4 KiB.
# 3. rpo       50 MB/s paced writes for 30 s through the process server's NBD export,
#              checkpoint interval 1000 ms; recovery point lag sampled every 100 ms from
#              <cache>/<disk>/status.json: p50/p99/max. Target p99 <= 2 s.
#
# Each can run alone: cargo run --release -p ferry-bench --bin pipeline|ingest|rpo|inventory
# Knobs (environment): FERRY_BENCH_IMAGE_MIB, FERRY_BENCH_MIN_SECS (pipeline);
# FERRY_BENCH_CACHE_IO=auto|direct|buffered (the journal's writes, ingest and rpo);
# FERRY_BENCH_SECS, FERRY_BENCH_SEQ_MIB (ingest); FERRY_BENCH_RPO_SECS, FERRY_BENCH_RPO_MBPS,
# FERRY_BENCH_INTERVAL_MS (rpo); FERRY_BENCH_TMP (scratch parent, default: a fresh directory
# under /tmp that this script removes).
#
# 4. periodic  (bench/periodic.sh, run last; skip with FERRY_BENCH_PERIODIC_GIB=0) one mixed
#              8 GiB image (FERRY_BENCH_PERIODIC_GIB): seed and 1%-changed incremental by Ferry's
#              periodic mode (qemu-storage-daemon dirty bitmaps) versus restic and borg (fixed
#              4 MiB chunker; and borg with zstd,1) on a fresh journaled ext4 (loop device):
#              wall, CPU, bytes stored. Targets: seed
#              >= 1.5x, incremental >= 20x faster than the faster peer. Adds ~15 min and needs
#              ~30 GB in /tmp; installs restic and borgbackup when missing.
#
# 5. inventory (only with FERRY_BENCH_INVENTORY=1, run last; about 1-2 min) a real `ferry
#              config-server` with 10 tenants, 2,500 machines, 10,000 disks (FERRY_BENCH_DISKS,
#              FERRY_BENCH_TENANTS) created and reported through the API: the status endpoints over
#              mutual TLS and `ferry ctl status` (table, --json) as whole processes, p50/p99/max;
#              the server's VmRSS/VmHWM and sled size. Target: p99 < 200 ms.
#
# Installs qemu-utils (for qemu-nbd), zstd and lz4 (the pipeline's peers) when missing.
# Traffic goes only to 127.0.0.1; every process the benchmarks start is stopped and every
# scratch file removed, also when a run times out.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

missing=()
command -v qemu-nbd >/dev/null 2>&1 || missing+=(qemu-utils)
# Debian's zstd program: the pipeline's peer row (zstd's own benchmark on the same image).
command -v zstd >/dev/null 2>&1 || missing+=(zstd)
command -v lz4 >/dev/null 2>&1 || missing+=(lz4)
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

cargo build --release -p ferry -p ferry-bench --bins
export FERRY_EXE="$PWD/target/release/ferry"
bin="$PWD/target/release"

scratch="$(mktemp -d /tmp/ferry-bench.XXXXXX)"
trap 'rm -rf "$scratch"' EXIT
export FERRY_BENCH_TMP="${FERRY_BENCH_TMP:-$scratch}"

# timeout signals its whole process group, so a stuck run also takes its ferry/qemu-nbd children.
pin=()
command -v taskset >/dev/null 2>&1 && pin=(taskset -c 0)
status=0
echo "== 1/3 pipeline (one core) =="
timeout 300 "${pin[@]}" "$bin/pipeline" || status=$?
echo
echo "== 2/3 ingest: ferry process server vs qemu-nbd =="
timeout 600 "$bin/ingest" || status=$?
echo
echo "== 3/3 rpo =="
timeout 300 "$bin/rpo" || status=$?
[[ "${FERRY_BENCH_PERIODIC_GIB:-8}" == 0 ]] || { echo; echo "== 4/4 periodic vs restic, borg =="; bash bench/periodic.sh || status=$?; }
if [[ "${FERRY_BENCH_INVENTORY:-0}" == 1 ]]; then
  echo
  echo "== 5/5 inventory: 10,000 disks at the configuration server =="
  timeout 900 "$bin/inventory" || status=$?
fi
exit "$status"
