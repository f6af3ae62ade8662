# The VM tier's scenarios (sourced by run.sh). Each is a function run with
# `set -e`: host steps (QMP) and guest scripts (g NAME SECS <<script, with
# guest/lib.sh). They share one boot and run in this order; later ones build
# on the install and the enrolled stick.
SCENARIOS=(install enroll_and_flow wrong_key damaged_header pull_mid_sync
  held_mount_pull policy notifier_credential activation kill_mid_flow watchdog onfailure
  timer user_service journald uninstall)


scenario_install() {
  g install 900 <<'G'
mkdir -p $T $MAIL
# Test-only udev rule: the uhid BlinkStick has no USB parent, so the
# product's rule (ATTRS{idVendor}) cannot match it; its HID parent can.
cat > /etc/udev/rules.d/70-ferry-vm-uhid-blinkstick.rules <<'R'
SUBSYSTEM=="hidraw", KERNELS=="0003:20A0:41E5.*", GROUP="ferry-led", MODE="0660"
R
systemd-run --quiet --unit=vmtest-recorder python3 $G/vmtest.py record $SIG
wait_until 120 "the signal recorder listens" test -e $SIG.ready

echo "== the Debian package, as the README says"
cd /mnt/share
apt install -y ./ferry_*.deb > $T/apt.log 2>&1 || { cat $T/apt.log; fail "apt install ./ferry_*.deb failed"; }
tail -3 $T/apt.log
# Its postinst made the users and directories and reloaded systemd, udev and D-Bus.
getent passwd ferry-notifier >/dev/null || fail "the package made no ferry-notifier user"
stat -c '%a %U' /var/lib/ferry/notifier | grep -qx '700 ferry-notifier' || fail "no /var/lib/ferry/notifier"
systemctl is-enabled --quiet ferry-crypt || fail "the package did not enable ferry-crypt"
systemctl is-active --quiet ferry-crypt && fail "ferry-crypt started without a configuration"
cp /etc/ferry/ferry.toml.example /etc/ferry/ferry.toml   # then edit it

# The emulated BlinkStick, the SMTP sink (its password as a credential), a
# borg repository with an archive, and the watcher of the README's recipe
# (dbus-monitor as an unprivileged user).
systemd-run --quiet --unit=vmtest-blinkstick -p StandardOutput=file:$BS python3 -u $G/fake-blinkstick.py
wait_until 60 "the BlinkStick's hidraw node belongs to ferry-led" \
  bash -c 'ls -l /dev/hidraw* 2>/dev/null | grep -q ferry-led'
install -d -m 0700 /etc/credstore
head -c 12 /dev/urandom | base64 > /etc/credstore/ferry-smtp-password
chmod 0600 /etc/credstore/ferry-smtp-password
systemd-run --quiet --unit=vmtest-smtp python3 $G/vmtest.py smtp $MAIL 2525 ferry /etc/credstore/ferry-smtp-password
wait_until 60 "the SMTP sink listens" test -e $MAIL/.ready
touch $T/monitor.log && chown nobody $T/monitor.log
systemd-run --quiet --unit=vmtest-monitor -p User=nobody -p StandardOutput=file:$T/monitor.log \
  dbus-monitor --system "type='signal',path_namespace='/org/ferry'"

head -c 32 /dev/urandom | base64 > /etc/ferry/nas.passphrase; chmod 0600 /etc/ferry/nas.passphrase
mkdir -p /srv/borg /srv/data
head -c 8M /dev/urandom > /srv/data/a
export BORG_PASSCOMMAND="cat /etc/ferry/nas.passphrase"
borg init -e repokey /srv/borg/nas
borg create /srv/borg/nas::first /srv/data

cat > /etc/ferry/ferry.toml <<'C'
[repositories.nas]
path = "/srv/borg/nas"
passphrase-file = "/etc/ferry/nas.passphrase"

[crypt]
close-timeout = 120

[led]
backend = "blinkstick"
brightness-limit = 100

[led.colors]
idle = "off"
working = "#102030"
done = "#00ff00"
failed = "#ff0000"

[mail]
transport = "smtp"
from = "ferry@ferryvm.example.org"
to = ["admin@ferryvm.example.org"]
smtp-host = "127.0.0.1"
smtp-port = 2525
security = "none"
username = "ferry"
password-credential = "ferry-smtp-password"
timeout-seconds = 10

[notify]
repeat-window-minutes = 0

[profiles.nas]
repository = "nas"
sources = ["/srv/data"]
C
echo "== systemctl enable --now (the six services)"
systemctl enable --now ferry-drive-watcher ferry-crypt ferry-sync ferry-borg ferry-led ferry-notifier
for s in drive-watcher crypt sync borg led notifier; do
  wait_until 120 "ferry-$s is active" systemctl is-active --quiet ferry-$s
done
for n in DriveWatcher1 Crypt1 Sync1 Borg1 Led1 Notifier1; do
  busctl --system status org.ferry.$n >/dev/null || fail "nobody owns org.ferry.$n"
done
systemctl show -p User ferry-drive-watcher ferry-led ferry-notifier
stat -c '%A %U %n' /etc/ferry /etc/ferry/ferry.toml /etc/ferry/keys
echo "six services active, each owns its name"
G
}

