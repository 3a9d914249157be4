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
#    The health line names slot a.
# 2. updates from update media (an ISO attached as a CD-ROM), on the same disk, powered off
#    between the steps (QEMU stopped):
#    a. a medium with a bundle whose signature was damaged and one signed by another key: both
#       refused on the console, slot A stays healthy, and slot B's partitions and both GPTs are
#       byte for byte what they were;
#    b. a signed but broken update (its roles fail): installed into slot B, rebooted into; each
#       trial boot of B is unhealthy and reboots itself; when its tries are gone slot A boots and
#       comes up healthy, and does not install the same bundle again although it is still attached;
#    c. a good signed update: installed into slot B, booted, healthy (the health line names slot b
#       and the new version), blessed: its boot entry on the ESP has lost its boot counter. The
#       same media also carries the build's own release (ferry-update.bundle, the version slot A
#       runs): once slot B runs, it is refused on the console as a downgrade.
#    These boots let the guest reboot itself (no -no-reboot): the fallback happens by itself.
# 3. tampered root: one byte of root partition A flipped in a copy of the image. Passes when the
#    system never reaches FERRY-HEALTHY and the kernel reports dm-verity corruption.
# Every QEMU is bounded by a timeout and killed on exit; scratch files live in /tmp/ferry-image-boot.*.
#
# Environment: FERRY_IMAGE (a built ferry.raw, with build.sh's other outputs beside it),
# FERRY_BOOT_TIMEOUT (seconds, default 900), FERRY_BOOT_KEEP=1 keeps the scratch directory
# (serial logs), FERRY_UPDATE_KEY_DIR (the key the image was built with; as build.sh),
# FERRY_BOOT_UPDATES=0 skips step 2.
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

# boot NAME DISK [ISO]: start QEMU in the background with DISK as the boot disk and ISO as a
# CD-ROM; serial to $work/NAME.log. The NVMe cache disk and the firmware variables belong to
# the machine ($machine, default NAME): they persist across the boots of one machine.
# REBOOTS=yes lets the guest reboot itself; otherwise QEMU ends when the guest resets.
# QEMU_LIMIT bounds the whole QEMU run (all its boots), default FERRY_BOOT_TIMEOUT.
boot() {
  local name=$1 disk=$2 iso=${3:-} m=${machine:-$1}
  [ -e "$work/$m-vars.fd" ] || cp /usr/share/OVMF/OVMF_VARS_4M.fd "$work/$m-vars.fd"
  [ -e "$work/$m-cache.qcow2" ] || qemu-img create -q -f qcow2 "$work/$m-cache.qcow2" 2G
  local extra=(-no-reboot)
  [ "${REBOOTS:-no}" = yes ] && extra=()
  [ -n "$iso" ] && extra+=(-drive "file=$iso,media=cdrom,readonly=on,format=raw")
  nbd_port=$(free_port) repl_port=$(free_port)
  local ps_env mt_env
  ps_env=$(printf 'FERRY_PROCESS_SERVER_ARGS=--disk vm1=1G --master 127.0.0.1:7443 --journal-capacity 64M\n' | base64 -w0)
  mt_env=$(printf 'FERRY_MASTER_TARGET_ARGS=--listen 0.0.0.0:7443\n' | base64 -w0)
  : > "$work/$name.log"
  timeout "${QEMU_LIMIT:-$timeout_s}" qemu-system-x86_64 -machine q35,accel=tcg -cpu max -smp 2 -m 1536 \
    -drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
    -drive if=pflash,format=raw,unit=1,file="$work/$m-vars.fd" \
    -drive file="$disk",if=none,id=boot,format=qcow2 -device virtio-blk-pci,drive=boot,bootindex=0 \
    -drive file="$work/$m-cache.qcow2",if=none,id=cache,format=qcow2 -device nvme,drive=cache,serial=ferry-cache \
    -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$nbd_port-:10809,hostfwd=tcp:127.0.0.1:$repl_port-:7443" \
    -device virtio-net-pci,netdev=n0 \
    -smbios "type=11,value=io.systemd.credential.binary:ferry.process-server.env=$ps_env" \
    -smbios "type=11,value=io.systemd.credential.binary:ferry.master-target.env=$mt_env" \
    -serial "file:$work/$name.log" -display none \
    -monitor "unix:$work/$name.mon,server=on,wait=off" "${extra[@]}" &
  qemu_pid=$!
  qemu_name=$name
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

# shutdown: the ACPI power button (QEMU monitor system_powerdown), as an operator would do it
# from the hypervisor; systemd powers off cleanly (the ESP and /var are written back). Killed
# when it has not ended after 120 s.
shutdown() {
  python3 - "$work/$qemu_name.mon" <<'PY' || true
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1]); time.sleep(0.5); s.sendall(b"system_powerdown\n"); time.sleep(0.5)
PY
  local t=0
  while kill -0 "$qemu_pid" 2>/dev/null && [ $t -lt 120 ]; do sleep 1; t=$((t + 1)); done
  if kill -0 "$qemu_pid" 2>/dev/null; then echo "(no clean power-off in 120 s: QEMU killed)"; fi
  stop
}

