//! The committed header ffi/include/pat.h must equal a fresh cbindgen generation from ffi/src.
//! After changing an export or its docs: `PAT_BLESS=1 cargo test -p pat_ffi --test header`, then
//! commit the header. (The cbindgen CLI's `--verify` rewrites the file even when it fails, so
//! this test compares in memory and writes only when told to.)

#[test]
fn header_is_up_to_date() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let cfg = cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).expect("cbindgen.toml");
    let mut fresh = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(cfg)
        .generate()
        .expect("cbindgen could not generate the header")
        .write(&mut fresh);
    let path = format!("{dir}/include/pat.h");
    if std::env::var_os("PAT_BLESS").is_some() {
        std::fs::write(&path, &fresh).expect("write include/pat.h");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "ffi/include/pat.h differs from a fresh generation: run \
         `PAT_BLESS=1 cargo test -p pat_ffi --test header` and commit the header"
    );
}