# Plugs the stick image in and waits for the guest to see it.
plug() {
  usb_add "$1" stick "${2:-FERRY0001}"
}
unplug() {
  usb_del stick
}

scenario_enroll_and_flow() {
  truncate -s 96M "$STICK"
  plug "$STICK"
  g enroll 600 <<'G'
wait_until 120 "the stick is /dev/sda on USB" bash -c 'udevadm settle; udevadm info -q property /dev/sda 2>/dev/null | grep -qx ID_BUS=usb'
ferry-crypt enroll --drive stick --yes-destroy-all-data-on /dev/sda /dev/sda > $T/section
cat $T/section
cryptsetup luksDump /dev/sda | grep -E '^Version|PBKDF' | sort -u
G
  unplug
  g configure 300 <<'G'
sed -e 's/^repositories = \[\]$/repositories = ["nas"]/' $T/section >> /etc/ferry/ferry.toml
echo 'power-off = true' >> /etc/ferry/ferry.toml
systemctl restart ferry-drive-watcher ferry-crypt ferry-sync ferry-borg ferry-led ferry-notifier
for s in drive-watcher crypt sync borg led notifier; do
  wait_until 120 "ferry-$s is active" systemctl is-active --quiet ferry-$s
done
mark > $T/mark; led_mark > $T/ledmark
G
  plug "$STICK"
  g flow 900 <<'G'
m=$(cat $T/mark)
wait_sig $m 600 DriveAttached/stick DriveOpened/stick SyncStarted/stick SyncFinished/stick DriveClosed/stick
# The real smartctl ran on the emulated USB disk before it was opened and
# did not stop the flow; its reading is in the health ledger.
python3 -c 'import json; r = json.load(open("/var/lib/ferry/crypt-health.json"))["stick"]; print("health of the emulated stick:", r["device"], r["verdict"], r["decision"], "-", r["summary"])' \
  || fail "ferry-crypt recorded no health reading of the stick"
# ... and on the bus, as Crypt1.Health (what ferryctl status shows).
busctl get-property org.ferry.Crypt1 /org/ferry/Crypt1 org.ferry.Crypt1 Health | tee $T/health.txt | grep -q '"stick"' \
  || { cat $T/health.txt; fail "Crypt1.Health has no reading of the stick"; }
mapped && fail "ferry-stick is still mapped"
mounted && fail "/run/ferry/stick is still mounted"
sigs_since $m
reports=$(led_since $(cat $T/ledmark) | tr '\n' ' ')
echo "BlinkStick reports: $reports"
case " $reports " in *" $WORKING "*) ;; *) fail "the LED never showed working ($WORKING)";; esac
case " $reports " in *" $DONE "*) ;; *) fail "the LED never showed done ($DONE)";; esac
between=${reports#*$WORKING}; between=${between%%$DONE*}
case "$between" in *"$OFF"*) fail "the LED went idle ($OFF) between working and done";; esac
grep -q 'member=DriveClosed' $T/monitor.log || fail "dbus-monitor as nobody (the README's recipe) missed DriveClosed"
grep -q 'member=DriveAttached' $T/monitor.log || fail "dbus-monitor as nobody missed DriveAttached"
G
  powered_off
}

