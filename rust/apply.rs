//! Applying deltas: RFC 6902 JSON Patch (atomic, in place, with an undo log) and RFC 7396
//! merge patches, with the two limits that keep a hostile delta cheap: a work budget and
//! exact state-size accounting.
//!
//! Why not `json_patch::patch`: the crate is used as a test oracle (see the tests), but its
//! apply is not the one we ship: its undo on failure does not restore key order, so a failed
//! patch is not byte-for-byte a no-op; it compares `test` values with serde's `==` (`1` !=
//! `1.0`, against RFC 6902 section 4.6 which compares numbers by value), has no hook for our
//! nesting limit, budget or size accounting, and reports every failure as "path is invalid".
//! The algorithm below is RFC 6902 as written (pointers: [`crate::pointer`]):
//! - add: object member insert-or-replace (a replaced member keeps its position; a new one
//!   is appended), array insert, root replaces the whole document;
//! - remove: target must exist; removing the root is an error;
//! - replace: target must exist (root allowed);
//! - move: `from` must exist, `path` must not be a proper descendant of `from`; from == path
//!   is a no-op; otherwise remove then add;
//! - copy: `from` must exist; add of a copy;
//! - test: numeric equality for numbers (`1` == `1.0`), see [`crate::json::rfc_eq`];
//! - the document never nests deeper than MAX_DEPTH: an add/replace/move/copy that would
//!   make it deeper fails;
//! - atomic: a failing patch leaves the document exactly as it was (key order included).
//!
//! Object member order. Removing a member (remove, the remove half of move, a merge patch
//! null) uses IndexMap's `swap_remove`: the LAST member moves into the removed member's
//! place, O(1) instead of shifting every member after it (removing 2,000 keys of a
//! 400k-key object took 15 s with shifting). JSON objects are unordered (RFC 8259), so
//! only determinism matters: both engines produce exactly this order (the pure twin
//! emulates it), so every relay computes the same bytes.
//!
//! Work budget. A patch may do at most [`work_budget`]`(len of its bytes)` units of work
//! that its own bytes do not already bound: copying a value costs its JSON length in bytes
//! (measured before it is cloned, stopping at the budget), so does a move into a deeper
//! path (its depth check walks the value), and inserting into / removing from an array
//! costs one unit per element shifted. Past the budget the patch fails ("delta needs too
//! much work", `bad_patch` on the wire), in check and apply alike: deterministic, so a
//! no-op on every relay. Adds, replaces and tests cost nothing extra (their values are in
//! the delta); object member changes are O(1); merge patches are bounded by their size.
//! Not charged: measuring and dropping what a delta removes (each value was paid for
//! when it was added or loaded).
//!
//! Size accounting. Every application keeps the document's exact compact-JSON length
//! ([`crate::json::len`]) up to date from what each op adds and drops (key, separators
//! and value), so a size check never serialises the state. With a limit (`max_bytes` >
//! 0), a delta that would make the state longer than the limit AND longer than before is
//! refused with [`crate::error::ErrorKind::TooLarge`] and changes nothing (a state loaded
//! above the limit can still shrink). The check runs before every op that grows the
//! state, before anything is cloned: a state never passes its limit, not even in the
//! middle of a patch (so the memory a delta may take is bounded by the limit too).

use crate::error::{DeltaError, Result};
use crate::json::{self, MAX_DEPTH};
use crate::pointer::{array_index, NOT_FOUND};
use serde_json::{Map, Value};

// The delta model and pointers moved to their own modules; re-exported for callers.
pub use crate::delta::{
    delta_from_value, merge_delta_json, parse_delta, parse_ops, patch_delta_json, validate,
    validate_request, Delta, Op, Scalar,
};
pub use crate::pointer::{get, get_mut, Pointer};

/// Work units every patch may use whatever its size (a copy of a 16 KB value, an insert at
/// the head of a 16k-element array).
pub const WORK_BASE: u64 = 16_384;
/// Work units per byte of the delta. Measured (2-core AMD EPYC VM, shared, release build):
/// the most expensive accepted shape, a copy of small arrays (`[[0],[0],...]`, one
/// allocation per 4 bytes), takes ~0.7-1.2 ms for a 1 KiB delta (48k units); shifting
/// array elements ~0.4 ms per 80k units. So an accepted delta costs about a millisecond
/// per KiB or less (benches/test_engine_hostile.py). A unit of a copy may allocate up to
/// ~16 bytes (a `Value` per small node), so a delta's transient memory is at most ~16x its
/// budget, besides the size limit.
pub const WORK_PER_BYTE: u64 = 32;

/// The work budget of a delta of `delta_len` bytes.
pub fn work_budget(delta_len: usize) -> u64 {
    WORK_BASE.saturating_add(WORK_PER_BYTE.saturating_mul(delta_len as u64))
}

pub const TOO_MUCH_WORK: &str = "delta needs too much work";

/// The limits a delta is applied under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Work units (see the module doc).
    pub work: u64,
    /// Maximum state size in bytes of compact JSON; 0: no limit.
    pub max_bytes: u64,
    /// Maximum memory estimate of the state ([`Size::memory`]); 0: no limit.
    pub max_memory: u64,
}

impl Limits {
    /// No limits (tests, and callers that applied the delta before under limits).
    pub const NONE: Limits = Limits {
        work: u64::MAX,
        max_bytes: 0,
        max_memory: 0,
    };

    /// The limits of a delta of `delta_len` bytes applied to a state capped at `max_bytes`.
    pub fn for_delta(delta_len: usize, max_bytes: u64) -> Limits {
        Limits {
            work: work_budget(delta_len),
            max_bytes,
            max_memory: 0,
        }
    }

    /// The same with a memory limit (0: none).
    pub fn with_memory(self, max_memory: u64) -> Limits {
        Limits { max_memory, ..self }
    }
}

/// What the size accounting keeps of a document: its exact compact-JSON length and the
/// structure part of its memory estimate ([`json::weight`]); both are additive over the
/// nodes, so every op knows what it adds and drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Size {
    pub json: u64,
    pub weight: u64,
}

impl Size {
    pub const ZERO: Size = Size { json: 0, weight: 0 };

