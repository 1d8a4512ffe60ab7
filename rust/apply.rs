//! Deltas: parsing (`{"patch": [...]}` / `{"merge": ...}`), RFC 6901 JSON Pointers, RFC 6902
//! JSON Patch application (atomic, in place, with an undo log) and RFC 7396 merge patches.
//!
//! Why not `json_patch::patch`: the crate is used as a test oracle (see the tests), but its
//! apply is not the one we ship, because with serde_json's `preserve_order` (which we need so
//! that objects keep their key order like Python dicts, and both engines produce the same
//! bytes) it removes keys with `swap_remove` (moving the last key into the hole) and its undo
//! on failure re-appends removed keys at the end, so a failed patch is not byte-for-byte a
//! no-op. It also compares `test` values with serde's `==` (`1` != `1.0`, against RFC 6902
//! section 4.6 which compares numbers by value), has no hook for our nesting limit, and
//! reports every failure as "path is invalid". The algorithm below is RFC 6902 as written:
//! - pointers: "" is the root, otherwise "/"-separated tokens with `~0` -> `~`, `~1` -> `/`;
//!   any other `~` escape, or a non-empty pointer without a leading "/", is an error;
//! - array indices: "0" or digits without a leading zero; "-" only as the last token of an
//!   `add` (or `move`/`copy` target) path; out of range is an error (add allows == len);
//! - add: object member insert-or-replace (a replaced member keeps its position), array
//!   insert, root replaces the whole document;
//! - remove: target must exist; removing the root is an error;
//! - replace: target must exist (root allowed);
//! - move: `from` must exist, `path` must not be a proper descendant of `from`; from == path
//!   is a no-op; otherwise remove then add;
//! - copy: `from` must exist; add of a copy;
//! - test: numeric equality for numbers (`1` == `1.0`), see [`crate::json::rfc_eq`];
//! - the document never nests deeper than MAX_DEPTH: an add/replace/move/copy that would
//!   make it deeper fails;
//! - atomic: a failing patch leaves the document exactly as it was (key order included).

use crate::error::{DeltaError, Result};
use crate::json::{self, MAX_DEPTH};
use serde_json::{Map, Value};

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

/// One RFC 6902 operation.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Add { path: Pointer, value: Value },
    Remove { path: Pointer },
    Replace { path: Pointer, value: Value },
    Move { from: Pointer, path: Pointer },
    Copy { from: Pointer, path: Pointer },
    Test { path: Pointer, value: Value },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Add { .. } => "add",
            Op::Remove { .. } => "remove",
            Op::Replace { .. } => "replace",
            Op::Move { .. } => "move",
            Op::Copy { .. } => "copy",
            Op::Test { .. } => "test",
        }
    }

    pub fn path(&self) -> &Pointer {
        match self {
            Op::Add { path, .. }
            | Op::Remove { path }
            | Op::Replace { path, .. }
            | Op::Move { path, .. }
            | Op::Copy { path, .. }
            | Op::Test { path, .. } => path,
        }
    }

    /// The canonical JSON form: `{"op","path","value"}`, `{"op","from","path"}` or
    /// `{"op","path"}`, members in that order.
    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("op".into(), Value::String(self.name().into()));
        match self {
            Op::Add { path, value } | Op::Replace { path, value } | Op::Test { path, value } => {
                m.insert("path".into(), Value::String(path.raw.clone()));
                m.insert("value".into(), value.clone());
            }
            Op::Remove { path } => {
                m.insert("path".into(), Value::String(path.raw.clone()));
            }
            Op::Move { from, path } | Op::Copy { from, path } => {
                m.insert("from".into(), Value::String(from.raw.clone()));
                m.insert("path".into(), Value::String(path.raw.clone()));
            }
        }
        Value::Object(m)
    }

    /// Write the canonical JSON form into `out` (same bytes as `to_value` serialised).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        self.write_json_named(out, self.name());
    }

    /// `write_json` with another op name (a `replace` written as an `add`).
    fn write_json_named(&self, out: &mut Vec<u8>, name: &str) {
        out.extend_from_slice(b"{\"op\":\"");
        out.extend_from_slice(name.as_bytes());
        out.push(b'"');
        let write_str = json::write_str;
        match self {
            Op::Add { path, value } | Op::Replace { path, value } | Op::Test { path, value } => {
                out.extend_from_slice(b",\"path\":");
                write_str(out, &path.raw);
                out.extend_from_slice(b",\"value\":");
                json::write_to(out, value);
            }
            Op::Remove { path } => {
                out.extend_from_slice(b",\"path\":");
                write_str(out, &path.raw);
            }
            Op::Move { from, path } | Op::Copy { from, path } => {
                out.extend_from_slice(b",\"from\":");
                write_str(out, &from.raw);
                out.extend_from_slice(b",\"path\":");
                write_str(out, &path.raw);
            }
        }
        out.push(b'}');
    }
}

/// Serialise `{"patch":[...]}` with canonical ops.
pub fn patch_delta_json(ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 48 * ops.len());
    out.extend_from_slice(b"{\"patch\":[");
    for (i, op) in ops.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        op.write_json(&mut out);
    }
    out.extend_from_slice(b"]}");
    out
}

/// Serialise `{"patch":[...]}` from the ops that `how` keeps (see [`crate::merge::collapse`]).
pub fn patch_delta_json_with(ops: &[Op], how: impl Fn(usize) -> crate::merge::Write) -> Vec<u8> {
    use crate::merge::Write;
    let mut out = Vec::with_capacity(16 + 48 * ops.len());
    out.extend_from_slice(b"{\"patch\":[");
    let mut first = true;
    for (i, op) in ops.iter().enumerate() {
        let name = match how(i) {
            Write::Drop => continue,
            Write::Keep => op.name(),
            Write::AsAdd => "add",
        };
        if !first {
            out.push(b',');
        }
        first = false;
        op.write_json_named(&mut out, name);
    }
    out.extend_from_slice(b"]}");
    out
}

/// Serialise `{"merge":...}`.
pub fn merge_delta_json(body: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(b"{\"merge\":");
    json::write_to(&mut out, body);
    out.push(b'}');
    out
}

/// A parsed delta.
#[derive(Debug, Clone, PartialEq)]
pub enum Delta {
    Patch(Vec<Op>),
    Merge(Value),
}

impl Delta {
    pub fn kind(&self) -> &'static str {
        match self {
            Delta::Patch(_) => "patch",
            Delta::Merge(_) => "merge",
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        match self {
            Delta::Patch(ops) => patch_delta_json(ops),
            Delta::Merge(v) => merge_delta_json(v),
        }
    }
}

/// Take the body out of a delta document: ("patch" | "merge", body).
fn split_delta(doc: Value) -> Result<(&'static str, Value)> {
    let Value::Object(mut m) = doc else {
        return Err(not_a_delta());
    };
    match (m.shift_remove("patch"), m.shift_remove("merge")) {
        (Some(p), None) => Ok(("patch", p)),
        (None, Some(b)) => Ok(("merge", b)),
        (Some(_), Some(_)) => Err(both_kinds()),
        (None, None) => Err(no_kind()),
    }
}

