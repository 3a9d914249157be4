#!/bin/bash
# Boot the appliance image under QEMU (TCG, OVMF) and check it, as root on Debian 12:
#
#   sudo ./image/boot-test.sh          # builds target/image/ferry.raw first unless FERRY_IMAGE is set
#
# 1. healthy boot: q35 + OVMF, the image as a virtio disk (copy-on-write overlay grown to 8 GiB
#    so first boot can create /var), a blank NVMe disk as the cache, user networking with the
#    NBD (10809) and replication (7443) ports forwarded, both roles configured through SMBIOS
#    credentials. Passes when the serial console shows FERRY-HEALTHY and the host, through the
#    forwarded ports and the appliance's firewall, gets the NBD greeting and the master target's
#    TLS certificate.
# 2. tampered root: one byte of root partition A flipped in a copy of the image. Passes when the
#    system never reaches FERRY-HEALTHY and the kernel reports dm-verity corruption.
# Every QEMU is bounded by a timeout and killed on exit; scratch files live in /tmp/ferry-image-boot.*.
#
# Environment: FERRY_IMAGE (a built ferry.raw), FERRY_BOOT_TIMEOUT (seconds, default 900),
# FERRY_BOOT_KEEP=1 keeps the scratch directory (serial logs).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=image/lib.sh
. "$here/lib.sh"
timeout_s=${FERRY_BOOT_TIMEOUT:-900}
[ "$(id -u)" = 0 ] || { echo "boot-test.sh: run as root" >&2; exit 1; }
ensure_boot_deps

image=${FERRY_IMAGE:-}
if [ -z "$image" ]; then
  "$here/build.sh"
  image=$(cd "$here/.." && pwd)/target/image/ferry.raw
fi
[ -f "$image" ] || { echo "boot-test.sh: no image at $image" >&2; exit 1; }
image=$(readlink -f "$image")

work=$(mktemp -d /tmp/ferry-image-boot.XXXXXX)
qemu_pid=
cleanup() {
  if [ -n "$qemu_pid" ] && kill -0 "$qemu_pid" 2>/dev/null; then kill "$qemu_pid" 2>/dev/null || true; wait "$qemu_pid" 2>/dev/null || true; fi
  if [ "${FERRY_BOOT_KEEP:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# boot NAME DISK: start QEMU in the background with DISK as the boot disk; serial to $work/NAME.log
boot() {
  local name=$1 disk=$2
  cp /usr/share/OVMF/OVMF_VARS_4M.fd "$work/$name-vars.fd"
  qemu-img create -q -f qcow2 "$work/$name-cache.qcow2" 2G
  nbd_port=$(free_port) repl_port=$(free_port)
  local ps_env mt_env
  ps_env=$(printf 'FERRY_PROCESS_SERVER_ARGS=--disk vm1=1G --master 127.0.0.1:7443 --journal-capacity 64M\n' | base64 -w0)
  mt_env=$(printf 'FERRY_MASTER_TARGET_ARGS=--listen 0.0.0.0:7443\n' | base64 -w0)
  : > "$work/$name.log"
  timeout "$timeout_s" qemu-system-x86_64 -machine q35,accel=tcg -cpu max -smp 2 -m 1536 \
    -drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
    -drive if=pflash,format=raw,unit=1,file="$work/$name-vars.fd" \
    -drive file="$disk",if=none,id=boot,format=qcow2 -device virtio-blk-pci,drive=boot,bootindex=0 \
    -drive file="$work/$name-cache.qcow2",if=none,id=cache,format=qcow2 -device nvme,drive=cache,serial=ferry-cache \
    -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$nbd_port-:10809,hostfwd=tcp:127.0.0.1:$repl_port-:7443" \
    -device virtio-net-pci,netdev=n0 \
    -smbios "type=11,value=io.systemd.credential.binary:ferry.process-server.env=$ps_env" \
    -smbios "type=11,value=io.systemd.credential.binary:ferry.master-target.env=$mt_env" \
    -serial "file:$work/$name.log" -display none -monitor none -no-reboot &
  qemu_pid=$!
  boot_start=$(date +%s.%N)
}

# wait_for NAME PATTERN SECONDS: 0 when PATTERN shows in the serial log, 1 when QEMU ended or time ran out
wait_for() {
  local name=$1 pattern=$2 limit=$3 t=0
  while [ "$t" -lt "$limit" ]; do
    grep -aq -- "$pattern" "$work/$name.log" && return 0
    kill -0 "$qemu_pid" 2>/dev/null || return 1
    sleep 1; t=$((t + 1))
  done
  return 1
}

stop() {
  kill "$qemu_pid" 2>/dev/null || true; wait "$qemu_pid" 2>/dev/null || true; qemu_pid=
}

echo "== 1. healthy boot of $image"
qemu-img create -q -f qcow2 -b "$image" -F raw "$work/healthy.qcow2" 8G
boot healthy "$work/healthy.qcow2"
if ! wait_for healthy 'FERRY-HEALTHY\|FERRY-UNHEALTHY\|FERRY-UNCONFIGURED' "$timeout_s"; then
  tail -n 60 "$work/healthy.log"; echo "FAIL: no health line on the serial console within ${timeout_s}s"; exit 1
fi
healthy_at=$(date +%s.%N)
line=$(grep -a -m1 'FERRY-HEALTHY\|FERRY-UNHEALTHY\|FERRY-UNCONFIGURED' "$work/healthy.log" | tr -d '\r')
echo "serial: $line"
grep -a 'ferry-storage:\|ferry-provision:' "$work/healthy.log" | tr -d '\r' || true
case $line in *FERRY-HEALTHY*) ;; *) tail -n 80 "$work/healthy.log"; echo "FAIL: not healthy"; exit 1 ;; esac
# The hardware profiles were applied at boot (ferry-hw-tune.service ran and stayed active).
case $line in *hw-tune=active*) ;; *) tail -n 80 "$work/healthy.log"; echo "FAIL: ferry-hw-tune.service is not active"; exit 1 ;; esac
case $line in *journald=yes*) ;; *) tail -n 80 "$work/healthy.log"; echo "FAIL: the roles' logs are not structured journal entries"; exit 1 ;; esac
printf '== boot-to-healthy: %.0f s (QEMU start to FERRY-HEALTHY on the serial console, TCG)\n' \
  "$(echo "$healthy_at - $boot_start" | bc -l 2>/dev/null || python3 -c "print($healthy_at - $boot_start)")"
