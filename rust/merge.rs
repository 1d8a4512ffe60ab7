//! Merging deltas: one delta with the effect of several, for every state on which they all
//! apply. The rules are those of the pure-Python twin (`_pydelta._fold`, `_compose`,
//! `_collapse`, `_merge_to_ops`), kept identical so that both engines give the same bytes.
//!
//! Folding, left to right (acc starts as the first delta):
//! - merge non-object M after a merge -> merge M; after a patch -> patch + `replace "" M`;
//! - merge object after a merge object -> composed merge (see [`compose`]);
//! - merge object after a merge non-object A -> the state is known exactly:
//!   patch [`replace "" MergePatch(A, M)`];
//! - merge object after a patch -> DeltaError ("cannot be merged into one delta");
//! - patch after a patch -> concatenation; after a merge non-object A ->
//!   [`replace "" A`, ...patch]; after a merge object -> DeltaError.
//!
//! A resulting patch is then collapsed ([`collapse`]).

use crate::apply;
use crate::delta::{self as dm, Delta, Op};
use crate::error::{DeltaError, Result};
use crate::pointer::Pointer;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

fn root_replace(value: Value) -> Op {
    Op::Replace {
        path: Pointer::root(),
        value,
    }
}

/// Compose two merge patch objects into `a` (in place, so folding n patches costs the size
/// of the patches, not n times the accumulated one): for each key of `b`: an object over an
/// object key of `a` composes recursively; an object over a key that `a` sets to a
/// non-object or deletes (null) is an error; anything else (including null) replaces `a`'s
/// member (keeping its position) or is appended. On error `a` is partly composed (callers
/// discard it).
pub fn compose(a: &mut Map<String, Value>, b: Map<String, Value>, path: &str) -> Result<()> {
    for (k, bv) in b {
        match (bv, a.get_mut(k.as_str())) {
            (Value::Object(bm), Some(av)) => {
                let sub = format!("{path}{}", Pointer::root().child(&k).raw);
                let Value::Object(am) = av else {
                    return Err(DeltaError::new(format!(
                        "cannot be merged into one delta: {sub} is set to a non-object or \
                         deleted, then merged into"
                    )));
                };
                compose(am, bm, &sub)?;
            }
            (bv, Some(slot)) => *slot = bv,
            (bv, None) => {
                a.insert(k, bv);
            }
        }
    }
    Ok(())
}

/// Fold parsed deltas into one (see the module doc). Empty input: an empty patch.
pub fn fold(items: Vec<Delta>) -> Result<Delta> {
    // Runs of patches are concatenated: size the first one for all of them at once instead
    // of moving the ops again at every doubling of a growing list.
    let total_ops: usize = items
        .iter()
        .map(|d| match d {
            Delta::Patch(ops) => ops.len(),
            Delta::Merge(_) => 1,
        })
        .sum();
    let mut it = items.into_iter();
    let Some(mut acc) = it.next() else {
        return Ok(Delta::Patch(Vec::new()));
    };
    if let Delta::Patch(a) = &mut acc {
        a.reserve(total_ops.saturating_sub(a.len()));
    }
    for item in it {
        acc =
            match (acc, item) {
                (Delta::Merge(_), Delta::Merge(b)) if !b.is_object() => Delta::Merge(b),
                (Delta::Patch(mut a), Delta::Merge(b)) if !b.is_object() => {
                    a.push(root_replace(b));
                    Delta::Patch(a)
                }
                (Delta::Merge(Value::Object(mut a)), Delta::Merge(Value::Object(b))) => {
                    compose(&mut a, b, "")?;
                    Delta::Merge(Value::Object(a))
                }
                (Delta::Merge(mut a), Delta::Merge(b)) => {
                    // a is not an object: the state is exactly `a`, then b applies to it.
                    apply::merge_apply(&mut a, &b);
                    Delta::Patch(vec![root_replace(a)])
                }
                (Delta::Patch(_), Delta::Merge(_)) => return Err(DeltaError::new(
                    "cannot be merged into one delta: a JSON Merge Patch object after a JSON Patch",
                )),
                (Delta::Patch(mut a), Delta::Patch(b)) => {
                    a.extend(b);
                    Delta::Patch(a)
                }
                (Delta::Merge(a), Delta::Patch(b)) if !a.is_object() => {
                    let mut ops = Vec::with_capacity(b.len() + 1);
                    ops.push(root_replace(a));
                    ops.extend(b);
                    Delta::Patch(ops)
                }
                (Delta::Merge(_), Delta::Patch(_)) => return Err(DeltaError::new(
                    "cannot be merged into one delta: a JSON Patch after a JSON Merge Patch object",
                )),
            };
    }
    Ok(acc)
}