    /// The size of `v` (O(nodes)).
    pub fn of(v: &Value) -> Size {
        Size {
            json: json::len(v),
            weight: json::weight(v),
        }
    }

    /// The memory estimate of the engine's representation: JSON bytes (strings and keys
    /// are held as such) plus the structure ([`json::NODE_BYTES`]).
    pub fn memory(self) -> u64 {
        self.json.saturating_add(self.weight)
    }

    fn plus(self, o: Size) -> Size {
        Size {
            json: self.json.saturating_add(o.json),
            weight: self.weight.saturating_add(o.weight),
        }
    }

    fn minus(self, o: Size) -> Size {
        Size {
            json: self.json.saturating_sub(o.json),
            weight: self.weight.saturating_sub(o.weight),
        }
    }
}

/// The TooLarge error for a state going from `old` to `new` bytes, or None when allowed.
pub fn size_error(old: u64, new: u64, max_bytes: u64) -> Option<DeltaError> {
    if max_bytes == 0 || new <= max_bytes || new <= old {
        return None;
    }
    Some(DeltaError::too_large(format!(
        "the delta would make the state {new} bytes, past its limit of {max_bytes}"
    )))
}

/// The TooLarge error for a state going from `old` to `new` under `lim` (the JSON length
/// limit, then the memory limit: each refuses a state past it AND larger than before).
pub fn limit_error(old: Size, new: Size, lim: Limits) -> Option<DeltaError> {
    if let Some(e) = size_error(old.json, new.json, lim.max_bytes) {
        return Some(e);
    }
    let (o, n, max) = (old.memory(), new.memory(), lim.max_memory);
    if max == 0 || n <= max || n <= o {
        return None;
    }
    Some(DeltaError::too_large(format!(
        "the delta would make the state take about {n} bytes of memory, past its limit of {max}"
    )))
}

