//! The enums whose values travel as strings: each variant has exactly one
//! documented wire name (the XML documents the same names), so a service
//! compares variants, never strings, and a new name is a compile error in
//! every `match` instead of a silent mismatch.

/// Defines a wire enum: the variants with their wire names, `ALL`,
/// `as_str`, `from_wire` and `Display` (the wire name).
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident => $wire:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every value, in documentation order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The wire name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $wire,)+
                }
            }

            /// The value named `wire`, if any.
            pub fn from_wire(wire: &str) -> Option<$name> {
                $name::ALL.iter().copied().find(|v| v.as_str() == wire)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_enum! {
    /// A drive's state in Crypt1.Drives (`CryptDrive::state`).
    pub enum CryptState {
        /// `absent`: not plugged in.
        Absent => "absent",
        /// `attached`: plugged in, locked.
        Attached => "attached",
        /// `opening`: being unlocked, mounted and checked.
        Opening => "opening",
        /// `open`: unlocked, mounted and proven.
        Open => "open",
        /// `held`: unlocked, proven and mounted read-only for a person;
        /// never synced.
        Held => "held",
        /// `closing`: being unmounted and locked.
        Closing => "closing",
        /// `closed`: unmounted and locked after a flow: safe to remove.
        Closed => "closed",
        /// `failed`: the last operation failed (see LastFailures).
        Failed => "failed",
    }
}

wire_enum! {
    /// Where opening or closing a drive failed: Crypt1.DriveFailed's stage
    /// (and the stage of Crypt1.LastFailures and FailureHistory).
    pub enum CryptStage {
        /// `health`: the drive's SMART health is failing or degraded and
        /// its policy is `health = "refuse"`; checked before it is
        /// unlocked, so nothing of it was opened.
        Health => "health",
        /// `unlock`: the key file, the LUKS header or the mapping.
        Unlock => "unlock",
        /// `mount`: the mountpoint or the mount.
        Mount => "mount",
        /// `identity`: the filesystem or the identity token is not the
        /// enrolled drive's.
        Identity => "identity",
        /// `close`: unmounting or locking; the drive may still be mounted.
        Close => "close",
        /// `removed`: the drive was pulled out while open.
        Removed => "removed",
        /// `sync`: ferry-sync went away during the drive's sync without a
        /// result; the drive was closed and its flow ends failed.
        Sync => "sync",
    }
}

wire_enum! {
    /// What the status LED shows: Led1.State, ColorChanged's state.
    pub enum LedState {
        /// `idle`: nothing to say; off.
        Idle => "idle",
        /// `working`: a drive or a backup is busy.
        Working => "working",
        /// `done`: a drive is safe to remove.
        Done => "done",
        /// `failed`: something failed (or finished with warnings) and
        /// nobody has acknowledged it.
        Failed => "failed",
    }
}

wire_enum! {
    /// What a drive's SMART reading says, worst last: Crypt1.Health's
    /// verdict.
    pub enum HealthVerdict {
        /// `unavailable`: smartctl could not read the drive's health (not
        /// installed, a USB bridge it does not know, no SMART): nothing is
        /// known, and nothing is refused for it.
        Unavailable => "unavailable",
        /// `passed`: the drive says it is healthy and no sector is
        /// reallocated, pending or uncorrectable.
        Passed => "passed",
        /// `degraded`: overall health passes, but sectors were reallocated
        /// or are pending or uncorrectable: the drive is wearing out.
        Degraded => "degraded",
        /// `failing`: the drive's own overall assessment is FAILED, or an
        /// attribute is past its threshold now.
        Failing => "failing",
    }
}

wire_enum! {
    /// What a drive's health policy (`health` in `[drives.NAME]`) made of
    /// its reading: Crypt1.Health's decision.
    pub enum HealthDecision {
        /// `open`: nothing to say; the drive was opened.
        Open => "open",
        /// `warn`: failing or degraded, opened anyway (`health = "warn"`);
        /// mailed, and shown as a warning in Led1.Reason.
        Warn => "warn",
        /// `refuse`: failing or degraded and not opened (`health =
        /// "refuse"`): DriveFailed at stage `health`.
        Refuse => "refuse",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_round_trip_and_are_distinct() {
        for state in CryptState::ALL {
            assert_eq!(CryptState::from_wire(state.as_str()), Some(*state));
        }
        for stage in CryptStage::ALL {
            assert_eq!(CryptStage::from_wire(stage.as_str()), Some(*stage));
        }
        for state in LedState::ALL {
            assert_eq!(LedState::from_wire(state.as_str()), Some(*state));
        }
        for verdict in HealthVerdict::ALL {
            assert_eq!(HealthVerdict::from_wire(verdict.as_str()), Some(*verdict));
        }
        for decision in HealthDecision::ALL {
            assert_eq!(
                HealthDecision::from_wire(decision.as_str()),
                Some(*decision)
            );
        }
        assert!(HealthVerdict::Failing > HealthVerdict::Degraded);
        assert_eq!(CryptState::from_wire("Open"), None);
        assert_eq!(CryptStage::Removed.to_string(), "removed");
    }
}
