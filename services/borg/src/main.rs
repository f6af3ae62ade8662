//! The ferry-borg binary: ferry's shared main around [`ferry_borg::run`],
//! or with `start --wait PROFILE` the client the timer's unit runs
//! ([`ferry_borg::wait`]).
fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("start") => ferry_borg::wait::main(&args[1..]),
        _ => ferry_service::main("ferry-borg", ferry_borg::run),
    }
}
