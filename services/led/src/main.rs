//! The ferry-led binary: see the library for what it does.

fn main() -> std::process::ExitCode {
    ferry_service::main("ferry-led", ferry_led::run)
}
