#!/bin/bash
# The VM tier: ferry installed as the README says, under real systemd, on the
# real system bus with the installed policy, with LUKS USB sticks plugged in
# and pulled over QMP and an emulated BlinkStick. See README.md here.
#
#   scripts/vm-test [SCENARIO...]    (root; default: every scenario, in order)
#
# Env: VM_WORK (default /var/tmp/ferry-vm), VM_KEEP=1 (leave the guest
# running at the end, for poking at it), CI=true (a missing prerequisite fails).
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
source "$HERE/lib.sh"

skip_or_fail() {
  if [ "${CI:-}" = true ]; then echo "vm-test: FAIL: $*" >&2; exit 1; fi
  echo "vm-test: SKIP: $*"; exit 0
}
[ "$(id -u)" = 0 ] || skip_or_fail "needs root (mmdebstrap, QEMU's 9p share)"
for c in qemu-system-x86_64 mmdebstrap mkfs.ext4 cargo; do
  command -v "$c" >/dev/null || skip_or_fail "$c is missing (integration-tests/vm/install-host-deps.sh installs QEMU and mmdebstrap)"
done

T_ALL=$(now)
mkdir -p "$VM_WORK"
image_ensure || exit 1
IMG=$(image_dir)

# ferry, built on the host (the guest is Debian 12 like the host), debug:
# the build is incremental after ./scripts/test (see docs/benchmarks.md).
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
t=$(now)
# The six services and ferryctl (ferry-backup@ runs it; install makes its
# completions and man pages with it).
services=(ferry-drive-watcher ferry-crypt ferry-sync ferry-borg ferry-led ferry-notifier ferryctl)
(cd "$REPO" && cargo build --locked --bins ${services[@]/#/-p }) || { echo "vm-test: FAIL: cargo build" >&2; exit 1; }
echo "TIME cargo build (debug): $(elapsed "$t")s"

# VM_REUSE=RUN (a guest left running by VM_KEEP=1): run scenarios in it
# again, with freshly copied binaries and scripts, without booting.
RUN=${VM_REUSE:-$VM_WORK/run-$$}
export RUN
mkdir -p "$RUN/share"
cleanup() {
  if [ "${VM_KEEP:-}" = 1 ] || [ -n "${VM_REUSE:-}" ]; then echo "vm-test: guest left running, RUN=$RUN"; return; fi
  vm_stop
  rm -rf "$RUN"
}
trap cleanup EXIT
# What the guest installs from: the repository's files and the built binaries.
rm -rf "$RUN/share/ferry"; mkdir -p "$RUN/share/ferry/target/debug"
cp -r "$REPO/scripts" "$REPO/units" "$REPO/examples" "$RUN/share/ferry/"
for s in "${services[@]}"; do cp "$CARGO_TARGET_DIR/debug/$s" "$RUN/share/ferry/target/debug/"; done
# ferry's Debian package, as users install it (the install scenario does
# apt install ./ferry_….deb); lintian runs in scripts/deb's own test.
t=$(now)
(cd "$REPO" && BUILD=debug NO_BUILD=1 LINTIAN=0 COMPRESS=gzip OUT="$RUN/share" scripts/deb) || { echo "vm-test: FAIL: scripts/deb" >&2; exit 1; }
echo "TIME scripts/deb: $(elapsed "$t")s"
cp -r "$HERE/guest" "$RUN/share/guest"

rm -rf "$RUN/share/guest"
cp -r "$HERE/guest" "$RUN/share/guest"
if [ -z "${VM_REUSE:-}" ]; then
t=$(now)
vm_boot "$IMG" || { echo "vm-test: FAIL: qemu did not start" >&2; exit 1; }
vm_wait_ready 300 || { tail -40 "$RUN/console.log"; exit 1; }
echo "TIME boot -> runner ready: $(elapsed "$t")s"
vm_run boot-wait 300 <<'G' || true
systemctl is-system-running --wait
G
echo "TIME boot -> system running: $(elapsed "$t")s"
fi

# g NAME SECS <<script: runs a guest script with guest/lib.sh sourced.
g() {
  local name=$1 secs=$2
  { echo "source /mnt/share/guest/lib.sh"; cat; } | vm_run "$name" "$secs"
}

STICK=$RUN/stick.img
passed=(); failed=()
source "$HERE/scenarios.sh"

run_scenario() {
  local name=$1 t rc
  t=$(now)
  echo "--- $name"
  ( set -e; "scenario_$name" ) > "$RUN/$name.log" 2>&1
  rc=$?
  # A failed scenario may leave the stick plugged in: pull it, so the next
  # one starts from an empty USB bus.
  if usb_present stick; then usb_del stick >> "$RUN/$name.log" 2>&1; fi
  sed 's/^/    /' "$RUN/$name.log"
  if [ $rc = 0 ]; then
    echo "PASS $name ($(elapsed "$t")s)"; passed+=("$name")
  else
    echo "FAIL $name ($(elapsed "$t")s)"; failed+=("$name")
  fi
  return $rc
}

wanted=("$@")
[ ${#wanted[@]} = 0 ] && wanted=("${SCENARIOS[@]}")
for s in "${wanted[@]}"; do
  run_scenario "$s"
done

echo
echo "vm-test: ${#passed[@]} passed, ${#failed[@]} failed: ${failed[*]:-}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "===== guest journal (ferry units, dbus, systemd) ====="
  g journal 120 <<'G' || true
journalctl -b --no-pager -o short-precise | grep -E 'ferry|dbus|systemd\[1\]' | tail -400
G
  echo "===== console log (tail) ====="
  tail -60 "$RUN/console.log"
  echo "TIME total: $(elapsed "$T_ALL")s"
  exit 1
fi
echo "TIME total: $(elapsed "$T_ALL")s"