/// Parse a delta from JSON bytes.
pub fn parse_delta(input: &[u8]) -> Result<Delta> {
    // serde_json's own recursion limit (it refuses 128 nested containers; skipped parts are
    // read without recursion) keeps the common case to one pass; only a delta that hits it
    // gets the exact MAX_DEPTH check and, when it is within, a parse without that limit.
    let raw = match de::read(input, false) {
        Err(e) if e.to_string().starts_with("recursion limit exceeded") => {
            json::check_nesting(input)?;
            de::read(input, true)
        }
        r => r,
    };
    let raw = raw.map_err(|e| DeltaError::new(format!("invalid JSON: {e}")))?;
    match raw {
        None => Err(not_a_delta()),
        Some((Some(_), Some(_))) => Err(both_kinds()),
        Some((None, None)) => Err(no_kind()),
        Some((None, Some(body))) => Ok(Delta::Merge(body)),
        Some((Some(de::PatchBody(None)), None)) => Err(not_an_array()),
        Some((Some(de::PatchBody(Some(ops))), None)) => Ok(Delta::Patch(ops?)),
    }
}

fn not_a_delta() -> DeltaError {
    DeltaError::new("a delta must be a JSON object with \"patch\" or \"merge\"")
}

fn both_kinds() -> DeltaError {
    DeltaError::new("a delta must have exactly one of \"patch\" and \"merge\", not both")
}

fn no_kind() -> DeltaError {
    DeltaError::new("a delta must have a \"patch\" (RFC 6902) or \"merge\" (RFC 7396) member")
}

fn not_an_array() -> DeltaError {
    DeltaError::new("\"patch\" must be a JSON array of operations")
}

pub fn delta_from_value(doc: Value) -> Result<Delta> {
    match split_delta(doc)? {
        ("patch", body) => Ok(Delta::Patch(parse_ops(body)?)),
        (_, body) => Ok(Delta::Merge(body)),
    }
}

/// `validate`: (kind, compact JSON of the body).
pub fn validate(input: &[u8]) -> Result<(&'static str, Vec<u8>)> {
    let (kind, body) = split_delta(json::parse(input)?)?;
    let bytes = json::to_vec(&body);
    if kind == "patch" {
        parse_ops(body)?;
    }
    Ok((kind, bytes))
}

/// Parse an RFC 6902 patch document (a JSON array of operation objects).
pub fn parse_ops(body: Value) -> Result<Vec<Op>> {
    let Value::Array(items) = body else {
        return Err(not_an_array());
    };
    let mut ops = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        ops.push(parse_op(i, item)?);
    }
    Ok(ops)
}

fn parse_op(i: usize, item: Value) -> Result<Op> {
    let Value::Object(mut m) = item else {
        return op_from_raw(i, RawOp::NotObject);
    };
    let field = |v: Option<Value>| match v {
        None => Field::Missing,
        Some(Value::String(s)) => Field::Str(s),
        Some(_) => Field::Other,
    };
    op_from_raw(
        i,
        RawOp::Object {
            op: match m.shift_remove("op") {
                None => OpName::Missing,
                Some(Value::String(s)) => OpName::of(&s),
                Some(_) => OpName::Other,
            },
            path: field(m.shift_remove("path")),
            from: field(m.shift_remove("from")),
            value: m.shift_remove("value"),
        },
    )
}

/// The six RFC 6902 operation names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Add,
    Remove,
    Replace,
    Move,
    Copy,
    Test,
}

impl OpKind {
    fn from_name(s: &str) -> Option<OpKind> {
        Some(match s {
            "add" => OpKind::Add,
            "remove" => OpKind::Remove,
            "replace" => OpKind::Replace,
            "move" => OpKind::Move,
            "copy" => OpKind::Copy,
            "test" => OpKind::Test,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            OpKind::Add => "add",
            OpKind::Remove => "remove",
            OpKind::Replace => "replace",
            OpKind::Move => "move",
            OpKind::Copy => "copy",
            OpKind::Test => "test",
        }
    }
}

/// The "op" member as read. A known name is kept as its kind, so the common case allocates
/// nothing; an unknown one is kept for its error message.
#[derive(Debug, Default)]
enum OpName {
    #[default]
    Missing,
    Known(OpKind),
    Unknown(String),
    Other,
}

impl OpName {
    fn of(s: &str) -> OpName {
        OpKind::from_name(s).map_or_else(|| OpName::Unknown(s.to_owned()), OpName::Known)
    }
}

/// A member of an operation object as read: absent, a string, or something else.
#[derive(Debug, Default)]
enum Field {
    #[default]
    Missing,
    Str(String),
    Other,
}

/// An operation as read, before validation.
#[derive(Debug)]
enum RawOp {
    NotObject,
    Object {
        op: OpName,
        path: Field,
        from: Field,
        value: Option<Value>,
    },
}

/// Validate one operation (the single source of the parse-time error messages).
fn op_from_raw(i: usize, raw: RawOp) -> Result<Op> {
    let RawOp::Object {
        op,
        path,
        from,
        value,
    } = raw
    else {
        return Err(DeltaError::new(format!("op {i}: not a JSON object")));
    };
    let kind = match op {
        OpName::Known(k) => k,
        OpName::Unknown(name) => {
            return Err(DeltaError::new(format!("op {i}: unknown op {name:?}")))
        }
        OpName::Other => return Err(DeltaError::new(format!("op {i}: \"op\" must be a string"))),
        OpName::Missing => return Err(DeltaError::new(format!("op {i}: missing \"op\""))),
    };
    let name = kind.name();
    let path_raw = match path {
        Field::Str(s) => s,
        Field::Other => {
            return Err(DeltaError::new(format!(
                "op {i} ({name}): \"path\" must be a string"
            )))
        }
        Field::Missing => {
            return Err(DeltaError::new(format!(
                "op {i} ({name}): missing \"path\""
            )))
        }
    };
    let path = Pointer::parse_owned(path_raw)
        .map_err(|(raw, e)| DeltaError::new(format!("op {i} ({name} {raw}): {e}")))?;
    let ctx = |msg: &str| DeltaError::new(format!("op {i} ({name} {}): {msg}", path.raw));
    let from = || -> Result<Pointer> {
        match from {
            Field::Str(s) => {
                Pointer::parse_owned(s).map_err(|(s, e)| ctx(&format!("\"from\" {s}: {e}")))
            }
            Field::Other => Err(ctx("\"from\" must be a string")),
            Field::Missing => Err(ctx("missing \"from\"")),
        }
    };
    let value = || value.ok_or_else(|| ctx("missing \"value\""));
    Ok(match kind {
        OpKind::Add => Op::Add {
            value: value()?,
            path,
        },
        OpKind::Remove => Op::Remove { path },
        OpKind::Replace => Op::Replace {
            value: value()?,
            path,
        },
        OpKind::Move => Op::Move {
            from: from()?,
            path,
        },
        OpKind::Copy => Op::Copy {
            from: from()?,
            path,
        },
        OpKind::Test => Op::Test {
            value: value()?,
            path,
        },
    })
}

// ---------------------------------------------------------------------------------------
// Fast delta parsing: straight from the bytes into operations, without building a JSON
// object per operation first. Same results and errors as parse -> delta_from_value: JSON
// syntax errors first, then the checks of `split_delta` and `op_from_raw`; duplicate members
// keep the last one (as a parsed object would).

mod de {
    use super::{op_from_raw, DeltaError, Field, Op, OpName, RawOp};
    use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    use serde_json::Value;
    use std::fmt;