fail() { # NAME MESSAGE
  tail -n 80 "$work/$1.log" | tr -d '\r'; echo "FAIL: $2"; exit 1
}

secs_since() { python3 -c "import sys,time; print(round(time.time() - float(sys.argv[1])))" "$1"; }

# read_disk DISK OFFSET LENGTH OUT: bytes of a qcow2 disk into the file OUT (qemu-img dd, in 1 MiB
# blocks when aligned; its count= includes the skipped blocks, and it exits 0 on a bad offset).
# slot_b_digest DISK: SHA-256 of the primary and backup GPT and of slot B's two partitions, read
# from the (powered-off) qcow2 disk.
slot_b_digest() {
  python3 - "$1" "$work/dd" <<'PY'
import hashlib, json, struct, subprocess, sys
disk, tmp = sys.argv[1], sys.argv[2]
size = json.loads(subprocess.check_output(["qemu-img", "info", "--output=json", disk]))["virtual-size"]
def read(offset, length):
    bs = 1 << 20 if offset % (1 << 20) == 0 and length % (1 << 20) == 0 else 512
    subprocess.check_call(["qemu-img", "dd", "-f", "qcow2", "-O", "raw", f"bs={bs}",
                           f"skip={offset // bs}", f"count={(offset + length) // bs}",
                           f"if={disk}", f"of={tmp}"], stdout=subprocess.DEVNULL)
    data = open(tmp, "rb").read()
    if len(data) != length:
        sys.exit(f"read {len(data)} bytes at {offset} of {disk}, wanted {length}")
    return data
head = read(0, 34 * 512)
entries_lba, count, esize = struct.unpack_from("<QII", head, 512 + 72)
out = {"gpt": hashlib.sha256(head[512:]).hexdigest(),
       "backup-gpt": hashlib.sha256(read(size - 33 * 512, 33 * 512)).hexdigest()}
table = head[entries_lba * 512:entries_lba * 512 + count * esize]
for i in range(count):
    e = table[i * esize:(i + 1) * esize]
    name = e[56:128].decode("utf-16-le").rstrip("\0")
    if name in ("ferry-root-b", "ferry-verity-b"):
        first, last = struct.unpack_from("<QQ", e, 32)
        h = hashlib.sha256()
        step = 256 << 20
        for at in range(first * 512, (last + 1) * 512, step):
            h.update(read(at, min(step, (last + 1) * 512 - at)))
        out[name] = h.hexdigest()
print(" ".join(f"{k}={v[:16]}" for k, v in sorted(out.items())))
PY
}

# esp_entries DISK: the boot entries in EFI/Linux on the ESP of the (powered-off) qcow2 disk.
esp_entries() {
  local off
  off=$(python3 - "$image" <<'PY'
import struct, sys
with open(sys.argv[1], "rb") as f:
    f.seek(512); hdr = f.read(92)
    lba, count, size = struct.unpack_from("<QII", hdr, 72)
    f.seek(lba * 512); t = f.read(count * size)
for i in range(count):
    e = t[i * size:(i + 1) * size]
    if e[56:128].decode("utf-16-le").rstrip("\0") == "ferry-esp":
        first, last = struct.unpack_from("<QQ", e, 32)
        assert first % 2048 == 0 and (last + 1) % 2048 == 0, "ESP not 1 MiB aligned"
        print(first // 2048, (last + 1) // 2048)
PY
)
  set -- "$1" $off
  qemu-img dd -f qcow2 -O raw bs=1M skip="$2" count="$3" if="$1" of="$work/esp.img" >/dev/null
  mdir -b -i "$work/esp.img" ::/EFI/Linux | sed 's|.*/||' | sort
  rm -f "$work/esp.img"
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
case $line in *" slot=a "*) ;; *) fail healthy "the health line does not name slot a" ;; esac
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
shutdown

