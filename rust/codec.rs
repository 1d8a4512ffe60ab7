//! MessagePack <-> JSON, for the `kasagi.v1.msgpack` subprotocol and the state snapshots.
//!
//! Encoding matches Python's `msgpack.packb(value, use_bin_type=True)` byte for byte: the
//! smallest integer format (unsigned formats for non-negative integers), floats as float64,
//! strings as str (fixstr/str8/16/32), maps in key order. Decoding accepts what has a JSON
//! form: nil, booleans, integers, floats (float32 widened, NaN/infinities refused), strings
//! (valid UTF-8), arrays, maps with string keys; nesting at most MAX_DEPTH; one value with
//! no trailing bytes. Binary and extension types are refused.

use crate::error::{DeltaError, Result};
use crate::json::{self, MAX_DEPTH};
use serde_json::{Map, Number, Value};

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

pub fn msgpack_to_json(data: &[u8]) -> Result<Vec<u8>> {
    Ok(json::to_vec(&from_msgpack(data)?))
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
        assert_eq!(String::from_utf8(msgpack_to_json(&mp).unwrap()).unwrap(), j);
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
        assert!(msgpack_to_json(b"").is_err());
        assert!(msgpack_to_json(b"\x81\x01\x02").is_err()); // int key
        assert!(msgpack_to_json(b"\xc4\x01x").is_err()); // bin
        assert!(msgpack_to_json(b"\xd4\x01\x00").is_err()); // fixext
        assert!(msgpack_to_json(b"\xc1").is_err());
        assert!(msgpack_to_json(b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00").is_err()); // NaN
        assert!(msgpack_to_json(b"\xa2\xff\xfe").is_err()); // bad UTF-8
        assert!(msgpack_to_json(b"\x01\x02").is_err()); // trailing
        assert!(msgpack_to_json(b"\xdd\xff\xff\xff\xff").is_err()); // huge, truncated
        assert!(msgpack_to_json(&vec![0x91u8; 100_000]).is_err()); // deep
        assert!(msgpack_to_json(&[vec![0x91u8; MAX_DEPTH + 1], vec![0x90]].concat()).is_err());
        assert!(msgpack_to_json(&[vec![0x91u8; MAX_DEPTH - 1], vec![0x90]].concat()).is_ok());
        assert_eq!(msgpack_to_json(b"\xca\x3f\xc0\x00\x00").unwrap(), b"1.5");
    }
}
