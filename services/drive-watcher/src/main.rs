//! The ferry-drive-watcher binary: see the library for what it does.

fn main() -> std::process::ExitCode {
    ferry_service::main("ferry-drive-watcher", ferry_drive_watcher::run)
}