if [ "${FERRY_BOOT_UPDATES:-1}" = 1 ]; then
  echo "== 2. updates from attached media (same disk; slot A runs)"
  src=$(cd "$here/.." && pwd)
  imgdir=$(dirname "$image")
  ferry=$src/target/release/ferry
  [ -x "$ferry" ] || (cd "$src" && cargo build --release --locked -p ferry)
  keydir=${FERRY_UPDATE_KEY_DIR:-$src/target/update-key}
  base=$(cat "$imgdir/version")
  t0=$(date +%s)
  make_variant_bundle "$imgdir" "$work" broken "$base.1" broken "$ferry" "$keydir/update-key.pk8"
  make_variant_bundle "$imgdir" "$work" good "$base.2" good "$ferry" "$keydir/update-key.pk8"
  # Refused: the good bundle with one byte of its signature flipped, and the good bundle's
  # manifest signed by another key (the bytes of a real release, only the signer differs).
  "$ferry" update keygen --private "$work/other.pk8" --public "$work/other.pub"
  python3 - "$work/good.bundle" "$work/tampered.bundle" <<'PY'
import struct, sys
good, tampered = sys.argv[1:3]
b = bytearray(open(good, "rb").read())
m = struct.unpack_from("<I", b, 8)[0]
b[12 + m + 5] ^= 0x01                      # inside the Ed25519 signature
open(tampered, "wb").write(b)
PY
  # Re-sign the good bundle's own parts with the other key (the parts are cut out of it).
  python3 - "$work/good.bundle" "$work" <<'PY'
import json, struct, sys
path, work = sys.argv[1], sys.argv[2]
with open(path, "rb") as f:
    head = f.read(12); m = struct.unpack_from("<I", head, 8)[0]
    manifest = json.loads(f.read(m)); f.read(64)
    for p in manifest["parts"]:
        with open(f"{work}/part.{p['name']}", "wb") as o:
            left = p["size"]
            while left:
                chunk = f.read(min(left, 1 << 20)); o.write(chunk); left -= len(chunk)
    open(f"{work}/part.roothash", "w").write(manifest["roothash"])
    open(f"{work}/part.version", "w").write(manifest["version"])
