//! Build script. Without the `cuda` feature it does nothing. With it:
//! - compiles every `cuda/*.cu` with nvcc into `OUT_DIR/<name>.fatbin`, using the flags in
//!   `cuda/nvcc.flags` (the same file `scripts/compile-kernels.sh` reads);
//! - writes `OUT_DIR/kernels.rs`: `KERNELS: &[(&str, &[u8])]`, the embedded fatbins by file stem;
//! - checks that `src/backend/cuda/params.rs`, the committed bindgen output for `cuda/params.h`
//!   (kernel parameter structs and the `PAT_*` launch constants), was generated from the current
//!   params.h: its header records an FNV-1a hash of the header file. It does not run bindgen, so
//!   no libclang is needed; after editing params.h run `scripts/check-params-bindings.sh --fix`
//!   (CI runs it without `--fix` as the drift check).
//!
//! nvcc is found via `$NVCC`, `$CUDA_HOME/bin/nvcc`, `PATH`, then the repo's `.cuda-toolchain/`
//! (see `scripts/install-cuda-toolchain.sh`). No GPU is needed.

use std::env;
use std::fmt::{self, Write as _};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A build failure; `main` returning it prints `Error: <message>` and fails the build.
struct BuildError(String);

impl fmt::Debug for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `map_err` adapter: "<what>: <cause>".
fn fail<E: fmt::Display>(what: impl fmt::Display) -> impl FnOnce(E) -> BuildError {
    move |e| BuildError(format!("{what}: {e}"))
}

fn main() -> Result<(), BuildError> {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return Ok(());
    }
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let var = |name: &str| {
        env::var_os(name)
            .map(PathBuf::from)
            .ok_or(BuildError(format!("{name} is not set")))
    };
    let (root, out) = (var("CARGO_MANIFEST_DIR")?, var("OUT_DIR")?);
    let cuda = root.join("cuda");
    println!("cargo:rerun-if-changed={}", cuda.display()); // catches added and removed files
    check_params_bindings(&cuda.join("params.h"), &root.join(PARAMS_RS))?;

    let mut sources = Vec::new();
    for entry in fs::read_dir(&cuda).map_err(fail(format!("cannot read {}", cuda.display())))? {
        let path = entry
            .map_err(fail(format!("cannot list {}", cuda.display())))?
            .path();
        if path.is_file() {
            println!("cargo:rerun-if-changed={}", path.display());
            if path.extension().is_some_and(|x| x == "cu") {
                sources.push(path);
            }
        }
    }
    sources.sort();
    if sources.is_empty() {
        return Err(BuildError(format!("no .cu files in {}", cuda.display())));
    }

    let nvcc = find_nvcc(&root)?;
    let flags = read_flags(&cuda.join("nvcc.flags"))?;
    compile_all(&nvcc, &flags, &cuda, &sources, &out)?;
    write_kernels_rs(&sources, &out.join("kernels.rs"))
}

/// The committed Rust bindings of `cuda/params.h`, relative to the manifest directory.
const PARAMS_RS: &str = "src/backend/cuda/params.rs";
/// The line of `PARAMS_RS` holding the hash of the params.h it was generated from.
const PARAMS_HASH_PREFIX: &str = "// cuda/params.h fnv1a64: ";

/// Fails when `params.rs` was generated from another `params.h` than the one nvcc compiles, which
/// would make the kernels and the Rust launch wrappers disagree on struct layouts.
fn check_params_bindings(header: &Path, bindings: &Path) -> Result<(), BuildError> {
    println!("cargo:rerun-if-changed={}", header.display());
    println!("cargo:rerun-if-changed={}", bindings.display());
    let h = fs::read(header).map_err(fail(format!("cannot read {}", header.display())))?;
    let rs = fs::read_to_string(bindings)
        .map_err(fail(format!("cannot read {}", bindings.display())))?;
    let want = format!(
        "{:016x}",
        fnv1a64(h.iter().copied().filter(|&b| b != b'\r'))
    );
    let recorded = rs.lines().find_map(|l| l.strip_prefix(PARAMS_HASH_PREFIX));
    if recorded.map(str::trim) == Some(want.as_str()) {
        return Ok(());
    }
    Err(BuildError(format!(
        "{PARAMS_RS} was not generated from the current cuda/params.h (params.h hashes to {want}, \
         the bindings record {}); regenerate them with `scripts/check-params-bindings.sh --fix` \
         (needs libclang) and commit the result",
        recorded.unwrap_or("no hash")
    )))
}

