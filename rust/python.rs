//! The Python binding `kasagi_relay._native` (API: `kasagi_relay/_native.pyi`).
//!
//! Thin on purpose: convert arguments, release the GIL (`Python::detach`) around the work,
//! map errors. The one exception: `RoomState.apply` of a small delta whose work is bounded
//! by the delta's size keeps the GIL (see there). Arguments are borrowed, not copied: a
//! `bytes` argument's buffer or a `str`'s UTF-8 form is handed to the engine as a slice,
//! kept alive by the owned references held here while the GIL is released.
//!
//! Errors: `DeltaError(ValueError)` for bad input (too much work included), its subclass
//! `TooLarge` for a delta that would take a state past its `max_bytes`, `TypeError` for an
//! argument that is not bytes/str, `ValueError` for a `seq` that does not fit (RoomState).
//! A `str` that cannot be UTF-8 encoded (lone surrogate) is a `DeltaError`, and a
//! malformed delta where failures are no-ops (compact, RoomState.apply/apply_batch), like
//! the pure twin.

use crate::apply;
use crate::codec;
use crate::compact;
use crate::diff;
use crate::error::DeltaError as CoreError;
use crate::merge;
use crate::room::Room;
use pyo3::create_exception;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyInt, PyList, PyMemoryView, PyString};
use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

create_exception!(
    kasagi_relay._native,
    DeltaError,
    PyValueError,
    "Bad input: malformed JSON or delta, or a delta that cannot apply."
);

create_exception!(
    kasagi_relay._native,
    TooLarge,
    DeltaError,
    "A delta that would take the state past its size limit (max_bytes)."
);

/// `RoomState.apply` may handle a delta of at most this many bytes with the GIL held (see
/// `RoomState::apply`): a 4 KiB delta of 76 replace ops is parsed and applied in ~17 us.
const SMALL_DELTA: usize = 4096;
/// A state up to this many JSON bytes is small: a check of a small delta against it runs
/// with the GIL held (room.py's SMALL_STATE, the bound on its inline work).
const SMALL_STATE: u64 = 64 * 1024;

/// Results this large are copied into their `bytes` object with the GIL released: copying tens
/// of megabytes into fresh pages otherwise holds every other Python thread (the relay's event
/// loop) for milliseconds (benches/test_engine_loop_lag.py). The same bound decides which
/// argument lists are allocated with the GIL released ([`prefaulted`]).
const COPY_WITHOUT_GIL: usize = 1 << 16;

/// A result as a `bytes` object. Large results are copied, and then freed, with the GIL
/// released (freeing tens of megabytes unmaps them, which took ~0.1 ms with the GIL held).
fn bytes_out(py: Python<'_>, data: Vec<u8>) -> PyResult<Bound<'_, PyBytes>> {
    if data.len() < COPY_WITHOUT_GIL {
        return Ok(PyBytes::new(py, &data));
    }
    let len = isize::try_from(data.len())
        .map_err(|_| PyValueError::new_err("result too large for a bytes object"))?;
    // SAFETY: PyBytes_FromStringAndSize(NULL, len) returns a new, uninitialised bytes object
    // (or NULL with an exception set, turned into Err). Only this function holds a reference to
    // it, so no other thread can see it while the GIL is released; every one of its `len` bytes
    // is written before it is returned. PyBytes_AsString cannot fail on a bytes object.
    unsafe {
        let ptr = pyo3::ffi::PyBytes_FromStringAndSize(std::ptr::null(), len);
        let obj = Bound::from_owned_ptr_or_err(py, ptr)?.cast_into_unchecked::<PyBytes>();
        // As an address: raw pointers are not Send, and the closure crosses the GIL release.
        let dst = pyo3::ffi::PyBytes_AsString(obj.as_ptr()) as usize;
        py.detach(move || {
            std::ptr::copy_nonoverlapping(data.as_ptr(), dst as *mut u8, data.len());
            drop(data);
        });
        Ok(obj)
    }
}

/// An empty vector with room for `n` items. When that is large, it is allocated and its
/// pages touched with the GIL released: on this VM the first touch of fresh memory sometimes
/// stalls for milliseconds (measured: a 1 MB buffer 0.3 ms usually, 5 ms once in 8 cold
/// runs), and with the GIL held such a stall stops the event loop too. Filling it with the
/// GIL held then writes resident memory.
fn prefaulted<T: Send>(py: Python<'_>, n: usize) -> Vec<T> {
    if n.saturating_mul(std::mem::size_of::<T>()) < COPY_WITHOUT_GIL {
        return Vec::with_capacity(n);
    }
    py.detach(|| {
        let mut v = Vec::with_capacity(n);
        for slot in v.spare_capacity_mut() {
            *slot = std::mem::MaybeUninit::zeroed();
        }
        v
    })
}

fn to_py(e: CoreError) -> PyErr {
    if e.is_too_large() {
        return TooLarge::new_err(e.message().to_owned());
    }
    DeltaError::new_err(e.message().to_owned())
}

/// An argument as UTF-8 bytes. Err(None) means "not valid Unicode" (a str with a lone
/// surrogate); Err(Some(e)) is a TypeError.
fn arg_bytes<'a>(obj: &'a Bound<'_, PyAny>) -> Result<Cow<'a, [u8]>, Option<PyErr>> {
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Cow::Borrowed(b.as_bytes()));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return s
            .to_str()
            .map(|s| Cow::Borrowed(s.as_bytes()))
            .map_err(|_| None);
    }
    if let Ok(b) = obj.cast::<PyByteArray>() {
        return Ok(Cow::Owned(b.to_vec()));
    }
    if obj.is_instance_of::<PyMemoryView>() {
        let py = obj.py();
        let b = py.get_type::<PyBytes>().call1((obj,)).map_err(Some)?;
        let b = b.cast_into::<PyBytes>().map_err(|e| Some(e.into()))?;
        return Ok(Cow::Owned(b.as_bytes().to_vec()));
    }
    let tname = obj
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into());
    Err(Some(PyTypeError::new_err(format!(
        "expected bytes or str, not {tname}"
    ))))
}

