//! One room's state held natively (the core of the Python `RoomState`): parsed once,
//! patched in place in time proportional to the delta, never copied whole to check or roll
//! back a delta (the undo log of [`crate::apply`] restores it exactly). The binding caches
//! the encoded snapshots; `version` tells it when they are stale.

use crate::apply::{self, Limits, Size};
use crate::delta::{self, Delta, Op};
use crate::error::{DeltaError, Result};
use crate::json;
use crate::merge;
use crate::pointer::Pointer;
use serde_json::Value;

#[derive(Debug, Clone)]
pub struct Room {
    doc: Value,
    seq: u64,
    version: u64,
    /// len(to_json()) and the structure part of the memory estimate, kept exact by every
    /// change (see `crate::apply`, size accounting).
    size: Size,
    /// 0: no limit; else deltas that would take the state past it fail as TooLarge.
    max_bytes: u64,
    /// The same for the memory estimate ([`Size::memory`]).
    max_memory: u64,
    /// The seqs of the last `apply_batch` that failed at their position (no-ops), so the
    /// relay can replay them as empty patches.
    failed: Vec<u64>,
}

/// Misuse of the room API (a seq that does not fit): `ValueError` in Python.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqError(pub String);

impl Room {
    pub fn new(state: &[u8], seq: u64) -> Result<Room> {
        Room::with_max_bytes(state, seq, 0)
    }

    /// A room whose deltas may not take the state past `max_bytes` (0: no limit). A state
    /// already past it loads (and may shrink).
    pub fn with_max_bytes(state: &[u8], seq: u64, max_bytes: u64) -> Result<Room> {
        Room::with_limits(state, seq, max_bytes, 0)
    }

    /// A room under both limits (0: none); a state already past either loads (and may
    /// shrink).
    pub fn with_limits(state: &[u8], seq: u64, max_bytes: u64, max_memory: u64) -> Result<Room> {
        let doc = json::parse(state).map_err(|e| e.context("state"))?;
        let mut room = Room::from_value(doc, seq);
        room.max_bytes = max_bytes;
        room.max_memory = max_memory;
        Ok(room)
    }

