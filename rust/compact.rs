//! `compact(state, ds, max_bytes, max_memory)`: apply deltas in order; a delta that is malformed or
//! fails at its position is a no-op (docs/protocol.md), under the work budget and size
//! limit of a room (see `crate::apply`), so a room loaded from snapshot + ops has the state
//! every relay computed. The state is parsed once and patched in place; each patch is
//! atomic through the undo log, so a failure costs nothing like a state copy.

use crate::apply::{self, Limits, Size};
use crate::delta::{self, Delta};
use crate::error::Result;
use crate::json;
use serde_json::Value;

/// Apply one delta in place, atomically, under its work budget and `max_bytes` /
/// `max_memory` (0: no limit) from a document of `size` (updated); false when it failed
/// (unchanged).
pub fn apply_or_skip(
    doc: &mut Value,
    size: &mut Size,
    d: &[u8],
    max_bytes: u64,
    max_memory: u64,
) -> bool {
    match delta::parse_delta(d) {
        Ok(delta) => {
            let lim = Limits::for_delta(d.len(), max_bytes).with_memory(max_memory);
            apply::apply_delta_limited(doc, size, &delta, lim).is_ok()
        }
        Err(_) => false,
    }
}

/// Apply already parsed deltas in order without limits, skipping failures; the number that
/// applied.
pub fn compact_value(doc: &mut Value, ds: &[Delta]) -> usize {
    ds.iter()
        .filter(|d| apply::apply_delta(doc, d).is_ok())
        .count()
}

/// `compact(state, ds, max_bytes, max_memory)`: the same rules as a room applying `ds`
/// one by one.
pub fn compact_bytes<B: AsRef<[u8]>>(
    state: &[u8],
    ds: &[B],
    max_bytes: u64,
    max_memory: u64,
) -> Result<Vec<u8>> {
    let mut doc = json::parse(state).map_err(|e| e.context("state"))?;
    let mut size = Size::of(&doc);
    for d in ds {
        apply_or_skip(&mut doc, &mut size, d.as_ref(), max_bytes, max_memory);
    }
    Ok(json::to_vec(&doc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_no_ops() {
        let ds: Vec<&[u8]> = vec![
            br#"{"patch":[{"op":"add","path":"/a","value":1}]}"#,
            br#"{"patch":[{"op":"add","path":"/b","value":1},{"op":"remove","path":"/zz"}]}"#,
            b"not json",
            br#"{"merge":{"c":{"d":1}}}"#,
            br#"{"patch":[{"op":"test","path":"/a","value":2}]}"#,
            br#"{"patch":[{"op":"replace","path":"/a","value":2}],"seq":9}"#,
            br#"{"nothing":1}"#,
        ];
        assert_eq!(
            compact_bytes(br#"{"z":0}"#, &ds, 0, 0).unwrap(),
            br#"{"z":0,"a":2,"c":{"d":1}}"#
        );
        assert!(compact_bytes(b"[", &ds, 0, 0).is_err());
        let parsed: Vec<Delta> = ds
            .iter()
            .filter_map(|d| apply::parse_delta(d).ok())
            .collect();
        let mut doc = json::parse(br#"{"z":0}"#).unwrap();
        assert_eq!(compact_value(&mut doc, &parsed), 3);
    }

    #[test]
    fn limits_as_in_a_room() {
        let copy = br#"{"patch":[{"op":"copy","from":"","path":"/k"}]}"#.as_slice();
        let grow = br#"{"merge":{"big":"0123456789012345678901234567890123456789"}}"#.as_slice();
        assert_eq!(
            compact_bytes(br#"{"a":1}"#, &[grow, copy], 40, 0).unwrap(),
            br#"{"a":1,"k":{"a":1}}"#
        );
        assert_eq!(
            compact_bytes(br#"{"a":1}"#, &[grow], 0, 0).unwrap().len(),
            56
        );
        // Too much work is a no-op whatever the limit.
        let head = br#"{"patch":[{"op":"add","path":"/a/0","value":1}]}"#.as_slice();
        let big = format!("{{\"a\":[{}0]}}", "0,".repeat(40_000));
        let out = compact_bytes(big.as_bytes(), &[head], 0, 0).unwrap();
        assert_eq!(out, big.as_bytes());
    }
}
