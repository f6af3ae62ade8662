//! The ferry-notifier binary: see the library for what it does.

fn main() -> std::process::ExitCode {
    ferry_service::main("ferry-notifier", ferry_notifier::run)
}
