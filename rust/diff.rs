//! `diff(a, b)`: a JSON Patch taking `a` to `b`, small when the change is small. The exact
//! algorithm of the pure-Python twin (`_pydelta._diff`), so both give the same ops:
//! - both objects: `remove` for each key of `a` missing from `b` (in `a`'s order), then for
//!   each key of `b` in `b`'s order: recurse when `a` has it, else `add`;
//! - both arrays: trim the longest common head, then the longest common tail (not
//!   overlapping the head), compared with [`same`]; diff the first min(len) remaining
//!   elements pairwise; then `remove` the extra elements of `a` from the highest index down,
//!   or `add` the extra elements of `b` in increasing index order;
//! - otherwise, when not [`same`]: `replace` at the path (the root is "").

use crate::delta::Op;
use crate::json;
use crate::pointer::Pointer;
use serde_json::Value;

/// Same JSON value that serialises the same: `1` != `1.0`, and `0.0` != `-0.0`; objects
/// compare regardless of key order.
pub fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if x.is_f64() && y.is_f64() {
                let (p, q) = (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
                p == q && p.is_sign_negative() == q.is_sign_negative()
            } else {
                x == y
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

pub fn diff(a: &Value, b: &Value) -> Vec<Op> {
    let mut out = Vec::new();
    diff_at(a, b, &mut Vec::new(), &mut out);
    out
}

/// The pointer of the current position (built only when an op is emitted).
fn here(tokens: &[String]) -> Pointer {
    Pointer::from_tokens(tokens.to_vec())
}

fn child(tokens: &[String], last: &str) -> Pointer {
    let mut t = Vec::with_capacity(tokens.len() + 1);
    t.extend_from_slice(tokens);
    t.push(last.to_owned());
    Pointer::from_tokens(t)
}

fn diff_at(a: &Value, b: &Value, tokens: &mut Vec<String>, out: &mut Vec<Op>) {
    match (a, b) {
        (Value::Object(am), Value::Object(bm)) => {
            for k in am.keys() {
                if !bm.contains_key(k.as_str()) {
                    out.push(Op::Remove {
                        path: child(tokens, k),
                    });
                }
            }
            for (k, bv) in bm {
                match am.get(k.as_str()) {
                    Some(av) => {
                        tokens.push(k.clone());
                        diff_at(av, bv, tokens, out);
                        tokens.pop();
                    }
                    None => out.push(Op::Add {
                        path: child(tokens, k),
                        value: bv.clone(),
                    }),
                }
            }
        }
        (Value::Array(al), Value::Array(bl)) => diff_list(al, bl, tokens, out),
        _ => {
            if !same(a, b) {
                out.push(Op::Replace {
                    path: here(tokens),
                    value: b.clone(),
                });
            }
        }
    }
}

fn diff_list(a: &[Value], b: &[Value], tokens: &mut Vec<String>, out: &mut Vec<Op>) {
    let (na, nb) = (a.len(), b.len());
    let m = na.min(nb);
    let mut head = 0;
    while head < m && same(&a[head], &b[head]) {
        head += 1;
    }
    let mut tail = 0;
    while tail < m - head && same(&a[na - 1 - tail], &b[nb - 1 - tail]) {
        tail += 1;
    }
    let (ca, cb) = (na - head - tail, nb - head - tail);
    let common = ca.min(cb);
    for i in head..head + common {
        tokens.push(i.to_string());
        diff_at(&a[i], &b[i], tokens, out);
        tokens.pop();
    }
    for i in (head + common..head + ca).rev() {
        out.push(Op::Remove {
            path: child(tokens, &i.to_string()),
        });
    }
    for (i, v) in b.iter().enumerate().take(head + cb).skip(head + common) {
        out.push(Op::Add {
            path: child(tokens, &i.to_string()),
            value: v.clone(),
        });
    }
}

/// `diff(a, b)` on JSON bytes.
pub fn diff_bytes(a: &[u8], b: &[u8]) -> crate::Result<Vec<u8>> {
    let va = json::parse(a).map_err(|e| e.context("a"))?;
    let vb = json::parse(b).map_err(|e| e.context("b"))?;
    Ok(crate::delta::patch_delta_json(&diff(&va, &vb)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::apply_patch_atomic;
    use serde_json::json;

    fn check(a: Value, b: Value) -> Vec<Op> {
        let ops = diff(&a, &b);
        let mut x = a.clone();
        apply_patch_atomic(&mut x, &ops).unwrap();
        assert!(same(&x, &b), "{a} -> {b}: got {x}");
        ops
    }

    #[test]
    fn small_changes_give_small_diffs() {
        assert!(check(json!({"a": 1}), json!({"a": 1})).is_empty());
        assert_eq!(
            check(json!({"a": 1, "b": 2}), json!({"a": 1, "b": 3})).len(),
            1
        );
        let big: Vec<Value> = (0..100).map(|i| json!({"id": i})).collect();
        let mut b2 = big.clone();
        b2.insert(50, json!("new"));
        assert_eq!(check(Value::Array(big.clone()), Value::Array(b2)).len(), 1);
        let mut b3 = big.clone();
        b3.remove(10);
        let ops = check(Value::Array(big.clone()), Value::Array(b3));
        assert_eq!(
            ops,
            vec![Op::Remove {
                path: Pointer::parse("/10").unwrap()
            }]
        );
        check(json!([1, 2, 3]), json!([]));
        check(json!([]), json!([1, 2, 3]));
        check(json!([1, 2, 3, 4]), json!([1, 9, 8, 7, 6, 4]));
        check(json!([1, 9, 8, 7, 6, 4]), json!([1, 2, 4]));
        check(json!({"a/b": {"~": 1}}), json!({"a/b": {"~": 2}, "x": [1]}));
        check(json!(1), json!(1.0));
        check(json!(0.0), json!(-0.0));
        check(json!({"a": 1}), json!([1]));
        check(json!([[1, 2], {"a": [3]}]), json!([[1], {"a": [3, 4]}]));
    }

    #[test]
    fn exact_output() {
        let a = json!({"x": 1, "y": 2, "z": [1, 2, 3]});
        let b = json!({"w": 0, "z": [1, 3], "x": 5});
        let out = crate::delta::patch_delta_json(&diff(&a, &b));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"patch":[{"op":"remove","path":"/y"},{"op":"add","path":"/w","value":0},{"op":"remove","path":"/z/1"},{"op":"replace","path":"/x","value":5}]}"#
        );
    }
}
