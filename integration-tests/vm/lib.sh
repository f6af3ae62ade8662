# Host side of the VM tier (sourced by run.sh): the cached guest image, QEMU,
# the command channel into the guest, USB hot-plug over QMP.
#
# State lives outside the repository, under $VM_WORK (default
# /var/tmp/ferry-vm): img-<hash of the recipe>/ (the cached image) and
# run-<pid>/ (one boot: 9p share, QMP socket, console log).

VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VM_WORK=${VM_WORK:-/var/tmp/ferry-vm}
export VM_WORK

now() { date +%s.%N; }
elapsed() { /usr/bin/python3 -c "import sys; print(f'{float(sys.argv[2])-float(sys.argv[1]):.1f}')" "$1" "$(now)"; }

# The image directory for the current recipe: a hash of every file that
# decides what is in the image, so a changed recipe builds a new one.
image_dir() {
  local hash
  hash=$(cat "$VM_DIR"/image/build.sh "$VM_DIR"/image/customize.sh | sha256sum | cut -c1-16)
  echo "$VM_WORK/img-$hash"
}

# Builds the image unless it is cached. Prints TIME lines.
image_ensure() {
  local dir t
  dir=$(image_dir)
  if [ -s "$dir/root.img" ] && [ -s "$dir/vmlinuz" ] && [ -s "$dir/initrd.img" ] && [ -e "$dir/done" ]; then
    echo "vm: image cached in $dir"
    return 0
  fi
  t=$(now)
  rm -rf "$dir.tmp"
  echo "vm: building the guest image into $dir (log: $dir.log)"
  if ! "$VM_DIR/image/build.sh" "$dir.tmp" >"$dir.log" 2>&1; then
    tail -40 "$dir.log" >&2
    echo "vm: image build failed (whole log: $dir.log)" >&2
    return 1
  fi
  touch "$dir.tmp/done"
  rm -rf "$dir"; mv "$dir.tmp" "$dir"
  echo "TIME image build (cold): $(elapsed "$t")s"
}

# Boots the guest in the background; RUN is this boot's directory.
vm_boot() {
  local img=$1
  mkdir -p "$RUN/share/cmd" "$RUN/share/out"
  rm -f "$RUN/qmp.sock" "$RUN/console.log" "$RUN/qemu.pid"
  qemu-system-x86_64 -accel tcg,thread=multi,tb-size=256 -cpu max -m "${VM_MEM:-2G}" -smp "${VM_SMP:-2}" \
    -machine q35 -display none -no-reboot -nic none \
    -kernel "$img/vmlinuz" -initrd "$img/initrd.img" \
    -append "root=/dev/vda rw console=ttyS0 panic=-1 systemd.journald.forward_to_console=0" \
    -drive file="$img/root.img",if=virtio,format=raw,snapshot=on \
    -virtfs local,path="$RUN/share",mount_tag=share,security_model=none,id=share \
    -device qemu-xhci,id=xhci \
    -qmp unix:"$RUN/qmp.sock",server=on,wait=off \
    -serial file:"$RUN/console.log" \
    -pidfile "$RUN/qemu.pid" -daemonize
}