/// One step of the undo log: enough to put the document back exactly as it was. Pointers
/// borrow from the operations being applied (no copies on the hot path).
#[derive(Debug)]
pub enum Undo<'a> {
    /// Put `old` back at `tokens` (replace, add over an existing member, add at the root).
    Restore { tokens: &'a [String], old: Value },
    /// Remove the member `key` that an add appended (the last member) to the object at
    /// `parent`.
    ObjRemove { parent: &'a [String], key: &'a str },
    /// Put back a member removed with `swap_remove`: `moved` is the member that was last
    /// and took its place (None when the removed member was the last).
    ObjInsert {
        parent: &'a [String],
        key: &'a str,
        /// None: the value the step undone just before took out (the add half of a move).
        value: Option<Value>,
        moved: Option<String>,
    },
    /// Remove the element an add inserted.
    ArrRemove { parent: &'a [String], index: usize },
    /// Re-insert a removed element (None: see `ObjInsert`).
    ArrInsert {
        parent: &'a [String],
        index: usize,
        value: Option<Value>,
    },
}

/// The state of one application: the undo log (when kept), whether each step must be
/// bounded ([`apply_patch_bounded`]), the work left and the document's exact JSON length.
struct Ctx<'l, 'a> {
    log: Option<&'l mut Vec<Undo<'a>>>,
    bounded: bool,
    work: u64,
    size: Size,
    /// The size before the patch, and the limits.
    start: Size,
    lim: Limits,
}

/// Why an op did not apply: it fails (an error of the patch, too much work included), or,
/// in a bounded application, it would do work that grows with the state (it changed
/// nothing).
enum Fail {
    Op(String),
    Unbounded,
    /// The state would pass its size limit (the error says by how much).
    Large(DeltaError),
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

impl<'a> Ctx<'_, 'a> {
    fn on(&self) -> bool {
        self.log.is_some()
    }
    fn push(&mut self, u: Undo<'a>) {
        if let Some(log) = self.log.as_mut() {
            log.push(u);
        }
    }
    /// Err(Unbounded) when the application is bounded and `ok()` is false.
    fn bound(&self, ok: impl FnOnce() -> bool) -> std::result::Result<(), Fail> {
        if self.bounded && !ok() {
            return Err(Fail::Unbounded);
        }
        Ok(())
    }
    /// Spend `units` of the work budget, or fail (before the work is done).
    fn charge(&mut self, units: u64) -> std::result::Result<(), Fail> {
        if units > self.work {
            return Err(TOO_MUCH_WORK.into());
        }
        self.work -= units;
        Ok(())
    }
    /// The value's size, its JSON length charged to the budget (the walk stops at the
    /// budget; the structure walk after it then visits at most that many nodes).
    fn charge_len(&mut self, v: &Value) -> std::result::Result<Size, Fail> {
        let n = json::len_bounded(v, self.work).ok_or(TOO_MUCH_WORK)?;
        self.charge(n)?;
        Ok(Size {
            json: n,
            weight: json::weight(v),
        })
    }
    /// Account for an op about to add `added` and drop `dropped`; called BEFORE the
    /// change (and before anything is cloned), so that a state never passes its limits,
    /// not even in the middle of a patch.
    fn grow(&mut self, added: Size, dropped: Size) -> std::result::Result<(), Fail> {
        self.set_size(self.size.plus(added).minus(dropped))
    }
    fn set_size(&mut self, new: Size) -> std::result::Result<(), Fail> {
        if new.json > self.size.json || new.memory() > self.size.memory() {
            if let Some(e) = limit_error(self.start, new, self.lim) {
                return Err(Fail::Large(e));
            }
        }
        self.size = new;
        Ok(())
    }
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

fn check_depth(at: usize, value: &Value) -> std::result::Result<(), String> {
    if at + json::depth(value) > MAX_DEPTH {
        Err(format!(
            "the document would nest deeper than {MAX_DEPTH} levels"
        ))
    } else {
        Ok(())
    }
}

/// Add `value` (taken out of the option only once nothing can fail any more, so that a
/// move can put it back) at `tokens`. `vlen`: its JSON length, None when its bytes are
/// still counted in the size (the add half of a move).
fn add_at<'a>(
    doc: &mut Value,
    tokens: &'a [String],
    value: &mut Option<Value>,
    vlen: Option<Size>,
    ctx: &mut Ctx<'_, 'a>,
) -> std::result::Result<(), Fail> {
    let Some(v) = value.as_ref() else {
        return Err("internal: no value to add".into());
    };
    let Some((last, parent_tokens)) = tokens.split_last() else {
        ctx.bound(|| small(doc))?;
        ctx.set_size(vlen.unwrap_or_else(|| Size::of(v)))?;
        let Some(v) = value.take() else {
            return Ok(());
        };
        let old = std::mem::replace(doc, v);
        ctx.push(Undo::Restore { tokens, old });
        return Ok(());
    };
    let vl = vlen.unwrap_or(Size::ZERO);
    match get_mut(doc, parent_tokens)? {
        Value::Object(m) => {
            if let Some(slot) = m.get_mut(last.as_str()) {
                ctx.bound(|| small(slot))?;
                // Not charged: see the module doc (what a delta drops).
                ctx.grow(vl, Size::of(slot))?;
                if let Some(v) = value.take() {
                    let old = std::mem::replace(slot, v);
                    ctx.push(Undo::Restore { tokens, old });
                }
            } else {
                // Appending to a large map may reallocate (and rehash) it whole.
                ctx.bound(|| m.len() < SMALL_NODES)?;
                let member = Size {
                    json: json::str_len(last) + 1 + u64::from(!m.is_empty()),
                    weight: json::MEMBER_BYTES,
                };
                ctx.grow(member.plus(vl), Size::ZERO)?;
                if let Some(v) = value.take() {
                    m.insert(last.clone(), v);
                    ctx.push(Undo::ObjRemove {
                        parent: parent_tokens,
                        key: last,
                    });
                }
            }
        }
        Value::Array(a) => {
            let i = array_index(last, a.len(), true)?;
            ctx.bound(|| a.len() < SMALL_NODES)?;
            ctx.charge((a.len() - i) as u64)?;
            let comma = Size {
                json: u64::from(!a.is_empty()),
                weight: 0,
            };
            ctx.grow(vl.plus(comma), Size::ZERO)?;
            if let Some(v) = value.take() {
                a.insert(i, v);
                ctx.push(Undo::ArrRemove {
                    parent: parent_tokens,
                    index: i,
                });
            }
        }
        _ => return Err(NOT_FOUND.into()),
    }
    Ok(())
}

/// A removed value, where it was (to put it back) and the bytes of JSON that went with it
/// besides its own (member name, `:`, `,`).
struct Removed {
    value: Value,
    overhead: Size,
    index: usize,
    moved: Option<String>,
    from_object: bool,
}

impl Removed {
    /// The undo step; `value` None: the value the step undone just before takes out (the
    /// add half of a move).
    fn undo(
        tokens: &[String],
        index: usize,
        from_object: bool,
        moved: Option<String>,
        value: Option<Value>,
    ) -> Undo<'_> {
        let (last, parent): (&str, &[String]) = tokens
            .split_last()
            .map_or(("", &[]), |(l, p)| (l.as_str(), p));
        if from_object {
            Undo::ObjInsert {
                parent,
                key: last,
                value,
                moved,
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

/// Remove the value at `tokens` (object members with `swap_remove`, see the module doc).
fn remove_at(
    doc: &mut Value,
    tokens: &[String],
    ctx: &mut Ctx<'_, '_>,
) -> std::result::Result<Removed, Fail> {
    let Some((last, parent_tokens)) = tokens.split_last() else {
        return Err("cannot remove the document root".into());
    };
    let want_undo = ctx.on();
    match get_mut(doc, parent_tokens)? {
        Value::Object(m) => {
            let Some(v) = m.get(last.as_str()) else {
                return Err(NOT_FOUND.into());
            };
            // Dropping (and measuring) the value costs its size.
            ctx.bound(|| small(v))?;
            let moved = if want_undo {
                m.keys().next_back().filter(|k| *k != last).cloned()
            } else {
                None
            };
            let overhead = Size {
                json: json::str_len(last) + 1 + u64::from(m.len() > 1),
                weight: json::MEMBER_BYTES,
            };
            let value = m.swap_remove(last.as_str()).ok_or(NOT_FOUND)?;
            Ok(Removed {
                value,
                overhead,
                index: 0,
                moved,
                from_object: true,
            })
        }
        Value::Array(a) => {
            let index = array_index(last, a.len(), false)?;
            ctx.bound(|| a.len() <= SMALL_NODES && small(&a[index]))?;
            ctx.charge((a.len() - 1 - index) as u64)?;
            let overhead = Size {
                json: u64::from(a.len() > 1),
                weight: 0,
            };
            Ok(Removed {
                value: a.remove(index),
                overhead,
                index,
                moved: None,
                from_object: false,
            })
        }
        _ => Err(NOT_FOUND.into()),
    }
}

fn apply_one<'a>(
    doc: &mut Value,
    op: &'a Op,
    ctx: &mut Ctx<'_, 'a>,
) -> std::result::Result<(), Fail> {
    match op {
        Op::Add { path, value } => {
            check_depth(path.tokens.len(), value)?;
            let vlen = Size::of(value);
            add_at(doc, &path.tokens, &mut Some(value.clone()), Some(vlen), ctx)
        }
        Op::Remove { path } => {
            let r = remove_at(doc, &path.tokens, ctx)?;
            // Not charged: see the module doc (what a delta drops).
            ctx.grow(Size::ZERO, r.overhead.plus(Size::of(&r.value)))?;
            if ctx.on() {
                let u = Removed::undo(&path.tokens, r.index, r.from_object, r.moved, Some(r.value));
                ctx.push(u);
            }
            Ok(())
        }
        Op::Replace { path, value } => {
            check_depth(path.tokens.len(), value)?;
            let slot = get_mut(doc, &path.tokens)?;
            ctx.bound(|| small(slot))?;
            let old_len = if path.is_root() {
                ctx.size
            } else {
                Size::of(slot)
            };
            ctx.grow(Size::of(value), old_len)?;
            let old = std::mem::replace(slot, value.clone());
            ctx.push(Undo::Restore {
                tokens: &path.tokens,
                old,
            });
            Ok(())
        }
        Op::Move { from, path } => {
            // Moves a value of any size, and may shift array members twice.
            ctx.bound(|| false)?;
            let src = get(doc, &from.tokens).map_err(|e| format!("\"from\" {}: {e}", from.raw))?;
            if from.tokens == path.tokens {
                return Ok(());
            }
            if path.tokens.starts_with(&from.tokens) {
                return Err("cannot move a value into one of its own children".into());
            }
            if path.tokens.len() > from.tokens.len() {
                // The depth check walks the value: charged like a copy.
                ctx.charge_len(src)?;
                check_depth(path.tokens.len(), src)?;
            }
            let r = remove_at(doc, &from.tokens, ctx).map_err(|e| match e {
                Fail::Op(e) => Fail::Op(format!("\"from\" {}: {e}", from.raw)),
                u => u,
            })?;
            ctx.grow(Size::ZERO, r.overhead)?;
            let mut carried = Some(r.value);
            if ctx.on() {
                // The value travels without a copy: undoing the add half takes it out and
                // this step puts it back.
                ctx.push(Removed::undo(
                    &from.tokens,
                    r.index,
                    r.from_object,
                    r.moved,
                    None,
                ));
            }
            let res = add_at(doc, &path.tokens, &mut carried, None, ctx);
            if res.is_err() {
                // The add half failed before taking the value: the undo step keeps it.
                if let Some(Undo::ObjInsert { value, .. } | Undo::ArrInsert { value, .. }) =
                    ctx.log.as_mut().and_then(|l| l.last_mut())
                {
                    *value = carried.take();
                }
            }
            res
        }
        Op::Copy { from, path } => {
            ctx.bound(|| false)?;
            let src = get(doc, &from.tokens).map_err(|e| format!("\"from\" {}: {e}", from.raw))?;
            // Measured (and charged) before anything is cloned.
            let n = ctx.charge_len(src)?;
            if path.tokens.len() > from.tokens.len() {
                check_depth(path.tokens.len(), src)?;
            }
            let v = src.clone();
            add_at(doc, &path.tokens, &mut Some(v), Some(n), ctx)
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

/// A bounded application stopped: the next op's work would grow with the document.
#[derive(Debug, PartialEq, Eq)]
pub struct Unbounded;

/// Apply `ops` in order from a document of `size` bytes; Ok(new size). On failure the
/// document is left half-patched unless the caller rolls `log` back.
fn run_ops<'a>(
    doc: &mut Value,
    ops: &'a [Op],
    log: Option<&mut Vec<Undo<'a>>>,
    bounded: bool,
    lim: Limits,
    size: Size,
) -> std::result::Result<Result<Size>, Unbounded> {
    let mut ctx = Ctx {
        log,
        bounded,
        work: lim.work,
        size,
        start: size,
        lim,
    };
    for (i, op) in ops.iter().enumerate() {
        match apply_one(doc, op, &mut ctx) {
            Ok(()) => {}
            Err(Fail::Op(r)) => return Ok(Err(op_error(i, op, r))),
            Err(Fail::Unbounded) => return Err(Unbounded),
            Err(Fail::Large(e)) => {
                let label = format_args!("op {i} ({} {})", op.name(), op.path().raw);
                return Ok(Err(e.context(label)));
            }
        }
    }
    Ok(limit_error(size, ctx.size, lim).map_or(Ok(ctx.size), Err))
}

/// Apply `ops` in place, atomically, under `lim`; `size` (the document's exact JSON length)
/// is updated on success. `keep` false: roll back even on success (a check).
fn patch_in_place(
    doc: &mut Value,
    size: &mut Size,
    ops: &[Op],
    lim: Limits,
    bounded: bool,
    keep: bool,
) -> std::result::Result<Result<()>, Unbounded> {
    // A single op other than move fails before it changes anything; with no size limit
    // and nothing to undo, it needs no log.
    let single = matches!(ops, [op] if !matches!(op, Op::Move { .. }));
    if single && keep && lim.max_bytes == 0 && lim.max_memory == 0 {
        let r = run_ops(doc, ops, None, bounded, lim, *size)?;
        return Ok(r.map(|new| *size = new));
    }
    let mut log = Vec::new();
    let r = run_ops(doc, ops, Some(&mut log), bounded, lim, *size);
    match r {
        Ok(Ok(new)) if keep => {
            *size = new;
            Ok(Ok(()))
        }
        r => {
            rollback(doc, log);
            r.map(|r| r.map(|_| ()))
        }
    }
}

/// Apply `ops` atomically under `lim`: on error the document (and `size`) are exactly as
/// before. Errors: a failing op, too much work, or TooLarge.
pub fn apply_patch(doc: &mut Value, size: &mut Size, ops: &[Op], lim: Limits) -> Result<()> {
    // Not bounded, so never Err(Unbounded).
    patch_in_place(doc, size, ops, lim, false, true).unwrap_or(Ok(()))
}

/// What `apply_patch` would do, changing nothing.
pub fn check_patch(doc: &mut Value, size: Size, ops: &[Op], lim: Limits) -> Result<()> {
    let mut s = size;
    patch_in_place(doc, &mut s, ops, lim, false, false).unwrap_or(Ok(()))
}

/// [`apply_patch`] if every step is cheap whatever the size of `doc`; otherwise
/// Err(Unbounded), with `doc` exactly as before.
///
/// Each op checks, before it changes anything, what it would drop, shift or move: replace
/// and add drop only [`small`] values; add appends only to objects of fewer than
/// [`SMALL_NODES`] members (a larger map may reallocate whole); array inserts and removals
/// only in arrays of at most [`SMALL_NODES`] elements; remove drops only small values (an
/// object member's removal is O(1)); move and copy (which carry values of any size) stop
/// it. `test` compares at most the size of its own value. So the work, a rollback included,
/// is bounded by a constant times the size of `ops`, and the checks themselves by
/// [`SMALL_NODES`] per op.
pub fn apply_patch_bounded(
    doc: &mut Value,
    size: &mut Size,
    ops: &[Op],
    lim: Limits,
) -> std::result::Result<Result<()>, Unbounded> {
    patch_in_place(doc, size, ops, lim, true, true)
}

/// Apply `ops` atomically in place, without limits (tests and the RFC conformance suite).
pub fn apply_patch_atomic(doc: &mut Value, ops: &[Op]) -> Result<()> {
    let mut size = Size::ZERO;
    apply_patch(doc, &mut size, ops, Limits::NONE)
}

/// Apply `ops` in order without limits; on failure the document is left half-patched (use
/// when it is a throw-away copy), or exactly restored by [`rollback`] of `undo`.
pub fn apply_ops<'a>(
    doc: &mut Value,
    ops: &'a [Op],
    undo: Option<&mut Vec<Undo<'a>>>,
) -> Result<()> {
    run_ops(doc, ops, undo, false, Limits::NONE, Size::ZERO)
        .unwrap_or(Ok(Size::ZERO))
        .map(|_| ())
}

/// Undo the steps of `log` (most recent first).
pub fn rollback(doc: &mut Value, log: Vec<Undo<'_>>) {
    // What the last step took out, for the remove half of a move (see `Removed::undo`).
    let mut carry: Option<Value> = None;
    for u in log.into_iter().rev() {
        match u {
            Undo::Restore { tokens, old } => {
                if tokens.is_empty() {
                    carry = Some(std::mem::replace(doc, old));
                } else if let Ok(slot) = get_mut(doc, tokens) {
                    carry = Some(std::mem::replace(slot, old));
                }
            }
            Undo::ObjRemove { parent, key } => {
                if let Ok(Value::Object(m)) = get_mut(doc, parent) {
                    // The member was appended, so it is last: no other member moves.
                    carry = m.swap_remove(key);
                }
            }
            Undo::ObjInsert {
                parent,
                key,
                value,
                moved,
            } => {
                let Some(value) = value.or_else(|| carry.take()) else {
                    continue;
                };
                if let Ok(Value::Object(m)) = get_mut(doc, parent) {
                    // Before the removal: [.. key@i .. moved@last]; after it: [.. moved@i ..].
                    // Appending key, swap-removing moved (key takes slot i) and appending
                    // moved again restores the order exactly, in O(1).
                    m.insert(key.to_owned(), value);
                    if let Some(moved) = moved {
                        if let Some(v) = m.swap_remove(moved.as_str()) {
                            m.insert(moved, v);
                        }
                    }
                }
            }
            Undo::ArrRemove { parent, index } => {
                if let Ok(Value::Array(a)) = get_mut(doc, parent) {
                    if index < a.len() {
                        carry = Some(a.remove(index));
                    }
                }
            }
            Undo::ArrInsert {
                parent,
                index,
                value,
            } => {
                let Some(value) = value.or_else(|| carry.take()) else {
                    continue;
                };
                if let Ok(Value::Array(a)) = get_mut(doc, parent) {
                    let index = index.min(a.len());
                    a.insert(index, value);
                }
            }
        }
    }
}

/// RFC 7396 MergePatch(target, patch), in place. A removed member's place is taken by the
/// last member (`swap_remove`, see the module doc); new members are appended in the
/// patch's order. Cannot fail, and cannot make the document deeper than max(depth(doc),
/// depth(patch)).
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
                m.swap_remove(k.as_str());
            } else if v.is_object() {
                merge_apply(m.entry(k.as_str()).or_insert(Value::Null), v);
            } else {
                m.insert(k.clone(), v.clone());
            }
        }
    }
}

