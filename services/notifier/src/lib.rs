//! ferry-notifier (to be written)
