//! ferry-borg (to be written)