/// len(merge_apply(target, patch)) - len(target) (a missing target has length 0), without
/// applying it: O(size of the patch plus what it drops).
pub fn merge_growth(target: Option<&Value>, patch: &Value) -> i64 {
    let len = |v: &Value| json::len(v) as i64;
    let Value::Object(pm) = patch else {
        return len(patch) - target.map_or(0, len);
    };
    let (m, mut d) = match target {
        Some(Value::Object(m)) => (Some(m), 0),
        // Replaced by `{}` (2 bytes), then merged into.
        t => (None, 2 - t.map_or(0, len)),
    };
    let n0 = m.map_or(0, |m| m.len() as i64);
    let mut n = n0;
    for (k, v) in pm {
        match (m.and_then(|m| m.get(k.as_str())), v) {
            (None, Value::Null) => {}
            (Some(old), Value::Null) => {
                d -= json::str_len(k) as i64 + 1 + len(old);
                n -= 1;
            }
            (Some(old), v) => d += merge_growth(Some(old), v),
            (None, v) => {
                d += json::str_len(k) as i64 + 1 + merge_growth(None, v);
                n += 1;
            }
        }
    }
    // Commas between members.
    d + (n - 1).max(0) - (n0 - 1).max(0)
}

/// weight(merge_apply(target, patch)) - weight(target) ([`json::weight`]; a missing
/// target weighs 0), without applying it: the structure twin of [`merge_growth`].
pub fn merge_weight_growth(target: Option<&Value>, patch: &Value) -> i64 {
    let w = |v: &Value| json::weight(v) as i64;
    let Value::Object(pm) = patch else {
        return w(patch) - target.map_or(0, w);
    };
    let (m, mut d) = match target {
        Some(Value::Object(m)) => (Some(m), 0),
        // Replaced by `{}`, then merged into.
        t => (None, json::NODE_BYTES as i64 - t.map_or(0, w)),
    };
    let member = json::MEMBER_BYTES as i64;
    for (k, v) in pm {
        match (m.and_then(|m| m.get(k.as_str())), v) {
            (None, Value::Null) => {}
            (Some(old), Value::Null) => d -= member + w(old),
            (Some(old), v) => d += merge_weight_growth(Some(old), v),
            (None, v) => d += member + merge_weight_growth(None, v),
        }
    }
    d
}