/// An argument that must be valid: a lone surrogate is a DeltaError.
fn input<'a>(obj: &'a Bound<'_, PyAny>, what: &str) -> PyResult<Cow<'a, [u8]>> {
    input_named(obj, || what.to_owned())
}

/// `input` with the argument's name made only for an error: `merge` reads a thousand
/// deltas per call, and formatting "delta {i}" for each showed in its profile.
fn input_named<'a>(
    obj: &'a Bound<'_, PyAny>,
    what: impl FnOnce() -> String,
) -> PyResult<Cow<'a, [u8]>> {
    arg_bytes(obj).map_err(|e| match e {
        Some(e) => e,
        None => DeltaError::new_err(format!("{}: not valid Unicode (lone surrogate)", what())),
    })
}

/// A delta where malformed ones are no-ops: invalid Unicode becomes empty (malformed) input.
fn lenient<'a>(obj: &'a Bound<'_, PyAny>) -> PyResult<Cow<'a, [u8]>> {
    match arg_bytes(obj) {
        Ok(c) => Ok(c),
        Err(None) => Ok(Cow::Borrowed(b"")),
        Err(Some(e)) => Err(e),
    }
}

/// The items of a sequence argument, held (owned references) for the duration of a call.
/// Sized once from `len()` when there is one: growing it by doubling touched fresh memory
/// several times with the GIL held (see [`prefaulted`]).
fn items(ds: &Bound<'_, PyAny>) -> PyResult<Vec<Py<PyAny>>> {
    if ds.is_instance_of::<PyString>() || ds.is_instance_of::<PyBytes>() {
        return Err(PyTypeError::new_err(
            "expected a sequence of deltas, not a single str/bytes",
        ));
    }
    let py = ds.py();
    let mut held = prefaulted(py, ds.len().unwrap_or(0));
    for x in ds.try_iter()? {
        held.push(x?.unbind());
    }
    Ok(held)
}

/// `conv` of each held item, in a vector sized once (as [`items`]).
fn inputs<'a, 'py: 'a>(
    py: Python<'py>,
    held: &'a [Py<PyAny>],
    mut conv: impl FnMut(usize, &'a Bound<'py, PyAny>) -> PyResult<Cow<'a, [u8]>>,
) -> PyResult<Vec<Cow<'a, [u8]>>> {
    let mut out = prefaulted(py, held.len());
    for (i, h) in held.iter().enumerate() {
        out.push(conv(i, h.bind(py))?);
    }
    Ok(out)
}