    /// Visitor methods for the scalars, all mapped to one "not what we look for" value.
    macro_rules! scalars_are {
        ($t:ty, $v:expr) => {
            fn visit_bool<E>(self, _: bool) -> Result<$t, E> {
                Ok($v)
            }
            fn visit_i64<E>(self, _: i64) -> Result<$t, E> {
                Ok($v)
            }
            fn visit_u64<E>(self, _: u64) -> Result<$t, E> {
                Ok($v)
            }
            fn visit_f64<E>(self, _: f64) -> Result<$t, E> {
                Ok($v)
            }
            fn visit_unit<E>(self) -> Result<$t, E> {
                Ok($v)
            }
        };
    }

    fn drain_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(())
    }
    fn drain_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        Ok(())
    }

    /// A value read and dropped. Unlike serde's `IgnoredAny` (which serde_json skips without
    /// counting nesting), it goes through `deserialize_any`, so serde_json's recursion limit
    /// sees skipped parts too and the nesting rule covers the whole delta document.
    struct Skip;
    struct SkipV;
    impl<'de> Visitor<'de> for SkipV {
        type Value = Skip;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any JSON value")
        }
        scalars_are!(Skip, Skip);
        fn visit_str<E>(self, _: &str) -> Result<Skip, E> {
            Ok(Skip)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Skip, A::Error> {
            drain_seq(seq).map(|_| Skip)
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Skip, A::Error> {
            drain_map(map).map(|_| Skip)
        }
    }
    impl<'de> de::Deserialize<'de> for Skip {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Skip, D::Error> {
            d.deserialize_any(SkipV)
        }
    }

    /// Any JSON value, keeping only "is it a string, and which".
    struct FieldV;
    impl<'de> Visitor<'de> for FieldV {
        type Value = Field;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any JSON value")
        }
        scalars_are!(Field, Field::Other);
        fn visit_str<E>(self, v: &str) -> Result<Field, E> {
            Ok(Field::Str(v.to_owned()))
        }
        fn visit_string<E>(self, v: String) -> Result<Field, E> {
            Ok(Field::Str(v))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Field, A::Error> {
            drain_seq(seq).map(|_| Field::Other)
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Field, A::Error> {
            drain_map(map).map(|_| Field::Other)
        }
    }
    impl<'de> de::Deserialize<'de> for Field {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Field, D::Error> {
            d.deserialize_any(FieldV)
        }
    }

    /// The "op" member: a known name without allocating.
    struct OpNameV;
    impl<'de> Visitor<'de> for OpNameV {
        type Value = OpName;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any JSON value")
        }
        scalars_are!(OpName, OpName::Other);
        fn visit_str<E>(self, v: &str) -> Result<OpName, E> {
            Ok(OpName::of(v))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<OpName, A::Error> {
            drain_seq(seq).map(|_| OpName::Other)
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<OpName, A::Error> {
            drain_map(map).map(|_| OpName::Other)
        }
    }
    impl<'de> de::Deserialize<'de> for OpName {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<OpName, D::Error> {
            d.deserialize_any(OpNameV)
        }
    }

    enum Key {
        Op,
        Path,
        From,
        Value,
        Patch,
        Merge,
        Other,
    }
    struct KeyV;
    impl Visitor<'_> for KeyV {
        type Value = Key;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a member name")
        }
        fn visit_str<E>(self, v: &str) -> Result<Key, E> {
            Ok(match v {
                "op" => Key::Op,
                "path" => Key::Path,
                "from" => Key::From,
                "value" => Key::Value,
                "patch" => Key::Patch,
                "merge" => Key::Merge,
                _ => Key::Other,
            })
        }
    }
    impl<'de> de::Deserialize<'de> for Key {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
            d.deserialize_str(KeyV)
        }
    }

    struct RawOpV;
    impl<'de> Visitor<'de> for RawOpV {
        type Value = RawOp;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an operation")
        }
        scalars_are!(RawOp, RawOp::NotObject);
        fn visit_str<E>(self, _: &str) -> Result<RawOp, E> {
            Ok(RawOp::NotObject)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<RawOp, A::Error> {
            drain_seq(seq).map(|_| RawOp::NotObject)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawOp, A::Error> {
            let (mut op, mut path, mut from, mut value) =
                (OpName::Missing, Field::Missing, Field::Missing, None);
            while let Some(k) = map.next_key::<Key>()? {
                match k {
                    Key::Op => op = map.next_value()?,
                    Key::Path => path = map.next_value()?,
                    Key::From => from = map.next_value()?,
                    Key::Value => value = Some(map.next_value::<Value>()?),
                    _ => {
                        map.next_value::<Skip>()?;
                    }
                }
            }
            Ok(RawOp::Object {
                op,
                path,
                from,
                value,
            })
        }
    }
    impl<'de> de::Deserialize<'de> for RawOp {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RawOp, D::Error> {
            d.deserialize_any(RawOpV)
        }
    }

    /// The "patch" member: Some(ops) for an array, None for anything else. Each operation
    /// is validated as soon as it is read (no intermediate list of raw operations); the
    /// first invalid one is kept and the rest are only read, so that a JSON syntax error
    /// anywhere still takes precedence, as documented above.
    pub struct PatchBody(pub Option<Result<Vec<Op>, DeltaError>>);
    struct PatchBodyV;
    impl<'de> Visitor<'de> for PatchBodyV {
        type Value = PatchBody;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a patch")
        }
        scalars_are!(PatchBody, PatchBody(None));
        fn visit_str<E>(self, _: &str) -> Result<PatchBody, E> {
            Ok(PatchBody(None))
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<PatchBody, A::Error> {
            drain_map(map).map(|_| PatchBody(None))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PatchBody, A::Error> {
            let mut ops = Ok(Vec::with_capacity(seq.size_hint().unwrap_or(2)));
            let mut i = 0;
            while let Some(raw) = seq.next_element::<RawOp>()? {
                if let Ok(list) = &mut ops {
                    match op_from_raw(i, raw) {
                        Ok(op) => list.push(op),
                        Err(e) => ops = Err(e),
                    }
                }
                i += 1;
            }
            Ok(PatchBody(Some(ops)))
        }
    }
    impl<'de> de::Deserialize<'de> for PatchBody {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PatchBody, D::Error> {
            d.deserialize_any(PatchBodyV)
        }
    }

    /// A delta document as read: None when it is not an object, else its last "patch" and
    /// last "merge" members.
    pub type RawDelta = Option<(Option<PatchBody>, Option<Value>)>;
    struct RawDeltaV;
    impl<'de> Visitor<'de> for RawDeltaV {
        type Value = RawDelta;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a delta")
        }
        scalars_are!(RawDelta, None);
        fn visit_str<E>(self, _: &str) -> Result<RawDelta, E> {
            Ok(None)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<RawDelta, A::Error> {
            drain_seq(seq).map(|_| None)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawDelta, A::Error> {
            let (mut patch, mut merge) = (None, None);
            while let Some(k) = map.next_key::<Key>()? {
                match k {
                    Key::Patch => patch = Some(map.next_value::<PatchBody>()?),
                    Key::Merge => merge = Some(map.next_value::<Value>()?),
                    _ => {
                        map.next_value::<Skip>()?;
                    }
                }
            }
            Ok(Some((patch, merge)))
        }
    }
    impl<'de> DeserializeSeed<'de> for RawDeltaV {
        type Value = RawDelta;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<RawDelta, D::Error> {
            d.deserialize_any(RawDeltaV)
        }
    }

    /// `unbounded`: lift serde_json's recursion limit (127 nested containers; only after the
    /// caller checked the nesting itself).
    pub fn read(input: &[u8], unbounded: bool) -> Result<RawDelta, serde_json::Error> {
        // Valid UTF-8 (nearly always) is read as a str, which spares serde_json a UTF-8
        // check of every string; other input takes the byte path, for its exact error.
        match std::str::from_utf8(input) {
            Ok(s) => read_from(serde_json::Deserializer::from_str(s), unbounded),
            Err(_) => read_from(serde_json::Deserializer::from_slice(input), unbounded),
        }
    }

    fn read_from<'de, R: serde_json::de::Read<'de>>(
        mut de: serde_json::Deserializer<R>,
        unbounded: bool,
    ) -> Result<RawDelta, serde_json::Error> {
        if unbounded {
            de.disable_recursion_limit();
        }
        let v = RawDeltaV.deserialize(&mut de)?;
        de.end()?;
        Ok(v)
    }
}

// ---------------------------------------------------------------------------------------
// Application

/// One step of the undo log: enough to put the document back exactly as it was. Pointers
/// borrow from the operations being applied (no copies on the hot path).
#[derive(Debug)]
pub enum Undo<'a> {
    /// Put `old` back at `tokens` (replace, add over an existing member, add at the root).
    Restore { tokens: &'a [String], old: Value },
    /// Remove the member `key` that an add appended to the object at `parent`.
    ObjRemove { parent: &'a [String], key: &'a str },
    /// Re-insert a removed member at its old position.
    ObjInsert {
        parent: &'a [String],
        index: usize,
        key: &'a str,
        value: Value,
    },
    /// Remove the element an add inserted.
    ArrRemove { parent: &'a [String], index: usize },
    /// Re-insert a removed element.
    ArrInsert {
        parent: &'a [String],
        index: usize,
        value: Value,
    },
}

const NOT_FOUND: &str = "path not found";
const OUT_OF_RANGE: &str = "array index out of range";

/// Parse an array index token. `allow_end`: "-" and `len` itself are allowed (add target).
fn array_index(tok: &str, len: usize, allow_end: bool) -> std::result::Result<usize, String> {
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

/// The undo log (when kept), and whether each step must be bounded
/// ([`apply_patch_bounded`]).
struct Recorder<'l, 'a>(Option<&'l mut Vec<Undo<'a>>>, bool);

/// Why an op did not apply: it fails (an error of the patch), or, in a bounded
/// application, it would do work that grows with the state (it changed nothing).
enum Fail {
    Op(String),
    Unbounded,
}

impl From<String> for Fail {
    fn from(e: String) -> Self {
        Fail::Op(e)
    }
}

impl From<&str> for Fail {
    fn from(e: &str) -> Self {
        Fail::Op(e.to_owned())
    }
}

/// Err(Unbounded) when the application is bounded and `ok()` is false.
fn bound(rec: &Recorder<'_, '_>, ok: impl FnOnce() -> bool) -> std::result::Result<(), Fail> {
    if rec.1 && !ok() {
        return Err(Fail::Unbounded);
    }
    Ok(())
}

/// A value of at most this many nodes (a scalar is one, a container one plus its contents;
/// strings of at most [`SMALL_STRING`] bytes) is small: dropping or comparing it is cheap.
pub const SMALL_NODES: usize = 64;
pub const SMALL_STRING: usize = 4096;

pub fn small(v: &Value) -> bool {
    fn walk(v: &Value, budget: &mut usize) -> bool {
        if *budget == 0 {
            return false;
        }
        *budget -= 1;
        match v {
            Value::Array(a) => a.iter().all(|x| walk(x, budget)),
            Value::Object(m) => m.values().all(|x| walk(x, budget)),
            Value::String(s) => s.len() <= SMALL_STRING,
            _ => true,
        }
    }
    let mut budget = SMALL_NODES;
    walk(v, &mut budget)
}

impl<'a> Recorder<'_, 'a> {
    fn on(&self) -> bool {
        self.0.is_some()
    }
    fn push(&mut self, u: Undo<'a>) {
        if let Some(log) = self.0.as_mut() {
            log.push(u);
        }
    }
}

fn check_depth(at: usize, value: &Value) -> std::result::Result<(), String> {
    if at + json::depth(value) > MAX_DEPTH {
        Err(format!(
            "the document would nest deeper than {MAX_DEPTH} levels"
        ))
    } else {
        Ok(())
    }
}

fn add_at<'a>(
    doc: &mut Value,
    tokens: &'a [String],
    value: Value,
    rec: &mut Recorder<'_, 'a>,
) -> std::result::Result<(), Fail> {
    let Some((last, parent_tokens)) = tokens.split_last() else {
        bound(rec, || small(doc))?;
        let old = std::mem::replace(doc, value);
        rec.push(Undo::Restore { tokens, old });
        return Ok(());
    };
    match get_mut(doc, parent_tokens)? {
        Value::Object(m) => {
            if let Some(slot) = m.get_mut(last.as_str()) {
                bound(rec, || small(slot))?;
                let old = std::mem::replace(slot, value);
                rec.push(Undo::Restore { tokens, old });
            } else {
                // Appending to a large map may reallocate (and rehash) it whole.
                bound(rec, || m.len() < SMALL_NODES)?;
                m.insert(last.clone(), value);
                rec.push(Undo::ObjRemove {
                    parent: parent_tokens,
                    key: last,
                });
            }
        }
        Value::Array(a) => {
            let i = array_index(last, a.len(), true)?;
            bound(rec, || a.len() < SMALL_NODES)?;
            a.insert(i, value);
            rec.push(Undo::ArrRemove {
                parent: parent_tokens,
                index: i,
            });
        }
        _ => return Err(NOT_FOUND.into()),
    }
    Ok(())
}

/// Where a removed value was, to put it back.
struct Removed {
    value: Value,
    index: usize,
    from_object: bool,
}

impl Removed {
    fn undo(tokens: &[String], index: usize, from_object: bool, value: Value) -> Undo<'_> {
        let (last, parent): (&str, &[String]) = tokens
            .split_last()
            .map_or(("", &[]), |(l, p)| (l.as_str(), p));
        if from_object {
            Undo::ObjInsert {
                parent,
                index,
                key: last,
                value,
            }
        } else {
            Undo::ArrInsert {
                parent,
                index,
                value,
            }
        }
    }
}

/// Remove the value at `tokens`; `want_index`: also find an object member's position (O(n),
/// needed only to undo).
fn remove_at(
    doc: &mut Value,
    tokens: &[String],
    want_index: bool,
    bounded: bool,
) -> std::result::Result<Removed, Fail> {
    let Some((last, parent_tokens)) = tokens.split_last() else {
        return Err("cannot remove the document root".into());
    };
    match get_mut(doc, parent_tokens)? {
        Value::Object(m) => {
            // Removing shifts the members after it (and drops the value).
            if bounded && (m.len() > SMALL_NODES || !m.get(last.as_str()).is_none_or(small)) {
                return Err(Fail::Unbounded);
            }
            let index = if want_index {
                m.keys().position(|k| k == last).ok_or(NOT_FOUND)?
            } else {
                0
            };
            let value = m.shift_remove(last.as_str()).ok_or(NOT_FOUND)?;
            Ok(Removed {
                value,
                index,
                from_object: true,
            })
        }
        Value::Array(a) => {
            let index = array_index(last, a.len(), false)?;
            if bounded && (a.len() > SMALL_NODES || !small(&a[index])) {
                return Err(Fail::Unbounded);
            }
            Ok(Removed {
                value: a.remove(index),
                index,
                from_object: false,
            })
        }
        _ => Err(NOT_FOUND.into()),
    }
}

fn apply_one<'a>(
    doc: &mut Value,
    op: &'a Op,
    rec: &mut Recorder<'_, 'a>,
) -> std::result::Result<(), Fail> {
    match op {
        Op::Add { path, value } => {
            check_depth(path.tokens.len(), value)?;
            add_at(doc, &path.tokens, value.clone(), rec)
        }
        Op::Remove { path } => {
            let r = remove_at(doc, &path.tokens, rec.on(), rec.1)?;
            if rec.on() {
                rec.push(Removed::undo(&path.tokens, r.index, r.from_object, r.value));
            }
            Ok(())
        }
        Op::Replace { path, value } => {
            check_depth(path.tokens.len(), value)?;
            let slot = get_mut(doc, &path.tokens)?;
            bound(rec, || small(slot))?;
            let old = std::mem::replace(slot, value.clone());
            rec.push(Undo::Restore {
                tokens: &path.tokens,
                old,
            });
            Ok(())
        }
        Op::Move { from, path } => {
            // Moves a value of any size, and may shift array members twice.
            bound(rec, || false)?;
            let src = get(doc, &from.tokens).map_err(|e| format!("\"from\" {}: {e}", from.raw))?;
            if from.tokens == path.tokens {
                return Ok(());
            }
            if path.tokens.starts_with(&from.tokens) {
                return Err("cannot move a value into one of its own children".into());
            }
            if path.tokens.len() > from.tokens.len() {
                check_depth(path.tokens.len(), src)?;
            }
            let r = remove_at(doc, &from.tokens, rec.on(), false).map_err(|e| match e {
                Fail::Op(e) => Fail::Op(format!("\"from\" {}: {e}", from.raw)),
                u => u,
            })?;
            if rec.on() {
                let u = Removed::undo(&from.tokens, r.index, r.from_object, r.value.clone());
                rec.push(u);
            }
            add_at(doc, &path.tokens, r.value, rec)
        }
        Op::Copy { from, path } => {
            bound(rec, || false)?;
            let src = get(doc, &from.tokens).map_err(|e| format!("\"from\" {}: {e}", from.raw))?;
            if path.tokens.len() > from.tokens.len() {
                check_depth(path.tokens.len(), src)?;
            }
            let v = src.clone();
            add_at(doc, &path.tokens, v, rec)
        }
        Op::Test { path, value } => {
            if json::rfc_eq(get(doc, &path.tokens)?, value) {
                Ok(())
            } else {
                // Comparing costs at most the size of `value` (part of the delta).
                Err("test failed (value differs)".into())
            }
        }
    }
}

