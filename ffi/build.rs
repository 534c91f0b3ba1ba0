//! Gives the shared library a SONAME (libpat_ffi.so.0: bumped with PAT_ABI_VERSION's major
//! changes), which rustc does not set by itself.

fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libpat_ffi.so.0");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
