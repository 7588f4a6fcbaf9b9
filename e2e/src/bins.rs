//! Locates the `kord` and `kordctl` binaries under test.

use std::path::PathBuf;

/// The `kord` server binary: `$KORD_BIN`, else `kord` next to the test's target profile dir.
pub fn kord_bin() -> PathBuf {
    locate("kord", "KORD_BIN")
}

/// The `kordctl` command line: `$KORDCTL_BIN`, else `kordctl` in the target profile dir.
pub fn kordctl_bin() -> PathBuf {
    locate("kordctl", "KORDCTL_BIN")
}

fn locate(name: &str, env: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{env}={} does not name an existing file",
            path.display()
        );
        return path;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let file = format!("{name}{}", std::env::consts::EXE_SUFFIX);
    // Test binaries live in target/<profile>/deps/; the crate binaries in target/<profile>/.
    let mut candidates = Vec::new();
    if let Some(dir) = exe.parent() {
        if let Some(profile_dir) = dir.parent() {
            candidates.push(profile_dir.join(&file));
        }
        candidates.push(dir.join(&file));
    }
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return found.clone();
    }
    panic!(
        "the `{name}` binary was not found (looked at {candidates:?}); \
         build it first: cargo build --bins (or set {env} to its path)"
    );
}