/// The size `doc` would have after the merge patch `p` (O(size of `p` plus what it drops)).
fn merged_size(doc: &Value, size: Size, p: &Value) -> Size {
    let add = |n: u64, d: i64| (n as i64).saturating_add(d).max(0) as u64;
    Size {
        json: add(size.json, merge_growth(Some(doc), p)),
        weight: add(size.weight, merge_weight_growth(Some(doc), p)),
    }
}

/// Apply a delta atomically in place under `lim`; `size` is the document's exact size,
/// updated on success.
pub fn apply_delta_limited(doc: &mut Value, size: &mut Size, d: &Delta, lim: Limits) -> Result<()> {
    match d {
        Delta::Patch(ops) => apply_patch(doc, size, ops, lim),
        Delta::Merge(p) => {
            let new = merged_size(doc, *size, p);
            if let Some(e) = limit_error(*size, new, lim) {
                return Err(e);
            }
            merge_apply(doc, p);
            *size = new;
            Ok(())
        }
    }
}

/// What `apply_delta_limited` would do, changing nothing.
pub fn check_delta(doc: &mut Value, size: Size, d: &Delta, lim: Limits) -> Result<()> {
    match d {
        Delta::Patch(ops) => check_patch(doc, size, ops, lim),
        // A merge patch always applies; only its size can refuse it (and measuring what it
        // drops costs the size of that).
        Delta::Merge(_) if lim.max_bytes == 0 && lim.max_memory == 0 => Ok(()),
        Delta::Merge(p) => limit_error(size, merged_size(doc, size, p), lim).map_or(Ok(()), Err),
    }
}

