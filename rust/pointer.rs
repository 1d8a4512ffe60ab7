//! RFC 6901 JSON Pointers, and resolving them in a document (RFC 6902's rules for array
//! indices):
//! - "" is the root, otherwise "/"-separated tokens with `~0` -> `~`, `~1` -> `/`; any other
//!   `~` escape, or a non-empty pointer without a leading "/", is an error;
//! - array indices: "0" or digits without a leading zero; "-" only as the last token of an
//!   `add` (or `move`/`copy` target) path; out of range is an error (add allows == len).

pub const NOT_FOUND: &str = "path not found";
pub const OUT_OF_RANGE: &str = "array index out of range";

use serde_json::Value;

/// A parsed RFC 6901 JSON Pointer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointer {
    pub raw: String,
    pub tokens: Vec<String>,
}

impl Pointer {
    pub fn parse(raw: &str) -> std::result::Result<Pointer, String> {
        if raw.is_empty() {
            return Ok(Pointer {
                raw: String::new(),
                tokens: Vec::new(),
            });
        }
        let Some(rest) = raw.strip_prefix('/') else {
            return Err("invalid JSON Pointer (must be empty or start with '/')".into());
        };
        let mut tokens = Vec::new();
        for part in rest.split('/') {
            if !part.contains('~') {
                tokens.push(part.to_owned());
                continue;
            }
            let mut tok = String::with_capacity(part.len());
            let mut chars = part.chars();
            while let Some(c) = chars.next() {
                if c == '~' {
                    match chars.next() {
                        Some('0') => tok.push('~'),
                        Some('1') => tok.push('/'),
                        _ => {
                            return Err(
                                "invalid JSON Pointer ('~' must be followed by '0' or '1')".into()
                            )
                        }
                    }
                } else {
                    tok.push(c);
                }
            }
            tokens.push(tok);
        }
        Ok(Pointer {
            raw: raw.to_owned(),
            tokens,
        })
    }

    /// Like `parse`, keeping `raw` without copying it.
    /// On error, the input comes back with the message.
    pub fn parse_owned(raw: String) -> std::result::Result<Pointer, (String, String)> {
        // Byte scans: `str::contains(char)` / `split(char)` go through the generic char
        // searcher, which showed in the profile of `merge` (every op has a pointer).
        if raw.as_bytes().contains(&b'~') {
            return Pointer::parse(&raw).map_err(|e| (raw, e));
        }
        if raw.is_empty() {
            return Ok(Pointer::root());
        }
        let Some(rest) = raw.strip_prefix('/') else {
            let e = "invalid JSON Pointer (must be empty or start with '/')".to_owned();
            return Err((raw, e));
        };
        let mut tokens = Vec::with_capacity(4);
        let mut start = 0;
        for (i, &c) in rest.as_bytes().iter().enumerate() {
            if c == b'/' {
                // '/' is ASCII, so `start..i` are char boundaries.
                tokens.push(rest[start..i].to_owned());
                start = i + 1;
            }
        }
        tokens.push(rest[start..].to_owned());
        Ok(Pointer { raw, tokens })
    }

    pub fn from_tokens(tokens: Vec<String>) -> Pointer {
        let mut raw = String::new();
        for t in &tokens {
            raw.push('/');
            push_escaped(&mut raw, t);
        }
        Pointer { raw, tokens }
    }

    /// This pointer extended by one token.
    pub fn child(&self, token: &str) -> Pointer {
        let mut raw = String::with_capacity(self.raw.len() + token.len() + 1);
        raw.push_str(&self.raw);
        raw.push('/');
        push_escaped(&mut raw, token);
        let mut tokens = Vec::with_capacity(self.tokens.len() + 1);
        tokens.extend(self.tokens.iter().cloned());
        tokens.push(token.to_owned());
        Pointer { raw, tokens }
    }

    pub fn root() -> Pointer {
        Pointer {
            raw: String::new(),
            tokens: Vec::new(),
        }
    }

    pub fn is_root(&self) -> bool {
        self.tokens.is_empty()
    }
}

fn push_escaped(out: &mut String, token: &str) {
    for c in token.chars() {
        match c {
            '~' => out.push_str("~0"),
            '/' => out.push_str("~1"),
            c => out.push(c),
        }
    }
}

/// Parse an array index token. `allow_end`: "-" and `len` itself are allowed (add target).
pub fn array_index(tok: &str, len: usize, allow_end: bool) -> std::result::Result<usize, String> {
    if tok == "-" {
        return if allow_end {
            Ok(len)
        } else {
            Err("'-' (the end of an array) is only allowed as the target of an add".into())
        };
    }
    let b = tok.as_bytes();
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) || (b.len() > 1 && b[0] == b'0') {
        return Err(format!("invalid array index {tok:?}"));
    }
    let idx: usize = tok.parse().map_err(|_| OUT_OF_RANGE.to_string())?;
    if idx > len || (idx == len && !allow_end) {
        return Err(OUT_OF_RANGE.into());
    }
    Ok(idx)
}

pub fn get<'a>(doc: &'a Value, tokens: &[String]) -> std::result::Result<&'a Value, String> {
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(m) => m.get(t.as_str()).ok_or(NOT_FOUND)?,
            Value::Array(a) => &a[array_index(t, a.len(), false)?],
            _ => return Err(NOT_FOUND.into()),
        };
    }
    Ok(cur)
}

pub fn get_mut<'a>(
    doc: &'a mut Value,
    tokens: &[String],
) -> std::result::Result<&'a mut Value, String> {
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(m) => m.get_mut(t.as_str()).ok_or(NOT_FOUND)?,
            Value::Array(a) => {
                let i = array_index(t, a.len(), false)?;
                &mut a[i]
            }
            _ => return Err(NOT_FOUND.into()),
        };
    }
    Ok(cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers() {
        assert_eq!(Pointer::parse("").unwrap().tokens, Vec::<String>::new());
        assert_eq!(Pointer::parse("/").unwrap().tokens, vec![""]);
        assert_eq!(
            Pointer::parse("/a~1b/c~0d/~01").unwrap().tokens,
            vec!["a/b", "c~d", "~1"]
        );
        assert!(Pointer::parse("a/b").is_err());
        assert!(Pointer::parse("/~2").is_err());
        assert!(Pointer::parse("/a~").is_err());
        let p = Pointer::from_tokens(vec!["a/b".into(), "~".into()]);
        assert_eq!(p.raw, "/a~1b/~0");
        assert_eq!(Pointer::parse(&p.raw).unwrap(), p);
        assert_eq!(Pointer::root().child("x/y").raw, "/x~1y");
    }
}
