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

# pin_vmdk_cid VMDK CID: set the content id (CID=, up to 8 hex digits) in a sparse VMDK's
# descriptor. qemu-img writes a random one, and without zero padding (CID=4be0d7a): the
# descriptor text is rewritten within its NUL-padded area, not patched in place.
pin_vmdk_cid() {
  python3 - "$1" "$2" <<'PY'
import re, struct, sys
path, cid = sys.argv[1], sys.argv[2].encode()
if not re.fullmatch(rb"[0-9a-f]{1,8}", cid):
    sys.exit(f"pin_vmdk_cid: {cid!r} is not 1 to 8 hex digits")
with open(path, "r+b") as f:
    head = f.read(512)
    if head[:4] != b"KDMV":
        sys.exit(f"pin_vmdk_cid: {path} is not a sparse VMDK")
    at, sectors = struct.unpack_from("<QQ", head, 28)   # descriptorOffset, descriptorSize
    f.seek(at * 512)
    desc = f.read(sectors * 512)
    new, n = re.subn(rb"\nCID=[0-9a-f]{1,8}\n", b"\nCID=" + cid + b"\n", desc, count=1)
    if n != 1:
        sys.exit(f"pin_vmdk_cid: no CID= in the descriptor of {path}")
    new = new.rstrip(b"\0")
    if len(new) > len(desc):
        sys.exit(f"pin_vmdk_cid: the descriptor of {path} is full")
    f.seek(at * 512)
    f.write(new.ljust(len(desc), b"\0"))
PY
}

# xml_text TEXT: TEXT with the XML special characters escaped.
xml_text() {
  local s=$1
  # Quoted replacements: bash 5.2 (patsub_replacement) reads an unquoted & as the match.
  s=${s//'&'/'&amp;'}; s=${s//'<'/'&lt;'}; s=${s//'>'/'&gt;'}; s=${s//'"'/'&quot;'}
  printf '%s' "$s"
}

# make_ova VMDK OUT VERSION [FULL_VERSION]: the appliance for VMware, an OVA (OVF 1.0 package):
# a POSIX ustar archive holding, in this order (the OVF specification's: descriptor first, then
# the manifest, then the files in References order), ferry.ovf, ferry.mf and VMDK as ferry.vmdk.
# VMDK must be a streamOptimized VMDK (build.sh's ferry.vmdk). The descriptor describes one VM:
# EFI firmware (no Secure Boot: the UKI is not signed for it), 2 vCPUs, 8 GiB of RAM (reserved),
# the system disk and an empty cache disk (FERRY_OVA_CACHE_GIB, default 128) each on its own
# PVSCSI controller (hardware/profiles), one vmxnet3 NIC, and a product section with VERSION.
# The guest type is debian11_64Guest, not debian12_64Guest, which older ESXi releases lack.
# ferry.mf has each file's SHA-256 (`SHA256(ferry.ovf)= HEX`). Reproducible: member times are
# SOURCE_DATE_EPOCH, owners 0, modes 0644, no user or group names. Fails, leaving no OUT, when
# VMDK is not a streamOptimized VMDK.
make_ova() {
  local vmdk=$1 out=$2 version=$3 full=${4:-$3}
  local cache_gib=${FERRY_OVA_CACHE_GIB:-128}
  local tmp info capacity size
  info=$(qemu-img info --output=json "$vmdk") || { echo "make_ova: cannot read $vmdk" >&2; return 1; }
  capacity=$(printf '%s' "$info" | python3 -c '
import json, sys
i = json.load(sys.stdin)
d = i.get("format-specific", {}).get("data", {})
if i.get("format") != "vmdk" or d.get("create-type") != "streamOptimized":
    sys.exit("make_ova: {} is {} ({}), not a streamOptimized VMDK".format(
        sys.argv[1], i.get("format"), d.get("create-type", "-")))
print(i["virtual-size"])
' "$vmdk") || return 1
  tmp=$(mktemp -d /tmp/ferry-ova.XXXXXX)
  ln -s "$(readlink -f "$vmdk")" "$tmp/ferry.vmdk"
  size=$(stat -L -c %s "$vmdk")
  local v f
  v=$(xml_text "$version"); f=$(xml_text "$full")
  cat > "$tmp/ferry.ovf" <<OVF
<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href="ferry.vmdk" ovf:id="system" ovf:size="$size"/>
  </References>
  <DiskSection>
    <Info>The system disk (boot loader, root slots A and B; /var is made in its free space at first boot) and the cache disk (empty; formatted at first boot)</Info>
    <Disk ovf:capacity="$capacity" ovf:capacityAllocationUnits="byte" ovf:diskId="system" ovf:fileRef="system" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
    <Disk ovf:capacity="$cache_gib" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="cache" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <NetworkSection>
    <Info>The network the appliance reaches the hypervisor hosts and the recovery site through</Info>
    <Network ovf:name="VM Network">
      <Description>The appliance's network (DHCP, or set at the console)</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="ferry">
    <Info>The Ferry disaster-recovery replication appliance</Info>
    <Name>ferry</Name>
    <ProductSection>
      <Info>The appliance image</Info>
      <Product>Ferry</Product>
      <Vendor>Ferry</Vendor>
      <Version>$v</Version>
      <FullVersion>$f</FullVersion>
    </ProductSection>
    <OperatingSystemSection ovf:id="96" vmw:osType="debian11_64Guest">
      <Info>The guest operating system: Debian 12 based</Info>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>2 vCPUs, 8 GiB of RAM, the system and cache disks on PVSCSI, a vmxnet3 NIC, EFI firmware</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>ferry</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-14</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:Description>Number of virtual CPUs</rasd:Description>
        <rasd:ElementName>2 virtual CPUs</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>2</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:Description>Memory size (reserved: the journal's buffers must not be swapped by the host)</rasd:Description>
        <rasd:ElementName>8192 MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:Reservation>8192</rasd:Reservation>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>8192</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>SCSI controller of the system disk</rasd:Description>
        <rasd:ElementName>SCSI controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:Address>1</rasd:Address>
        <rasd:Description>SCSI controller of the cache disk (its own, as hardware/profiles advise)</rasd:Description>
        <rasd:ElementName>SCSI controller 1</rasd:ElementName>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 1 (system)</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/system</rasd:HostResource>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 2 (cache)</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/cache</rasd:HostResource>
        <rasd:InstanceID>6</rasd:InstanceID>
        <rasd:Parent>4</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>7</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>VM Network</rasd:Connection>
        <rasd:Description>vmxnet3 ethernet adapter on "VM Network"</rasd:Description>
        <rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>7</rasd:InstanceID>
        <rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
      <vmw:Config ovf:required="false" vmw:key="bootOptions.efiSecureBootEnabled" vmw:value="false"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
OVF
  (cd "$tmp" && for m in ferry.ovf ferry.vmdk; do
     printf 'SHA256(%s)= %s\n' "$m" "$(sha256sum -b < "$m" | cut -c1-64)"; done) > "$tmp/ferry.mf"
  rm -f "$out"
  # The order is the specification's, so the names are given one by one (no --sort).
  if ! tar --format=ustar --create --file="$out" --directory="$tmp" --dereference \
      --owner=0 --group=0 --numeric-owner --mode=0644 --mtime="@${SOURCE_DATE_EPOCH:-0}" \
      ferry.ovf ferry.mf ferry.vmdk; then
    rm -rf "$tmp" "$out"; echo "make_ova: tar failed" >&2; return 1
  fi
  rm -rf "$tmp"
}