fn op_error(i: usize, op: &Op, reason: String) -> DeltaError {
    DeltaError::new(format!(
        "op {i} ({} {}): {reason}",
        op.name(),
        op.path().raw
    ))
}

/// Apply `ops` in order; on failure the document is left half-patched (use when it is a
/// throw-away copy), or exactly restored when `undo` is given via [`apply_patch_atomic`].
pub fn apply_ops<'a>(
    doc: &mut Value,
    ops: &'a [Op],
    undo: Option<&mut Vec<Undo<'a>>>,
) -> Result<()> {
    // Not bounded, so never Err(Unbounded).
    run_ops(doc, ops, Recorder(undo, false)).unwrap_or(Ok(()))
}

/// A bounded application stopped: the next op's work would grow with the document.
#[derive(Debug, PartialEq, Eq)]
pub struct Unbounded;

fn run_ops<'a>(
    doc: &mut Value,
    ops: &'a [Op],
    mut rec: Recorder<'_, 'a>,
) -> std::result::Result<Result<()>, Unbounded> {
    for (i, op) in ops.iter().enumerate() {
        match apply_one(doc, op, &mut rec) {
            Ok(()) => {}
            Err(Fail::Op(r)) => return Ok(Err(op_error(i, op, r))),
            Err(Fail::Unbounded) => return Err(Unbounded),
        }
    }
    Ok(Ok(()))
}

