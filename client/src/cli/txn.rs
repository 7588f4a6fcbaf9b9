//! Parses kordctl's txn op syntax, one op per line:
//! `create PATH [DATA]`, `create-seq PATH [DATA]`, `set PATH DATA [VERSION]`,
//! `delete PATH [VERSION]`, `check PATH [VERSION]`.
//!
//! Words are separated by whitespace; a word may be single- or double-quoted to hold spaces
//! (inside double quotes, `\"` and `\\` escape). Blank lines and lines starting with `#` are
//! skipped.

use crate::Op;

/// Parses numbered lines; errors name the line (`what` is "line" or "op") so the user can find it.
pub fn parse_ops<'a>(
    lines: impl IntoIterator<Item = &'a str>,
    what: &str,
) -> Result<Vec<Op>, String> {
    let mut ops = Vec::new();
    for (i, line) in lines.into_iter().enumerate() {
        match parse_op(line) {
            Ok(Some(op)) => ops.push(op),
            Ok(None) => {}
            Err(e) => return Err(format!("{what} {}: {e}", i + 1)),
        }
    }
    Ok(ops)
}

/// Parses one line; `Ok(None)` for blank and comment lines.
pub fn parse_op(line: &str) -> Result<Option<Op>, String> {
    let trimmed = line.trim();
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return Ok(None);
    }
    let words = split_words(trimmed)?;
    let (verb, args) = match words.split_first() {
        Some((verb, args)) => (verb.as_str(), args),
        None => return Ok(None),
    };
    let op = match (verb, args) {
        ("create", [path]) => Op::create(path, ""),
        ("create", [path, data]) => Op::create(path, data.as_bytes()),
        ("create-seq", [path]) => Op::create_sequential(path, ""),
        ("create-seq", [path, data]) => Op::create_sequential(path, data.as_bytes()),
        ("set", [path, data]) => Op::set(path, data.as_bytes(), None),
        ("set", [path, data, version]) => {
            Op::set(path, data.as_bytes(), Some(version_of(version)?))
        }
        ("delete", [path]) => Op::delete(path, None),
        ("delete", [path, version]) => Op::delete(path, Some(version_of(version)?)),
        ("check", [path]) => Op::check(path, None),
        ("check", [path, version]) => Op::check(path, Some(version_of(version)?)),
        ("create" | "create-seq", _) => return Err(format!("usage: {verb} PATH [DATA]")),
        ("set", _) => return Err("usage: set PATH DATA [VERSION]".to_owned()),
        ("delete" | "check", _) => return Err(format!("usage: {verb} PATH [VERSION]")),
        _ => {
            return Err(format!(
                "unknown op {verb:?} (expected create, create-seq, set, delete or check)"
            ))
        }
    };
    Ok(Some(op))
}

fn version_of(word: &str) -> Result<i32, String> {
    word.parse()
        .map_err(|_| format!("version {word:?} is not a 32-bit integer"))
}

/// Splits on whitespace, honouring quotes, so data with spaces can be written.
fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let Some(&first) = chars.peek() else {
            return Ok(words);
        };
        let mut word = String::new();
        if first == '"' || first == '\'' {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    c if c == first => {
                        closed = true;
                        break;
                    }
                    '\\' if first == '"' => match chars.next() {
                        Some(escaped @ ('"' | '\\')) => word.push(escaped),
                        Some(other) => {
                            word.push('\\');
                            word.push(other);
                        }
                        None => word.push('\\'),
                    },
                    c => word.push(c),
                }
            }
            if !closed {
                return Err(format!("unterminated {first} quote"));
            }
            if chars.peek().is_some_and(|c| !c.is_whitespace()) {
                return Err(format!("text right after closing {first} quote"));
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                word.push(c);
            }
        }
        words.push(word);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_op() {
        let ops = parse_ops(
            [
                "create /a hello",
                "create /b",
                "  # a comment",
                "",
                "create-seq /q/n- x",
                "set /a world 3",
                "set /a world",
                "delete /b 0",
                "delete /b",
                "check /a 4",
                "check /a",
            ],
            "line",
        )
        .unwrap();
        assert_eq!(
            ops,
            vec![
                Op::create("/a", "hello"),
                Op::create("/b", ""),
                Op::create_sequential("/q/n-", "x"),
                Op::set("/a", "world", Some(3)),
                Op::set("/a", "world", None),
                Op::delete("/b", Some(0)),
                Op::delete("/b", None),
                Op::check("/a", Some(4)),
                Op::check("/a", None),
            ]
        );
    }

    #[test]
    fn quotes_hold_spaces_and_escapes() {
        assert_eq!(
            parse_op(r#"set /a "hello world" 2"#).unwrap(),
            Some(Op::set("/a", "hello world", Some(2)))
        );
        assert_eq!(
            parse_op(r#"create /a 'it "is"'"#).unwrap(),
            Some(Op::create("/a", r#"it "is""#))
        );
        assert_eq!(
            parse_op(r#"create /a "say \"hi\" \\ \n""#).unwrap(),
            Some(Op::create("/a", r#"say "hi" \ \n"#))
        );
        assert_eq!(
            parse_op(r#"create /a """#).unwrap(),
            Some(Op::create("/a", ""))
        );
    }

    #[test]
    fn rejects_bad_lines() {
        assert!(parse_op("frob /a").unwrap_err().contains("unknown op"));
        assert!(parse_op("set /a").unwrap_err().contains("usage: set"));
        assert!(parse_op("delete /a x")
            .unwrap_err()
            .contains("not a 32-bit integer"));
        assert!(parse_op("create /a b c")
            .unwrap_err()
            .contains("usage: create"));
        assert!(parse_op("create /a \"open")
            .unwrap_err()
            .contains("unterminated"));
        assert!(parse_op("create /a \"x\"y").is_err());
        let err = parse_ops(["create /a", "bogus"], "line").unwrap_err();
        assert!(err.starts_with("line 2: "), "{err}");
    }
}
