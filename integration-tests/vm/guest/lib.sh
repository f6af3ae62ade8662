# Sourced by every guest script of the VM tier (runs as root in the guest).
set -euo pipefail
G=/mnt/share/guest
T=/run/vmtest
SIG=$T/signals.jsonl
BS=$T/blinkstick.log
MAIL=$T/mail
export SYSTEMD_PAGER= PAGER=cat

# The number of signals recorded so far (a mark for wait_sig).
mark() { wc -l < "$SIG"; }
# wait_sig FROM SECS SPEC...: the SPECs (Member or Member/arg0) in order
# among the signals recorded after mark FROM.
wait_sig() { python3 "$G/vmtest.py" wait "$SIG" "$@"; }
# The signals recorded after mark FROM.
sigs_since() { tail -n +"$(( $1 + 1 ))" "$SIG"; }
# wait_until SECS DESCRIPTION COMMAND...: waits for a condition, with a deadline.
wait_until() {
  local secs=$1 what=$2; shift 2
  local deadline=$(( $(date +%s) + secs ))
  until "$@"; do
    if [ "$(date +%s)" -ge "$deadline" ]; then echo "timed out after ${secs}s waiting until $what"; return 1; fi
    sleep 0.2
  done
}
# The BlinkStick's feature reports (hex, report id first) after line FROM.
led_mark() { wc -l < "$BS"; }
led_since() { tail -n +"$(( $1 + 1 ))" "$BS" | sed -n 's/^SET_REPORT .* data=\([0-9a-f]*\)$/\1/p'; }
mail_count() { find "$MAIL" -name '*.eml' | wc -l; }
# The mails (subject and decoded body) that arrived after file $1 was touched.
mails_after() {
  find "$MAIL" -name '*.eml' -newer "$1" | sort | while read -r f; do
    python3 -c 'import email, email.policy, sys
m = email.message_from_binary_file(open(sys.argv[1], "rb"), policy=email.policy.default)
print("Subject:", m["subject"]); print(m.get_body(preferencelist=("plain",)).get_content())' "$f"
  done
}
mapped() { dmsetup ls 2>/dev/null | grep -q '^ferry-stick\b'; }
mounted() { findmnt /run/ferry/stick >/dev/null; }
fail() { echo "FAILED: $*"; exit 1; }
as_user() { local u=$1; shift; setpriv --reuid="$u" --regid="$u" --init-groups "$@"; }
# The BlinkStick's feature report 1 ([1, r, g, b]) for the tier's colours.
WORKING=01102030 DONE=0100ff00 FAILED=01ff0000 OFF=01000000
# For conditions checked in `bash -c` by wait_until.
export T SIG BS MAIL G WORKING DONE FAILED OFF
export -f mark sigs_since led_mark led_since mail_count mails_after mapped mounted