/// [`apply_patch_atomic`] if every step is cheap whatever the size of `doc`; otherwise
/// Err(Unbounded), with `doc` exactly as before.
///
/// Each op checks, before it changes anything, what it would drop, shift or move: replace
/// and add drop only [small](small) values; add and remove shift members only of objects
/// and arrays of at most [`SMALL_NODES`] members; remove drops only small values; move and
/// copy (which carry values of any size) stop it. `test` compares at most the size of its
/// own value. So the work, a rollback included, is bounded by a constant times the size of
/// `ops`, and the checks themselves by [`SMALL_NODES`] per op.
pub fn apply_patch_bounded(
    doc: &mut Value,
    ops: &[Op],
) -> std::result::Result<Result<()>, Unbounded> {
    if let [_] = ops {
        // A single op stops or fails before changing anything (move, the exception in
        // `apply_patch_atomic`, is never bounded).
        return run_ops(doc, ops, Recorder(None, true));
    }
    let mut log = Vec::new();
    let r = run_ops(doc, ops, Recorder(Some(&mut log), true));
    if !matches!(r, Ok(Ok(()))) {
        rollback(doc, log);
    }
    r
}

/// Apply `ops` atomically in place: on error the document is exactly as before.
pub fn apply_patch_atomic(doc: &mut Value, ops: &[Op]) -> Result<()> {
    if let [op] = ops {
        // A single operation either fails before changing anything or succeeds; except a
        // move whose add half fails after its remove half, which needs the log.
        if !matches!(op, Op::Move { .. }) {
            return apply_ops(doc, ops, None);
        }
    }
    let mut log = Vec::new();
    let r = apply_ops(doc, ops, Some(&mut log));
    if r.is_err() {
        rollback(doc, log);
    }
    r
}