/// 64-bit FNV-1a; `scripts/check-params-bindings.sh` computes the same (on params.h without `\r`).
fn fnv1a64(bytes: impl Iterator<Item = u8>) -> u64 {
    bytes.fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `$NVCC`, `$CUDA_HOME/bin/nvcc`, `nvcc` on `PATH`, `.cuda-toolchain/lib/python3*/.../cu13/bin/nvcc`.
fn find_nvcc(root: &Path) -> Result<PathBuf, BuildError> {
    if let Some(nvcc) = env::var_os("NVCC").map(PathBuf::from) {
        if !nvcc.is_file() {
            return Err(BuildError(format!("NVCC={} is not a file", nvcc.display())));
        }
        return Ok(nvcc);
    }
    let mut candidates = Vec::new();
    if let Some(home) = env::var_os("CUDA_HOME") {
        candidates.push(PathBuf::from(home).join("bin/nvcc"));
    }
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|dir| dir.join("nvcc")));
    }
    for lib in fs::read_dir(root.join(".cuda-toolchain/lib"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if lib.file_name().to_string_lossy().starts_with("python3") {
            candidates.push(lib.path().join("site-packages/nvidia/cu13/bin/nvcc"));
        }
    }
    candidates
        .into_iter()
        .find(|c| c.is_file())
        .ok_or(BuildError(
            "the `cuda` feature needs nvcc, which is not in $NVCC, $CUDA_HOME/bin, PATH or \
         .cuda-toolchain/; run scripts/install-cuda-toolchain.sh or set NVCC=/path/to/nvcc"
                .into(),
        ))
}

/// One argument per line; `#` starts a comment.
fn read_flags(path: &Path) -> Result<Vec<String>, BuildError> {
    let text = fs::read_to_string(path).map_err(fail(format!("cannot read {}", path.display())))?;
    let args = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim());
    Ok(args.filter(|a| !a.is_empty()).map(str::to_owned).collect())
}

/// Runs up to `NUM_JOBS` nvcc processes at a time and reports every failure with nvcc's output.
fn compile_all(
    nvcc: &Path,
    flags: &[String],
    cuda: &Path,
    sources: &[PathBuf],
    out: &Path,
) -> Result<(), BuildError> {
    let jobs = env::var("NUM_JOBS")
        .ok()
        .and_then(|j| j.parse().ok())
        .unwrap_or(1usize)
        .max(1);
    let mut failures = String::new();
    for batch in sources.chunks(jobs) {
        let mut running = Vec::new();
        for src in batch {
            let child = Command::new(nvcc)
                .args(flags)
                .arg("-I")
                .arg(cuda)
                .arg("-o")
                .arg(out.join(format!("{}.fatbin", stem(src))))
                .arg(src)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(fail(format!("cannot run {}", nvcc.display())))?;
            running.push((src, child));
        }
        for (src, child) in running {
            let o = child.wait_with_output().map_err(fail("waiting for nvcc"))?;
            if !o.status.success() {
                let (stdout, stderr) = (
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr),
                );
                let _ = writeln!(
                    failures,
                    "nvcc failed on {} ({}):\n{stdout}{stderr}",
                    src.display(),
                    o.status
                );
            }
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(BuildError(failures))
    }
}

/// `KERNELS`: (file stem, fatbin bytes). The bytes are embedded 16-byte aligned, since the driver
/// parses the fatbin in place.
fn write_kernels_rs(sources: &[PathBuf], path: &Path) -> Result<(), BuildError> {
    let mut rs = String::from(
        "// @generated by build.rs: the CUDA kernels, one fatbin per cuda/*.cu file.\n\
         #[repr(C, align(16))]\n\
         struct Aligned16<B: ?Sized>(B);\n\n\
         /// (kernel file stem, fatbin image) for every `cuda/*.cu`, e.g. (\"rmsnorm\", ...).\n\
         pub static KERNELS: &[(&str, &[u8])] = &[\n",
    );
    for name in sources.iter().map(|s| stem(s)) {
        let file = format!("concat!(env!(\"OUT_DIR\"), \"/{name}.fatbin\")");
        let _ = writeln!(
            rs,
            "    (\"{name}\", {{\n        static A: &Aligned16<[u8]> = &Aligned16(*include_bytes!({file}));\n        &A.0\n    }}),"
        );
    }
    rs.push_str("];\n");
    fs::write(path, rs).map_err(fail(format!("cannot write {}", path.display())))
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}
