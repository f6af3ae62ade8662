//! Links ferry-notifier with packed relative relocations (DT_RELR): a
//! position-independent binary otherwise carries about 400 KiB of RELA
//! relocations that the dynamic loader reads at every start and that stay
//! resident (part of the idle footprint, docs/benchmarks.md). GNU ld ≥
//! 2.38 and lld understand the flag; glibc ≥ 2.36 (Debian 12) loads the
//! result. Set FERRY_NO_RELR=1 to link the old way on an older toolchain.

fn main() {
    println!("cargo:rerun-if-env-changed=FERRY_NO_RELR");
    if std::env::var_os("FERRY_NO_RELR").is_none()
        && std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux")
    {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