# After a close with power-off = true: the guest removed the USB device
# (QEMU still lists it: the guest only let go of it). Then pull it for good.
powered_off() {
  g poweroff 300 <<'G'
wait_until 120 "power-off removed the USB device" bash -c '! grep -qs FERRY0001 /sys/bus/usb/devices/*/serial && ! test -b /dev/sda'
echo "power-off removed the stick's USB device"
G
  unplug
}

# Marks the signals and LED reports and the mail directory before a plug-in.
g_mark() {
  g mark 60 <<'G'
mark > $T/mark; led_mark > $T/ledmark; touch $T/mailmark; sleep 0.01
G
}

# A failed plug-in of drive `stick` at STAGE: red, a mail, nothing mapped.
expect_red_and_mail() {
  local stage=$1
  g red 600 <<G
m=\$(cat \$T/mark)
wait_sig \$m 300 DriveAttached/stick DriveFailed/stick
sigs_since \$m
sigs_since \$m | grep '"DriveFailed", "stick", "$stage"' || fail "DriveFailed is not at stage $stage"
wait_until 120 "the LED shows red" bash -c '[ "\$(led_since 0 | tail -1)" = "\$FAILED" ]'
wait_until 300 "a mail about stick arrived" bash -c 'mails_after \$T/mailmark | grep -q stick'
mails_after \$T/mailmark | grep -E '^Subject:' | head -3
wait_until 60 "nothing is mapped" bash -c '! dmsetup ls | grep -q ferry-stick'
mounted && fail "/run/ferry/stick is mounted"
true
G
}

scenario_wrong_key() {
  g wrongkey 60 <<'G'
cp -p /etc/ferry/keys/stick.key $T/stick.key.good
head -c "$(stat -c %s /etc/ferry/keys/stick.key)" /dev/urandom > /etc/ferry/keys/stick.key
G
  g_mark
  plug "$STICK"
  expect_red_and_mail unlock
  unplug
  g restorekey 60 <<'G'
cp -p $T/stick.key.good /etc/ferry/keys/stick.key
G
}

scenario_damaged_header() {
  # The LUKS2 header is intact (the UUID is still seen), its key slot area
  # (from 32 KiB) is zeroed: no key opens it.
  cp --sparse=always "$STICK" "$RUN/damaged.img"
  dd if=/dev/zero of="$RUN/damaged.img" bs=32K seek=1 count=32 conv=notrunc status=none
  g_mark
  plug "$RUN/damaged.img"
  expect_red_and_mail unlock
  unplug
  rm -f "$RUN/damaged.img"
}

scenario_pull_mid_sync() {
  g newdata 600 <<'G'
head -c 24M /dev/urandom > /srv/data/b
BORG_PASSCOMMAND="cat /etc/ferry/nas.passphrase" borg create /srv/borg/nas::second /srv/data
mark > $T/mark; led_mark > $T/ledmark; touch $T/mailmark
G
  plug "$STICK"
  g midsync 600 <<'G'
wait_sig $(cat $T/mark) 300 DriveOpened/stick SyncStarted/stick
G
  unplug
  g pulled 600 <<'G'
m=$(cat $T/mark)
wait_sig $m 300 SyncStarted/stick DriveFailed/stick
sigs_since $m
sigs_since $m | grep -q '"SyncFinished"' && fail "the sync finished before the pull: nothing was tested"
wait_until 120 "nothing is mapped" bash -c '! dmsetup ls | grep -q ferry-stick'
wait_until 60 "nothing is mounted" bash -c '! findmnt /run/ferry/stick >/dev/null'
wait_until 120 "the LED shows red" bash -c '[ "$(led_since 0 | tail -1)" = "$FAILED" ]'
G
  qmp '{"execute":"blockdev-del","arguments":{"node-name":"stick-blk"}}' >/dev/null 2>&1 || true
}

