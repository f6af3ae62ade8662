//! The ferry-borg binary: ferry's shared main around [`ferry_borg::run_on`],
//! on the system bus or, with `--user`, as a user's own service on their
//! session bus. (The client the timer's unit runs is `ferryctl backup --wait`.)
fn main() -> std::process::ExitCode {
    ferry_service::main_on_either_bus("ferry-borg", ferry_borg::run_on)
}
