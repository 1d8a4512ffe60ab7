//! MessagePack <-> JSON, for the `kasagi.v1.msgpack` subprotocol and the state snapshots.
//!
//! Encoding matches Python's `msgpack.packb(value, use_bin_type=True)` byte for byte: the
//! smallest integer format (unsigned formats for non-negative integers), floats as float64,
//! strings as str (fixstr/str8/16/32), maps in key order. Decoding accepts what has a JSON
//! form: nil, booleans, integers, floats (float32 widened, NaN/infinities refused), strings
//! (valid UTF-8), arrays, maps with string keys; nesting at most MAX_DEPTH; one value with
//! no trailing bytes. Binary and extension types are refused.
//!
//! [`msgpack_to_json`] (the wire protocol's path) transcodes without building a `Value`:
//! memory in the size of the output plus ~50 bytes per distinct key of the maps being
//! written, and an optional cap on arrays and maps that stops it at once (a 1 MiB frame of
//! empty arrays cost ~100 MB and ~40 ms through a `Value` tree, ~1 ms refused at 100,000).
//! [`from_msgpack`] builds the `Value` for callers that need one.

use crate::error::{DeltaError, Result};
use crate::json::{self, MAX_DEPTH};
use rmp::decode::{RmpRead, ValueReadError};
use rmp::Marker;
use serde_json::ser::{CompactFormatter, Formatter};
use serde_json::{Map, Number, Value};
use std::collections::HashMap;
use std::ops::Range;

pub fn to_msgpack(v: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_value(&mut out, v);
    out
}

fn write_value(out: &mut Vec<u8>, v: &Value) {
    // Writing into a Vec cannot fail.
    match v {
        Value::Null => {
            let _ = rmp::encode::write_nil(out);
        }
        Value::Bool(b) => {
            let _ = rmp::encode::write_bool(out, *b);
        }
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                let _ = rmp::encode::write_uint(out, u);
            } else if let Some(i) = n.as_i64() {
                let _ = rmp::encode::write_sint(out, i);
            } else {
                let _ = rmp::encode::write_f64(out, n.as_f64().unwrap_or(0.0));
            }
        }
        Value::String(s) => {
            let _ = rmp::encode::write_str(out, s);
        }
        Value::Array(a) => {
            let _ = rmp::encode::write_array_len(out, a.len() as u32);
            for x in a {
                write_value(out, x);
            }
        }
        Value::Object(m) => {
            let _ = rmp::encode::write_map_len(out, m.len() as u32);
            for (k, x) in m {
                let _ = rmp::encode::write_str(out, k);
                write_value(out, x);
            }
        }
    }
}

pub fn json_to_msgpack(doc: &[u8]) -> Result<Vec<u8>> {
    Ok(to_msgpack(
        &json::parse(doc).map_err(|e| e.context("document"))?,
    ))
}

/// Re-encode one MessagePack document as JSON, written as it is read (no `Value` tree), so
/// the memory used is that of the output (plus one small record per key of the maps being
/// written). The output is byte for byte `json::to_vec(&from_msgpack(data)?)`, and so are
/// the errors, with one more: past `max_containers` arrays and maps (0 = no limit) it stops
/// at once. A map that repeats a key keeps the key's first position and its last value, as
/// `from_msgpack` (and Python's dict) do.
pub fn msgpack_to_json(data: &[u8], max_containers: u64) -> Result<Vec<u8>> {
    let limit = if max_containers == 0 {
        u64::MAX
    } else {
        max_containers
    };
    msgpack_to_json_counted(data, limit).map(|(out, _)| out)
}

/// [`msgpack_to_json`] under an exact container budget (0: none may be read) that also
/// returns how many arrays and maps it read: one budget shared by the members of a message
/// (protocol.py converts each member separately and passes what the ones before left).
pub fn msgpack_to_json_counted(data: &[u8], budget: u64) -> Result<(Vec<u8>, u64)> {
    let mut t = Transcoder {
        rd: data,
        out: Vec::with_capacity(data.len().saturating_add(16)),
        containers: 0,
        max_containers: budget,
        entries: Vec::new(),
        index: Vec::new(),
    };
    t.value(0)?;
    if !t.rd.is_empty() {
        return Err(err("trailing bytes after the document"));
    }
    Ok((t.out, t.containers))
}