scenario_held_mount_pull() {
  g_mark
  plug "$STICK"
  g hold 600 <<'G'
wait_sig $(cat $T/mark) 300 DriveOpened/stick
systemd-run --quiet --unit=vmtest-holder -p WorkingDirectory=/run/ferry/stick sleep infinity
wait_until 600 "ferry-crypt names the holder of the busy drive" \
  bash -c 'journalctl -b -u ferry-crypt --no-pager | grep -q "busy, held by pid [0-9]* (sleep"'
journalctl -b -u ferry-crypt --no-pager | grep "held by" | tail -1
mark > $T/mark2
G
  unplug
  g heldpulled 300 <<'G'
m=$(cat $T/mark2)
# The close was retrying on the busy mount (close-timeout is 120 s): the
# pull stops it at once, and the removal is reported well before the
# close would have given up.
wait_sig $m 60 DriveFailed/stick
msg=$(sigs_since $m | grep DriveFailed)
echo "$msg"
echo "$msg" | grep -q 'sleep' || fail "the message does not name the holder (sleep)"
echo "$msg" | grep -q 'only scheduled for removal' || fail "the message does not say the mapping is only scheduled for removal"
dmsetup info ferry-stick | grep -q 'DEFERRED REMOVE' || fail "ferry-stick is not in deferred removal"
mark > $T/mark
G
  plug "$STICK"
  g replug_held 600 <<'G'
m=$(cat $T/mark)
wait_sig $m 300 DriveAttached/stick DriveFailed/stick
msg=$(sigs_since $m | grep DriveFailed)
echo "$msg"
echo "$msg" | grep -q 'still in use' || fail "the message does not say the old mapping is still in use"
echo "$msg" | grep -q 'sleep' || fail "the message does not name the holder (sleep)"
mounted && fail "mounted although the old mapping is still held"
systemctl stop vmtest-holder
wait_until 120 "the kernel removed the old mapping once its holder let go" bash -c '! dmsetup ls | grep -q ferry-stick'
mark > $T/mark
G
  unplug
  plug "$STICK"
  g replug 900 <<'G'
m=$(cat $T/mark)
wait_sig $m 600 DriveAttached/stick DriveOpened/stick SyncFinished/stick DriveClosed/stick
sigs_since $m | grep -E '"Drive|"Sync(Started|Finished|Failed)'
G
  powered_off
}

scenario_policy() {
  g policy 300 <<'G'
id alice >/dev/null 2>&1 || useradd -G ferry alice
id bob >/dev/null 2>&1 || useradd bob
L="org.ferry.Led1 /org/ferry/Led1 org.ferry.Led1"
W="org.ferry.DriveWatcher1 /org/ferry/DriveWatcher1 org.ferry.DriveWatcher1"
as_user alice busctl --system call $L Acknowledge || fail "alice (group ferry) may not Acknowledge"
as_user alice busctl --system call $W Rescan || fail "alice (group ferry) may not Rescan"
out=$(as_user bob busctl --system call $L Acknowledge 2>&1) && fail "bob could call Acknowledge"
echo "bob: $out"; echo "$out" | grep -q 'Access denied' || fail "bob was not refused by the policy"
as_user bob busctl --system get-property $L State || fail "bob cannot read Led1.State"
as_user bob busctl --system get-property $W Drives || fail "bob cannot read DriveWatcher1.Drives"
echo "== forged DriveAttached from bob and alice"
m=$(mark); before=$(grep -c forged $T/monitor.log || true)
uuid=$(sed -n 's/^uuid = "\(.*\)"$/\1/p' $T/section)
as_user bob busctl --system emit /org/ferry/DriveWatcher1 org.ferry.DriveWatcher1 DriveAttached sss stick /dev/forged "$uuid"
as_user alice busctl --system emit /org/ferry/DriveWatcher1 org.ferry.DriveWatcher1 DriveAttached sss stick /dev/forged "$uuid"
# A barrier: a real signal sent after the forgeries.
busctl --system call $L Test
wait_sig $m 120 ColorChanged
sigs_since $m | grep -q DriveAttached && fail "a forged DriveAttached reached the bus's listeners"
sigs_since $m | grep -qE 'DriveOpened|DriveFailed' && fail "ferry-crypt acted on a forged DriveAttached"
[ "$(grep -c forged $T/monitor.log || true)" = "$before" ] || fail "nobody's dbus-monitor received a forged signal"
grep -q 'member=ColorChanged' $T/monitor.log || fail "nobody's dbus-monitor does not receive ferry-led's signals"
echo "forgeries dropped; bob and nobody read properties and receive signals"
G
}