    pub fn from_value(doc: Value, seq: u64) -> Room {
        Room {
            size: Size::of(&doc),
            doc,
            seq,
            version: 0,
            max_bytes: 0,
            max_memory: 0,
            failed: Vec::new(),
        }
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Changes whenever the state may have changed.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn value(&self) -> &Value {
        &self.doc
    }

    /// `to_json().len()`, O(1).
    pub fn size(&self) -> u64 {
        self.size.json
    }

    /// The memory estimate of the state ([`Size::memory`]), O(1).
    pub fn memory(&self) -> u64 {
        self.size.memory()
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    pub fn max_memory(&self) -> u64 {
        self.max_memory
    }

    fn limits(&self, delta_len: usize) -> Limits {
        Limits::for_delta(delta_len, self.max_bytes).with_memory(self.max_memory)
    }

    /// Err when `d` is malformed, would fail now, needs too much work, or would take the
    /// state past `max_bytes` (TooLarge). Changes nothing (a patch is applied with the undo
    /// log, then rolled back).
    pub fn check(&mut self, d: &[u8]) -> Result<()> {
        let delta = delta::parse_delta(d)?;
        let lim = self.limits(d.len());
        apply::check_delta(&mut self.doc, self.size, &delta, lim)
    }

    fn advance(&mut self, seq: u64) -> std::result::Result<(), SeqError> {
        if seq <= self.seq {
            return Err(SeqError(format!(
                "seq {seq} is not after the room's seq {}",
                self.seq
            )));
        }
        Ok(())
    }

    /// Apply `d` as delta number `seq`; Ok(false) when it was malformed or failed (a no-op;
    /// the seq advances all the same). Failing includes too much work and TooLarge.
    pub fn apply(&mut self, d: &[u8], seq: u64) -> std::result::Result<bool, SeqError> {
        self.apply_parsed(delta::parse_delta(d).ok().as_ref(), d.len(), seq)
    }

    /// `apply` of an already parsed delta of `len` bytes (None: it was malformed).
    pub fn apply_parsed(
        &mut self,
        delta: Option<&Delta>,
        len: usize,
        seq: u64,
    ) -> std::result::Result<bool, SeqError> {
        self.advance(seq)?;
        self.seq = seq;
        let Some(delta) = delta else {
            return Ok(false);
        };
        let lim = self.limits(len);
        if apply::apply_delta_limited(&mut self.doc, &mut self.size, delta, lim).is_err() {
            return Ok(false);
        }
        self.version += 1;
        Ok(true)
    }

    /// `apply_parsed` if its work is bounded by the size of the delta whatever the size of
    /// the state ([`apply::apply_patch_bounded`]; merge patches are not tried: they may
    /// drop large values); None, with nothing changed, otherwise.
    pub fn apply_bounded(
        &mut self,
        delta: Option<&Delta>,
        len: usize,
        seq: u64,
    ) -> Option<std::result::Result<bool, SeqError>> {
        if let Err(e) = self.advance(seq) {
            return Some(Err(e));
        }
        let lim = self.limits(len);
        let applied = match delta {
            None => false,
            Some(Delta::Merge(_)) => return None,
            Some(Delta::Patch(ops)) => {
                match apply::apply_patch_bounded(&mut self.doc, &mut self.size, ops, lim) {
                    Ok(r) => r.is_ok(),
                    Err(apply::Unbounded) => return None,
                }
            }
        };
        self.seq = seq;
        if applied {
            self.version += 1;
        }
        Some(Ok(applied))
    }

    /// The seqs among the last `apply_batch`'s deltas that failed (no-ops), in order.
    pub fn failed(&self) -> &[u64] {
        &self.failed
    }

    /// Apply the deltas self.seq+1 ..= seq (failures are no-ops, as in `apply`) and return
    /// one delta taking the previous state to the new one: the fold of the deltas that
    /// applied (as `merge`), or when that does not exist, the collapsed concrete ops (merge
    /// patches turned into add/remove/replace against the state they applied to).
    pub fn apply_batch<B: AsRef<[u8]>>(
        &mut self,
        ds: &[B],
        seq: u64,
    ) -> std::result::Result<Vec<u8>, SeqError> {
        if seq < self.seq || (ds.len() as u64) != seq - self.seq {
            return Err(SeqError(format!(
                "{} deltas cannot take seq {} to {seq}",
                ds.len(),
                self.seq
            )));
        }
        let mut applied: Vec<Delta> = Vec::new();
        let mut concrete: Vec<Op> = Vec::new();
        self.failed.clear();
        for (at, d) in (self.seq + 1..).zip(ds) {
            let d = d.as_ref();
            let Ok(delta) = delta::parse_delta(d) else {
                self.failed.push(at);
                continue;
            };
            let lim = self.limits(d.len());
            match &delta {
                Delta::Merge(p) => {
                    let mut ops = Vec::new();
                    merge::merge_to_ops(&self.doc, p, &Pointer::root(), &mut ops);
                    if apply::apply_delta_limited(&mut self.doc, &mut self.size, &delta, lim)
                        .is_err()
                    {
                        self.failed.push(at);
                        continue;
                    }
                    concrete.extend(ops);
                }
                Delta::Patch(ops) => {
                    if apply::apply_patch(&mut self.doc, &mut self.size, ops, lim).is_err() {
                        self.failed.push(at);
                        continue;
                    }
                    concrete.extend(ops.iter().cloned());
                }
            }
            applied.push(delta);
        }
        self.seq = seq;
        if applied.is_empty() {
            return Ok(b"{\"patch\":[]}".to_vec());
        }
        self.version += 1;
        Ok(match merge::fold(applied) {
            Ok(d) => merge::delta_bytes(d),
            Err(_) => merge::delta_bytes(Delta::Patch(concrete)),
        })
    }

    pub fn to_json(&self) -> Vec<u8> {
        json::to_vec(&self.doc)
    }

    pub fn to_msgpack(&self) -> Vec<u8> {
        crate::codec::to_msgpack(&self.doc)
    }
}

impl From<SeqError> for DeltaError {
    fn from(e: SeqError) -> Self {
        DeltaError::new(e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn room(s: &str) -> Room {
        Room::new(s.as_bytes(), 0).unwrap()
    }

    #[test]
    fn apply_and_seq() {
        let mut r = room(r#"{"a":1}"#);
        assert_eq!(
            r.apply(br#"{"patch":[{"op":"replace","path":"/a","value":2}]}"#, 1),
            Ok(true)
        );
        assert_eq!(
            r.apply(br#"{"patch":[{"op":"remove","path":"/zz"}]}"#, 2),
            Ok(false)
        );
        assert_eq!(r.apply(b"junk", 3), Ok(false));
        assert!(r.apply(b"{}", 3).is_err());
        assert_eq!(r.seq(), 3);
        assert_eq!(r.to_json(), br#"{"a":2}"#);
        assert_eq!(r.version(), 1);
    }

    #[test]
    fn check_changes_nothing() {
        let mut r = room(r#"{"a":1,"b":[1,2],"c":{"d":1}}"#);
        let before = r.to_json();
        r.check(br#"{"patch":[{"op":"remove","path":"/a"},{"op":"add","path":"/b/0","value":0},{"op":"move","from":"/c","path":"/e"}]}"#).unwrap();
        assert_eq!(r.to_json(), before);
        assert!(r
            .check(br#"{"patch":[{"op":"remove","path":"/a"},{"op":"remove","path":"/a"}]}"#)
            .is_err());
        assert_eq!(r.to_json(), before);
        assert!(r.check(b"{").is_err());
        r.check(br#"{"merge":{"a":null}}"#).unwrap();
        assert_eq!(r.to_json(), before);
        assert_eq!(r.version(), 0);
    }

    #[test]
    fn batch() {
        let mut r = room(r#"{"a":1,"b":{"x":1}}"#);
        let out = r
            .apply_batch(
                &[
                    br#"{"merge":{"a":null}}"#.as_slice(),
                    br#"{"patch":[{"op":"add","path":"/c","value":1}]}"#,
                    br#"{"patch":[{"op":"remove","path":"/nope"}]}"#,
                    br#"{"merge":{"b":{"x":null,"y":2},"zz":null}}"#,
                ],
                4,
            )
            .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"patch":[{"op":"remove","path":"/a"},{"op":"add","path":"/c","value":1},{"op":"remove","path":"/b/x"},{"op":"add","path":"/b/y","value":2}]}"#
        );
        assert_eq!(r.to_json(), br#"{"b":{"y":2},"c":1}"#);
        assert_eq!(r.failed(), &[3]);
        let out = r
            .apply_batch(
                &[
                    br#"{"merge":{"q":1}}"#.as_slice(),
                    br#"{"merge":{"q":null}}"#,
                ],
                6,
            )
            .unwrap();
        assert_eq!(out, br#"{"merge":{"q":null}}"#);
        assert!(r.failed().is_empty());
        assert!(r.apply_batch(&[b"{}".as_slice()], 8).is_err());
        assert_eq!(r.apply_batch::<&[u8]>(&[], 6).unwrap(), br#"{"patch":[]}"#);
    }

    #[test]
    fn max_bytes_in_check_apply_and_batch() {
        let mut r = Room::with_max_bytes(br#"{"s":"xxxxxxxxxx"}"#, 0, 40).unwrap();
        assert_eq!(r.size(), 18);
        let copy =
            |to: &str| format!(r#"{{"patch":[{{"op":"copy","from":"/s","path":"/{to}"}}]}}"#);
        // +17 bytes: 35
        assert_eq!(r.apply(copy("a").as_bytes(), 1), Ok(true));
        assert_eq!(r.size(), 35);
        assert!(r.check(copy("b").as_bytes()).unwrap_err().is_too_large());
        assert_eq!(r.apply(copy("b").as_bytes(), 2), Ok(false));
        assert!(r
            .check(br#"{"merge":{"b":"0123456789"}}"#)
            .unwrap_err()
            .is_too_large());
        r.check(br#"{"merge":{"a":null,"b":"0123456789"}}"#)
            .unwrap();
        let out = r
            .apply_batch(
                &[
                    br#"{"merge":{"b":"0123456789"}}"#.as_slice(),
                    br#"{"merge":{"a":null}}"#,
                    copy("c").as_bytes(),
                ],
                5,
            )
            .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"patch":[{"op":"remove","path":"/a"},{"op":"copy","from":"/s","path":"/c"}]}"#
        );
        assert_eq!(r.to_json(), br#"{"s":"xxxxxxxxxx","c":"xxxxxxxxxx"}"#);
        assert_eq!(r.size(), r.to_json().len() as u64);
    }

    #[test]
    fn max_memory_in_check_apply_and_batch() {
        let one = json::NODE_BYTES + json::MEMBER_BYTES;
        let mut r = Room::with_limits(b"{}", 0, 0, json::NODE_BYTES + 2 + 2 * (one + 6)).unwrap();
        assert_eq!(r.memory(), json::NODE_BYTES + 2);
        let add = |k: &str| format!(r#"{{"patch":[{{"op":"add","path":"/{k}","value":1}}]}}"#);
        // {"a":1}: 7 bytes, one member.
        assert_eq!(r.apply(add("a").as_bytes(), 1), Ok(true));
        assert_eq!(r.memory(), json::NODE_BYTES + 7 + one);
        assert_eq!(r.apply(add("b").as_bytes(), 2), Ok(true));
        assert!(r.check(add("c").as_bytes()).unwrap_err().is_too_large());
        assert_eq!(r.apply(add("c").as_bytes(), 3), Ok(false));
        assert!(r.check(br#"{"merge":{"c":1}}"#).unwrap_err().is_too_large());
        r.check(br#"{"merge":{"a":null,"c":1}}"#).unwrap();
        let out = r
            .apply_batch(
                &[
                    br#"{"merge":{"c":1}}"#.as_slice(),
                    br#"{"merge":{"a":null}}"#,
                ],
                5,
            )
            .unwrap();
        assert_eq!(out, br#"{"merge":{"a":null}}"#);
        assert_eq!(r.to_json(), br#"{"b":1}"#);
        let fresh = Room::new(&r.to_json(), 0).unwrap();
        assert_eq!(r.memory(), fresh.memory());
    }
}
