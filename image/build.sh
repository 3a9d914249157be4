#!/bin/bash
# Build the Ferry appliance disk image (x86_64, GPT, UEFI), reproducibly, as root on Debian 12:
#
#   sudo ./image/build.sh   # -> target/image/ferry.raw, ferry.qcow2, ferry.vmdk, ferry.ova, SHA256SUMS
#
# Layout (systemd-repart, CopyBlocks=):  ESP (systemd-boot + UKI) | root A (squashfs) |
# verity A | root B | verity B (B empty until the first update). /var and the cache disk are
# created on first boot (ferry-storage.service). The UKI's command line carries roothash=; the
# initrd's systemd-veritysetup-generator finds the root and verity partitions by their GPT
# partition UUIDs, which are the two halves of the root hash, so a slot is chosen by its UKI.
#
# Environment:
#   FERRY_SRC           the Ferry source tree to build (default: this repository)
#   FERRY_IMAGE_OUT     output directory (default: $FERRY_SRC/target/image)
#   FERRY_MIRROR        Debian mirror (default deb.debian.org; pin a snapshot.debian.org URL to
#                       reproduce an image later: the package set is the only moving input)
#   SOURCE_DATE_EPOCH   timestamp for every file, file system and PE header (default: the source
#                       tree's last git commit, or 1700000000)
#   FERRY_IMAGE_FORMATS "qcow2 vmdk ova" by default; "" for the raw image only
#   FERRY_OVA_CACHE_GIB the size of the OVA's empty cache disk (default 128)
#   FERRY_VERSION       the image version (IMAGE_VERSION in os-release, the update bundle's
#                       version). systemd-boot boots the entry with the highest version, so an
#                       update must carry a higher one than the running image. Default:
#                       SOURCE_DATE_EPOCH as YYYY.MM.DD.HHMMSS (the git commit goes to BUILD_ID)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
src=${FERRY_SRC:-$(cd "$here/.." && pwd)}
out=${FERRY_IMAGE_OUT:-$src/target/image}
mirror=${FERRY_MIRROR:-http://deb.debian.org/debian}
formats=${FERRY_IMAGE_FORMATS-qcow2 vmdk ova}
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH=$(git -C "$src" log -1 --format=%ct 2>/dev/null || echo 1700000000)
fi
export SOURCE_DATE_EPOCH
# Slot sizes are fixed so that every future update fits the same partitions.
ESP_SIZE=256M ROOT_SIZE=1G VERITY_SIZE=64M
start=$(date +%s)
step() { echo "== build.sh [$(( $(date +%s) - start ))s] $*"; }

[ "$(id -u)" = 0 ] || { echo "build.sh: run as root" >&2; exit 1; }
# shellcheck source=image/lib.sh
. "$here/lib.sh"
ensure_build_deps

work=$(mktemp -d /tmp/ferry-image-build.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/root

step "building ferry (release)"
export PATH="$HOME/.cargo/bin:$PATH"
# Without SOURCE_DATE_EPOCH: the C parts of ring and zstd-sys rebuild (with everything above
# them) whenever it changes, i.e. at every commit, and nothing in them uses it.
(cd "$src" && env -u SOURCE_DATE_EPOCH cargo build --release --locked -p ferry)
target_dir=$(cd "$src" && cargo metadata --format-version=1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
objcopy --strip-debug "$target_dir/release/ferry" "$work/ferry"

step "mmdebstrap (Debian 12 minbase + systemd + kernel + nftables)"
# No SSH server, no getty: the console (tty1 and serial) belongs to Ferry's console unit.
# The kernel's postinst runs dracut with rootfs/etc/dracut.conf.d/ferry.conf (put in place by the
# setup hook, before any package): that initrd goes into the UKI.
mmdebstrap --variant=minbase --mode=root --format=directory \
  --include=systemd,systemd-sysv,systemd-resolved,systemd-boot,udev,dbus,linux-image-amd64,dracut,kmod,nftables,e2fsprogs,util-linux,fdisk,mtools,iproute2,ca-certificates \
  --setup-hook='mkdir -p "$1/etc/dracut.conf.d"' \
  --setup-hook="cp '$here/rootfs/etc/dracut.conf.d/ferry.conf' \"\$1/etc/dracut.conf.d/\"" \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-exclude=/usr/share/info/*' \
  bookworm "$root" "$mirror"

step "installing Ferry into the root"
install -D -m 0755 "$work/ferry" "$root/usr/bin/ferry"
install -d "$root/usr/lib/systemd/system" "$root/usr/lib/sysusers.d" "$root/usr/lib/tmpfiles.d"
install -m 0644 "$src"/systemd/*.service "$root/usr/lib/systemd/system/"
install -m 0644 "$src/systemd/sysusers.d/ferry.conf" "$root/usr/lib/sysusers.d/ferry.conf"
install -m 0644 "$src/systemd/tmpfiles.d/ferry.conf" "$root/usr/lib/tmpfiles.d/ferry.conf"
install -D -m 0644 "$src/README.md" "$root/usr/share/doc/ferry/README.md"
# ferry-hw-tune.service's Documentation= points here.
install -D -m 0644 "$src/hardware/README.md" "$root/usr/share/doc/ferry/hardware/README.md"
install -D -m 0644 "$here/README.md" "$root/usr/share/doc/ferry/image/README.md"
# The ESP's mount point (fstab): boot entries of updates, boot counting.
install -d -m 0755 "$root/efi"
cp -r --preserve=mode "$here/rootfs/." "$root/"
chroot "$root" systemd-sysusers
ln -sfn /var/lib/ferry/etc "$root/etc/ferry"
# The provider's update-signing public key, built into the image (`ferry update apply` checks
# bundles against it). Without FERRY_UPDATE_KEY_DIR a development key is made once and kept.
keydir=${FERRY_UPDATE_KEY_DIR:-$src/target/update-key}
have_update=no
if "$work/ferry" update --help >/dev/null 2>&1; then
  if [ ! -f "$keydir/update-key.pk8" ]; then
    mkdir -p "$keydir" && chmod 700 "$keydir"
    "$work/ferry" update keygen --private "$keydir/update-key.pk8" --public "$keydir/update-key.pub"
    echo "build.sh: made a DEVELOPMENT update key in $keydir (set FERRY_UPDATE_KEY_DIR for the provider's)"
  fi
  install -D -m 0644 "$keydir/update-key.pub" "$root/usr/lib/ferry/update-key.pub"
  have_update=yes
else
  echo "build.sh: this ferry has no 'update' command yet: no update key, no update bundle"
fi
systemctl --root="$root" enable systemd-networkd.service systemd-resolved.service nftables.service \
  ferry-storage.service ferry-provision.service ferry-process-server.service \
  ferry-master-target.service ferry-health.service ferry-hw-tune.service \
  ferry-console.service ferry-console-serial.service ferry-update.service
# No login prompts: ferry-console.service and ferry-console-serial.service hold tty1 and ttyS0.
systemctl --root="$root" mask getty@.service serial-getty@.service console-getty.service
ln -sfn ../run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"
# Empty machine-id: systemd makes a transient one on the read-only root at each boot.
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"

step "unified kernel image inputs (the initrd was made by dracut when the kernel was installed)"
kver=$(basename "$(ls -d "$root"/lib/modules/*)")
cp "$root/boot/vmlinuz-$kver" "$work/vmlinuz"
mv "$root/boot/initrd.img-$kver" "$work/initrd"
rm -f "$root"/boot/initrd.img* "$root"/initrd.img* "$root"/initrd.img.old

step "cleaning non-reproducible leftovers"
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/log/* \
  "$root"/var/cache/ldconfig/aux-cache "$root"/var/cache/debconf/*-old \
  "$root"/var/lib/dpkg/*-old "$root"/etc/*- "$root"/tmp/* "$root"/var/tmp/* \
  "$root"/var/lib/systemd/catalog/database "$root"/etc/ssh
find "$root" -name '__pycache__' -prune -exec rm -rf {} +
build_id=$(cd "$src" && git describe --always --dirty 2>/dev/null || echo unknown)
version=${FERRY_VERSION:-$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y.%m.%d.%H%M%S)}
cat > "$root/usr/lib/os-release" <<EOF
NAME="Ferry"
ID=ferry
ID_LIKE=debian
PRETTY_NAME="Ferry appliance ($version)"
VERSION_ID=$version
BUILD_ID=$build_id
IMAGE_ID=ferry
IMAGE_VERSION=$version
HOME_URL="https://github.com/ferry"
EOF
ln -sfn ../usr/lib/os-release "$root/etc/os-release"

step "root file system (squashfs, zstd) and dm-verity"
# mksquashfs takes SOURCE_DATE_EPOCH from the environment for the file system and every inode.
mksquashfs "$root" "$work/root.squashfs" -comp zstd -Xcompression-level 15 -noappend \
  -no-progress -quiet \
  -processors 2 -e boot/vmlinuz-"$kver"
sq_sum=$(sha256sum "$work/root.squashfs" | cut -c1-64)
# Salt and verity superblock UUID from the content: same root, same hash tree.
salt=$sq_sum
vuuid=$(uuid_from_hex "$(printf '%s' "verity:$sq_sum" | sha256sum | cut -c1-32)")
veritysetup format "$work/root.squashfs" "$work/root.verity" --salt="$salt" --uuid="$vuuid" \
  --root-hash-file="$work/roothash" >/dev/null
roothash=$(cat "$work/roothash")
step "root hash $roothash"

cmdline="root=/dev/mapper/root roothash=$roothash systemd.verity_root_options=restart-on-corruption rootfstype=squashfs ro console=tty0 console=ttyS0,115200 panic=10 rd.shell=0 rd.emergency=reboot systemd.gpt_auto=no"
make_uki "$work/vmlinuz" "$work/initrd" "$cmdline" "$root/usr/lib/os-release" "$work/ferry.efi"

step "ESP (systemd-boot + UKI, vfat, invariant)"
esp=$work/esp.img
rm -f "$esp"; truncate -s "$ESP_SIZE" "$esp"
mkfs.vfat --invariant -F 32 -n FERRY-ESP -i "$(printf '%s' "$roothash" | cut -c1-8)" "$esp" >/dev/null
cat > "$work/loader.conf" <<EOF
timeout 0
editor no
default ferry_*
EOF
touch -d "@$SOURCE_DATE_EPOCH" "$work/loader.conf" "$work/ferry.efi"
cp /usr/lib/systemd/boot/efi/systemd-bootx64.efi "$work/systemd-bootx64.efi"
touch -d "@$SOURCE_DATE_EPOCH" "$work/systemd-bootx64.efi"
mmd -i "$esp" ::/EFI ::/EFI/BOOT ::/EFI/systemd ::/EFI/Linux ::/loader
mcopy -m -i "$esp" "$work/systemd-bootx64.efi" ::/EFI/BOOT/BOOTX64.EFI
mcopy -m -i "$esp" "$work/systemd-bootx64.efi" ::/EFI/systemd/systemd-bootx64.efi
mcopy -m -i "$esp" "$work/loader.conf" ::/loader/loader.conf
# Entries are ferry_<generation>-<slot>.efi: an update writes generation+1 with a boot counter
# (+3), so systemd-boot tries it next and falls back here when its tries run out.
mcopy -m -i "$esp" "$work/ferry.efi" "::/EFI/Linux/ferry_00000-a.efi"

step "GPT disk (systemd-repart, CopyBlocks=)"
defs=$work/repart.d; mkdir -p "$defs"
h1=$(uuid_from_hex "${roothash:0:32}") h2=$(uuid_from_hex "${roothash:32:32}")
derived() { uuid_from_hex "$(printf '%s' "$1:$roothash" | sha256sum | cut -c1-32)"; }
part() { # file type label uuid size [copyblocks]
  { echo "[Partition]"; echo "Type=$2"; echo "Label=$3"; echo "UUID=$4"
    echo "SizeMinBytes=$5"; echo "SizeMaxBytes=$5"; if [ -n "${6:-}" ]; then echo "CopyBlocks=$6"; fi; } > "$defs/$1"
}
part 00-esp.conf esp ferry-esp "$(derived esp)" "$ESP_SIZE" "$esp"
part 10-root-a.conf root-x86-64 ferry-root-a "$h1" "$ROOT_SIZE" "$work/root.squashfs"
part 11-verity-a.conf root-x86-64-verity ferry-verity-a "$h2" "$VERITY_SIZE" "$work/root.verity"
part 20-root-b.conf root-x86-64 ferry-root-b "$(derived root-b)" "$ROOT_SIZE"
part 21-verity-b.conf root-x86-64-verity ferry-verity-b "$(derived verity-b)" "$VERITY_SIZE"
disk=$work/ferry.raw
rm -f "$disk"
systemd-repart --empty=create --size=auto --dry-run=no --no-pager \
  --seed="$(derived disk)" --definitions="$defs" "$disk" >/dev/null

step "writing $out"
mkdir -p "$out"
rm -f "$out"/ferry.raw "$out"/ferry.qcow2 "$out"/ferry.vmdk "$out"/ferry.ova "$out"/ferry-update.bundle "$out"/ferry-update.iso "$out"/SHA256SUMS
mv "$disk" "$out/ferry.raw"
printf '%s\n' "$roothash" > "$out/roothash"
printf '%s\n' "$cmdline" > "$out/cmdline"
cp "$work/ferry.efi" "$out/ferry.efi"
cp "$work/root.squashfs" "$out/root.squashfs"; cp "$work/root.verity" "$out/root.verity"
# The UKI's inputs, for bundles made from this build (the boot test's update variants).
cp "$work/vmlinuz" "$out/vmlinuz"; cp "$work/initrd" "$out/initrd"
printf '%s\n' "$version" > "$out/version"
# qemu-img writes a random content id (CID=) into a VMDK's descriptor: pinned to the root hash.
make_vmdk() {
  qemu-img convert -f raw -O vmdk -o subformat=streamOptimized "$out/ferry.raw" "$out/ferry.vmdk"
  pin_vmdk_cid "$out/ferry.vmdk" "${roothash:0:8}"
}
for f in $formats; do
  case $f in
    qcow2) qemu-img convert -f raw -O qcow2 "$out/ferry.raw" "$out/ferry.qcow2" ;;
    vmdk) make_vmdk ;;
    ova)
      # VMware: the streamOptimized VMDK in an OVF package (image/README.md, "For VMware").
      [ -f "$out/ferry.vmdk" ] || make_vmdk
      make_ova "$out/ferry.vmdk" "$out/ferry.ova" "$version" "$version ($build_id)"
      ;;
    *) echo "build.sh: unknown image format $f (qcow2, vmdk, ova)" >&2; exit 1 ;;
  esac
done
if [ $have_update = yes ]; then
  # The same root, verity and UKI as a signed update bundle (Ed25519 signatures are deterministic).
  "$work/ferry" update sign --private "$keydir/update-key.pk8" --version "$version" \
    --roothash "$roothash" --root "$work/root.squashfs" --verity "$work/root.verity" \
    --uki "$work/ferry.efi" --out "$out/ferry-update.bundle"
  # What the provider hands out: update media to attach to the appliance (ISO 9660 CD/DVD).
  make_update_iso "$out/ferry-update.iso" "$out/ferry-update.bundle"
fi
(cd "$out" && sha256sum ferry.* ferry-update.* root.* 2>/dev/null > SHA256SUMS)
step "done in $(( $(date +%s) - start ))s"
cat "$out/SHA256SUMS"
ls -la "$out"