scenario_activation() {
  g activation 300 <<'G'
systemctl stop ferry-drive-watcher
systemctl is-active --quiet ferry-drive-watcher && fail "still active"
as_user bob busctl --system get-property org.ferry.DriveWatcher1 /org/ferry/DriveWatcher1 org.ferry.DriveWatcher1 Drives
wait_until 120 "ferry-drive-watcher was started by the call" systemctl is-active --quiet ferry-drive-watcher
G
}

scenario_kill_mid_flow() {
  g_mark
  plug "$STICK"
  g kill 900 <<'G'
m=$(cat $T/mark)
wait_sig $m 300 DriveOpened/stick
before=$(systemctl show -p NRestarts --value ferry-sync)
systemctl kill -s KILL ferry-sync
wait_until 120 "systemd restarted ferry-sync" bash -c "[ \$(systemctl show -p NRestarts --value ferry-sync) -gt $before ] && systemctl is-active --quiet ferry-sync"
# The flow ends either way: closed after a sync that a restarted ferry-sync
# finished, or closed and red (DriveFailed at sync) when ferry-crypt saw the
# sync worker die mid-flow.
wait_until 600 "the flow ended (DriveClosed or DriveFailed)" bash -c "python3 $G/vmtest.py wait $SIG $m 1 DriveClosed/stick >/dev/null 2>&1 || python3 $G/vmtest.py wait $SIG $m 1 DriveFailed/stick >/dev/null 2>&1"
sigs_since $m
wait_until 120 "nothing is mapped or mounted" bash -c '! dmsetup ls | grep -q ferry-stick && ! findmnt /run/ferry/stick >/dev/null'
G
  if usb_present stick; then unplug; else qmp '{"execute":"blockdev-del","arguments":{"node-name":"stick-blk"}}' >/dev/null 2>&1 || true; fi
}

scenario_watchdog() {
  g watchdog 600 <<'G'
mkdir -p /etc/systemd/system/ferry-led.service.d
printf '[Service]\nWatchdogSec=10s\n' > /etc/systemd/system/ferry-led.service.d/vmtest-watchdog.conf
systemctl daemon-reload && systemctl restart ferry-led
wait_until 60 "ferry-led is active" systemctl is-active --quiet ferry-led
pid=$(systemctl show -p MainPID --value ferry-led)
before=$(systemctl show -p NRestarts --value ferry-led)
kill -STOP $pid
wait_until 180 "the watchdog restarted ferry-led" bash -c "[ \$(systemctl show -p NRestarts --value ferry-led) -gt $before ] && [ \$(systemctl show -p MainPID --value ferry-led) != $pid ] && systemctl is-active --quiet ferry-led"
journalctl -b -u ferry-led --no-pager | grep -i watchdog | tail -2
rm /etc/systemd/system/ferry-led.service.d/vmtest-watchdog.conf
systemctl daemon-reload
G
}

