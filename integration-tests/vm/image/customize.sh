#!/bin/bash
# mmdebstrap customize hook of build.sh: $1 = the guest's root directory.
# A throwaway test machine: root without a password, a command runner on
# the 9p share, nothing that slows boot.
set -euo pipefail
R=$1
echo ferryvm > "$R/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 ferryvm\n' > "$R/etc/hosts"
chroot "$R" passwd -d root >/dev/null
echo 'LABEL=vmroot / ext4 rw,errors=remount-ro 0 1' > "$R/etc/fstab"
mkdir -p "$R/mnt/share"
# root autologin on the serial console (interactive debugging)
mkdir -p "$R/etc/systemd/system/serial-getty@ttyS0.service.d"
cat > "$R/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<'U'
[Service]
ExecStart=
ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,57600,38400,9600 - $TERM
U
# command runner: mounts the 9p share "share" and executes share/cmd/*.sh
install -m 0755 /dev/stdin "$R/usr/local/sbin/vm-runner" <<'S'
#!/bin/bash
S=/mnt/share
modprobe 9pnet_virtio 2>/dev/null || true
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 share "$S" || exit 1
mkdir -p "$S/cmd" "$S/out"
echo "runner-ready uptime=$(cut -d' ' -f1 /proc/uptime)" > "$S/out/ready"
while :; do
  for f in "$S"/cmd/*.sh; do
    [ -e "$f" ] || continue
    n=$(basename "$f" .sh)
    mv "$f" "$S/out/$n.sh"
    ( cd /root && timeout "${VM_CMD_TIMEOUT:-900}" bash "$S/out/$n.sh" > "$S/out/$n.out" 2>&1; echo $? > "$S/out/$n.rc.tmp"; mv "$S/out/$n.rc.tmp" "$S/out/$n.rc" ) &
  done
  sleep 0.2
done
S
cat > "$R/etc/systemd/system/vm-runner.service" <<'U'
[Unit]
Description=Run commands from the host 9p share
After=local-fs.target systemd-udevd.service
DefaultDependencies=no
Wants=systemd-udevd.service
[Service]
ExecStart=/usr/local/sbin/vm-runner
[Install]
WantedBy=multi-user.target
U
chroot "$R" systemctl enable vm-runner.service >/dev/null 2>&1
# Things that slow boot / are pointless in a throwaway VM
chroot "$R" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer >/dev/null 2>&1 || true
echo 'uhid' > "$R/etc/modules-load.d/uhid.conf"
# Shrink: drop kernel modules a headless test VM never loads (saves ~200 MB), then re-run depmod
if [ "${PRUNE_MODULES:-1}" = 1 ]; then
  for k in "$R"/usr/lib/modules/*; do
    v=$(basename "$k")
    rm -rf "$k"/kernel/sound "$k"/kernel/drivers/{gpu,media,infiniband,staging,isdn,bluetooth,net/wireless,net/ethernet,net/can} \
           "$k"/kernel/net/{bluetooth,wireless,mac80211}
    chroot "$R" depmod -a "$v"
  done
fi
