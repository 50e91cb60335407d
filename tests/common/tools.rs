//! The external tools an integrator or operator would use, pinned and installed by
//! `deploy/dev tools` (which `deploy/dev test` runs first): Python's `jsonschema` and
//! `kubernetes-validate` in `tests/tools/.venv`, the npm packages of `tests/tools`, and
//! Prometheus's `promtool`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A path inside the repository.
pub fn repo(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn installed(path: PathBuf, what: &str) -> PathBuf {
    assert!(
        path.exists(),
        "{what} is not installed at {}: run `deploy/dev tools` (deploy/dev test does it first)",
        path.display()
    );
    path
}

/// The pinned Python environment's interpreter.
pub fn python() -> Command {
    Command::new(installed(
        repo("tests/tools/.venv/bin/python"),
        "the Python tools environment",
    ))
}

/// `node` with the pinned packages of `dir` (relative to the repository) installed.
pub fn node(dir: &str) -> Command {
    installed(repo(dir).join("node_modules"), &format!("npm ci in {dir}"));
    let mut cmd = Command::new("node");
    cmd.current_dir(repo(dir));
    cmd
}

/// Prometheus's `promtool`.
pub fn promtool() -> Command {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join("promtool").exists()))
        .unwrap_or(false);
    assert!(
        found,
        "promtool is not on PATH: run `deploy/dev tools` (deploy/dev test does it first)"
    );
    Command::new("promtool")
}

/// Runs `cmd` to the end with no input and returns its output, whatever its exit status.
pub fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs `cmd` and returns its standard output; fails the test, with both streams, unless it
/// exits 0.
pub fn stdout_of(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}