# A unit that fails for good (a bad configuration exits 78, which is not
# restarted) starts ferry-notify-failure@, which mails with its journal lines.
# (A watchdog restart is not a failure to systemd: Restart= retries first.)
scenario_onfailure() {
  g onfailure 600 <<'G'
touch $T/mailmark; sleep 0.01
printf '[led]\nbackend = "blinkstick"\nblink = 1\n' > $T/broken.toml
mkdir -p /etc/systemd/system/ferry-led.service.d
printf '[Service]\nExecStart=\nExecStart=/usr/bin/ferry-led --config %s\n' $T/broken.toml \
  > /etc/systemd/system/ferry-led.service.d/vmtest-broken.conf
systemctl daemon-reload
systemctl restart ferry-led || true
wait_until 120 "ferry-led failed" bash -c '[ "$(systemctl is-active ferry-led)" = failed ]'
wait_until 300 "OnFailure= mailed that ferry-led failed" bash -c 'mails_after $T/mailmark | grep -q ferry-led'
mails_after $T/mailmark | grep -E '^Subject:'
mails_after $T/mailmark | grep -q 'blink' || fail "the mail does not carry the journal line with the reason"
rm /etc/systemd/system/ferry-led.service.d/vmtest-broken.conf
systemctl daemon-reload; systemctl reset-failed ferry-led; systemctl restart ferry-led
wait_until 60 "ferry-led is active again" systemctl is-active --quiet ferry-led
G
}

scenario_timer() {
  g timer 900 <<'G'
mkdir -p /etc/systemd/system/ferry-backup@nas.timer.d
printf '[Timer]\nOnCalendar=\nOnActiveSec=1s\nAccuracySec=10ms\nRandomizedDelaySec=0\nPersistent=false\n' \
  > /etc/systemd/system/ferry-backup@nas.timer.d/vmtest.conf
systemctl daemon-reload
n=$(BORG_PASSCOMMAND="cat /etc/ferry/nas.passphrase" borg list --short /srv/borg/nas | wc -l)
m=$(mark)
systemctl start ferry-backup@nas.timer
wait_until 600 "the timer's backup finished, or its unit failed" bash -c \
  "sigs_since $m | grep -q BackupFinished || [ \$(systemctl show -p ActiveState --value ferry-backup@nas.service) = failed ]"
if [ "$(systemctl show -p ActiveState --value ferry-backup@nas.service)" = failed ]; then
  journalctl -b --no-pager -u ferry-backup@nas.service | tail -4
  fail "the timer fired, but ferry-backup@nas.service failed"
fi
wait_sig $m 60 BackupStarted BackupFinished
sigs_since $m
systemctl show -p Result --value ferry-backup@nas.service | grep -qx success || fail "ferry-backup@nas.service did not succeed"
n2=$(BORG_PASSCOMMAND="cat /etc/ferry/nas.passphrase" borg list --short /srv/borg/nas | wc -l)
[ "$n2" -gt "$n" ] || fail "no new archive ($n -> $n2)"
systemctl stop ferry-backup@nas.timer
rm -r /etc/systemd/system/ferry-backup@nas.timer.d; systemctl daemon-reload
G
}