/// The error past `max_containers`; protocol.py recognises "arrays and objects".
pub fn too_many_containers(max: u64) -> DeltaError {
    err(&format!(
        "a document may hold at most {max} arrays and objects"
    ))
}

/// Maps up to this many keys find a repeated key by a scan, larger ones by a hash index.
const LINEAR_KEYS: usize = 8;

/// One key of a map being written: where its JSON key (with the colon) is in `out`, and its
/// value, the last one read (a repeated key leaves the earlier values unused in `out`).
struct Entry<'a> {
    key: &'a [u8],
    start: usize,
    key_end: usize,
    value: Range<usize>,
}

struct Transcoder<'a> {
    /// The input not read yet.
    rd: &'a [u8],
    out: Vec<u8>,
    containers: u64,
    /// Containers that may be read (u64::MAX: no limit).
    max_containers: u64,
    /// The distinct keys of every map being written, innermost map last.
    entries: Vec<Entry<'a>>,
    /// Per depth: key -> entry, for the map being written there once it has many keys.
    index: Vec<HashMap<&'a [u8], usize>>,
}

impl<'a> Transcoder<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.rd.len() {
            return Err(err("truncated data"));
        }
        let (head, rest) = self.rd.split_at(n);
        self.rd = rest;
        Ok(head)
    }

    fn str_body(&mut self, n: usize) -> Result<&'a str> {
        std::str::from_utf8(self.take(n)?).map_err(|_| err("invalid UTF-8 in a string"))
    }

    fn len<T>(r: std::result::Result<T, ValueReadError>) -> Result<T> {
        // Reading from a slice fails only when it runs out.
        r.map_err(|_| err("truncated data"))
    }

    fn float(&mut self, f: f64) -> Result<()> {
        if !f.is_finite() {
            return Err(err("NaN and infinities have no JSON form"));
        }
        // Writing into a Vec cannot fail.
        let _ = json::write_py_float(&mut self.out, f);
        Ok(())
    }

    fn uint(&mut self, u: u64) {
        let _ = CompactFormatter.write_u64(&mut self.out, u);
    }

    fn int(&mut self, i: i64) {
        // serde_json keeps non-negative integers as u64; both print the same digits.
        let _ = CompactFormatter.write_i64(&mut self.out, i);
    }

    /// Entering one more array or map around `depth` containers.
    fn enter(&mut self, depth: usize) -> Result<()> {
        if depth + 1 > MAX_DEPTH {
            return Err(err(&format!("nested deeper than {MAX_DEPTH} levels")));
        }
        self.containers += 1;
        if self.containers > self.max_containers {
            return Err(too_many_containers(self.max_containers));
        }
        Ok(())
    }

    fn array(&mut self, n: u32, depth: usize) -> Result<()> {
        self.enter(depth)?;
        self.out.push(b'[');
        for i in 0..n {
            if i > 0 {
                self.out.push(b',');
            }
            self.value(depth + 1)?;
        }
        self.out.push(b']');
        Ok(())
    }

    fn key(&mut self) -> Result<&'a str> {
        let n = match rmp::decode::read_marker(&mut self.rd) {
            Ok(Marker::FixStr(n)) => n as usize,
            Ok(Marker::Str8) => Self::len(self.rd.read_data_u8())? as usize,
            Ok(Marker::Str16) => Self::len(self.rd.read_data_u16())? as usize,
            Ok(Marker::Str32) => Self::len(self.rd.read_data_u32())? as usize,
            Ok(_) => return Err(err("map keys must be strings")),
            Err(_) => return Err(err("truncated data")),
        };
        self.str_body(n)
    }

    fn map(&mut self, n: u32, depth: usize) -> Result<()> {
        self.enter(depth)?;
        self.out.push(b'{');
        let base = self.entries.len();
        let mut repeated = false;
        for i in 0..n {
            if i > 0 {
                self.out.push(b',');
            }
            let start = self.out.len();
            let key = self.key()?;
            json::write_str(&mut self.out, key);
            self.out.push(b':');
            let value_start = self.out.len();
            self.value(depth + 1)?;
            // After the value: a map inside it has already dropped its own entries.
            let value = value_start..self.out.len();
            let key = key.as_bytes();
            if let Some(j) = self.find(base, depth, key) {
                // Written in full all the same; the rewrite at the end drops it.
                self.entries[j].value = value;
                repeated = true;
            } else {
                self.entries.push(Entry {
                    key,
                    start,
                    key_end: value_start,
                    value,
                });
                self.index_last(base, depth);
            }
        }
        if repeated {
            self.drop_repeated_keys(base);
        }
        if self.entries.len() - base > LINEAR_KEYS {
            self.index[depth].clear();
        }
        self.entries.truncate(base);
        self.out.push(b'}');
        Ok(())
    }

    /// The entry of `key` in the map at `depth` whose entries start at `base`: a scan while
    /// the map is small, then a hash index (one per depth, reused), so a map of many keys
    /// costs linear time.
    fn find(&self, base: usize, depth: usize, key: &[u8]) -> Option<usize> {
        let es = &self.entries[base..];
        if es.len() <= LINEAR_KEYS {
            return es.iter().position(|e| e.key == key).map(|j| base + j);
        }
        self.index[depth].get(key).copied()
    }

    /// Index the entry just added, once the map has outgrown the scan.
    fn index_last(&mut self, base: usize, depth: usize) {
        let n = self.entries.len() - base;
        if n <= LINEAR_KEYS {
            return;
        }
        if self.index.len() <= depth {
            self.index.resize_with(depth + 1, HashMap::new);
        }
        let first = if n == LINEAR_KEYS + 1 {
            base
        } else {
            self.entries.len() - 1
        };
        for j in first..self.entries.len() {
            self.index[depth].insert(self.entries[j].key, j);
        }
    }

    /// Rewrite the members of the map whose entries start at `base`: each key once, at its
    /// first position, with its last value.
    fn drop_repeated_keys(&mut self, base: usize) {
        let es = &self.entries[base..];
        let from = es[0].start;
        let body = self.out.split_off(from);
        for (i, e) in es.iter().enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            self.out
                .extend_from_slice(&body[e.start - from..e.key_end - from]);
            self.out
                .extend_from_slice(&body[e.value.start - from..e.value.end - from]);
        }
    }

    /// One value; `depth` = number of containers around it.
    fn value(&mut self, depth: usize) -> Result<()> {
        let Ok(marker) = rmp::decode::read_marker(&mut self.rd) else {
            return Err(err("truncated data"));
        };
        match marker {
            Marker::FixPos(u) => self.uint(u as u64),
            Marker::FixNeg(i) => self.int(i as i64),
            Marker::Null => self.out.extend_from_slice(b"null"),
            Marker::False => self.out.extend_from_slice(b"false"),
            Marker::True => self.out.extend_from_slice(b"true"),
            Marker::U8 => {
                let u = Self::len(self.rd.read_data_u8())?;
                self.uint(u as u64)
            }
            Marker::U16 => {
                let u = Self::len(self.rd.read_data_u16())?;
                self.uint(u as u64)
            }
            Marker::U32 => {
                let u = Self::len(self.rd.read_data_u32())?;
                self.uint(u as u64)
            }
            Marker::U64 => {
                let u = Self::len(self.rd.read_data_u64())?;
                self.uint(u)
            }
            Marker::I8 => {
                let i = Self::len(self.rd.read_data_i8())?;
                self.int(i as i64)
            }
            Marker::I16 => {
                let i = Self::len(self.rd.read_data_i16())?;
                self.int(i as i64)
            }
            Marker::I32 => {
                let i = Self::len(self.rd.read_data_i32())?;
                self.int(i as i64)
            }
            Marker::I64 => {
                let i = Self::len(self.rd.read_data_i64())?;
                self.int(i)
            }
            Marker::F32 => {
                let f = Self::len(self.rd.read_data_f32())?;
                return self.float(f as f64);
            }
            Marker::F64 => {
                let f = Self::len(self.rd.read_data_f64())?;
                return self.float(f);
            }
            Marker::FixStr(n) => {
                let s = self.str_body(n as usize)?;
                json::write_str(&mut self.out, s);
            }
            Marker::Str8 | Marker::Str16 | Marker::Str32 => {
                let n = match marker {
                    Marker::Str8 => Self::len(self.rd.read_data_u8())? as usize,
                    Marker::Str16 => Self::len(self.rd.read_data_u16())? as usize,
                    _ => Self::len(self.rd.read_data_u32())? as usize,
                };
                let s = self.str_body(n)?;
                json::write_str(&mut self.out, s);
            }
            Marker::FixArray(n) => return self.array(n as u32, depth),
            Marker::Array16 => {
                let n = Self::len(self.rd.read_data_u16())?;
                return self.array(n as u32, depth);
            }
            Marker::Array32 => {
                let n = Self::len(self.rd.read_data_u32())?;
                return self.array(n, depth);
            }
            Marker::FixMap(n) => return self.map(n as u32, depth),
            Marker::Map16 => {
                let n = Self::len(self.rd.read_data_u16())?;
                return self.map(n as u32, depth);
            }
            Marker::Map32 => {
                let n = Self::len(self.rd.read_data_u32())?;
                return self.map(n, depth);
            }
            Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => {
                return Err(err("binary data has no JSON form"))
            }
            Marker::Ext8
            | Marker::Ext16
            | Marker::Ext32
            | Marker::FixExt1
            | Marker::FixExt2
            | Marker::FixExt4
            | Marker::FixExt8
            | Marker::FixExt16 => return Err(err("extension types have no JSON form")),
            Marker::Reserved => return Err(err("invalid data (reserved marker 0xc1)")),
        }
        Ok(())
    }
}

