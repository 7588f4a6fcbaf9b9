//! Znode path syntax: the one check every path passes at the edge before it is proposed.

use std::fmt;

/// Longest accepted path, in bytes (ZooKeeper has no such limit short of its 1 MiB packet;
/// a bound keeps keys, events and error messages small).
pub const MAX_PATH_BYTES: usize = 4096;

/// Why a path was refused, phrased for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathError {
    pub path: String,
    pub reason: &'static str,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid path {:?}: {}", self.path, self.reason)
    }
}

impl std::error::Error for PathError {}

/// Checks ZooKeeper's path rules: absolute, no empty, `.` or `..` components, no trailing
/// slash (except the root), no NUL or other control characters, at most [`MAX_PATH_BYTES`].
pub fn validate(path: &str) -> Result<(), PathError> {
    let fail = |reason| {
        Err(PathError {
            path: path.to_owned(),
            reason,
        })
    };
    if path.is_empty() {
        return fail("must not be empty");
    }
    if !path.starts_with('/') {
        return fail("must start with '/'");
    }
    if path.len() > MAX_PATH_BYTES {
        return fail("longer than 4096 bytes");
    }
    if path == "/" {
        return Ok(());
    }
    if path.ends_with('/') {
        return fail("must not end with '/'");
    }
    if path.chars().any(is_forbidden_char) {
        return fail("contains a NUL or control character");
    }
    for component in path[1..].split('/') {
        match component {
            "" => return fail("contains an empty component ('//')"),
            "." | ".." => return fail("contains a relative component ('.' or '..')"),
            _ => {}
        }
    }
    Ok(())
}

/// ZooKeeper refuses the same ranges: C0 and C1 controls and the non-characters it lists.
fn is_forbidden_char(c: char) -> bool {
    matches!(c, '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}' | '\u{fff0}'..='\u{ffff}')
}

/// The parent of a valid, non-root path.
/// Whether `path` is `dir` itself or a node below it (every path is below the root).
pub fn is_at_or_below(path: &str, dir: &str) -> bool {
    dir == "/"
        || path
            .strip_prefix(dir)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

pub fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) => "/",
        Some(i) => &path[..i],
        None => "/",
    }
}

/// The last component of a valid, non-root path.
pub fn name(path: &str) -> &str {
    match path.rfind('/') {
        Some(i) => &path[i + 1..],
        None => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtree_membership_respects_component_boundaries() {
        assert!(is_at_or_below("/a", "/a"));
        assert!(is_at_or_below("/a/b/c", "/a"));
        assert!(is_at_or_below("/x", "/"));
        assert!(!is_at_or_below("/ab", "/a"));
        assert!(!is_at_or_below("/", "/a"));
    }

    #[test]
    fn accepts_valid_paths() {
        for p in ["/", "/a", "/a/b", "/a.b/c..d", "/ünï/cödé", "/a-0000000001"] {
            assert_eq!(validate(p), Ok(()), "{p}");
        }
    }

    #[test]
    fn refuses_invalid_paths_with_reason() {
        let cases = [
            ("", "empty"),
            ("a", "start with"),
            ("/a/", "end with"),
            ("//a", "empty component"),
            ("/a//b", "empty component"),
            ("/a/./b", "relative"),
            ("/a/../b", "relative"),
            ("/.", "relative"),
            ("/a\0b", "NUL"),
            ("/a\u{1}", "control"),
        ];
        for (p, why) in cases {
            let err = validate(p).expect_err(p);
            assert!(err.reason.contains(why), "{p:?}: {}", err.reason);
            assert!(err.to_string().contains(&format!("{p:?}")));
        }
        assert!(validate(&format!("/{}", "x".repeat(MAX_PATH_BYTES))).is_err());
    }

    #[test]
    fn parent_and_name() {
        assert_eq!(parent("/a"), "/");
        assert_eq!(parent("/a/b/c"), "/a/b");
        assert_eq!(name("/a/b/c"), "c");
        assert_eq!(name("/a"), "a");
    }
}
