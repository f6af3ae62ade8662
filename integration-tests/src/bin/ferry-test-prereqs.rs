//! Says which integration tests this machine will skip and why, before
//! `scripts/test` runs them (the runner itself only reports them skipped).

fn main() {
    use ferry_integration_tests::trials::{report, Needs};
    for (needs, missing) in report() {
        let what = match needs {
            Needs::Nothing => "tests on a private bus",
            Needs::Machine => "tests with udev, loop devices and the real tools",
            Needs::DeviceMapper => "tests that map LUKS devices",
        };
        match missing {
            None => println!("prerequisites: {what}: all here"),
            Some(why) => println!("prerequisites: {what}: SKIPPED, this machine lacks {why}"),
        }
    }
}