# Waits (deadline $1 s) until the guest's runner has mounted the share.
vm_wait_ready() {
  local deadline=$(( $(date +%s) + $1 ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    [ -e "$RUN/share/out/ready" ] && return 0
    if [ -e "$RUN/qemu.pid" ] && ! kill -0 "$(cat "$RUN/qemu.pid")" 2>/dev/null; then
      echo "vm: qemu exited before the guest was ready" >&2; return 1
    fi
    sleep 0.2
  done
  echo "vm: guest not ready after $1 s" >&2
  return 1
}

# vm_run NAME TIMEOUT < script: runs the script in the guest as root, prints
# its output, returns its exit code. (The channel is a directory on the 9p
# share that the guest's runner and this loop poll: infrastructure.)
vm_run() {
  local name=$1 timeout=$2 s=$RUN/share deadline
  rm -f "$s/out/$name".{out,rc,sh}
  cat > "$s/.$name.tmp" && mv "$s/.$name.tmp" "$s/cmd/$name.sh"
  deadline=$(( $(date +%s) + timeout ))
  while [ ! -e "$s/out/$name.rc" ]; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      cat "$s/out/$name.out" 2>/dev/null
      echo "vm: $name did not finish within $timeout s" >&2
      return 124
    fi
    sleep 0.1
  done
  cat "$s/out/$name.out"
  return "$(cat "$s/out/$name.rc")"
}

# vm_start NAME < script: starts a script in the guest and returns at once.
vm_start() {
  local name=$1 s=$RUN/share
  rm -f "$s/out/$name".{out,rc,sh}
  cat > "$s/.$name.tmp" && mv "$s/.$name.tmp" "$s/cmd/$name.sh"
}

qmp() { /usr/bin/python3 "$VM_DIR/qmp.py" "$RUN/qmp.sock" "$@"; }

# usb_add IMAGE ID SERIAL: plugs a disk image in as a USB stick.
usb_add() {
  local out
  out=$(qmp "{\"execute\":\"blockdev-add\",\"arguments\":{\"driver\":\"raw\",\"node-name\":\"$2-blk\",\"file\":{\"driver\":\"file\",\"filename\":\"$1\"}}}" \
      "{\"execute\":\"device_add\",\"arguments\":{\"driver\":\"usb-storage\",\"bus\":\"xhci.0\",\"drive\":\"$2-blk\",\"id\":\"$2\",\"serial\":\"$3\",\"removable\":true}}" 2>/dev/null) \
    || { echo "vm: plugging in $1 as $2 failed: $out" >&2; return 1; }
}

# usb_present ID: the USB device is still plugged in (QEMU's view).
usb_present() {
  qmp '{"execute":"qom-list","arguments":{"path":"/machine/peripheral"}}' 2>/dev/null | grep "\"$1\"" >/dev/null
}

# usb_del ID: pulls the stick (the guest sees a surprise removal), waits
# until QEMU has let go of it (deadline 60 s), drops its backend.
usb_del() {
  qmp "{\"execute\":\"device_del\",\"arguments\":{\"id\":\"$1\"}}" >/dev/null || true
  usb_gone "$1" 60
  # QEMU may still hold the backend for a moment after the device is gone
  # (or the guest powered the device off itself): retry until the node is
  # dropped, or a later plug-in could not add it again.
  local deadline=$(( $(date +%s) + 30 )) out
  while :; do
    out=$(qmp "{\"execute\":\"blockdev-del\",\"arguments\":{\"node-name\":\"$1-blk\"}}" 2>/dev/null) && return 0
    case "$out" in *"Failed to find node"*|*"Cannot find node"*) return 0 ;; esac
    [ "$(date +%s)" -ge "$deadline" ] && { echo "vm: cannot drop the block node $1-blk: $out" >&2; return 1; }
    sleep 0.2
  done
}

# usb_gone ID DEADLINE: waits until the USB device is gone from the machine
# (unplugged, or powered off by the guest).
usb_gone() {
  local deadline=$(( $(date +%s) + $2 ))
  while usb_present "$1"; do
    [ "$(date +%s)" -ge "$deadline" ] && { echo "vm: USB device $1 still present after $2 s" >&2; return 1; }
    sleep 0.2
  done
}

# Powers the guest off and waits (deadline 60 s), else kills QEMU.
vm_stop() {
  local pid
  [ -e "$RUN/qemu.pid" ] || return 0
  pid=$(cat "$RUN/qemu.pid")
  qmp '{"execute":"system_powerdown"}' >/dev/null 2>&1 || true
  local deadline=$(( $(date +%s) + 60 ))
  while kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.2; done
  kill "$pid" 2>/dev/null || true
  rm -f "$RUN/qemu.pid"
}
