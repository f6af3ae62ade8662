//! The ferry-sync binary: see the library for what it does.

fn main() -> std::process::ExitCode {
    ferry_service::main("ferry-sync", ferry_sync::run)
}
