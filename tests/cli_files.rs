//! The `pat` binary's output files: written whole or not at all (a sibling renamed over the
//! path, or in place where a rename would change what the path is), and an interrupt leaves no
//! part of one, nor the demo's scratch model.

use std::path::Path;
use std::process::{Command, Output};

fn pat(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pat"))
        .args(args)
        .output()
        .expect("run pat")
}

/// Runs pat expecting success; returns (stdout, stderr).
fn ok(args: &[&str]) -> (String, String) {
    let o = pat(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "pat {args:?} failed: {err}");
    (String::from_utf8(o.stdout).unwrap(), err)
}

/// Starts `pat demo` (through `sh` with `trap`, when given) with its scratch in `scratch` and its
/// timeline at `svg`, and waits until its scratch model is written; returns it and the model.
fn demo_until_its_model(
    scratch: &Path,
    svg: &Path,
    trap: &str,
) -> (std::process::Child, std::path::PathBuf) {
    use std::process::Stdio;
    let script = format!("{trap} exec \"$0\" demo --svg \"$1\"");
    let mut child = Command::new("sh")
        .args([
            "-c",
            &script,
            env!("CARGO_BIN_EXE_pat"),
            svg.to_str().unwrap(),
        ])
        .env("TMPDIR", scratch)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `exec`: the shell's pid is pat's.
    let model = scratch.join(format!("pat-demo-{}", child.id()));
    // The default demo runs for a minute or more: the model appears within seconds.
    let t0 = std::time::Instant::now();
    while !model.join("config.json").exists() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("the demo ended before its model was written: {st}");
        }
        if t0.elapsed().as_secs() > 120 {
            let _ = child.kill();
            panic!("no scratch model at {model:?} after 120 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    (child, model)
}

fn send(child: &std::process::Child, sig: &str) {
    let kill = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
}

/// What `dir` holds, by name.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Ctrl-C during `pat demo` removes the scratch model it made (~100 MB) and the timeline it
/// claimed (a sibling it writes and renames over the path at the end), leaving an existing
/// timeline as it was, and ends the process by the signal (a shell loop stops on it); a signal
/// the command was started ignoring stays ignored, and SIGTERM cleans up the same way.
#[test]
fn an_interrupted_demo_leaves_no_scratch_model_and_no_part_of_a_timeline() {
    use std::os::unix::process::ExitStatusExt;
    for (trap, ignored, sig, signo, before) in [
        ("", None, "-INT", 2, None),
        (
            "trap '' INT;",
            Some("-INT"),
            "-TERM",
            15,
            Some("<svg>old</svg>"),
        ),
    ] {
        let scratch = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let svg = out.path().join("t.svg");
        if let Some(b) = before {
            std::fs::write(&svg, b).unwrap();
        }
        let (child, model) = demo_until_its_model(scratch.path(), &svg, trap);
        let claimed = names(out.path());
        if let Some(ig) = ignored {
            send(&child, ig);
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
        let alive = model.exists();
        send(&child, sig);
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        let sibling = format!(".t.svg.pat-{}-", child_pid(&model));
        assert!(
            claimed.iter().any(|n| n.starts_with(&sibling)),
            "{trap} the timeline is claimed before the run: {claimed:?}"
        );
        assert!(alive, "{trap} an ignored {ignored:?} changed nothing");
        assert_eq!(o.status.signal(), Some(signo), "{trap} {sig}: {err}");
        assert!(
            err.contains("interrupted") && !err.contains("panicked"),
            "{err}"
        );
        assert!(
            !model.exists(),
            "{trap} {sig}: scratch model left at {model:?}"
        );
        match before {
            None => assert_eq!(names(out.path()), Vec::<String>::new(), "{trap} {sig}"),
            Some(b) => {
                assert_eq!(names(out.path()), ["t.svg"], "{trap} {sig}");
                assert_eq!(std::fs::read_to_string(&svg).unwrap(), b, "{trap} {sig}");
            }
        }
    }
}

/// The pid in a demo's scratch directory name (`pat-demo-PID`).
fn child_pid(model: &Path) -> String {
    let name = model.file_name().unwrap().to_string_lossy();
    name.trim_start_matches("pat-demo-").to_string()
}

/// An output file is written whole or not at all: a run that fails after claiming it leaves an
/// existing file byte for byte and nothing beside it; one that succeeds replaces it with the
/// same permissions, and through a symbolic link replaces what the link leads to.
#[test]
fn an_output_is_replaced_whole_or_left_as_it_was() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let s = |x: &Path| x.to_str().unwrap().to_string();
    let bad = p.join("bad.jsonl");
    std::fs::write(&bad, "{\"prompt_len\":4}\n").unwrap();
    let svg = p.join("t.svg");
    std::fs::write(&svg, "<svg>old</svg>").unwrap();
    let o = pat(&["simulate", "--trace", &s(&bad), "--svg", &s(&svg)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("response_len"), "{err}");
    assert_eq!(std::fs::read_to_string(&svg).unwrap(), "<svg>old</svg>");
    assert_eq!(names(p), ["bad.jsonl", "t.svg"]);

    let real = p.join("trace.jsonl");
    std::fs::write(&real, "old\n").unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o604)).unwrap();
    let link = p.join("link.jsonl");
    std::os::unix::fs::symlink("trace.jsonl", &link).unwrap();
    ok(&[
        "trace",
        "gen",
        "--kind",
        "uniform",
        "--n",
        "5",
        "--out",
        &s(&link),
    ]);
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    let text = std::fs::read_to_string(&real).unwrap();
    assert_eq!(text.lines().count(), 5, "{text}");
    assert!(
        text.lines().all(|l| l.contains("\"response_len\"")),
        "{text}"
    );
    let mode = std::fs::metadata(&real).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o604);
    assert_eq!(
        names(p),
        ["bad.jsonl", "link.jsonl", "t.svg", "trace.jsonl"]
    );

    // What cannot be replaced is written in place: /dev/stdout (a pipe here), /dev/null.
    let gen = ["trace", "gen", "--kind", "uniform", "--n", "3", "--out"];
    let (out, _) = ok(&[&gen[..], &["/dev/stdout"]].concat());
    assert_eq!(out.lines().count(), 3, "{out}");
    ok(&[&gen[..], &["/dev/null"]].concat());
    use std::os::unix::fs::FileTypeExt;
    let null = std::fs::metadata("/dev/null").unwrap().file_type();
    assert!(null.is_char_device(), "/dev/null replaced: {null:?}");
    // /dev/stdout redirected to a file: that file written, the same file (the shell's
    // redirection still leads to it).
    use std::os::unix::fs::MetadataExt;
    let redirect = p.join("redirect.jsonl");
    let f = std::fs::File::create(&redirect).unwrap();
    let ino = f.metadata().unwrap().ino();
    let o = Command::new(env!("CARGO_BIN_EXE_pat"))
        .args([&gen[..], &["/dev/stdout"]].concat())
        .stdout(f)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::metadata(&redirect).unwrap().ino(), ino);
    assert_eq!(
        std::fs::read_to_string(&redirect).unwrap().lines().count(),
        3
    );
    // A file with another hard link is written in place: both names read the new bytes.
    let other = p.join("other-name.jsonl");
    std::fs::hard_link(&redirect, &other).unwrap();
    ok(&[
        &gen[..2],
        &["--kind", "uniform", "--n", "4", "--out", &s(&redirect)],
    ]
    .concat());
    assert_eq!(std::fs::read_to_string(&other).unwrap().lines().count(), 4);
}
