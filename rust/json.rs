//! JSON in and out: parsing with a nesting limit, serialisation that matches Python's
//! `json.dumps(v, separators=(",", ":"), ensure_ascii=False)` byte for byte, and the two
//! equalities the engine uses.
//!
//! Rules (the pure-Python twin mirrors them):
//! - Input is UTF-8 JSON (serde_json's grammar: no NaN/Infinity, no lone surrogates, no BOM).
//! - Containers nest at most [`MAX_DEPTH`] levels: depth(scalar) = 0, depth(container) =
//!   1 + max depth of its children (an empty container has depth 1). Deeper input is an error,
//!   found while parsing (documents) or by a byte scan first (deltas, [`check_nesting`]),
//!   so 100,000 levels never cause a deep recursion (nor a deep drop).
//! - Numbers: integers that fit i64/u64 stay integers; other integers become f64 (serde_json);
//!   `-0` is the float `-0.0` (serde_json); a number that overflows f64 is an error.
//! - Output: compact, keys in document (insertion) order, floats formatted like Python's
//!   `repr(float)` (`1e+16`, `1e-05`, `0.0001`, `1.5`).
//! - Equalities: [`rfc_eq`] for RFC 6902 `test` (numbers by value); `diff::same` where
//!   "unchanged" must mean "serialises the same".

use crate::error::{DeltaError, Result};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::ser::{CompactFormatter, Formatter};
use serde_json::{Map, Value};
use std::io;

/// Maximum nesting of containers in any document the engine accepts or produces.
pub const MAX_DEPTH: usize = 128;

/// Parse one JSON document from UTF-8 bytes.
///
/// A seeded visitor builds the `Value` (instead of `Value::deserialize`): it counts the
/// nesting as it goes (so no separate scan, and the recursion is bounded), and it sizes each
/// object's map once from a reused per-level buffer instead of growing (and rehashing) it.
pub fn parse(input: &[u8]) -> Result<Value> {
    // Valid UTF-8 is read as a str: serde_json then skips its UTF-8 check of every string
    // (one check of the whole input is cheaper). Other input takes the byte path, which
    // reports the same error as before.
    match std::str::from_utf8(input) {
        Ok(s) => parse_from(serde_json::Deserializer::from_str(s)),
        Err(_) => parse_from(serde_json::Deserializer::from_slice(input)),
    }
}

fn parse_from<'de, R: serde_json::de::Read<'de>>(
    mut de: serde_json::Deserializer<R>,
) -> Result<Value> {
    // Bounded by ValueSeed's own depth count.
    de.disable_recursion_limit();
    let mut scratch = Scratch::default();
    let seed = ValueSeed {
        depth: 0,
        scratch: &mut scratch,
    };
    let r = seed.deserialize(&mut de).and_then(|v| de.end().map(|_| v));
    match r {
        Ok(v) => Ok(v),
        Err(_) if scratch.too_deep => Err(too_deep()),
        Err(e) => Err(DeltaError::new(format!("invalid JSON: {e}"))),
    }
}

#[derive(Default)]
struct Scratch {
    /// One entry buffer per nesting level, reused by every object at that level.
    maps: Vec<Vec<(String, Value)>>,
    too_deep: bool,
}

struct ValueSeed<'s> {
    /// Containers around the value being read.
    depth: usize,
    scratch: &'s mut Scratch,
}