/// `merge(ds)`: parse, fold, collapse, serialise.
pub fn merge_bytes<B: AsRef<[u8]>>(ds: &[B]) -> Result<Vec<u8>> {
    let mut items = Vec::with_capacity(ds.len());
    for (i, d) in ds.iter().enumerate() {
        items.push(dm::parse_delta(d.as_ref()).map_err(|e| e.context(format_args!("delta {i}")))?);
    }
    Ok(delta_bytes(fold(items)?))
}

/// Serialise a folded delta, collapsing a patch first.
pub fn delta_bytes(d: Delta) -> Vec<u8> {
    match d {
        Delta::Merge(v) => dm::merge_delta_json(&v),
        Delta::Patch(ops) => {
            let plan = collapse(&ops);
            dm::patch_delta_json_with(&ops, |i| plan[i])
        }
    }
}

/// `0`, digits without a leading zero, or `-`: a token that addresses an array position.
pub fn index_like(t: &str) -> bool {
    let b = t.as_bytes();
    t == "-"
        || (!b.is_empty() && b.iter().all(u8::is_ascii_digit) && (b.len() == 1 || b[0] != b'0'))
}

/// How [`collapse`] keeps an op.
pub use crate::delta::Write;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Add,
    Remove,
    Replace,
    Other,
}

fn kind(op: &Op) -> Kind {
    match op {
        Op::Add { .. } => Kind::Add,
        Op::Remove { .. } => Kind::Remove,
        Op::Replace { .. } => Kind::Replace,
        _ => Kind::Other,
    }
}

/// Does a write `w` (kind `wk`, pointer `q`) overwrite everything written at `p` by an op of
/// kind `ek`, given that nothing in between relates to `p`?
fn kills(ek: Kind, p: &[String], wk: Kind, q: &[String]) -> bool {
    if !matches!(wk, Kind::Add | Kind::Replace | Kind::Remove) {
        return false;
    }
    if q.len() > p.len() || p[..q.len()] != *q {
        return false;
    }
    let object_add = wk == Kind::Add && q.last().is_none_or(|t| !index_like(t));
    if q.len() < p.len() {
        return wk != Kind::Add || object_add;
    }
    match wk {
        Kind::Replace => true,
        Kind::Add => object_add,
        // remove after add: the path may not have existed before
        _ => ek == Kind::Replace,
    }
}

/// FxHash (rustc's hasher): much cheaper than SipHash for these short keys; no untrusted
/// collision concern matters here (a table lives for one collapse call).
#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(K);
        }
    }
}

/// Numbers for pointer prefixes: equal prefixes (token sequences) get equal ids, the root is
/// 0. Each op's prefixes are numbered once, a token at a time, so the tables of [`collapse`]
/// are plain vectors instead of maps hashing every prefix slice again at each lookup (that
/// hashing was most of the cost of `merge` on long runs of small deltas).
#[derive(Default)]
struct Prefixes<'a> {
    ids: HashMap<(usize, &'a str), usize, BuildHasherDefault<FxHasher>>,
    /// Ids of each interned pointer's prefixes, lengths 0..=len, back to back.
    flat: Vec<usize>,
}

impl<'a> Prefixes<'a> {
    fn with_capacity(n: usize) -> Self {
        Prefixes {
            ids: HashMap::with_capacity_and_hasher(n, Default::default()),
            flat: Vec::with_capacity(n),
        }
    }

    /// Number the prefixes of `toks`; returns where their ids start in `flat`.
    fn intern(&mut self, toks: &'a [String]) -> usize {
        let start = self.flat.len();
        let mut cur = 0;
        self.flat.push(cur);
        for t in toks {
            let fresh = self.ids.len() + 1;
            cur = *self.ids.entry((cur, t.as_str())).or_insert(fresh);
            self.flat.push(cur);
        }
        start
    }

