//! ferry-crypt: the org.ferry.Crypt1 service, or with `enroll` the command
//! that prepares a new drive.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("enroll") => ferry_crypt::enroll::main(&args[1..]),
        Some("--help" | "-h") => {
            println!(
                "usage: ferry-crypt [--config FILE]\n       ferry-crypt enroll --help\n\n\
                 Without a command: the service that owns org.ferry.Crypt1 on the system bus\n\
                 (or DBUS_SYSTEM_BUS_ADDRESS); --config defaults to {}.\n\
                 Log filter: FERRY_LOG (or RUST_LOG), e.g. FERRY_LOG=debug.\n\n\
                 enroll: erase a device and prepare it as a ferry drive.",
                ferry_config::DEFAULT_PATH
            );
            ExitCode::SUCCESS
        }
        _ => ferry_service::main("ferry-crypt", ferry_crypt::run),
    }
}
