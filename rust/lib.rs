//! kasagi-relay's native delta engine.
//!
//! The algorithms live in plain Rust modules with no PyO3 in them (`cargo test` exercises
//! them without Python); `python` is the one thin binding module, compiled when the optional
//! `pyo3` dependency is enabled (maturin does that, see Cargo.toml).
//!
//! Checks: `cargo fmt --check`, `cargo clippy --all-targets -- -D warnings`,
//! `cargo clippy --all-targets --features pyo3 -- -D warnings` (lints the binding too) and
//! `cargo test` (no Python needed; the RFC 6902 conformance cases are read from
//! `../shared/conformance/` when present).
//!
//! Semantics shared with the pure-Python twin (`kasagi_relay/_pydelta.py`) are written down
//! in the module docs: [`json`] (parsing, output format, equality), [`apply`] (RFC 6902 /
//! RFC 7396), [`merge`] (collapsing and composing deltas), [`diff`], [`compact`], [`room`].
//! [`fanout`] is the relay's broadcast loop (one frame, many sockets), apart from the engine.

pub mod apply;
pub mod codec;
pub mod compact;
pub mod delta;
pub mod diff;
pub mod error;
#[cfg(unix)]
pub mod fanout;
pub mod json;
pub mod merge;
pub mod pointer;
pub mod room;

#[cfg(feature = "pyo3")]
mod python;

pub use error::{DeltaError, Result};
pub use json::MAX_DEPTH;