    fn count(&self) -> usize {
        self.ids.len() + 1
    }
}

/// For each prefix id: the earliest kept later op at that pointer / strictly below it /
/// shifting its children (n when none).
struct Tables {
    at: Vec<usize>,
    below: Vec<usize>,
    shifts: Vec<usize>,
}

impl Tables {
    /// Record that kept op `e` touches the pointer whose prefix ids are `ids` (and, when
    /// `shifting`, may shift its siblings).
    fn register(&mut self, ids: &[usize], shifting: bool, e: usize) {
        let len = ids.len() - 1;
        self.at[ids[len]] = e;
        for &id in &ids[..len] {
            self.below[id] = e;
        }
        if shifting {
            self.shifts[ids[len - 1]] = e;
        }
    }
}

/// Drop `test` ops and writes that a later write overwrites.
///
/// An op E = `replace p`, or an `add p` whose last token is not index-like (or p the
/// root), is dropped when the first later kept op that relates to p is a write W that
/// overwrites p: replace/remove of p or an ancestor, or an add of p or an ancestor whose last
/// token is not index-like. A later op relates to p when one of its pointers (path, or from
/// of move/copy) is p, an ancestor or a descendant of p, or it may shift array positions
/// under an ancestor of p (add/remove/move/copy path, or move from, whose last token is
/// index-like and whose parent is a proper ancestor of p). Exceptions that keep it exact on
/// every state where the ops all apply: `add p` then `remove p` is kept (p may not have
/// existed before); `add p` then `replace p` becomes one `add p` with the later value.
/// Object key order of the result may differ from the sequential result.
///
/// Returns, for each op, how it appears in the result ([`Write`]), so that the result is
/// written straight from `ops` (the ops are large; moving them into a new list cost more
/// than the rest of this function).
pub fn collapse(ops: &[Op]) -> Vec<Write> {
    let n = ops.len();
    // Test ops take no part: never kept, never registered.
    let mut kept: Vec<bool> = ops.iter().map(|o| !matches!(o, Op::Test { .. })).collect();
    let mut kinds: Vec<Kind> = ops.iter().map(kind).collect();
    {
        let mut pre = Prefixes::with_capacity(4 * n);
        // Where each op's path (and move/copy from) prefix ids start in `pre.flat`.
        let locs: Vec<(usize, Option<usize>)> = ops
            .iter()
            .map(|o| {
                let p = pre.intern(&o.path().tokens);
                let f = match o {
                    Op::Move { from, .. } | Op::Copy { from, .. } => Some(pre.intern(&from.tokens)),
                    _ => None,
                };
                (p, f)
            })
            .collect();
        let ids_of = |start: usize, len: usize| &pre.flat[start..=start + len];
        let mut t = Tables {
            at: vec![n; pre.count()],
            below: vec![n; pre.count()],
            shifts: vec![n; pre.count()],
        };
        for e in (0..n).rev() {
            if !kept[e] {
                continue;
            }
            let o = &ops[e];
            let p: &[String] = &o.path().tokens;
            let pids = ids_of(locs[e].0, p.len());
            let ek = kinds[e];
            let candidate =
                ek == Kind::Replace || (ek == Kind::Add && p.last().is_none_or(|t| !index_like(t)));
            if candidate {
                let me = pids[p.len()];
                let mut m = t.at[me].min(t.below[me]);
                for &anc in &pids[..p.len()] {
                    m = m.min(t.at[anc]).min(t.shifts[anc]);
                }
                if m < n && kills(ek, p, kinds[m], &ops[m].path().tokens) {
                    kept[e] = false;
                    if ek == Kind::Add
                        && !p.is_empty()
                        && kinds[m] == Kind::Replace
                        && ops[m].path().tokens == p
                    {
                        kinds[m] = Kind::Add;
                    }
                    continue;
                }
            }
            let shifting_kind = matches!(
                o,
                Op::Add { .. } | Op::Remove { .. } | Op::Move { .. } | Op::Copy { .. }
            );
            t.register(
                pids,
                shifting_kind && p.last().is_some_and(|t| index_like(t)),
                e,
            );
            match (o, locs[e].1) {
                (Op::Move { from, .. }, Some(fstart)) => {
                    let f: &[String] = &from.tokens;
                    t.register(
                        ids_of(fstart, f.len()),
                        f.last().is_some_and(|t| index_like(t)),
                        e,
                    );
                }
                (Op::Copy { from, .. }, Some(fstart)) => {
                    t.register(ids_of(fstart, from.tokens.len()), false, e);
                }
                _ => {}
            }
        }
    }
    kept.into_iter()
        .zip(&kinds)
        .zip(ops)
        .map(|((k, &kd), op)| match (k, op) {
            (false, _) => Write::Drop,
            (true, Op::Replace { .. }) if kd == Kind::Add => Write::AsAdd,
            (true, _) => Write::Keep,
        })
        .collect()
}

