#!/usr/bin/python3
"""A stand-in for ferry-led, in a few lines of Python with dbus-python.

It owns org.ferry.Led1 and speaks the same interface (as far as the flows
need it), knowing nothing of ferry's Rust code: the contract, not the code,
holds ferry together. Usage: led.py COLOUR_FILE  (bus: DBUS_SYSTEM_BUS_ADDRESS)
"""
import sys

import dbus
import dbus.service
from dbus.mainloop.glib import DBusGMainLoop
from gi.repository import GLib

NAME = "org.ferry.Led1"
PATH = "/org/ferry/Led1"
COLOURS = {"idle": "#000000", "working": "#33c280", "done": "#008000", "failed": "#ff0000"}


class Led(dbus.service.Object):
    def __init__(self, bus, colour_file):
        super().__init__(bus, PATH)
        self.colour_file, self.state, self.busy, self.done, self.failure = colour_file, "idle", set(), set(), None
        for member in ["DriveAttached", "DriveDetached", "DriveOpened", "DriveClosed", "DriveFailed", "SyncFailed",
                       "BackupStarted", "BackupFinished", "BackupFailed", "BackupSkipped"]:
            bus.add_signal_receiver(self.on_signal, signal_name=member, member_keyword="member")
        self.show()

    def on_signal(self, *args, member):
        first = str(args[0])
        if member in ("DriveAttached", "DriveOpened", "BackupStarted"):
            self.busy.add(first); self.done.discard(first)
        elif member == "DriveDetached":
            self.busy.discard(first); self.done.discard(first)
        elif member == "DriveClosed":
            self.busy.discard(first); self.done.add(first)
        elif member in ("DriveFailed", "SyncFailed", "BackupFailed"):
            self.busy.discard(first); self.failure = f"{first}: {member}"
        elif member in ("BackupFinished", "BackupSkipped"):
            self.busy.discard(first)
        self.show()

    def show(self):
        state = "failed" if self.failure else "working" if self.busy else "done" if self.done else "idle"
        if state != self.state or not getattr(self, "shown", False):
            self.state, self.shown = state, True
            with open(self.colour_file, "a") as f:
                f.write(f"{COLOURS[state]} {state}\n")
            self.ColorChanged(COLOURS[state], state)

    @dbus.service.method(NAME)
    def Acknowledge(self):
        self.failure = None
        self.show()

    @dbus.service.method(NAME)
    def Test(self):
        pass

    @dbus.service.signal(NAME, signature="ss")
    def ColorChanged(self, color, state):
        pass

    @dbus.service.method(dbus.PROPERTIES_IFACE, in_signature="ss", out_signature="v")
    def Get(self, interface, prop):
        return self.GetAll(interface)[prop]

    @dbus.service.method(dbus.PROPERTIES_IFACE, in_signature="s", out_signature="a{sv}")
    def GetAll(self, interface):
        return {"Color": COLOURS[self.state], "State": self.state, "Reason": self.failure or "",
                "Backend": "file", "DevicePresent": True}


if __name__ == "__main__":
    DBusGMainLoop(set_as_default=True)
    bus = dbus.SystemBus()
    led = Led(bus, sys.argv[1])
    name = dbus.service.BusName(NAME, bus, do_not_queue=True)
    GLib.MainLoop().run()