# A user-level ferry-borg (issue 17): the user units, installed by
# scripts/install, run under `systemctl --user` for a real user with
# lingering enabled (no login), on that user's session bus; its timer fires
# and backs up over SSH to a restricted account on this machine (key-only,
# `command="borg serve --restrict-to-path …",restrict`, the host key in the
# user's known_hosts); `ferryctl --user` reaches it.
scenario_user_service() {
  g user_service 900 <<'G'
id laptop >/dev/null 2>&1 || useradd -m -s /bin/bash laptop
id borgsrv >/dev/null 2>&1 || useradd -m -s /bin/bash borgsrv
uid=$(id -u laptop)
U="setpriv --reuid=laptop --regid=laptop --init-groups env HOME=/home/laptop XDG_RUNTIME_DIR=/run/user/$uid DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/$uid/bus"

echo "== the server side: sshd on loopback, a restricted key"
systemctl is-active --quiet ssh || systemctl start ssh
wait_until 60 "sshd is active" systemctl is-active --quiet ssh
$U bash -c 'mkdir -p ~/.ssh && chmod 700 ~/.ssh && ssh-keygen -q -t ed25519 -N "" -f ~/.ssh/id_ed25519'
install -d -o borgsrv -g borgsrv -m 0700 /home/borgsrv/.ssh /home/borgsrv/repos
printf 'command="borg serve --restrict-to-path /home/borgsrv/repos",restrict %s\n' "$(cat /home/laptop/.ssh/id_ed25519.pub)" \
  > /home/borgsrv/.ssh/authorized_keys
chown borgsrv: /home/borgsrv/.ssh/authorized_keys; chmod 600 /home/borgsrv/.ssh/authorized_keys
# The user checks the host key themselves (ferry never adds one): here the
# server's own public key file is the fingerprint to trust.
printf 'localhost %s\n' "$(cut -d' ' -f1,2 /etc/ssh/ssh_host_ed25519_key.pub)" > /home/laptop/.ssh/known_hosts
chown laptop: /home/laptop/.ssh/known_hosts

echo "== the user's files: ferry.toml under ~/.config/ferry, the passphrase, data"
$U bash -c '
mkdir -p ~/.config/ferry ~/data
echo "laptop data" > ~/data/notes
head -c 24 /dev/urandom | base64 > ~/.config/ferry/offsite.pass; chmod 600 ~/.config/ferry/offsite.pass
BORG_PASSCOMMAND="cat $HOME/.config/ferry/offsite.pass" borg init -e repokey borgsrv@localhost:repos/laptop
cat > ~/.config/ferry/ferry.toml <<C
[remote-repositories.offsite]
url = "borgsrv@localhost:repos/laptop"
passphrase-file = "~/.config/ferry/offsite.pass"

[profiles.laptop]
repository = "offsite"
sources = ["/home/laptop/data"]

[profiles.laptop.preconditions]
network-online = true
C
mkdir -p ~/.config/systemd/user/ferry-backup@laptop.timer.d
printf "[Timer]\nOnCalendar=\nOnActiveSec=1s\nAccuracySec=10ms\nRandomizedDelaySec=0\nPersistent=false\n" \
  > ~/.config/systemd/user/ferry-backup@laptop.timer.d/vmtest.conf
'

echo "== lingering: the user's manager runs without a login"
loginctl enable-linger laptop
wait_until 120 "laptop's user manager is active" systemctl is-active --quiet user@$uid.service
wait_until 60 "laptop's session bus socket exists" test -S /run/user/$uid/bus
$U systemctl --user daemon-reload
$U systemctl --user enable --now ferry-borg.service
wait_until 120 "the user's ferry-borg is active" $U systemctl --user is-active --quiet ferry-borg.service
$U busctl --user status org.ferry.Borg1 >/dev/null || fail "org.ferry.Borg1 is not on laptop's session bus"
pid=$($U systemctl --user show -p MainPID --value ferry-borg.service)
[ "$(stat -c %U /proc/$pid)" = laptop ] || fail "the user's ferry-borg does not run as laptop"

echo "== the user's timer fires"
backup_ended() {
  local state exited
  state=$($U systemctl --user show -p ActiveState --value ferry-backup@laptop.service)
  exited=$($U systemctl --user show -p ExecMainExitTimestampMonotonic --value ferry-backup@laptop.service)
  [ "$state" = failed ] || { [ "$state" = inactive ] && [ "${exited:-0}" != 0 ]; }
}
$U systemctl --user start ferry-backup@laptop.timer
wait_until 600 "ferry-backup@laptop.service ran to its end" backup_ended
journalctl -b --no-pager _UID=$uid | grep -E 'ferry|borg' | tail -8 || true
[ "$($U systemctl --user show -p Result --value ferry-backup@laptop.service)" = success ] \
  || fail "the user's backup did not succeed"
list() { $U env BORG_PASSCOMMAND="cat /home/laptop/.config/ferry/offsite.pass" BORG_BASE_DIR=/home/laptop/.cache/vmtest-borg \
  borg list --short borgsrv@localhost:repos/laptop; }
n=$(list | wc -l)
[ "$n" -ge 1 ] || fail "no archive in the server's repository (a skip? see the journal above)"
test -s /home/laptop/.local/state/ferry/borg.json || fail "the user's state is not under ~/.local/state/ferry"
echo "== ferryctl --user reaches it"
$U ferryctl --user backup --wait laptop || fail "ferryctl --user backup --wait laptop failed"
[ "$(list | wc -l)" -gt "$n" ] || fail "ferryctl --user's backup made no archive"
echo "the user's ferry-borg ran under systemctl --user (lingering), its timer fired and backed up over SSH"

$U systemctl --user disable --now ferry-backup@laptop.timer ferry-borg.service
loginctl disable-linger laptop
G
}