#[pyfunction(name = "validate")]
fn py_validate<'py>(
    py: Python<'py>,
    d: &Bound<'py, PyAny>,
) -> PyResult<(String, Bound<'py, PyBytes>)> {
    let d = input(d, "delta")?;
    let (kind, body) = py.detach(|| apply::validate(&d)).map_err(to_py)?;
    Ok((kind.to_owned(), bytes_out(py, body)?))
}

/// Messages up to this size are read with the GIL held: releasing and taking it back costs
/// more than reading them (and a worker thread may hold it for a while).
const REQUEST_WITH_GIL: usize = 4096;

#[pyfunction(name = "validate_request")]
#[allow(clippy::type_complexity)]
fn py_validate_request<'py>(
    py: Python<'py>,
    d: &Bound<'py, PyAny>,
) -> PyResult<Option<(Bound<'py, PyDict>, String, Bound<'py, PyBytes>)>> {
    let d = match arg_bytes(d) {
        Ok(d) => d,
        Err(None) => return Ok(None), // a lone surrogate: the long way says so
        Err(Some(e)) => return Err(e),
    };
    let read = if d.len() <= REQUEST_WITH_GIL {
        apply::validate_request(&d)
    } else {
        py.detach(|| apply::validate_request(&d))
    };
    let Some((fields, kind, body)) = read else {
        return Ok(None);
    };
    let out = PyDict::new(py);
    for (k, v) in fields {
        match v {
            apply::Scalar::Str(s) => out.set_item(k, s)?,
            apply::Scalar::Int(i) => out.set_item(k, i)?,
            apply::Scalar::UInt(u) => out.set_item(k, u)?,
            apply::Scalar::Bool(b) => out.set_item(k, b)?,
            apply::Scalar::Null => out.set_item(k, py.None())?,
        }
    }
    Ok(Some((out, kind.to_owned(), bytes_out(py, body)?)))
}

#[pyfunction(name = "apply")]
fn py_apply<'py>(
    py: Python<'py>,
    state: &Bound<'py, PyAny>,
    d: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyBytes>> {
    let d = input(d, "delta")?;
    let state = input(state, "state")?;
    let out = py
        .detach(|| apply::apply_bytes(&state, &d))
        .map_err(to_py)?;
    bytes_out(py, out)
}

#[pyfunction(name = "merge")]
fn py_merge<'py>(py: Python<'py>, ds: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    let held = items(ds)?;
    let inputs = inputs(py, &held, |i, d| input_named(d, || format!("delta {i}")))?;
    let out = py.detach(|| merge::merge_bytes(&inputs)).map_err(to_py)?;
    bytes_out(py, out)
}

#[pyfunction(name = "diff")]
fn py_diff<'py>(
    py: Python<'py>,
    a: &Bound<'py, PyAny>,
    b: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyBytes>> {
    let a = input(a, "a")?;
    let b = input(b, "b")?;
    let out = py.detach(|| diff::diff_bytes(&a, &b)).map_err(to_py)?;
    bytes_out(py, out)
}

#[pyfunction(name = "compact")]
#[pyo3(signature = (state, ds, max_bytes = 0, max_memory = 0))]
fn py_compact<'py>(
    py: Python<'py>,
    state: &Bound<'py, PyAny>,
    ds: &Bound<'py, PyAny>,
    max_bytes: u64,
    max_memory: u64,
) -> PyResult<Bound<'py, PyBytes>> {
    let state = input(state, "state")?;
    let held = items(ds)?;
    let inputs = inputs(py, &held, |_, d| lenient(d))?;
    let out = py
        .detach(|| compact::compact_bytes(&state, &inputs, max_bytes, max_memory))
        .map_err(to_py)?;
    bytes_out(py, out)
}

#[pyfunction(name = "json_to_msgpack")]
fn py_json_to_msgpack<'py>(
    py: Python<'py>,
    doc: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyBytes>> {
    let doc = input(doc, "document")?;
    let out = py.detach(|| codec::json_to_msgpack(&doc)).map_err(to_py)?;
    bytes_out(py, out)
}

#[pyfunction(name = "msgpack_to_json", signature = (data, max_containers = None))]
fn py_msgpack_to_json<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    max_containers: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyBytes>> {
    if data.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err("expected bytes, not str"));
    }
    let max = match max_containers {
        None => 0,
        Some(m) => non_negative(m, "max_containers")?,
    };
    let data = input(data, "data")?;
    let out = py
        .detach(|| codec::msgpack_to_json(&data, max))
        .map_err(to_py)?;
    bytes_out(py, out)
}

