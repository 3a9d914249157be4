# Helpers shared by build.sh and boot-test.sh (sourced, not run).

# Install the Debian 12 packages the image build uses, when a command is missing.
ensure_build_deps() {
  local need=()
  command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
  command -v mksquashfs >/dev/null || need+=(squashfs-tools)
  command -v veritysetup >/dev/null || need+=(cryptsetup-bin)
  command -v mcopy >/dev/null || need+=(mtools)
  command -v mkfs.vfat >/dev/null || need+=(dosfstools)
  command -v systemd-repart >/dev/null || need+=(systemd)
  command -v objcopy >/dev/null || need+=(binutils)
  command -v qemu-img >/dev/null || need+=(qemu-utils)
  command -v python3 >/dev/null || need+=(python3)
  command -v xorriso >/dev/null || need+=(xorriso)
  [ -e /usr/lib/systemd/boot/efi/linuxx64.efi.stub ] || need+=(systemd-boot-efi)
  if [ ${#need[@]} -gt 0 ]; then
    echo "== installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
  fi
}

# qemu-system-x86_64 and OVMF. Debian 12's qemu-system-x86 (7.2) cannot be installed beside a
# qemu-utils from bookworm-backports (10.0, as on the CI machines); then take qemu-system-x86
# from bookworm-backports too, through a private sources list that leaves the system's alone.
ensure_boot_deps() {
  export DEBIAN_FRONTEND=noninteractive
  if [ ! -e /usr/share/OVMF/OVMF_CODE_4M.fd ]; then
    apt-get update -qq && apt-get install -y -qq --no-install-recommends ovmf
  fi
  command -v qemu-system-x86_64 >/dev/null && return 0
  if apt-get install -y -qq --no-install-recommends qemu-system-x86 2>/dev/null; then
    return 0
  fi
  local d=/tmp/ferry-image-apt
  mkdir -p "$d/lists/partial" "$d/archives/partial"
  cat > "$d/sources.list" <<'EOF'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
deb http://deb.debian.org/debian bookworm-backports main
EOF
  local o=(-o "Dir::Etc::sourcelist=$d/sources.list" -o Dir::Etc::sourceparts=-
           -o "Dir::State::lists=$d/lists" -o "Dir::Cache::archives=$d/archives")
  apt-get "${o[@]}" update -qq
  apt-get "${o[@]}" install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86
}

# 32 hex digits -> 8-4-4-4-12 UUID text.
uuid_from_hex() {
  local h=${1,,}
  echo "${h:0:8}-${h:8:4}-${h:12:4}-${h:16:4}-${h:20:12}"
}

# make_uki KERNEL INITRD CMDLINE OS_RELEASE OUT: a unified kernel image from systemd's EFI stub,
# with the PE timestamp pinned to SOURCE_DATE_EPOCH.
make_uki() {
  local kernel=$1 initrd=$2 cmdline=$3 osrel=$4 out=$5
  local stub=/usr/lib/systemd/boot/efi/linuxx64.efi.stub
  local tmp; tmp=$(mktemp -d /tmp/ferry-image-uki.XXXXXX)
  printf '%s' "$cmdline" > "$tmp/cmdline"
  cp "$osrel" "$tmp/osrel"
  # Place the new sections after the stub's own, each aligned to 64 KiB.
  python3 - "$stub" "$tmp" "$kernel" "$initrd" > "$tmp/args" <<'EOF'
import os, struct, sys
stub, tmp, kernel, initrd = sys.argv[1:5]
data = open(stub, "rb").read()
pe = struct.unpack_from("<I", data, 0x3C)[0]
nsec = struct.unpack_from("<H", data, pe + 6)[0]
opt = struct.unpack_from("<H", data, pe + 20)[0]
base = struct.unpack_from("<Q", data, pe + 24 + 24)[0]
sec = pe + 24 + opt
end = 0
for i in range(nsec):
    vsize, vaddr = struct.unpack_from("<II", data, sec + 40 * i + 8)
    end = max(end, vaddr + vsize)
align = lambda x: (x + 0xFFFF) & ~0xFFFF
off = align(end)
args = []
for name, path in ((".osrel", f"{tmp}/osrel"), (".cmdline", f"{tmp}/cmdline"),
                   (".linux", kernel), (".initrd", initrd)):
    args += [f"--add-section={name}={path}", f"--change-section-vma={name}={base + off:#x}"]
    off = align(off + os.path.getsize(path))
print("\n".join(args))
EOF
  mapfile -t args < "$tmp/args"
  objcopy "${args[@]}" "$stub" "$out"
  python3 - "$out" "${SOURCE_DATE_EPOCH:-0}" <<'EOF'
import struct, sys
path, epoch = sys.argv[1], int(sys.argv[2]) & 0xFFFFFFFF
b = bytearray(open(path, "rb").read())
pe = struct.unpack_from("<I", b, 0x3C)[0]
struct.pack_into("<I", b, pe + 8, epoch)          # COFF TimeDateStamp
csum_at = pe + 24 + 64                             # optional header CheckSum
if struct.unpack_from("<I", b, csum_at)[0]:
    struct.pack_into("<I", b, csum_at, 0)
    s = 0
    for i in range(0, len(b) - len(b) % 2, 2):
        s += b[i] | (b[i + 1] << 8)
        s = (s & 0xFFFF) + (s >> 16)
    if len(b) % 2:
        s += b[-1]; s = (s & 0xFFFF) + (s >> 16)
    struct.pack_into("<I", b, csum_at, (s & 0xFFFF) + len(b))
open(path, "wb").write(bytes(b))
EOF
  rm -rf "$tmp"
}

# make_update_iso OUT BUNDLE...: update media, an ISO 9660 image (Rock Ridge + Joliet names) with
# the bundles in its root directory; the appliance finds them by their magic, not their names.
# xorriso takes the volume's time stamps from SOURCE_DATE_EPOCH, but a file's from its mtime:
# the bundles get SOURCE_DATE_EPOCH as mtime first (else two builds give two ISOs).
make_update_iso() {
  local out=$1; shift
  local args=() b
  for b in "$@"; do
    [ -n "${SOURCE_DATE_EPOCH:-}" ] && touch -d "@$SOURCE_DATE_EPOCH" "$b"
    args+=("$(basename "$b")=$b")
  done
  rm -f "$out"
  xorriso -as mkisofs -quiet -o "$out" -V FERRY_UPDATE -R -J -graft-points "${args[@]}"
}

# make_variant_bundle IMAGE_DIR WORK NAME VERSION KIND FERRY PRIVATE_KEY: an update bundle made
# from a built image's root (IMAGE_DIR = build.sh's output), as a provider's next release would
# be, with IMAGE_VERSION=VERSION, written to WORK/NAME.bundle. KIND "good" changes only the
# version; "broken" also replaces /usr/bin/ferry by a program whose roles fail at once (its
# `update` command still works, so the console says which slot runs). Signed with PRIVATE_KEY by
# the FERRY binary. A fast zstd level: this is for tests, and the slot has room.
make_variant_bundle() {
  local dir=$1 work=$2 name=$3 version=$4 kind=$5 ferry=$6 key=$7
  local r=$work/$name.root
  rm -rf "$r"
  unsquashfs -q -n -d "$r" "$dir/root.squashfs" >/dev/null
  sed -i -e "s/^IMAGE_VERSION=.*/IMAGE_VERSION=$version/" -e "s/^VERSION_ID=.*/VERSION_ID=$version/" \
    -e "s/^PRETTY_NAME=.*/PRETTY_NAME=\"Ferry appliance ($version, $kind)\"/" "$r/usr/lib/os-release"
  if [ "$kind" = broken ]; then
    mv "$r/usr/bin/ferry" "$r/usr/lib/ferry/ferry.real"
    cat > "$r/usr/bin/ferry" <<'SH'
#!/bin/sh
# A deliberately broken update (image/boot-test.sh): every role fails to start.
case "$1" in update) exec /usr/lib/ferry/ferry.real "$@" ;; esac
echo "ferry: deliberately broken build for the fallback test" >&2
exit 1
SH
    chmod 0755 "$r/usr/bin/ferry"
  fi
  mksquashfs "$r" "$work/$name.squashfs" -comp zstd -Xcompression-level 3 -noappend -no-progress \
    -quiet -processors 2 >/dev/null
  rm -rf "$r"
  local sum; sum=$(sha256sum "$work/$name.squashfs" | cut -c1-64)
  veritysetup format "$work/$name.squashfs" "$work/$name.verity" --salt="$sum" \
    --uuid="$(uuid_from_hex "$(printf '%s' "verity:$sum" | sha256sum | cut -c1-32)")" \
    --root-hash-file="$work/$name.roothash" >/dev/null
  local roothash; roothash=$(cat "$work/$name.roothash")
  local old; old=$(cat "$dir/roothash")
  unsquashfs -q -cat "$work/$name.squashfs" usr/lib/os-release > "$work/$name.os-release"
  make_uki "$dir/vmlinuz" "$dir/initrd" "$(sed "s/roothash=$old/roothash=$roothash/" "$dir/cmdline")" \
    "$work/$name.os-release" "$work/$name.efi"
  "$ferry" update sign --private "$key" --version "$version" --roothash "$roothash" \
    --root "$work/$name.squashfs" --verity "$work/$name.verity" --uki "$work/$name.efi" \
    --out "$work/$name.bundle" >/dev/null
  rm -f "$work/$name.squashfs" "$work/$name.verity" "$work/$name.efi" "$work/$name.os-release"
}
