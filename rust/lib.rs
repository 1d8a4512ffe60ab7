//! kasagi-relay's native delta engine.
//!
//! The algorithms live in plain Rust modules with no PyO3 in them (`cargo test` exercises
//! them without Python); `python` is the one thin binding module (argument conversion, GIL
//! release, error mapping), compiled when the optional `pyo3` dependency is enabled
//! (maturin does that, see Cargo.toml).
//!
//! Modules, each depending only on those above it:
//! - [`error`]: the error type (`bad_patch`-kind errors and `TooLarge`);
//! - [`json`]: parsing with a nesting limit, the output format, exact output length, equality;
//! - [`pointer`](mod@pointer): RFC 6901 JSON Pointers and resolving them;
//! - [`delta`]: the delta model (`Op`, `Delta`), its parsing and canonical serialisation;
//! - [`apply`]: RFC 6902 / RFC 7396 application with the undo log, the work budget, exact
//!   size accounting and the member order rule (`swap_remove`);
//! - [`merge`] (collapsing and composing deltas), [`diff`], [`compact`], [`codec`]
//!   (MessagePack), [`room`] (one room's state);
//! - [`fanout`] is the relay's broadcast loop (one frame, many sockets) and [`frames`] its
//!   reading of client frames, apart from the engine.
//!
//! The pure-Python twin (`kasagi_relay/_pydelta.py`) implements exactly the same semantics
//! (same results, same failures, same work counting, same key order, same bytes). It is NOT
//! a server mode: it is (1) the test oracle the native engine is compared against byte for
//! byte (tests/test_delta_properties.py), written for clarity rather than speed (it may be
//! O(n) where this engine is O(1), e.g. member removal), and (2) the engine of the
//! pure-Python client, where no native build exists. A relay runs this native engine.
//!
//! Checks: `cargo fmt --check`, `cargo clippy --all-targets -- -D warnings`,
//! `cargo clippy --all-targets --features pyo3 -- -D warnings` (lints the binding too) and
//! `cargo test` (no Python needed; the RFC 6902 conformance cases are read from the
//! repository's conformance directory when present).

pub mod apply;
pub mod codec;
pub mod compact;
pub mod delta;
pub mod diff;
pub mod error;
#[cfg(unix)]
pub mod fanout;
pub mod frames;
pub mod json;
pub mod merge;
pub mod pointer;
pub mod room;

#[cfg(feature = "pyo3")]
mod python;

pub use error::{DeltaError, Result};
pub use json::MAX_DEPTH;
