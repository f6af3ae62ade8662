//! ferry-sync (to be written)