#[pyfunction(name = "msgpack_to_json_counted")]
fn py_msgpack_to_json_counted<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    budget: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyBytes>, u64)> {
    if data.is_instance_of::<PyString>() {
        return Err(PyTypeError::new_err("expected bytes, not str"));
    }
    let budget = non_negative(budget, "budget")?;
    let data = input(data, "data")?;
    let (out, used) = py
        .detach(|| codec::msgpack_to_json_counted(&data, budget))
        .map_err(to_py)?;
    Ok((bytes_out(py, out)?, used))
}

/// An int (not a bool) >= 0 that fits u64, else ValueError naming `what`.
fn non_negative(v: &Bound<'_, PyAny>, what: &str) -> PyResult<u64> {
    if v.is_exact_instance_of::<PyInt>() {
        if let Ok(n) = v.extract::<u64>() {
            return Ok(n);
        }
    }
    Err(PyValueError::new_err(format!(
        "{what} must be a non-negative integer below 2**64, not {}",
        v.repr().map(|r| r.to_string()).unwrap_or_default()
    )))
}

/// A `seq` argument: an int (not a bool) >= 0.
fn seq_arg(seq: &Bound<'_, PyAny>) -> PyResult<u64> {
    if !seq.is_exact_instance_of::<PyInt>() {
        return Err(PyValueError::new_err(format!(
            "seq must be a non-negative integer, not {}",
            seq.repr().map(|r| r.to_string()).unwrap_or_default()
        )));
    }
    seq.extract::<u64>().map_err(|_| {
        PyValueError::new_err(format!(
            "seq must be a non-negative integer below 2**64, not {seq}"
        ))
    })
}

struct Inner {
    room: Room,
    json: Option<(u64, Py<PyBytes>)>,
    msgpack: Option<(u64, Py<PyBytes>)>,
}

/// One room's state held natively; see `_native.pyi`.
///
/// Thread-safe: the state sits behind a mutex that is only taken either with the GIL
/// released (the engine's work) or, briefly, with it held (the snapshot caches; `apply` of
/// a small delta, which only tries it), and never across a GIL re-acquisition, so threads
/// cannot deadlock on it.
#[pyclass(frozen, module = "kasagi_relay._native")]
struct RoomState {
    inner: Mutex<Inner>,
    /// Copies of the room's size and seq, updated under the mutex after every change:
    /// `json_size` and `seq` read them without waiting for the mutex (which long work holds
    /// with the GIL released; waiting for it with the GIL held would stall every thread).
    size: AtomicU64,
    memory: AtomicU64,
    seq: AtomicU64,
    max_bytes: u64,
    max_memory: u64,
}

impl RoomState {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // No code path panics while holding the lock; recover the data if one ever did.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lock if nobody holds it: for work done with the GIL held, which must not wait
    /// for another thread (it may hold the mutex for long, GIL released).
    fn try_lock(&self) -> Option<MutexGuard<'_, Inner>> {
        match self.inner.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Run `f` on the room under the mutex and publish its new size.
    fn locked_apply<T>(&self, f: impl FnOnce(&mut Room) -> T) -> T {
        let mut g = self.lock();
        let r = f(&mut g.room);
        self.publish(&g.room);
        r
    }

    fn publish(&self, room: &Room) {
        self.size.store(room.size(), Ordering::Release);
        self.memory.store(room.memory(), Ordering::Release);
        self.seq.store(room.seq(), Ordering::Release);
    }

    fn snapshot<'py>(&self, py: Python<'py>, msgpack: bool) -> PyResult<Bound<'py, PyBytes>> {
        {
            let g = self.lock();
            let cache = if msgpack { &g.msgpack } else { &g.json };
            if let Some((ver, b)) = cache {
                if *ver == g.room.version() {
                    return Ok(b.bind(py).clone());
                }
            }
        }
        let (ver, bytes) = py.detach(|| {
            let g = self.lock();
            let bytes = if msgpack {
                g.room.to_msgpack()
            } else {
                g.room.to_json()
            };
            (g.room.version(), bytes)
        });
        let b = bytes_out(py, bytes)?;
        let mut g = self.lock();
        if g.room.version() == ver {
            let entry = Some((ver, b.clone().unbind()));
            let old = if msgpack {
                std::mem::replace(&mut g.msgpack, entry)
            } else {
                std::mem::replace(&mut g.json, entry)
            };
            drop(g);
            drop(old);
        }
        Ok(b)
    }
}