scenario_journald() {
  g journald 120 <<'G'
for s in ferry-crypt ferry-drive-watcher ferry-led ferry-notifier ferry-sync ferry-borg; do
  # The system unit's entries (user_service ran a user-level ferry-borg too).
  journalctl -b -o json --no-pager SYSLOG_IDENTIFIER=$s _SYSTEMD_UNIT=$s.service | python3 -c '
import json, sys
name = sys.argv[1]
entries = [json.loads(l) for l in sys.stdin if l.strip()]
assert entries, f"no journal entries with SYSLOG_IDENTIFIER={name}"
e = entries[-1]
for field in ("MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "_SYSTEMD_UNIT"):
    assert field in e, f"{name}: no {field} in {sorted(e)}"
assert e["_SYSTEMD_UNIT"] == name + ".service", e["_SYSTEMD_UNIT"]
print(name, len(entries), "entries; fields:", " ".join(k for k in sorted(e) if not k.startswith("_") and not k.startswith("__")))
' $s
done
G
}

scenario_uninstall() {
  g uninstall 300 <<'G'
systemctl enable ferry-backup@nas.timer
dpkg -L ferry | while read -r f; do if [ -f "$f" ]; then echo "$f"; fi; done > $T/package-files
[ -s $T/package-files ] || fail "dpkg lists no files of ferry"
apt purge -y ferry > $T/apt.log 2>&1 || { cat $T/apt.log; fail "apt purge ferry failed"; }
tail -3 $T/apt.log
left=$(systemctl list-units --all --plain --no-legend 'ferry*' | grep -v 'not-found' || true)
[ -z "$left" ] || fail "units still loaded: $left"
files=$(systemctl list-unit-files --no-legend 'ferry*' || true)
[ -z "$files" ] || fail "unit files left: $files"
ls /etc/systemd/system/*.wants/ferry* 2>/dev/null && fail "enablement links left"
found=$(while read -r f; do if [ -e "$f" ]; then echo "$f"; fi; done < $T/package-files)
[ -z "$found" ] || fail "files left: $found"
busctl --system list --no-legend | grep -q org.ferry && fail "a ferry name is still on the bus"
test -d /etc/ferry/keys || fail "purge removed /etc/ferry/keys (the drives' keys)"
test -d /var/lib/ferry || fail "purge removed /var/lib/ferry"
echo "apt purge left nothing of the package's files; /etc/ferry (keys) and /var/lib/ferry stay"
G
}

scenario_notifier_credential() {
  g credential 300 <<'G'
# Only ferry-notifier gets the password, and only from systemd's copy.
pid=$(systemctl show -p MainPID --value ferry-notifier)
test -r /proc/$pid/environ
tr '\0' '\n' < /proc/$pid/environ | grep -q '^CREDENTIALS_DIRECTORY=' || fail "ferry-notifier has no CREDENTIALS_DIRECTORY"
as_user ferry-notifier cat /etc/credstore/ferry-smtp-password 2>/dev/null && fail "ferry-notifier's user can read /etc/credstore directly"
as_user ferry-watcher bash -c 'cat /run/credentials/ferry-notifier.service/ferry-smtp-password' 2>/dev/null && fail "ferry-watcher can read the notifier's credential"
as_user ferry-watcher cat /etc/ferry/ferry.toml >/dev/null || fail "ferry-watcher cannot read ferry.toml"
# Without the file, the unit still starts (the credential is optional).
mv /etc/credstore/ferry-smtp-password $T/pw
systemctl restart ferry-notifier
wait_until 60 "ferry-notifier runs without the credential file" systemctl is-active --quiet ferry-notifier
mv $T/pw /etc/credstore/ferry-smtp-password
systemctl restart ferry-notifier
wait_until 60 "ferry-notifier is active" systemctl is-active --quiet ferry-notifier
echo "the SMTP password reaches ferry-notifier alone; a missing credential file does not fail the unit"
G
}
