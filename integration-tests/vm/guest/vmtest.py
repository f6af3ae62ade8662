#!/usr/bin/env python3
"""In-guest helpers of the VM tier.

  vmtest.py record FILE          every signal under /org/ferry on the system
                                 bus, one JSON line each: [interface, member, args...]
  vmtest.py wait FILE FROM SECS SPEC...
                                 waits until the lines after line FROM hold the
                                 SPECs in order; SPEC is MEMBER or MEMBER/ARG0
                                 (MEMBER may be Interface.Member). Exit 1 and
                                 the lines seen on timeout.
  vmtest.py smtp DIR PORT USER PASSWORDFILE
                                 an SMTP sink on 127.0.0.1:PORT that accepts
                                 AUTH only with USER and the password in
                                 PASSWORDFILE and stores each message in DIR.
"""
import json, os, sys, time


def record(path):
    import dbus
    from dbus.mainloop.glib import DBusGMainLoop
    from gi.repository import GLib
    DBusGMainLoop(set_as_default=True)
    bus = dbus.SystemBus()
    out = open(path, "a", buffering=1)

    def on_message(_bus, msg):
        if msg.get_type() != 4:  # signal
            return
        path_ = msg.get_path() or ""
        if not path_.startswith("/org/ferry"):
            return
        args = [str(a) if not isinstance(a, (dbus.Array, dbus.Dictionary)) else json.dumps(a, default=str)
                for a in msg.get_args_list()]
        out.write(json.dumps([msg.get_interface().split(".")[-1], msg.get_member()] + args) + "\n")

    bus.add_match_string("type='signal',path_namespace='/org/ferry'")
    bus.add_message_filter(on_message)
    open(path + ".ready", "w").close()
    GLib.MainLoop().run()


def matches(line, spec):
    member, _, arg0 = spec.partition("/")
    iface, _, name = member.rpartition(".")
    if line[1] != name or (iface and line[0] != iface):
        return False
    return not arg0 or (len(line) > 2 and line[2] == arg0)


def wait(path, start, secs, specs):
    deadline = time.monotonic() + float(secs)
    while True:
        with open(path) as f:
            lines = [json.loads(l) for l in f.read().splitlines()[int(start):] if l]
        i = 0
        for line in lines:
            if i < len(specs) and matches(line, specs[i]):
                i += 1
        if i == len(specs):
            return 0
        if time.monotonic() > deadline:
            print(f"timed out after {secs}s waiting for {specs[i:]} (in order {specs}); signals since #{start}:")
            for line in lines:
                print("  ", line)
            return 1
        time.sleep(0.1)


def smtp(directory, port, user, password_file):
    import asyncio
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    os.makedirs(directory, exist_ok=True)
    counter = [0]

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            if not session.authenticated:
                return "530 5.7.0 authentication required"
            counter[0] += 1
            tmp = os.path.join(directory, ".%d" % counter[0])
            with open(tmp, "wb") as f:
                f.write(envelope.original_content)
            os.rename(tmp, os.path.join(directory, "%d.eml" % counter[0]))
            return "250 2.0.0 accepted"

    def authenticator(server, session, envelope, mechanism, auth_data):
        with open(password_file, "rb") as f:
            want = f.read().strip()
        ok = isinstance(auth_data, LoginPassword) and auth_data.login == user.encode() \
            and auth_data.password == want
        return AuthResult(success=ok)

    controller = Controller(Handler(), hostname="127.0.0.1", port=int(port),
                            authenticator=authenticator, auth_require_tls=False,
                            auth_exclude_mechanism=["CRAM-MD5"])
    controller.start()
    open(os.path.join(directory, ".ready"), "w").close()
    try:
        while True:
            time.sleep(3600)
    finally:
        controller.stop()


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "record":
        record(sys.argv[2])
    elif cmd == "wait":
        sys.exit(wait(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]))
    elif cmd == "smtp":
        smtp(*sys.argv[2:6])
    else:
        sys.exit(__doc__)