/// Undo the steps of `log` (most recent first).
pub fn rollback(doc: &mut Value, log: Vec<Undo<'_>>) {
    for u in log.into_iter().rev() {
        match u {
            Undo::Restore { tokens, old } => {
                if let Ok(slot) = get_mut(doc, tokens) {
                    *slot = old;
                }
            }
            Undo::ObjRemove { parent, key } => {
                if let Ok(Value::Object(m)) = get_mut(doc, parent) {
                    m.shift_remove(key);
                }
            }
            Undo::ObjInsert {
                parent,
                index,
                key,
                value,
            } => {
                if let Ok(Value::Object(m)) = get_mut(doc, parent) {
                    let index = index.min(m.len());
                    m.shift_insert(index, key.to_owned(), value);
                }
            }
            Undo::ArrRemove { parent, index } => {
                if let Ok(Value::Array(a)) = get_mut(doc, parent) {
                    if index < a.len() {
                        a.remove(index);
                    }
                }
            }
            Undo::ArrInsert {
                parent,
                index,
                value,
            } => {
                if let Ok(Value::Array(a)) = get_mut(doc, parent) {
                    let index = index.min(a.len());
                    a.insert(index, value);
                }
            }
        }
    }
}

/// RFC 7396 MergePatch(target, patch), in place. Removed members keep the order of the rest;
/// new members are appended in the patch's order. Cannot fail, and cannot make the document
/// deeper than max(depth(doc), depth(patch)).
pub fn merge_apply(doc: &mut Value, patch: &Value) {
    let Value::Object(pm) = patch else {
        *doc = patch.clone();
        return;
    };
    if !doc.is_object() {
        *doc = Value::Object(Map::new());
    }
    if let Value::Object(m) = doc {
        for (k, v) in pm {
            if v.is_null() {
                m.shift_remove(k.as_str());
            } else if v.is_object() {
                merge_apply(m.entry(k.as_str()).or_insert(Value::Null), v);
            } else {
                m.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Apply a delta atomically in place.
pub fn apply_delta(doc: &mut Value, d: &Delta) -> Result<()> {
    match d {
        Delta::Patch(ops) => apply_patch_atomic(doc, ops),
        Delta::Merge(p) => {
            merge_apply(doc, p);
            Ok(())
        }
    }
}

/// `apply(state, d)`: parse both, apply, serialise.
pub fn apply_bytes(state: &[u8], d: &[u8]) -> Result<Vec<u8>> {
    let delta = parse_delta(d)?;
    let mut doc = json::parse(state)?;
    match &delta {
        // A failure discards `doc`, so no undo log is needed.
        Delta::Patch(ops) => apply_ops(&mut doc, ops, None)?,
        Delta::Merge(p) => merge_apply(&mut doc, p),
    }
    Ok(json::to_vec(&doc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ops(v: Value) -> Vec<Op> {
        parse_ops(v).unwrap()
    }

    fn run(doc: Value, patch: Value) -> Result<Value> {
        let mut d = doc;
        apply_patch_atomic(&mut d, &ops(patch))?;
        Ok(d)
    }

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

    #[test]
    fn array_indices() {
        let doc = json!({"a": [1, 2, 3]});
        assert!(run(doc.clone(), json!([{"op": "remove", "path": "/a/01"}])).is_err());
        assert!(run(doc.clone(), json!([{"op": "remove", "path": "/a/3"}])).is_err());
        assert!(run(doc.clone(), json!([{"op": "remove", "path": "/a/-"}])).is_err());
        assert!(run(
            doc.clone(),
            json!([{"op": "replace", "path": "/a/-", "value": 1}])
        )
        .is_err());
        assert!(run(
            doc.clone(),
            json!([{"op": "add", "path": "/a/-/x", "value": 1}])
        )
        .is_err());
        assert!(run(
            doc.clone(),
            json!([{"op": "add", "path": "/a/+1", "value": 1}])
        )
        .is_err());
        assert!(run(
            doc.clone(),
            json!([{"op": "add", "path": "/a/4", "value": 1}])
        )
        .is_err());
        assert_eq!(
            run(
                doc.clone(),
                json!([{"op": "add", "path": "/a/3", "value": 4}])
            )
            .unwrap(),
            json!({"a": [1, 2, 3, 4]})
        );
        assert_eq!(
            run(
                doc.clone(),
                json!([{"op": "add", "path": "/a/-", "value": 4}])
            )
            .unwrap(),
            json!({"a": [1, 2, 3, 4]})
        );
        assert_eq!(
            run(
                doc.clone(),
                json!([{"op": "move", "from": "/a/0", "path": "/a/-"}])
            )
            .unwrap(),
            json!({"a": [2, 3, 1]})
        );
        assert!(run(
            doc.clone(),
            json!([{"op": "move", "from": "/a/-", "path": "/a/0"}])
        )
        .is_err());
        // "-" on an object is just a member name
        assert_eq!(
            run(json!({}), json!([{"op": "add", "path": "/-", "value": 1}])).unwrap(),
            json!({"-": 1})
        );
    }

    #[test]
    fn messages_name_op_and_path() {
        let e = run(
            json!({"a": {}}),
            json!([
                {"op": "add", "path": "/x", "value": 1},
                {"op": "test", "path": "/x", "value": 1},
                {"op": "remove", "path": "/a/b"}
            ]),
        )
        .unwrap_err();
        assert_eq!(e.message(), "op 2 (remove /a/b): path not found");
        let e = parse_ops(json!([{"op": "add", "path": "a/b", "value": 1}])).unwrap_err();
        assert!(
            e.message()
                .starts_with("op 0 (add a/b): invalid JSON Pointer"),
            "{e}"
        );
        let e = parse_ops(json!([{"op": "add", "path": "/a"}])).unwrap_err();
        assert_eq!(e.message(), "op 0 (add /a): missing \"value\"");
        let e = parse_ops(json!([{"op": "frob", "path": "/a"}])).unwrap_err();
        assert_eq!(e.message(), "op 0: unknown op \"frob\"");
        assert!(parse_ops(json!({"op": "add"})).is_err());
        assert!(parse_ops(json!([1])).is_err());
        assert!(parse_ops(json!([{"op": "move", "path": "/a"}])).is_err());
        // null is a value
        assert!(parse_ops(json!([{"op": "add", "path": "/a", "value": null}])).is_ok());
    }

    #[test]
    fn atomic_and_order_preserving() {
        let doc = json!({"a": 1, "b": {"c": [1, 2, {"d": 3}]}, "e": 5, "f": [0]});
        let before = json::to_vec(&doc);
        let patch = json!([
            {"op": "remove", "path": "/a"},
            {"op": "add", "path": "/b/c/1", "value": "x"},
            {"op": "remove", "path": "/b/c/0"},
            {"op": "replace", "path": "/e", "value": [1]},
            {"op": "add", "path": "/z", "value": 1},
            {"op": "add", "path": "/e", "value": 7},
            {"op": "move", "from": "/b", "path": "/y"},
            {"op": "copy", "from": "/y", "path": "/f/0"},
            {"op": "add", "path": "", "value": {"whole": true}},
            {"op": "add", "path": "/q", "value": 1},
            {"op": "test", "path": "/q", "value": 2}
        ]);
        let mut d = doc.clone();
        assert!(apply_patch_atomic(&mut d, &ops(patch)).is_err());
        assert_eq!(json::to_vec(&d), before);
        // key order is kept on remove
        let d = run(doc.clone(), json!([{"op": "remove", "path": "/b"}])).unwrap();
        assert_eq!(json::to_vec(&d), br#"{"a":1,"e":5,"f":[0]}"#);
        // moving onto itself changes nothing, not even the order
        let d = run(
            doc.clone(),
            json!([{"op": "move", "from": "/a", "path": "/a"}]),
        )
        .unwrap();
        assert_eq!(json::to_vec(&d), before);
        assert!(run(
            doc.clone(),
            json!([{"op": "move", "from": "/b", "path": "/b/x"}])
        )
        .is_err());
        assert!(run(doc.clone(), json!([{"op": "remove", "path": ""}])).is_err());
        assert_eq!(
            run(
                doc.clone(),
                json!([{"op": "replace", "path": "", "value": 3}])
            )
            .unwrap(),
            json!(3)
        );
        // failing single move restores the source
        let mut d = json!({"a": 1, "b": 2});
        let m = ops(json!([{"op": "move", "from": "/a", "path": "/nope/x"}]));
        assert!(apply_patch_atomic(&mut d, &m).is_err());
        assert_eq!(json::to_vec(&d), br#"{"a":1,"b":2}"#);
    }

    #[test]
    fn depth_guard() {
        let deep = json::parse(("[".repeat(120) + &"]".repeat(120)).as_bytes()).unwrap();
        let mut doc = json!({});
        let p = |path: &str| {
            vec![Op::Add {
                path: Pointer::parse(path).unwrap(),
                value: deep.clone(),
            }]
        };
        assert!(apply_patch_atomic(&mut doc, &p("/a")).is_ok());
        let e = apply_patch_atomic(&mut doc, &p("/a/0/0/0/0/0/0/0/0/0")).unwrap_err();
        assert!(e.message().contains("deeper"), "{e}");
        // copy/move deeper than the limit fail, shallower succeed
        let mut doc = json!({});
        doc["a"] = deep.clone();
        let c = |to: &str| ops(json!([{"op": "copy", "from": "/a", "path": to}]));
        let m = |to: &str| ops(json!([{"op": "move", "from": "/a", "path": to}]));
        assert!(apply_patch_atomic(&mut doc, &c("/a/0/0/0/0/0/0/0/0")).is_err());
        assert!(apply_patch_atomic(&mut doc, &c("/b")).is_ok());
        assert!(apply_patch_atomic(&mut doc, &m("/b/0/0/0/0/0/0/0/0")).is_err());
        assert!(apply_patch_atomic(&mut doc, &c("/a/0")).is_ok());
        assert_eq!(json::depth(&doc), 122);
    }

    #[test]
    fn test_op_equality() {
        assert!(run(
            json!({"a": 1}),
            json!([{"op": "test", "path": "/a", "value": 1.0}])
        )
        .is_ok());
        assert!(run(
            json!({"a": true}),
            json!([{"op": "test", "path": "/a", "value": 1}])
        )
        .is_err());
        assert!(run(
            json!({"a": {"x":1,"y":2}}),
            json!([{"op": "test", "path": "/a", "value": {"y":2,"x":1}}])
        )
        .is_ok());
    }

    #[test]
    fn merge_patch_rfc7396_appendix_a() {
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (doc, patch, want) in cases {
            let mut d = doc.clone();
            merge_apply(&mut d, &patch);
            assert_eq!(d, want, "{doc} + {patch}");
        }
        let mut d = json!({"a":1,"b":2,"c":3});
        merge_apply(&mut d, &json!({"a":null,"d":4}));
        assert_eq!(json::to_vec(&d), br#"{"b":2,"c":3,"d":4}"#);
    }

    #[test]
    fn fast_delta_parser_agrees_with_the_value_path() {
        let inputs: &[&[u8]] = &[
            br#"{"patch":[]}"#,
            br#"{"patch":[{"op":"add","path":"/a","value":{"x":[1,{"y":null}]}}],"seq":1}"#,
            br#"{"seq":{"patch":1},"merge":{"a":null}}"#,
            br#"{"patch":[1],"patch":[]}"#,
            br#"{"patch":[],"patch":[1]}"#,
            br#"{"p\u0061tch":[{"\u006fp":"remove","path":"/a~1b"}]}"#,
            br#"{"patch":[{"op":"remove","path":"/a","op":"test"}]}"#,
            br#"{"patch":[{"op":"test","path":"/a"}]}"#,
            br#"{"patch":[{"op":"test","path":"/a","value":null}]}"#,
            br#"{"patch":[{"op":1,"path":"/a"}]}"#,
            br#"{"patch":[{"path":"/a"}]}"#,
            br#"{"patch":[{"op":"frob","path":"/a"}]}"#,
            br#"{"patch":[{"op":"add","path":["/a"],"value":1}]}"#,
            br#"{"patch":[{"op":"add","value":1}]}"#,
            br#"{"patch":[{"op":"move","path":"/a","from":{"x":1}}]}"#,
            br#"{"patch":[{"op":"copy","path":"/a"}]}"#,
            br#"{"patch":[{"op":"copy","path":"/a","from":"x"}]}"#,
            br#"{"patch":[{"op":"copy","path":"a","from":"/x"}]}"#,
            br#"{"patch":[{"op":"add","path":"/~2","value":1}]}"#,
            br#"{"patch":[[1],"x",null,true,2.5]}"#,
            br#"{"patch":{"op":"add"}}"#,
            br#"{"patch":"x"}"#,
            br#"{"patch":[],"merge":1}"#,
            br#"{"merge":[1,2]}"#,
            br#"{}"#,
            br#"[]"#,
            br#"[{"patch":[]}]"#,
            br#""patch""#,
            br#"null"#,
            br#"{"patch":[]} x"#,
            br#"{"patch":[{"op":"add","path":"/a","value":1e400}]}"#,
            br#"{"patch":[{"op":"add","path":"/a","value":"\ud800"}]}"#,
            b"{\"patch\":[{\"op\":\"add\",\"path\":\"/\xff\",\"value\":1}]}",
            br#"{"merge":{"a":1},"merge":{"b":2}}"#,
        ];
        for input in inputs {
            let fast = parse_delta(input);
            let slow = json::parse(input).and_then(delta_from_value);
            assert_eq!(fast, slow, "{}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn delta_nesting_limit_is_exact() {
        let wrap = |n: usize| {
            // {"merge": [[...]]} nests n + 1 levels
            format!("{{\"merge\":{}{}}}", "[".repeat(n), "]".repeat(n))
        };
        assert!(parse_delta(wrap(MAX_DEPTH - 1).as_bytes()).is_ok());
        let e = parse_delta(wrap(MAX_DEPTH).as_bytes()).unwrap_err();
        assert!(e.message().contains("deeper"), "{e}");
        assert!(parse_delta(wrap(100_000).as_bytes()).is_err());
        let v = format!(
            "{{\"patch\":[{{\"op\":\"add\",\"path\":\"/a\",\"value\":{}{}}}]}}",
            "[".repeat(125),
            "]".repeat(125)
        );
        assert!(parse_delta(v.as_bytes()).is_ok());
        let ignored = format!(
            "{{\"merge\":1,\"x\":{}{}}}",
            "[".repeat(127),
            "]".repeat(127)
        );
        assert!(parse_delta(ignored.as_bytes()).is_ok());
        let ignored = format!(
            "{{\"merge\":1,\"x\":{}{}}}",
            "[".repeat(128),
            "]".repeat(128)
        );
        assert!(parse_delta(ignored.as_bytes()).is_err());
    }

    #[test]
    fn deltas() {
        assert!(
            matches!(parse_delta(br#"{"patch":[],"seq":3}"#).unwrap(), Delta::Patch(v) if v.is_empty())
        );
        assert!(matches!(
            parse_delta(br#"{"merge":5}"#).unwrap(),
            Delta::Merge(_)
        ));
        assert!(parse_delta(br#"{"merge":5,"patch":[]}"#).is_err());
        assert!(parse_delta(br#"{"seq":1}"#).is_err());
        assert!(parse_delta(br#"[]"#).is_err());
        assert!(parse_delta(br#"{"patch":{}}"#).is_err());
        assert_eq!(
            validate(br#"{"patch":[{"op":"remove","path":"/a","x":1}]}"#).unwrap(),
            ("patch", br#"[{"op":"remove","path":"/a","x":1}]"#.to_vec())
        );
        assert_eq!(
            validate(br#"{"merge": {"a" : null}}"#).unwrap(),
            ("merge", br#"{"a":null}"#.to_vec())
        );
        assert_eq!(
            apply_bytes(b"{}", br#"{"merge":{"a":{"b":null,"c":1}}}"#).unwrap(),
            br#"{"a":{"c":1}}"#
        );
        let e = apply_bytes(b"{}", br#"{"patch":[{"op":"remove","path":"/a"}]}"#).unwrap_err();
        assert_eq!(e.message(), "op 0 (remove /a): path not found");
        let ops = vec![
            Op::Move {
                from: Pointer::parse("/a").unwrap(),
                path: Pointer::parse("/b").unwrap(),
            },
            Op::Remove {
                path: Pointer::parse("/c~1d").unwrap(),
            },
        ];
        let j = patch_delta_json(&ops);
        assert_eq!(
            j,
            br#"{"patch":[{"op":"move","from":"/a","path":"/b"},{"op":"remove","path":"/c~1d"}]}"#
        );
        assert_eq!(
            json::to_vec(&json!({"patch": ops.iter().map(Op::to_value).collect::<Vec<_>>()})),
            j
        );
    }

    #[test]
    fn bounded_application() {
        let big: Value = Value::Object(
            (0..100)
                .map(|i| (format!("k{i}"), json!({"v": i})))
                .collect(),
        );
        let doc = json!({"a": {"x": 1, "y": [1, 2]}, "big": big, "list": [1, 2, 3]});
        let bounded = |patch: Value| {
            let mut d = doc.clone();
            let r = apply_patch_bounded(&mut d, &ops(patch.clone()));
            (r, d)
        };
        // Small work: the same result as the unbounded application, failures included.
        for patch in [
            json!([{"op": "replace", "path": "/a/x", "value": 2}]),
            json!([{"op": "add", "path": "/a/z", "value": {"q": [1]}}, {"op": "remove", "path": "/a/y"}]),
            json!([{"op": "add", "path": "/list/0", "value": 0}, {"op": "remove", "path": "/list/3"}]),
            json!([{"op": "replace", "path": "/big/k5/v", "value": 0}, {"op": "test", "path": "/a/x", "value": 1.0}]),
            json!([{"op": "add", "path": "/big/k7", "value": 1}]),
            json!([{"op": "replace", "path": "/a/x", "value": 2}, {"op": "remove", "path": "/nope"}]),
            json!([{"op": "test", "path": "/big", "value": 1}]),
        ] {
            let (r, d) = bounded(patch.clone());
            assert_eq!(
                r.as_ref().map(|r| r.is_ok()),
                Ok(run(doc.clone(), patch.clone()).is_ok()),
                "{patch}"
            );
            let mut want = doc.clone();
            let _ = apply_patch_atomic(&mut want, &ops(patch.clone()));
            assert_eq!(json::to_vec(&d), json::to_vec(&want), "{patch}");
        }
        // Work that grows with the document: stopped, nothing changed (a rollback of the
        // ops before included).
        for patch in [
            json!([{"op": "replace", "path": "/big", "value": 1}]),
            json!([{"op": "remove", "path": "/big"}]),
            json!([{"op": "add", "path": "", "value": 1}]),
            json!([{"op": "add", "path": "/big/new", "value": 1}]),
            json!([{"op": "remove", "path": "/big/k1"}]),
            json!([{"op": "replace", "path": "/a/x", "value": 2}, {"op": "move", "from": "/a/x", "path": "/b"}]),
            json!([{"op": "remove", "path": "/a/x"}, {"op": "copy", "from": "/a/y", "path": "/b"}]),
            json!([{"op": "add", "path": "/a/q", "value": 1}, {"op": "add", "path": "/a/r", "value": {"s": "x".repeat(5000)}}, {"op": "replace", "path": "/a/r/s", "value": 1}]),
        ] {
            let (r, d) = bounded(patch.clone());
            assert!(r.is_err(), "{patch}");
            assert_eq!(json::to_vec(&d), json::to_vec(&doc), "{patch}");
        }
    }
}
