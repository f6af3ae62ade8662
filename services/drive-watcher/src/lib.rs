//! ferry-drive-watcher
