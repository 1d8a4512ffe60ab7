//! The delta model: RFC 6902 operations ([`Op`]), a parsed delta ([`Delta`]: `{"patch":
//! [...]}` or `{"merge": ...}`), its parsing (one pass from the bytes, [`parse_delta`]) and its
//! canonical serialisation (`{"op","from"?,"path","value"?}`, members in that order).
//!
//! Parsing rules: a delta is a JSON object with exactly one of "patch" and "merge" (other
//! members ignored); the whole delta document nests at most MAX_DEPTH levels; each op
//! needs a known "op", a string "path" (a valid JSON Pointer), "value" for add/replace/test
//! and a string "from" for move/copy; unknown op members are ignored.

use crate::error::{DeltaError, Result};
use crate::json;
use crate::pointer::Pointer;
use serde_json::{Map, Value};

/// How a serialised patch keeps each op (see `crate::merge::collapse`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write {
    Drop,
    Keep,
    /// A `replace` written as an `add` (it overwrites an `add` of the same path).
    AsAdd,
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
pub fn patch_delta_json_with(ops: &[Op], how: impl Fn(usize) -> Write) -> Vec<u8> {
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

/// A member of a request message beside its delta (`validate_request`).
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Str(String),
    Int(i64),
    UInt(u64),
    Bool(bool),
    Null,
}

/// The members read from a request message: the others (in document order) and the
/// delta as `validate` gives it.
pub type Request = (Vec<(String, Scalar)>, &'static str, Vec<u8>);

/// `validate` of a whole request message (`{"t":"delta","room":...,"merge":{...}}`), and
/// its other top-level members from the same parse, so that the relay reads a small
/// message once. None when the message is anything else: not valid, not an object, no or
/// both delta members, a member that is not a string, an integer of 64 bits, a boolean or
/// null, or a delta `validate` refuses. The caller then reads it the long way, which
/// gives each of those its exact error.
pub fn validate_request(input: &[u8]) -> Option<Request> {
    let Ok(Value::Object(mut m)) = json::parse(input) else {
        return None;
    };
    let (kind, body) = match (m.shift_remove("patch"), m.shift_remove("merge")) {
        (Some(p), None) => ("patch", p),
        (None, Some(b)) => ("merge", b),
        _ => return None,
    };
    let mut fields = Vec::with_capacity(m.len());
    for (k, v) in m {
        let scalar = match v {
            Value::String(s) => Scalar::Str(s),
            Value::Bool(b) => Scalar::Bool(b),
            Value::Null => Scalar::Null,
            Value::Number(n) => match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => Scalar::Int(i),
                (None, Some(u)) => Scalar::UInt(u),
                _ => return None, // a float (also `-0`): the long way
            },
            _ => return None,
        };
        fields.push((k, scalar));
    }
    let bytes = json::to_vec(&body);
    if kind == "patch" {
        parse_ops(body).ok()?;
    }
    Some((fields, kind, bytes))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::{self, MAX_DEPTH};

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
    fn validate_request_reads_the_delta_as_validate_and_the_other_members() {
        let input = br#"{"t":"delta","id":7,"room":"a\u0062","key":null,"ok":true,"big":18446744073709551615,"neg":-3,"merge":{"x":1.50,"y":[1,{"z":null}]}}"#;
        let (fields, kind, body) = validate_request(input).expect("a request");
        assert_eq!((kind, body.clone()), validate(input).unwrap());
        assert_eq!(kind, "merge");
        assert_eq!(body, br#"{"x":1.5,"y":[1,{"z":null}]}"#.to_vec());
        let want = vec![
            ("t".to_owned(), Scalar::Str("delta".into())),
            ("id".to_owned(), Scalar::Int(7)),
            ("room".to_owned(), Scalar::Str("ab".into())),
            ("key".to_owned(), Scalar::Null),
            ("ok".to_owned(), Scalar::Bool(true)),
            ("big".to_owned(), Scalar::UInt(u64::MAX)),
            ("neg".to_owned(), Scalar::Int(-3)),
        ];
        assert_eq!(fields, want);
        let patch =
            br#"{"patch":[{"op":"add","path":"/a","value":1,"extra":2}],"room":"r","room":"s"}"#;
        let (fields, kind, body) = validate_request(patch).expect("a request");
        assert_eq!((kind, body), validate(patch).unwrap());
        assert_eq!(fields, vec![("room".to_owned(), Scalar::Str("s".into()))]);
    }

    #[test]
    fn validate_request_leaves_everything_else_to_the_long_way() {
        let others: &[&[u8]] = &[
            br#"{"t":"join","room":"r"}"#,
            br#"{"t":"delta","patch":[],"merge":{}}"#,
            br#"{"t":"delta","id":1.0,"merge":{}}"#,
            br#"{"t":"delta","id":-0,"merge":{}}"#,
            br#"{"t":"delta","id":18446744073709551616,"merge":{}}"#,
            br#"{"t":"delta","id":[1],"merge":{}}"#,
            br#"{"t":{"a":1},"merge":{}}"#,
            br#"{"t":"delta","patch":{"op":"add"}}"#,
            br#"{"t":"delta","patch":[{"op":"frob","path":"/a"}]}"#,
            br#"{"t":"delta","merge":{"a":1e400}}"#,
            br#"{"t":"delta","room":"\ud800","merge":{}}"#,
            br#"{"t":"delta","merge":{}} x"#,
            br#"[{"merge":{}}]"#,
            b"{\"t\":\"\xff\",\"merge\":{}}",
            b"",
        ];
        for input in others {
            assert!(
                validate_request(input).is_none(),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        let deep = format!(
            "{{\"merge\":{}{}}}",
            "[".repeat(MAX_DEPTH),
            "]".repeat(MAX_DEPTH)
        );
        assert!(validate_request(deep.as_bytes()).is_none());
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
}