#[pymethods]
impl RoomState {
    #[new]
    #[pyo3(signature = (state = None, seq = None, max_bytes = 0, max_memory = 0))]
    fn new(
        py: Python<'_>,
        state: Option<&Bound<'_, PyAny>>,
        seq: Option<&Bound<'_, PyAny>>,
        max_bytes: u64,
        max_memory: u64,
    ) -> PyResult<Self> {
        let seq = match seq {
            Some(s) => seq_arg(s)?,
            None => 0,
        };
        let state: Cow<'_, [u8]> = match state {
            Some(s) => input(s, "state")?,
            None => Cow::Borrowed(b"{}"),
        };
        let room = py
            .detach(|| Room::with_limits(&state, seq, max_bytes, max_memory))
            .map_err(to_py)?;
        Ok(RoomState {
            size: AtomicU64::new(room.size()),
            memory: AtomicU64::new(room.memory()),
            seq: AtomicU64::new(room.seq()),
            max_bytes,
            max_memory,
            inner: Mutex::new(Inner {
                room,
                json: None,
                msgpack: None,
            }),
        })
    }

    #[getter]
    fn seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    fn __repr__(&self) -> String {
        format!("<RoomState seq={}>", self.seq.load(Ordering::Acquire))
    }

    #[getter]
    fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    #[getter]
    fn max_memory(&self) -> u64 {
        self.max_memory
    }

    fn check(&self, py: Python<'_>, d: &Bound<'_, PyAny>) -> PyResult<()> {
        let d = input(d, "delta")?;
        // A small delta against a small state, the relay's common case, is checked with
        // the GIL held, as `apply` applies one: its work is bounded by their sizes, and
        // handing the GIL to a waiting thread could keep the caller (the event loop) off
        // it for up to the switch interval (5 ms). The mutex is only tried, as there.
        if d.len() <= SMALL_DELTA && self.json_size() <= SMALL_STATE {
            if let Some(mut g) = self.try_lock() {
                return g.room.check(&d).map_err(to_py);
            }
        }
        py.detach(|| self.lock().room.check(&d)).map_err(to_py)
    }

    fn apply(
        &self,
        py: Python<'_>,
        d: &Bound<'_, PyAny>,
        seq: &Bound<'_, PyAny>,
    ) -> PyResult<bool> {
        let seq = seq_arg(seq)?;
        let d = lenient(d)?;
        if d.len() > SMALL_DELTA {
            return py
                .detach(|| self.locked_apply(|room| room.apply(&d, seq)))
                .map_err(|e| PyValueError::new_err(e.0));
        }
        // A small delta, the relay's common case, is applied with the GIL held when its
        // work turns out to be small too (`Room::apply_bounded`: bounded by the delta's
        // size whatever the state's; otherwise it stops before changing anything).
        // Releasing and re-acquiring the GIL costs more than that work, and when another
        // thread is waiting for the GIL the caller (the event loop) may then wait up to the
        // switch interval (5 ms) to get it back. The mutex is only tried: another thread
        // may hold it for long (a snapshot or batch, GIL released), and waiting for it with
        // the GIL held would stall every Python thread; that case takes the released path.
        // Parsing with the GIL held is bounded by SMALL_DELTA.
        let delta = apply::parse_delta(&d).ok();
        let len = d.len();
        if let Some(r) = self.try_lock().and_then(|mut g| {
            let r = g.room.apply_bounded(delta.as_ref(), len, seq);
            self.publish(&g.room);
            r
        }) {
            return r.map_err(|e| PyValueError::new_err(e.0));
        }
        py.detach(|| self.locked_apply(|room| room.apply_parsed(delta.as_ref(), len, seq)))
            .map_err(|e| PyValueError::new_err(e.0))
    }

    fn apply_batch<'py>(
        &self,
        py: Python<'py>,
        ds: &Bound<'py, PyAny>,
        seq: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let seq = seq_arg(seq)?;
        let held = items(ds)?;
        let inputs = inputs(py, &held, |_, d| lenient(d))?;
        let out = py
            .detach(|| self.locked_apply(|room| room.apply_batch(&inputs, seq)))
            .map_err(|e| PyValueError::new_err(e.0))?;
        bytes_out(py, out)
    }

    fn failed(&self) -> Vec<u64> {
        self.lock().room.failed().to_vec()
    }

    fn to_json<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        self.snapshot(py, false)
    }

    fn to_msgpack<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        self.snapshot(py, true)
    }

    fn json_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// A clone of the parsed state (GIL released): no parse, so no parser buffers, and
    /// the copy's maps and arrays are allocated at their exact sizes (room.py's check
    /// copy; parsing `to_json()` again took 2.4x the state's memory at its peak).
    fn copy(&self, py: Python<'_>) -> RoomState {
        let room = py.detach(|| self.lock().room.clone());
        RoomState {
            size: AtomicU64::new(room.size()),
            memory: AtomicU64::new(room.memory()),
            seq: AtomicU64::new(room.seq()),
            max_bytes: self.max_bytes,
            max_memory: self.max_memory,
            inner: Mutex::new(Inner {
                room,
                json: None,
                msgpack: None,
            }),
        }
    }

    fn memory_size(&self) -> u64 {
        self.memory.load(Ordering::Acquire)
    }
}