impl ValueSeed<'_> {
    fn enter<E: serde::de::Error>(&mut self) -> std::result::Result<(), E> {
        if self.depth >= MAX_DEPTH {
            self.scratch.too_deep = true;
            return Err(E::custom("too deep"));
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> std::result::Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> std::result::Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> std::result::Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> std::result::Result<Value, A::Error> {
        self.enter()?;
        let mut v = Vec::new();
        while let Some(x) = seq.next_element_seed(ValueSeed {
            depth: self.depth + 1,
            scratch: &mut *self.scratch,
        })? {
            v.push(x);
        }
        Ok(Value::Array(v))
    }
    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> std::result::Result<Value, A::Error> {
        self.enter()?;
        let d = self.depth;
        if self.scratch.maps.len() <= d {
            self.scratch.maps.resize_with(d + 1, Vec::new);
        }
        let mut buf = std::mem::take(&mut self.scratch.maps[d]);
        while let Some(k) = map.next_key::<String>()? {
            let v = map.next_value_seed(ValueSeed {
                depth: d + 1,
                scratch: &mut *self.scratch,
            })?;
            buf.push((k, v));
        }
        let mut m = Map::with_capacity(buf.len());
        for (k, v) in buf.drain(..) {
            // A repeated key keeps its first position and its last value, as serde_json.
            m.insert(k, v);
        }
        self.scratch.maps[d] = buf;
        Ok(Value::Object(m))
    }
}

/// Reject input whose brackets (outside strings) nest deeper than [`MAX_DEPTH`].
/// Malformed input that passes is left to the parser to reject.
pub fn check_nesting(input: &[u8]) -> Result<()> {
    let mut depth = 0usize;
    let mut i = 0usize;
    let n = input.len();
    while i < n {
        match input[i] {
            b'"' => {
                // Skip the string body, honouring backslash escapes.
                i += 1;
                while i < n {
                    match input[i] {
                        b'\\' => i += 2,
                        b'"' => break,
                        _ => i += 1,
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(too_deep());
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    Ok(())
}

pub fn too_deep() -> DeltaError {
    DeltaError::new(format!("document nests deeper than {MAX_DEPTH} levels"))
}

/// Nesting depth of a value: 0 for a scalar, 1 + the deepest child for a container.
pub fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Memory estimate of the engine's parsed representation, beyond the JSON bytes: every
/// node (scalar or container) takes a `Value` slot (`std::mem::size_of::<Value>()`, 72
/// bytes with `preserve_order`), every object member besides its value an IndexMap entry
/// (the cached hash and the key's `String`, 32 bytes) and its hash index (~16 bytes at the
/// table's load). The key's and strings' own bytes are counted by the JSON length, which
/// [`crate::apply`] keeps next to this. Allocator slack and spare capacity are not counted.
/// Measured (release build, RSS of a `RoomState`): a 400k-member object `{"kN":N}` of
/// 6.3 MB of JSON took 56 MiB, estimated 6.3 MB + 400k x 120 = 54 MB.
pub const NODE_BYTES: u64 = 72;
pub const MEMBER_BYTES: u64 = 48;

/// The structure part of the memory estimate of `v` (see [`NODE_BYTES`]): O(nodes).
pub fn weight(v: &Value) -> u64 {
    // Recursion is bounded by MAX_DEPTH (as in `depth`).
    match v {
        Value::Array(a) => a
            .iter()
            .fold(NODE_BYTES, |w, x| w.saturating_add(weight(x))),
        Value::Object(m) => m.values().fold(NODE_BYTES, |w, x| {
            w.saturating_add(MEMBER_BYTES).saturating_add(weight(x))
        }),
        _ => NODE_BYTES,
    }
}

/// Formatter matching Python's `json.dumps(..., separators=(",", ":"), ensure_ascii=False)`.
/// serde_json already escapes strings like Python does (`\"`, `\\`, `\n`, `\r`, `\t`, `\b`,
/// `\f`, other control characters as `\u00XX` in lower-case hex); only floats differ.
struct PyFormatter;

impl Formatter for PyFormatter {
    fn write_f64<W: ?Sized + io::Write>(&mut self, w: &mut W, value: f64) -> io::Result<()> {
        write_py_float(w, value)
    }
}

/// Write `value` like Python's `repr(float)`: positional notation for 1e-4 <= |v| < 1e16
/// (and zero), otherwise scientific with a signed, at-least-two-digit exponent.
pub(crate) fn write_py_float<W: ?Sized + io::Write>(w: &mut W, value: f64) -> io::Result<()> {
    let a = value.abs();
    if a == 0.0 || (1e-4..1e16).contains(&a) || !value.is_finite() {
        // serde_json's shortest round-trip formatting is positional in this range, with the
        // same digits and a trailing `.0` for integral values, exactly like Python.
        return CompactFormatter.write_f64(w, value);
    }
    let s = format!("{value:e}"); // shortest round-trip digits, e.g. "1e16", "-2.5e-7"
    let (mantissa, exp) = s.split_once('e').unwrap_or((s.as_str(), "0"));
    let (sign, digits) = match exp.strip_prefix('-') {
        Some(d) => ('-', d),
        None => ('+', exp),
    };
    if digits.len() < 2 {
        write!(w, "{mantissa}e{sign}0{digits}")
    } else {
        write!(w, "{mantissa}e{sign}{digits}")
    }
}

/// Serialise compactly (see the module doc for the exact format).
pub fn to_vec(v: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    write_to(&mut out, v);
    out
}

/// Append the serialisation of `v` to `out`.
pub fn write_to(out: &mut Vec<u8>, v: &Value) {
    let mut ser = serde_json::Serializer::with_formatter(out, PyFormatter);
    // Serialising a Value into a Vec cannot fail: keys are strings, numbers are finite.
    let _ = serde::Serialize::serialize(v, &mut ser);
}

/// An `io::Write` that only counts, and fails once past `limit` (which stops the
/// serialiser early).
struct Counter {
    n: u64,
    limit: u64,
}

impl io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.n += buf.len() as u64;
        if self.n > self.limit {
            return Err(io::Error::other("past the limit"));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// `to_vec(v).len()` without building it: O(size of `v`), no allocation.
pub fn len(v: &Value) -> u64 {
    len_bounded(v, u64::MAX).unwrap_or(u64::MAX)
}

/// `len(v)` if it is at most `limit`, else None (having done work of at most ~`limit` bytes).
pub fn len_bounded(v: &Value, limit: u64) -> Option<u64> {
    let mut c = Counter { n: 0, limit };
    let mut ser = serde_json::Serializer::with_formatter(&mut c, PyFormatter);
    serde::Serialize::serialize(v, &mut ser).ok()?;
    Some(c.n)
}

/// The length of `s` written as a JSON string (quotes and escapes included).
pub fn str_len(s: &str) -> u64 {
    let mut c = Counter {
        n: 0,
        limit: u64::MAX,
    };
    let mut ser = serde_json::Serializer::with_formatter(&mut c, PyFormatter);
    let _ = serde::Serialize::serialize(s, &mut ser);
    c.n
}

/// Append `s` as a JSON string (the escaping of [`write_to`], without making a `Value`).
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    let mut ser = serde_json::Serializer::with_formatter(out, PyFormatter);
    // Serialising a str into a Vec cannot fail.
    let _ = serde::Serialize::serialize(s, &mut ser);
}

/// RFC 6902 `test` equality: numbers compare by numeric value (`1` == `1.0`), objects are
/// unordered, arrays ordered, everything else by type and value.
pub fn rfc_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => num_eq(x, y),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| rfc_eq(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| rfc_eq(v, w)))
        }
        _ => a == b,
    }
}

fn as_int(n: &serde_json::Number) -> Option<i128> {
    n.as_i64()
        .map(i128::from)
        .or_else(|| n.as_u64().map(i128::from))
}

fn num_eq(x: &serde_json::Number, y: &serde_json::Number) -> bool {
    match (as_int(x), as_int(y)) {
        (Some(i), Some(j)) => i == j,
        (Some(i), None) => int_float_eq(i, y.as_f64().unwrap_or(f64::NAN)),
        (None, Some(j)) => int_float_eq(j, x.as_f64().unwrap_or(f64::NAN)),
        (None, None) => x.as_f64() == y.as_f64(),
    }
}

/// Exact comparison of an integer with a float (as Python does).
fn int_float_eq(i: i128, f: f64) -> bool {
    f.is_finite() && f.trunc() == f && f.abs() < 1.7e38 && (f as i128) == i
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn nested(n: usize) -> String {
        "[".repeat(n) + &"]".repeat(n)
    }

    #[test]
    fn depth_limit_is_exact() {
        assert!(parse(nested(MAX_DEPTH).as_bytes()).is_ok());
        assert_eq!(
            depth(&parse(nested(MAX_DEPTH).as_bytes()).unwrap()),
            MAX_DEPTH
        );
        assert!(parse(nested(MAX_DEPTH + 1).as_bytes()).is_err());
        let deep = nested(100_000);
        let e = parse(deep.as_bytes()).unwrap_err();
        assert!(e.message().contains("deeper"), "{e}");
        let deep_obj = "{\"a\":".repeat(100_000);
        assert!(parse(deep_obj.as_bytes()).is_err());
        // brackets inside strings do not count
        let s = format!("[\"{}\\\"{}\"]", "[".repeat(500), "{".repeat(500));
        assert!(parse(s.as_bytes()).is_ok());
    }

    #[test]
    fn numbers() {
        assert!(parse(b"1e400").is_err());
        assert!(parse(b"-1e400").is_err());
        assert_eq!(to_vec(&parse(b"1e-400").unwrap()), b"0.0");
        assert_eq!(
            to_vec(&parse(b"18446744073709551615").unwrap()),
            b"18446744073709551615"
        );
        assert_eq!(
            to_vec(&parse(b"18446744073709551616").unwrap()),
            b"1.8446744073709552e+19"
        );
        assert_eq!(
            to_vec(&parse(b"-9223372036854775809").unwrap()),
            b"-9.223372036854776e+18"
        );
        assert_eq!(to_vec(&parse(b"-0").unwrap()), b"-0.0");
        assert_eq!(to_vec(&parse(b"1E2").unwrap()), b"100.0");
        let big = "1".repeat(5000);
        assert!(parse(big.as_bytes()).is_err());
    }

    #[test]
    fn python_float_repr() {
        let cases: &[(f64, &str)] = &[
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (1.5, "1.5"),
            (0.1, "0.1"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345e100, "1.2345e+100"),
            (5e-324, "5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (123456789.125, "123456789.125"),
            (-2.5e-5, "-2.5e-05"),
        ];
        for (f, s) in cases {
            assert_eq!(String::from_utf8(to_vec(&json!(f))).unwrap(), *s, "{f}");
        }
    }

    #[test]
    fn strings_and_errors() {
        assert_eq!(
            to_vec(&parse("\"\\u001f\\u00e9\\n\\\"\"".as_bytes()).unwrap()),
            "\"\\u001fé\\n\\\"\"".as_bytes()
        );
        assert!(parse(b"\"\xff\"").is_err());
        assert!(parse(b"\"\\ud800\"").is_err());
        assert!(parse(b"NaN").is_err());
        assert!(parse(b"[1,]").is_err());
        assert!(parse(b"{} x").is_err());
        assert!(parse(b"\xef\xbb\xbf{}").is_err());
        assert!(parse(b"").is_err());
        assert!(parse(b" {\"b\":1,\"a\":2} ").is_ok());
        assert_eq!(
            to_vec(&parse(b"{\"b\":1,\"a\":2,\"b\":3}").unwrap()),
            b"{\"b\":3,\"a\":2}"
        );
    }

    #[test]
    fn equalities() {
        assert!(rfc_eq(&json!(1), &json!(1.0)));
        assert!(rfc_eq(&json!({"a": [1, 2.0]}), &json!({"a": [1.0, 2]})));
        assert!(!rfc_eq(&json!(true), &json!(1)));
        assert!(!rfc_eq(&json!([1, 2]), &json!([2, 1])));
        assert!(rfc_eq(
            &json!(9007199254740992u64),
            &json!(9007199254740992.0)
        ));
        assert!(!rfc_eq(
            &json!(9007199254740993u64),
            &json!(9007199254740992.0)
        ));
        assert!(rfc_eq(&json!({"a":1,"b":2}), &json!({"b":2,"a":1})));
    }
}