# Through the forwarded ports and the appliance's nftables policy, from the host.
python3 - "$nbd_port" "$repl_port" <<'EOF'
import socket, ssl, sys
nbd, repl = int(sys.argv[1]), int(sys.argv[2])
with socket.create_connection(("127.0.0.1", nbd), timeout=30) as s:
    s.settimeout(30)
    greeting = b""
    while len(greeting) < 16:
        chunk = s.recv(16 - len(greeting))
        if not chunk:
            break
        greeting += chunk
assert greeting[:8] == b"NBDMAGIC" and greeting[8:16] == b"IHAVEOPT", f"NBD greeting: {greeting!r}"
print(f"host -> :10809 (NBD): greeting {greeting[:8].decode()}/{greeting[8:16].decode()} from the process server")
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
with socket.create_connection(("127.0.0.1", repl), timeout=30) as raw:
    with ctx.wrap_socket(raw) as s:
        cert = s.getpeercert(binary_form=True)
        version = s.version()
assert cert, "no certificate from the master target"
print(f"host -> :7443 (replication): {version} handshake, server certificate {len(cert)} bytes")
EOF
stop

echo "== 2. tampered root: one byte flipped in root partition A"
cp --sparse=always "$image" "$work/tampered.raw"
python3 - "$work/tampered.raw" <<'EOF'
import struct, sys, uuid
path = sys.argv[1]
with open(path, "r+b") as f:
    f.seek(512)
    hdr = f.read(92)
    entries_lba, count, size = struct.unpack_from("<QII", hdr, 72)
    f.seek(entries_lba * 512)
    table = f.read(count * size)
    for i in range(count):
        e = table[i * size:(i + 1) * size]
        name = e[56:128].decode("utf-16-le").rstrip("\0")
        if name == "ferry-root-a":
            first = struct.unpack_from("<Q", e, 32)[0]
            break
    else:
        sys.exit("no partition ferry-root-a")
    # A byte in the squashfs superblock's block: read by every mount, so it cannot go unnoticed.
    at = first * 512 + 1000
    f.seek(at); b = f.read(1); f.seek(at); f.write(bytes([b[0] ^ 0xFF]))
    print(f"flipped byte {at} (root A + 1000): {b[0]:#04x} -> {b[0] ^ 0xFF:#04x}")
EOF
qemu-img create -q -f qcow2 -b "$work/tampered.raw" -F raw "$work/tampered.qcow2" 8G
boot tampered "$work/tampered.qcow2"
limit=$(( timeout_s < 600 ? timeout_s : 600 ))
if wait_for tampered 'FERRY-HEALTHY' "$limit"; then
  echo "FAIL: the tampered image came up healthy"; exit 1
fi
stop
if grep -aq 'device-mapper: verity: .* is corrupted' "$work/tampered.log"; then
  echo "caught by dm-verity (kernel): $(grep -a -m1 'device-mapper: verity: .* is corrupted' "$work/tampered.log" | tr -d '\r')"
  if grep -aq "dm-verity device corrupted" "$work/tampered.log"; then
    echo "the kernel restarted the machine (restart-on-corruption) before the root was used; QEMU (-no-reboot) stopped"
  fi
else
  tail -n 40 "$work/tampered.log"; echo "FAIL: no dm-verity corruption report on the console"; exit 1
fi
rm -f "$work/tampered.raw"
echo "== boot test passed"