/// Apply a delta atomically in place, without limits.
pub fn apply_delta(doc: &mut Value, d: &Delta) -> Result<()> {
    match d {
        Delta::Patch(ops) => apply_patch_atomic(doc, ops),
        Delta::Merge(p) => {
            merge_apply(doc, p);
            Ok(())
        }
    }
}

/// `apply(state, d)`: parse both, apply under the delta's work budget, serialise.
pub fn apply_bytes(state: &[u8], d: &[u8]) -> Result<Vec<u8>> {
    let delta = parse_delta(d)?;
    let mut doc = json::parse(state)?;
    match &delta {
        // A failure discards `doc`, so no undo log is needed; no size limit, so the size
        // is not needed either (only root replacements read it).
        Delta::Patch(ops) => run_ops(
            &mut doc,
            ops,
            None,
            false,
            Limits::for_delta(d.len(), 0),
            Size::ZERO,
        )
        .unwrap_or(Ok(Size::ZERO))
        .map(|_| ())?,
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
        // remove is a swap_remove: the last member takes the removed member's place
        let d = run(doc.clone(), json!([{"op": "remove", "path": "/b"}])).unwrap();
        assert_eq!(json::to_vec(&d), br#"{"a":1,"f":[0],"e":5}"#);
        let d = run(doc.clone(), json!([{"op": "remove", "path": "/f"}])).unwrap();
        assert_eq!(
            json::to_vec(&d),
            br#"{"a":1,"b":{"c":[1,2,{"d":3}]},"e":5}"#
        );
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
        // a null swap_removes: the last member takes the removed one's place
        assert_eq!(json::to_vec(&d), br#"{"c":3,"b":2,"d":4}"#);
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
            let mut size = Size::of(&d);
            let r = apply_patch_bounded(&mut d, &mut size, &ops(patch.clone()), Limits::NONE);
            (r, d)
        };
        // Small work: the same result as the unbounded application, failures included.
        for patch in [
            json!([{"op": "replace", "path": "/a/x", "value": 2}]),
            json!([{"op": "add", "path": "/a/z", "value": {"q": [1]}}, {"op": "remove", "path": "/a/y"}]),
            json!([{"op": "add", "path": "/list/0", "value": 0}, {"op": "remove", "path": "/list/3"}]),
            json!([{"op": "replace", "path": "/big/k5/v", "value": 0}, {"op": "test", "path": "/a/x", "value": 1.0}]),
            json!([{"op": "add", "path": "/big/k7", "value": 1}]),
            // O(1) whatever the size of the object (swap_remove)
            json!([{"op": "remove", "path": "/big/k1"}]),
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
            json!([{"op": "replace", "path": "/a/x", "value": 2}, {"op": "move", "from": "/a/x", "path": "/b"}]),
            json!([{"op": "remove", "path": "/a/x"}, {"op": "copy", "from": "/a/y", "path": "/b"}]),
            json!([{"op": "add", "path": "/a/q", "value": 1}, {"op": "add", "path": "/a/r", "value": {"s": "x".repeat(5000)}}, {"op": "replace", "path": "/a/r/s", "value": 1}]),
        ] {
            let (r, d) = bounded(patch.clone());
            assert!(r.is_err(), "{patch}");
            assert_eq!(json::to_vec(&d), json::to_vec(&doc), "{patch}");
        }
    }

    fn sized(doc: &Value) -> u64 {
        json::to_vec(doc).len() as u64
    }

    /// Apply a patch given as JSON under the budget of its own bytes and `max_bytes`.
    fn limited(doc: &mut Value, patch: Value, max_bytes: u64) -> Result<()> {
        let bytes = json::to_vec(&json!({ "patch": patch }));
        let Delta::Patch(ops) = parse_delta(&bytes).unwrap() else {
            unreachable!()
        };
        let mut size = Size::of(doc);
        let r = apply_patch(
            doc,
            &mut size,
            &ops,
            Limits::for_delta(bytes.len(), max_bytes),
        );
        assert_eq!(size.json, sized(doc), "size accounting");
        assert_eq!(size, Size::of(doc), "memory accounting");
        r
    }

    /// `limited` under a memory limit only.
    fn limited_memory(doc: &mut Value, patch: Value, max_memory: u64) -> Result<()> {
        let bytes = json::to_vec(&json!({ "patch": patch }));
        let Delta::Patch(ops) = parse_delta(&bytes).unwrap() else {
            unreachable!()
        };
        let mut size = Size::of(doc);
        let lim = Limits::for_delta(bytes.len(), 0).with_memory(max_memory);
        let r = apply_patch(doc, &mut size, &ops, lim);
        assert_eq!(size, Size::of(doc), "memory accounting");
        r
    }

    #[test]
    fn memory_accounting_is_exact_for_every_op() {
        let doc = json!({"a": {"x": 1, "y": [1, {"z": "s"}]}, "b": [], "c": "str"});
        for patch in [
            json!([{"op": "add", "path": "/a/n", "value": {"p": [1, 2, {}]}}]),
            json!([{"op": "add", "path": "/b/0", "value": [[], {}]}, {"op": "add", "path": "/b/-", "value": 1}]),
            json!([{"op": "remove", "path": "/a/y"}]),
            json!([{"op": "remove", "path": "/a/y/1"}]),
            json!([{"op": "replace", "path": "/c", "value": {"q": {"r": 1}}}]),
            json!([{"op": "replace", "path": "", "value": [1, 2]}]),
            json!([{"op": "add", "path": "", "value": {"k": {}}}]),
            json!([{"op": "add", "path": "/a", "value": 1}]),
            json!([{"op": "move", "from": "/a/y", "path": "/b/0"}]),
            json!([{"op": "move", "from": "/a/y/1", "path": "/n"}]),
            json!([{"op": "copy", "from": "/a", "path": "/a2"}]),
            json!([{"op": "copy", "from": "/a", "path": "/b/0"}]),
            json!([{"op": "copy", "from": "/a", "path": "/c"}]),
            json!([{"op": "add", "path": "/x", "value": 1}, {"op": "remove", "path": "/nope"}]),
        ] {
            let mut d = doc.clone();
            let _ = limited_memory(&mut d, patch.clone(), 0);
            let mut d2 = doc.clone();
            let _ = limited(&mut d2, patch, 0);
        }
        let docs = [
            json!({"a": 1, "b": {"c": [1, 2], "d": "x"}, "e": null}),
            json!([1, 2]),
            json!("s"),
        ];
        let patches = [
            json!({"a": null, "b": {"c": null, "n": {"m": null, "o": [1]}}}),
            json!({"new": {"deep": {"er": [1]}}, "a": 2.5}),
            json!([1]),
            json!({"b": 1}),
        ];
        for doc in &docs {
            for p in &patches {
                let mut d = doc.clone();
                merge_apply(&mut d, p);
                let want = json::weight(&d) as i64 - json::weight(doc) as i64;
                assert_eq!(merge_weight_growth(Some(doc), p), want, "{doc} + {p}");
            }
        }
    }

    #[test]
    fn many_small_members_pass_the_memory_limit_not_the_json_one() {
        // 200 members of 1-byte values: ~1.4 KB of JSON, ~24 KB of structure.
        let doc = json!({});
        let patch: Vec<Value> = (0..200)
            .map(|i| json!({"op": "add", "path": format!("/{i}"), "value": 0}))
            .collect();
        let json_len = {
            let mut d = doc.clone();
            limited(&mut d, Value::Array(patch.clone()), 0).unwrap();
            sized(&d)
        };
        let mut d = doc.clone();
        let max = 100 * (json::NODE_BYTES + json::MEMBER_BYTES);
        let e = limited_memory(&mut d, Value::Array(patch.clone()), max).unwrap_err();
        assert!(e.is_too_large() && e.message().contains("memory"), "{e}");
        // Refused at the op that passes it (the JSON bytes count too), before op 100.
        assert!(e.message().starts_with("op 9"), "{e}");
        assert_eq!(d, doc);
        assert!(json_len * 5 < max, "{json_len}");
        // A copy is measured before it is cloned.
        let mut d = json!({"o": {}});
        let fill: Vec<Value> = (0..50)
            .map(|i| json!({"op": "add", "path": format!("/o/{i}"), "value": 0}))
            .collect();
        limited_memory(&mut d, Value::Array(fill), 0).unwrap();
        let before = Size::of(&d).memory();
        let e = limited_memory(
            &mut d,
            json!([{"op": "copy", "from": "/o", "path": "/p"}]),
            before + 100,
        )
        .unwrap_err();
        assert!(e.is_too_large(), "{e}");
        // Merge patches too; a state above the limit may shrink.
        let mut size = Size::of(&d);
        let m = Delta::Merge(json!({"o": {"0": null, "1": null}}));
        let lim = Limits::for_delta(0, 0).with_memory(1);
        apply_delta_limited(&mut d, &mut size, &m, lim).unwrap();
        let m = Delta::Merge(json!({"q": 1}));
        assert!(apply_delta_limited(&mut d, &mut size, &m, lim)
            .unwrap_err()
            .is_too_large());
        assert_eq!(size, Size::of(&d));
    }

    #[test]
    fn doubling_copies_run_out_of_work_before_allocating() {
        let mut doc = json!({"s": "x".repeat(1000)});
        let ops: Vec<Value> = (0..40)
            .map(|i| json!({"op": "copy", "from": "", "path": format!("/k{i}")}))
            .collect();
        let before = json::to_vec(&doc);
        let e = limited(&mut doc, Value::Array(ops), 0).unwrap_err();
        assert!(e.message().ends_with(TOO_MUCH_WORK), "{e}");
        assert!(!e.is_too_large());
        assert_eq!(json::to_vec(&doc), before);
        // A few doublings fit in the budget of the same kind of delta.
        let ops: Vec<Value> = (0..3)
            .map(|i| json!({"op": "copy", "from": "", "path": format!("/k{i}")}))
            .collect();
        limited(&mut doc, Value::Array(ops), 0).unwrap();
        assert_eq!(doc.as_object().unwrap().len(), 4);
    }

    #[test]
    fn a_copy_costs_its_json_length_exactly() {
        let copy = json!([{"op": "copy", "from": "/v", "path": "/w"}]);
        let delta_len = json::to_vec(&json!({ "patch": copy.clone() })).len();
        let budget = work_budget(delta_len);
        // {"v":"...","w":...}: the copied value is a string of JSON length n + 2.
        for (n, ok) in [(budget - 2, true), (budget - 1, false)] {
            let mut doc = json!({"v": "y".repeat(n as usize)});
            assert_eq!(limited(&mut doc, copy.clone(), 0).is_ok(), ok, "{n}");
        }
    }

    #[test]
    fn array_shifts_are_charged() {
        let n = WORK_BASE as usize * 2;
        let mut doc = json!({ "a": vec![0; n] });
        // Appending and removing the last element shift nothing.
        limited(
            &mut doc,
            json!([{"op": "add", "path": "/a/-", "value": 1}]),
            0,
        )
        .unwrap();
        limited(
            &mut doc,
            json!([{"op": "remove", "path": format!("/a/{n}")}]),
            0,
        )
        .unwrap();
        for patch in [
            json!([{"op": "add", "path": "/a/0", "value": 1}]),
            json!([{"op": "remove", "path": "/a/0"}]),
            json!([{"op": "move", "from": "/a/0", "path": "/b"}]),
        ] {
            let e = limited(&mut doc, patch, 0).unwrap_err();
            assert!(e.message().ends_with(TOO_MUCH_WORK), "{e}");
        }
        // Near the end of the array the same ops are cheap.
        let at = n - 10;
        limited(
            &mut doc,
            json!([{"op": "add", "path": format!("/a/{at}"), "value": 1}]),
            0,
        )
        .unwrap();
        limited(
            &mut doc,
            json!([{"op": "move", "from": format!("/a/{at}"), "path": "/b"}]),
            0,
        )
        .unwrap();
        assert_eq!(doc["b"], json!(1));
    }

    #[test]
    fn removals_swap_and_rollback_restores_the_order() {
        let doc = json!({"a": 1, "b": 2, "c": 3, "d": {"x": [1, 2]}, "e": 5});
        let mut d = doc.clone();
        merge_apply(&mut d, &json!({"a": null, "c": null}));
        assert_eq!(json::to_vec(&d), br#"{"e":5,"b":2,"d":{"x":[1,2]}}"#);
        // Every kind of removal, then a failure: exactly the same bytes as before.
        for patch in [
            json!([{"op": "remove", "path": "/a"}, {"op": "remove", "path": "/b"}, {"op": "test", "path": "/zz", "value": 1}]),
            json!([{"op": "move", "from": "/a", "path": "/d/y"}, {"op": "move", "from": "/b", "path": "/a"}, {"op": "remove", "path": "/nope"}]),
            json!([{"op": "move", "from": "/d", "path": "/z"}, {"op": "add", "path": "/b", "value": 0}, {"op": "remove", "path": "/nope"}]),
            json!([{"op": "move", "from": "/a", "path": "/nope/x"}]),
            json!([{"op": "move", "from": "/d/x/0", "path": "/d/x/-"}, {"op": "move", "from": "/e", "path": ""}, {"op": "remove", "path": "/nope"}]),
            json!([{"op": "replace", "path": "/c", "value": 9}, {"op": "remove", "path": "/c"}, {"op": "add", "path": "/c", "value": 1}, {"op": "copy", "from": "/q", "path": "/r"}]),
        ] {
            let mut d = doc.clone();
            assert!(limited(&mut d, patch.clone(), 0).is_err(), "{patch}");
            assert_eq!(json::to_vec(&d), json::to_vec(&doc), "{patch}");
        }
        let mut d = doc.clone();
        limited(
            &mut d,
            json!([{"op": "move", "from": "/b", "path": "/z"}]),
            0,
        )
        .unwrap();
        assert_eq!(
            json::to_vec(&d),
            br#"{"a":1,"e":5,"c":3,"d":{"x":[1,2]},"z":2}"#
        );
    }

    #[test]
    fn too_large_is_decided_on_the_exact_size() {
        let mut doc = json!({"s": "x".repeat(100)});
        let size = sized(&doc);
        let add = |v: &str| json!([{"op": "add", "path": "/t", "value": v}]);
        // {"s":"..","t":"v"} adds 7 + len(v) bytes.
        let max = size + 7 + 10;
        assert!(limited(&mut doc.clone(), add(&"y".repeat(10)), max).is_ok());
        let e = limited(&mut doc, add(&"y".repeat(11)), max).unwrap_err();
        assert!(e.is_too_large(), "{e}");
        assert_eq!(sized(&doc), size);
        // Checked before each op: growing past the limit then shrinking back is refused.
        let p = json!([{"op": "add", "path": "/t", "value": "y".repeat(500)}, {"op": "remove", "path": "/t"}]);
        let e = limited(&mut doc, p, max).unwrap_err();
        assert!(
            e.is_too_large() && e.message().starts_with("op 0 (add /t): "),
            "{e}"
        );
        // ... while shrinking first makes room.
        let p = json!([{"op": "remove", "path": "/s"}, {"op": "add", "path": "/t", "value": "y".repeat(100)}]);
        limited(&mut doc, p, max).unwrap();
        // A state above its limit may shrink, not grow.
        let mut big = json!({"s": "x".repeat(100), "u": 1});
        assert!(limited(
            &mut big,
            json!([{"op": "replace", "path": "/u", "value": 22}]),
            50
        )
        .unwrap_err()
        .is_too_large());
        limited(
            &mut big,
            json!([{"op": "replace", "path": "/s", "value": "x"}]),
            50,
        )
        .unwrap();
        // Merge patches: measured before they apply.
        let mut d = json!({"a": "x"});
        let mut size = Size::of(&d);
        let m = Delta::Merge(json!({"b": "y".repeat(100)}));
        let e = apply_delta_limited(&mut d, &mut size, &m, Limits::for_delta(0, 50)).unwrap_err();
        assert!(e.is_too_large());
        assert_eq!(d, json!({"a": "x"}));
        assert_eq!(size, Size::of(&d));
    }

    #[test]
    fn merge_growth_is_exact() {
        let docs = [
            json!({"a": 1, "b": {"c": [1, 2], "d": "é\n"}, "e": null}),
            json!({}),
            json!([1, 2]),
            json!("s"),
            json!({"only": {}}),
        ];
        let patches = [
            json!({"a": null}),
            json!({"a": null, "b": null, "e": null, "only": null}),
            json!({"b": {"c": null, "d": {"x~/": null, "y": 1}}, "z": {"q": null}}),
            json!({"new": {"deep": {"er": [1]}}, "a": 2.5}),
            json!([1]),
            json!(null),
            json!({"\u{1}": "\"", "only": {"k": 1}}),
        ];
        for doc in &docs {
            for p in &patches {
                let mut d = doc.clone();
                merge_apply(&mut d, p);
                let want = sized(&d) as i64 - sized(doc) as i64;
                assert_eq!(merge_growth(Some(doc), p), want, "{doc} + {p}");
            }
        }
    }
}