/// Concrete JSON Patch ops doing to `target` (at `path`) what merge patch `patch` does;
/// appended to `out`.
pub fn merge_to_ops(target: &Value, patch: &Value, path: &Pointer, out: &mut Vec<Op>) {
    let Value::Object(pm) = patch else {
        out.push(Op::Replace {
            path: path.clone(),
            value: patch.clone(),
        });
        return;
    };
    let Value::Object(tm) = target else {
        let mut v = Value::Null;
        apply::merge_apply(&mut v, patch);
        out.push(if path.is_root() {
            Op::Replace {
                path: path.clone(),
                value: v,
            }
        } else {
            Op::Add {
                path: path.clone(),
                value: v,
            }
        });
        return;
    };
    for (k, v) in pm {
        let p = path.child(k);
        match (v, tm.get(k.as_str())) {
            (Value::Null, Some(_)) => out.push(Op::Remove { path: p }),
            (Value::Null, None) => {}
            (Value::Object(_), Some(t @ Value::Object(_))) => merge_to_ops(t, v, &p, out),
            _ => {
                let mut value = Value::Null;
                apply::merge_apply(&mut value, v);
                out.push(Op::Add { path: p, value });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::{apply_delta, parse_delta};
    use crate::json;
    use serde_json::json;

    fn m(ds: &[Value]) -> Result<Value> {
        let bytes: Vec<Vec<u8>> = ds.iter().map(json::to_vec).collect();
        Ok(serde_json::from_slice(&merge_bytes(&bytes)?).unwrap())
    }

    fn p(ops: Value) -> Value {
        json!({ "patch": ops })
    }

    #[test]
    fn empty_and_single() {
        assert_eq!(m(&[]).unwrap(), json!({"patch": []}));
        assert_eq!(m(&[json!({"merge": 3})]).unwrap(), json!({"merge": 3}));
        assert_eq!(
            m(&[p(json!([{"op":"test","path":"/a","value":1}]))]).unwrap(),
            json!({"patch": []})
        );
    }

    #[test]
    fn last_write_wins() {
        let r = m(&[
            p(json!([{"op":"replace","path":"/a","value":1}])),
            p(json!([{"op":"replace","path":"/b","value":1}])),
            p(json!([{"op":"replace","path":"/a","value":2}])),
        ])
        .unwrap();
        assert_eq!(
            r,
            p(
                json!([{"op":"replace","path":"/b","value":1},{"op":"replace","path":"/a","value":2}])
            )
        );
        // add then replace -> one add
        let r = m(&[
            p(json!([{"op":"add","path":"/a","value":1}])),
            p(json!([{"op":"replace","path":"/a","value":2}])),
        ])
        .unwrap();
        assert_eq!(r, p(json!([{"op":"add","path":"/a","value":2}])));
        // add then remove -> kept
        let r = m(&[
            p(json!([{"op":"add","path":"/a","value":1}])),
            p(json!([{"op":"remove","path":"/a"}])),
        ])
        .unwrap();
        assert_eq!(
            r,
            p(json!([{"op":"add","path":"/a","value":1},{"op":"remove","path":"/a"}]))
        );
        // replace then remove -> remove
        let r = m(&[
            p(json!([{"op":"replace","path":"/a","value":1}])),
            p(json!([{"op":"remove","path":"/a"}])),
        ])
        .unwrap();
        assert_eq!(r, p(json!([{"op":"remove","path":"/a"}])));
        // a descendant write in between is a barrier
        let r = m(&[p(json!([
            {"op":"replace","path":"/a","value":{"b":1}},
            {"op":"remove","path":"/a/b"},
            {"op":"replace","path":"/a","value":5}
        ]))])
        .unwrap();
        assert_eq!(r["patch"].as_array().unwrap().len(), 3);
        // an array shift under an ancestor is a barrier
        let r = m(&[p(json!([
            {"op":"replace","path":"/l/1","value":1},
            {"op":"remove","path":"/l/0"},
            {"op":"replace","path":"/l/1","value":2}
        ]))])
        .unwrap();
        assert_eq!(r["patch"].as_array().unwrap().len(), 3);
        // ancestor overwrite kills descendants
        let r = m(&[p(json!([
            {"op":"replace","path":"/a/x","value":1},
            {"op":"add","path":"/a/y","value":1},
            {"op":"replace","path":"/a","value":{}}
        ]))])
        .unwrap();
        assert_eq!(r, p(json!([{"op":"replace","path":"/a","value":{}}])));
    }

    #[test]
    fn compose_rules() {
        assert_eq!(
            m(&[
                json!({"merge":{"a":1,"b":{"c":1}}}),
                json!({"merge":{"b":{"d":2},"a":null,"e":3}})
            ])
            .unwrap(),
            json!({"merge":{"a":null,"b":{"c":1,"d":2},"e":3}})
        );
        assert!(
            m(&[json!({"merge":{"a":1}}), json!({"merge":{"a":{"b":1}}})])
                .unwrap_err()
                .message()
                .contains("cannot be merged into one delta")
        );
        assert!(m(&[json!({"merge":{"a":null}}), json!({"merge":{"a":{"b":1}}})]).is_err());
        assert_eq!(
            m(&[json!({"merge":{"a":1}}), json!({"merge":[1]})]).unwrap(),
            json!({"merge":[1]})
        );
        assert_eq!(
            m(&[
                json!({"merge":[1]}),
                json!({"merge":{"a":{"b":null,"c":1}}})
            ])
            .unwrap(),
            p(json!([{"op":"replace","path":"","value":{"a":{"c":1}}}]))
        );
        assert!(m(&[p(json!([])), json!({"merge":{"a":1}})]).is_err());
        assert!(m(&[json!({"merge":{"a":1}}), p(json!([]))]).is_err());
        assert_eq!(
            m(&[json!({"merge":5}), p(json!([{"op":"replace","path":"","value":{"x":1}},{"op":"add","path":"/y","value":2}]))]).unwrap(),
            p(json!([{"op":"replace","path":"","value":{"x":1}},{"op":"add","path":"/y","value":2}]))
        );
        let e = m(&[json!({"merge":{}}), json!("x")]).unwrap_err();
        assert!(e.message().starts_with("delta 1: a delta must be"), "{e}");
    }

    #[test]
    fn merge_to_ops_matches_merge_apply() {
        let states = [
            json!({"a":1,"b":{"c":2,"d":[1]},"e":null}),
            json!([1]),
            json!({"b":3}),
        ];
        let patches = [
            json!({"a":null,"b":{"c":null,"x":{"y":null,"z":1}},"e":{"f":1},"n":null}),
            json!(7),
            json!({"b":{"q":1}}),
        ];
        for s in &states {
            for pt in &patches {
                let mut ops = Vec::new();
                merge_to_ops(s, pt, &Pointer::root(), &mut ops);
                let mut a = s.clone();
                apply_delta(&mut a, &Delta::Patch(ops)).unwrap();
                let mut b = s.clone();
                apply::merge_apply(&mut b, pt);
                assert_eq!(a, b, "{s} {pt}");
            }
        }
        let mut ops = Vec::new();
        merge_to_ops(
            &json!({"a~b":1}),
            &json!({"a~b":null,"c/d":1}),
            &Pointer::root(),
            &mut ops,
        );
        assert_eq!(
            json::to_vec(&Value::Array(ops.iter().map(Op::to_value).collect())),
            br#"[{"op":"remove","path":"/a~0b"},{"op":"add","path":"/c~1d","value":1}]"#
        );
        let _ = parse_delta(b"{\"merge\":1}").unwrap();
    }
}