/// Decode one MessagePack document into a JSON value.
pub fn from_msgpack(data: &[u8]) -> Result<Value> {
    let mut r = Reader { buf: data, pos: 0 };
    let v = r.value(0)?;
    if r.pos != data.len() {
        return Err(err("trailing bytes after the document"));
    }
    Ok(v)
}

fn err(msg: &str) -> DeltaError {
    DeltaError::new(format!("MessagePack: {msg}"))
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(err("truncated data"));
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn be<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn len16(&mut self) -> Result<usize> {
        Ok(u16::from_be_bytes(self.be()?) as usize)
    }
    fn len32(&mut self) -> Result<usize> {
        Ok(u32::from_be_bytes(self.be()?) as usize)
    }

    fn str_body(&mut self, n: usize) -> Result<String> {
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| err("invalid UTF-8 in a string"))
    }

    fn float(f: f64) -> Result<Value> {
        Number::from_f64(f)
            .map(Value::Number)
            .ok_or_else(|| err("NaN and infinities have no JSON form"))
    }

    fn key(&mut self) -> Result<String> {
        let m = self.u8()?;
        let n = match m {
            0xa0..=0xbf => (m & 0x1f) as usize,
            0xd9 => self.u8()? as usize,
            0xda => self.len16()?,
            0xdb => self.len32()?,
            _ => return Err(err("map keys must be strings")),
        };
        self.str_body(n)
    }

    fn array(&mut self, n: usize, depth: usize) -> Result<Value> {
        if depth + 1 > MAX_DEPTH {
            return Err(err(&format!("nested deeper than {MAX_DEPTH} levels")));
        }
        let mut a = Vec::with_capacity(n.min(self.buf.len() - self.pos));
        for _ in 0..n {
            a.push(self.value(depth + 1)?);
        }
        Ok(Value::Array(a))
    }

    fn map(&mut self, n: usize, depth: usize) -> Result<Value> {
        if depth + 1 > MAX_DEPTH {
            return Err(err(&format!("nested deeper than {MAX_DEPTH} levels")));
        }
        let mut m = Map::with_capacity(n.min((self.buf.len() - self.pos) / 2));
        for _ in 0..n {
            let k = self.key()?;
            let v = self.value(depth + 1)?;
            m.insert(k, v);
        }
        Ok(Value::Object(m))
    }

    /// One value; `depth` = number of containers around it.
    fn value(&mut self, depth: usize) -> Result<Value> {
        let m = self.u8()?;
        Ok(match m {
            0x00..=0x7f => Value::from(m as u64),
            0x80..=0x8f => return self.map((m & 0x0f) as usize, depth),
            0x90..=0x9f => return self.array((m & 0x0f) as usize, depth),
            0xa0..=0xbf => Value::String(self.str_body((m & 0x1f) as usize)?),
            0xc0 => Value::Null,
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xca => return Self::float(f32::from_be_bytes(self.be()?) as f64),
            0xcb => return Self::float(f64::from_be_bytes(self.be()?)),
            0xcc => Value::from(self.u8()? as u64),
            0xcd => Value::from(u16::from_be_bytes(self.be()?) as u64),
            0xce => Value::from(u32::from_be_bytes(self.be()?) as u64),
            0xcf => Value::from(u64::from_be_bytes(self.be()?)),
            0xd0 => Value::from(i8::from_be_bytes(self.be()?) as i64),
            0xd1 => Value::from(i16::from_be_bytes(self.be()?) as i64),
            0xd2 => Value::from(i32::from_be_bytes(self.be()?) as i64),
            0xd3 => Value::from(i64::from_be_bytes(self.be()?)),
            0xd9 => {
                let n = self.u8()? as usize;
                Value::String(self.str_body(n)?)
            }
            0xda => {
                let n = self.len16()?;
                Value::String(self.str_body(n)?)
            }
            0xdb => {
                let n = self.len32()?;
                Value::String(self.str_body(n)?)
            }
            0xdc => {
                let n = self.len16()?;
                return self.array(n, depth);
            }
            0xdd => {
                let n = self.len32()?;
                return self.array(n, depth);
            }
            0xde => {
                let n = self.len16()?;
                return self.map(n, depth);
            }
            0xdf => {
                let n = self.len32()?;
                return self.map(n, depth);
            }
            0xe0..=0xff => Value::from(m as i8 as i64),
            0xc4..=0xc6 => return Err(err("binary data has no JSON form")),
            0xc7..=0xc9 | 0xd4..=0xd8 => return Err(err("extension types have no JSON form")),
            _ => return Err(err("invalid data (reserved marker 0xc1)")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt(j: &str) {
        let mp = json_to_msgpack(j.as_bytes()).unwrap();
        assert_eq!(
            String::from_utf8(msgpack_to_json(&mp, 0).unwrap()).unwrap(),
            j
        );
    }

    #[test]
    fn round_trips() {
        rt(
            r#"{"b":1,"a":[null,true,false,-1,-33,-129,-32769,-2147483649,127,128,256,65536,4294967296,18446744073709551615,1.5,-0.0,1e+100,"x"]}"#,
        );
        rt(&format!(
            "[\"{}\",\"{}\",\"{}\"]",
            "s".repeat(31),
            "s".repeat(300),
            "s".repeat(70000)
        ));
        let big: Vec<String> = (0..70000).map(|i| i.to_string()).collect();
        rt(&format!("[{}]", big.join(",")));
        rt(&("[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH)));
    }

    #[test]
    fn exact_bytes() {
        // msgpack.packb({"a": [1, -1, 200, -200, 1.5, None, True]}, use_bin_type=True)
        assert_eq!(
            json_to_msgpack(br#"{"a":[1,-1,200,-200,1.5,null,true]}"#).unwrap(),
            b"\x81\xa1a\x97\x01\xff\xcc\xc8\xd1\xff8\xcb?\xf8\x00\x00\x00\x00\x00\x00\xc0\xc3"
        );
    }

    #[test]
    fn refusals() {
        assert!(msgpack_to_json(b"", 0).is_err());
        assert!(msgpack_to_json(b"\x81\x01\x02", 0).is_err()); // int key
        assert!(msgpack_to_json(b"\xc4\x01x", 0).is_err()); // bin
        assert!(msgpack_to_json(b"\xd4\x01\x00", 0).is_err()); // fixext
        assert!(msgpack_to_json(b"\xc1", 0).is_err());
        assert!(msgpack_to_json(b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00", 0).is_err()); // NaN
        assert!(msgpack_to_json(b"\xa2\xff\xfe", 0).is_err()); // bad UTF-8
        assert!(msgpack_to_json(b"\x01\x02", 0).is_err()); // trailing
        assert!(msgpack_to_json(b"\xdd\xff\xff\xff\xff", 0).is_err()); // huge, truncated
        assert!(msgpack_to_json(&vec![0x91u8; 100_000], 0).is_err()); // deep
        assert!(msgpack_to_json(&[vec![0x91u8; MAX_DEPTH + 1], vec![0x90]].concat(), 0).is_err());
        assert!(msgpack_to_json(&[vec![0x91u8; MAX_DEPTH - 1], vec![0x90]].concat(), 0).is_ok());
        assert_eq!(msgpack_to_json(b"\xca\x3f\xc0\x00\x00", 0).unwrap(), b"1.5");
    }

    /// The reference: the `Value` path this transcoder replaces.
    fn via_value(data: &[u8]) -> Result<Vec<u8>> {
        Ok(json::to_vec(&from_msgpack(data)?))
    }

    #[test]
    fn container_cap() {
        let arrays = |n: u32| {
            let mut v = vec![0xdd];
            v.extend_from_slice(&n.to_be_bytes());
            v.extend(std::iter::repeat_n(0x90u8, n as usize));
            v
        };
        // n inner arrays + the outer one.
        assert_eq!(
            msgpack_to_json(&arrays(9), 10).unwrap().len(),
            2 + 9 * 3 - 1
        );
        let e = msgpack_to_json(&arrays(10), 10).unwrap_err();
        assert_eq!(
            e.to_string(),
            "MessagePack: a document may hold at most 10 arrays and objects"
        );
        // Maps count too; scalars do not.
        assert!(msgpack_to_json(b"\x92\x80\x80", 3).is_ok());
        assert!(msgpack_to_json(b"\x92\x80\x80", 2).is_err());
        assert!(msgpack_to_json(b"\x92\x01\xa1x", 1).is_ok());
        // The counted form: an exact budget (0: no container at all) and the count.
        assert_eq!(
            msgpack_to_json_counted(b"\x92\x80\x80", 3).unwrap(),
            (b"[{},{}]".to_vec(), 3)
        );
        assert!(msgpack_to_json_counted(b"\x92\x80\x80", 2).is_err());
        assert_eq!(
            msgpack_to_json_counted(b"\x01", 0).unwrap(),
            (b"1".to_vec(), 0)
        );
        assert!(msgpack_to_json_counted(b"\x90", 0).is_err());
        // It stops at once: a million arrays with the count past the cap early, then a
        // truncation that would be another error if it read on.
        let mut big = arrays(1_000_000);
        big.truncate(big.len() - 1);
        assert!(msgpack_to_json(&big, 100_000)
            .unwrap_err()
            .to_string()
            .contains("at most 100000 arrays and objects"));
        assert_eq!(
            msgpack_to_json(&big, 0).unwrap_err().to_string(),
            "MessagePack: truncated data"
        );
    }

    #[test]
    fn repeated_keys_keep_first_position_last_value() {
        // {"a":1,"b":{"x":1,"x":[2]},"a":{"c":3},"d":null,"b":4}
        let data =
            b"\x85\xa1a\x01\xa1b\x82\xa1x\x01\xa1x\x91\x02\xa1a\x81\xa1c\x03\xa1d\xc0\xa1b\x04";
        assert_eq!(
            std::str::from_utf8(&msgpack_to_json(data, 0).unwrap()).unwrap(),
            r#"{"a":{"c":3},"b":4,"d":null}"#
        );
        assert_eq!(msgpack_to_json(data, 0).unwrap(), via_value(data).unwrap());
        assert_eq!(
            msgpack_to_json(b"\x83\xa1k\x01\xa1k\x02\xa1k\x03", 0).unwrap(),
            br#"{"k":3}"#
        );
    }

    #[test]
    fn repeated_keys_in_large_maps() {
        // 3,000 members over 700 keys (so past the scan, into the hash index), with a nested
        // map that repeats keys of its own and a key repeated right after the scan's end.
        let mut data = Vec::new();
        let _ = rmp::encode::write_map_len(&mut data, 3_002);
        for i in 0..3_000u32 {
            let _ = rmp::encode::write_str(&mut data, &format!("k{}", i % 700));
            if i % 500 == 0 {
                let _ = rmp::encode::write_map_len(&mut data, 20);
                for j in 0..20u32 {
                    let _ = rmp::encode::write_str(&mut data, &format!("n{}", j % 11));
                    let _ = rmp::encode::write_uint(&mut data, (i + j) as u64);
                }
            } else {
                let _ = rmp::encode::write_uint(&mut data, i as u64);
            }
        }
        for k in ["k0", "k9"] {
            let _ = rmp::encode::write_str(&mut data, k);
            let _ = rmp::encode::write_nil(&mut data);
        }
        let out = msgpack_to_json(&data, 0).unwrap();
        assert_eq!(out, via_value(&data).unwrap());
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v.as_object().unwrap().len(), 700);
        assert_eq!(v["k0"], Value::Null);
        assert_eq!(v["k7"], serde_json::json!(2_807));
    }

    /// xorshift64*: a small deterministic generator for the agreement test.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn gen_str(r: &mut Rng, out: &mut Vec<u8>, key: bool) {
        const PIECES: [&str; 12] = [
            "a", "b", "k", "\"", "\\", "\n", "\u{1}", "\u{1f}", "\u{7f}", "é", "𝄞", "\u{2028}",
        ];
        let n = r.below(if key { 3 } else { 6 });
        let s: String = (0..n)
            .map(|_| PIECES[r.below(PIECES.len() as u64) as usize])
            .collect();
        // Sometimes a wider length format than needed (valid MessagePack all the same).
        match r.below(8) {
            0 => {
                out.push(0xd9);
                out.push(s.len() as u8);
            }
            1 => {
                out.push(0xda);
                out.extend_from_slice(&(s.len() as u16).to_be_bytes());
            }
            2 => {
                out.push(0xdb);
                out.extend_from_slice(&(s.len() as u32).to_be_bytes());
            }
            _ => {
                let _ = rmp::encode::write_str_len(out, s.len() as u32);
            }
        }
        out.extend_from_slice(s.as_bytes());
    }

    fn gen_value(r: &mut Rng, out: &mut Vec<u8>, depth: usize) {
        let kinds = if depth >= 6 { 8 } else { 11 };
        match r.below(kinds) {
            0 => out.push([0xc0, 0xc2, 0xc3][r.below(3) as usize]),
            1 => {
                let u = match r.below(4) {
                    0 => r.below(128),
                    1 => r.below(70_000),
                    2 => r.next() >> r.below(64),
                    _ => u64::MAX - r.below(3),
                };
                // Any unsigned format that holds it, not only the smallest.
                match r.below(3) {
                    0 => {
                        let _ = rmp::encode::write_uint(out, u);
                    }
                    1 => {
                        let _ = rmp::encode::write_u64(out, u);
                    }
                    _ => {
                        let _ = rmp::encode::write_i64(out, u as i64);
                    }
                }
            }
            2 => {
                let i = -((r.next() >> r.below(64)) as i64) - r.below(2) as i64;
                match r.below(2) {
                    0 => {
                        let _ = rmp::encode::write_sint(out, i);
                    }
                    _ => {
                        let _ = rmp::encode::write_i64(out, i);
                    }
                }
            }
            3 => {
                let f = match r.below(6) {
                    0 => f64::from_bits(r.next()),
                    1 => (r.below(2_000_000) as f64 - 1e6) / 8.0,
                    2 => 10f64.powi(r.below(40) as i32 - 20),
                    3 => -0.0,
                    4 => 1e16 - r.below(3) as f64,
                    _ => (r.next() as f64) * 1e-300,
                };
                let _ = rmp::encode::write_f64(out, f);
            }
            4 => {
                let _ = rmp::encode::write_f32(out, f32::from_bits(r.next() as u32));
            }
            5..=7 => gen_str(r, out, false),
            8 | 9 => {
                let n = r.below(5) as u32;
                let _ = rmp::encode::write_array_len(out, n);
                for _ in 0..n {
                    gen_value(r, out, depth + 1);
                }
            }
            _ => {
                // Past LINEAR_KEYS sometimes, so that the hash index is exercised too.
                let n = if r.below(4) == 0 {
                    r.below(24)
                } else {
                    r.below(6)
                } as u32;
                let _ = rmp::encode::write_map_len(out, n);
                for _ in 0..n {
                    gen_str(r, out, true);
                    gen_value(r, out, depth + 1);
                }
            }
        }
    }

    #[test]
    fn agrees_with_the_value_path() {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut ok, mut failed) = (0, 0);
        for _ in 0..40_000 {
            let mut data = Vec::new();
            gen_value(&mut r, &mut data, 0);
            // Some inputs damaged: a byte changed, the end cut, a byte added.
            match r.below(6) {
                0 if !data.is_empty() => {
                    let i = r.below(data.len() as u64) as usize;
                    data[i] = r.next() as u8;
                }
                1 => {
                    let keep = r.below(data.len() as u64 + 1) as usize;
                    data.truncate(keep);
                }
                2 => data.push(r.next() as u8),
                _ => {}
            }
            let new = msgpack_to_json(&data, 0);
            let old = via_value(&data);
            assert_eq!(new, old, "input {data:02x?}");
            if new.is_ok() {
                ok += 1;
            } else {
                failed += 1;
            }
        }
        // Both outcomes were exercised in earnest.
        assert!(ok > 20_000 && failed > 3_000, "ok {ok}, failed {failed}");
    }
}