PY
  "$ferry" update sign --private "$work/other.pk8" --version "$(cat "$work/part.version")" \
    --roothash "$(cat "$work/part.roothash")" --root "$work/part.root" --verity "$work/part.verity" \
    --uki "$work/part.uki" --out "$work/otherkey.bundle" >/dev/null
  rm -f "$work"/part.*
  make_update_iso "$work/bad.iso" "$work/tampered.bundle" "$work/otherkey.bundle"
  make_update_iso "$work/broken.iso" "$work/broken.bundle"
  # With the build's own release beside it: the running one on slot A, a downgrade on slot B.
  make_update_iso "$work/good.iso" "$work/good.bundle" "$imgdir/ferry-update.bundle"
  rm -f "$work"/*.bundle
  echo "update media made in $(( $(date +%s) - t0 )) s: bad.iso (tampered signature, other key), broken.iso ($base.1), good.iso ($base.2 and $base)"
  machine=healthy

  echo "== 2a. refused: damaged signature, another signer"
  before=$(slot_b_digest "$work/healthy.qcow2")
  echo "slot B before: $before"
  boot bad "$work/healthy.qcow2" "$work/bad.iso"
  wait_for bad 'FERRY-HEALTHY\|FERRY-UNHEALTHY' 600 || fail bad "no health line with the bad media attached"
  grep -a 'FERRY-UPDATE\|FERRY-SLOT' "$work/bad.log" | tr -d '\r'
  [ "$(grep -ac 'FERRY-UPDATE refused .*bad signature: this bundle was not signed by the provider key built into this image; nothing was written' "$work/bad.log")" = 2 ] \
    || fail bad "expected both bundles refused for their signature on the console"
  grep -aq 'FERRY-HEALTHY slot=a ' "$work/bad.log" || fail bad "slot A is not healthy with the bad media attached"
  grep -aq 'FERRY-UPDATE installing' "$work/bad.log" && fail bad "a refused bundle was installed"
  shutdown
  after=$(slot_b_digest "$work/healthy.qcow2")
  echo "slot B after:  $after"
  [ "$before" = "$after" ] || { echo "FAIL: slot B or the partition table changed"; exit 1; }
  echo "refused bundles wrote nothing: slot B and both GPTs unchanged"

  echo "== 2b. a broken update falls back to slot A by itself"
  # Four boots in one QEMU run: A (installs), B, B, A.
  REBOOTS=yes QEMU_LIMIT=$((timeout_s * 3)) boot broken "$work/healthy.qcow2" "$work/broken.iso"
  wait_for broken 'FERRY-UPDATE installed' 900 || fail broken "the broken update was not installed"
  installed_at=$(date +%s.%N)
  grep -a 'FERRY-UPDATE' "$work/broken.log" | tr -d '\r'
  wait_for broken 'not installing it again' 1800 || fail broken "slot A did not boot again after the broken slot's tries"
  wait_for broken 'FERRY-HEALTHY slot=a ' 600 || fail broken "slot A is not healthy after the fallback"
  fallback_s=$(secs_since "$installed_at")
  shutdown
  grep -a 'FERRY-SLOT\|FERRY-HEALTHY\|FERRY-UNHEALTHY\|FERRY-UPDATE' "$work/broken.log" | tr -d '\r'
  trials=$(grep -ac "FERRY-SLOT slot=b version=$base.1 " "$work/broken.log" || true)
  fallbacks=$(grep -ac 'FERRY-UPDATE-FALLBACK' "$work/broken.log" || true)
  echo "trial boots of the broken slot B: $trials, unhealthy-trial reboots: $fallbacks"
  [ "$trials" = 2 ] && [ "$fallbacks" = 2 ] || fail broken "expected 2 trial boots of slot B (2 tries), each rebooted"
  grep -aq 'FERRY-HEALTHY slot=b' "$work/broken.log" && fail broken "the broken slot came up healthy"
  printf '== broken update: installed -> slot A healthy again: %s s (2 trial boots of B)\n' "$fallback_s"
  echo "ESP: $(esp_entries "$work/healthy.qcow2" | tr '\n' ' ')"

  echo "== 2c. a good update: slot B boots, is healthy and blessed"
  REBOOTS=yes QEMU_LIMIT=$((timeout_s * 2)) boot good "$work/healthy.qcow2" "$work/good.iso"
  boot_at=$boot_start
  wait_for good 'checking every part' 900 || fail good "the good update was not found on the media"
  check_at=$(date +%s.%N)
  wait_for good 'FERRY-UPDATE installed' 900 || fail good "the good update was not installed"
  apply_s=$(secs_since "$check_at")
  installed_at=$(date +%s.%N)
  wait_for good 'FERRY-HEALTHY slot=b \|FERRY-UNHEALTHY' 900 || fail good "slot B did not come up"
  b_healthy_s=$(secs_since "$installed_at")
  wait_for good "Marked boot as 'good'" 120 || fail good "systemd-bless-boot did not mark slot B good"
  shutdown
  grep -a "FERRY-SLOT\|FERRY-HEALTHY\|FERRY-UNHEALTHY\|FERRY-UPDATE\|Marked boot as 'good'" "$work/good.log" | tr -d '\r'
  grep -aq "FERRY-HEALTHY slot=b version=$base.2 " "$work/good.log" || fail good "slot B with version $base.2 is not healthy"
  grep -aq "FERRY-SLOT slot=b version=$base.2 roothash=$(cat "$work/good.roothash")" "$work/good.log" \
    || fail good "slot B does not run the update's root hash"
  grep -aq "FERRY-UPDATE refused .*: version $base is older than the running version $base.2 (slot b); update media never downgrade; nothing was written" "$work/good.log" \
    || fail good "slot B did not refuse the older release on the media as a downgrade"
  entries=$(esp_entries "$work/healthy.qcow2")
  echo "ESP: $(echo "$entries" | tr '\n' ' ')"
  echo "$entries" | grep -qx 'ferry_[0-9]*-b\.efi' || { echo "FAIL: slot B's entry still carries a boot counter (not blessed)"; exit 1; }
  echo "$entries" | grep -qx 'ferry_00000-a\.efi' || { echo "FAIL: slot A's entry is gone"; exit 1; }
  # Two boots in this run (A installs, B runs) and no reboot after B was healthy: a healthy trial
  # boot is blessed, never rebooted.
  boots=$(grep -ac 'Linux version' "$work/good.log" || true)
  [ "$boots" = 2 ] || fail good "expected 2 boots (slot A installing, slot B), saw $boots"
  grep -aq 'FERRY-UPDATE-FALLBACK' "$work/good.log" && fail good "the healthy slot B was rebooted"
  printf '== good update: verify + install %s s (media found -> installed), installed -> FERRY-HEALTHY on slot B %s s\n' "$apply_s" "$b_healthy_s"
  rm -f "$work"/*.iso
fi

echo "== 3. tampered root: one byte flipped in root partition A"
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
