//! The ferry-borg binary: ferry's shared main around [`ferry_borg::run`].
//! (The client the timer's unit runs is `ferryctl backup --wait`.)
fn main() -> std::process::ExitCode {
    ferry_service::main("ferry-borg", ferry_borg::run)
}