/// `send_frame(fds, frame)`: the broadcast loop of `kasagi_relay/fanout.py` (rust/fanout.rs).
/// The GIL is released for the sends: thousands of them take milliseconds.
#[cfg(unix)]
#[pyfunction(name = "send_frame")]
fn py_send_frame(py: Python<'_>, fds: Vec<i32>, frame: &Bound<'_, PyBytes>) -> Vec<(usize, usize)> {
    let data = frame.as_bytes();
    py.detach(|| crate::fanout::send_to_all(&fds, data))
        .into_iter()
        .map(|s| (s.index, s.sent))
        .collect()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("IMPLEMENTATION", "native")?;
    m.add("MAX_DEPTH", crate::json::MAX_DEPTH)?;
    m.add("DeltaError", py.get_type::<DeltaError>())?;
    m.add("TooLarge", py.get_type::<TooLarge>())?;
    m.add("WORK_BASE", crate::apply::WORK_BASE)?;
    m.add("WORK_PER_BYTE", crate::apply::WORK_PER_BYTE)?;
    m.add("NODE_BYTES", crate::json::NODE_BYTES)?;
    m.add("MEMBER_BYTES", crate::json::MEMBER_BYTES)?;
    m.add_class::<RoomState>()?;
    m.add_function(wrap_pyfunction!(py_validate, m)?)?;
    m.add_function(wrap_pyfunction!(py_validate_request, m)?)?;
    m.add_function(wrap_pyfunction!(py_apply, m)?)?;
    m.add_function(wrap_pyfunction!(py_merge, m)?)?;
    m.add_function(wrap_pyfunction!(py_diff, m)?)?;
    m.add_function(wrap_pyfunction!(py_compact, m)?)?;
    m.add_function(wrap_pyfunction!(py_json_to_msgpack, m)?)?;
    m.add_function(wrap_pyfunction!(py_msgpack_to_json, m)?)?;
    m.add_function(wrap_pyfunction!(py_msgpack_to_json_counted, m)?)?;
    #[cfg(unix)]
    m.add_function(wrap_pyfunction!(py_send_frame, m)?)?;
    m.add_function(wrap_pyfunction!(py_read_frames, m)?)?;
    Ok(())
}

// The engine allocates many small strings and maps (parsed JSON); mimalloc is markedly
// faster than the system allocator for that. Only in the extension module.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `read_frames(data, max_size)`: the data frames at the start of `data` (rust/frames.rs) as
/// (opcode, payload) pairs, and how many bytes they take. With the GIL held, as the payloads
/// are made into `bytes` as they are unmasked: the relay passes one read of at most a few
/// KiB (session.FEED_SLICE), and the work is linear in it.
#[pyfunction(name = "read_frames")]
#[pyo3(signature = (data, max_size, /))]
fn py_read_frames<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyBytes>,
    max_size: Option<u64>,
) -> PyResult<(Bound<'py, PyList>, usize)> {
    let input = data.as_bytes();
    let (refs, used) = crate::frames::scan(input, max_size);
    let out = PyList::empty(py);
    for f in refs {
        let payload = PyBytes::new_with(py, f.len, |buf| {
            crate::frames::unmask(&input[f.start..f.start + f.len], f.mask, buf);
            Ok(())
        })?;
        out.append((f.opcode, payload))?;
    }
    Ok((out, used))
}
