//! The one error type of the engine: bad input (malformed JSON or delta, a delta that
//! cannot apply, or one that needs too much work), or a delta that would make the state
//! larger than its limit ([`ErrorKind::TooLarge`]). The Python binding maps them to
//! `DeltaError(ValueError)` and its subclass `TooLarge`.

use std::fmt;

/// An error caused by the input, with a message meant for people (it names the failing
/// operation index and JSON Pointer when there is one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaError {
    msg: String,
    kind: ErrorKind,
}

/// What kind of refusal: the wire protocol answers `bad_patch` and `too_large`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Malformed, cannot apply, or needs too much work.
    Bad,
    /// Would take the state past its `max_bytes`.
    TooLarge,
}

impl DeltaError {
    pub fn new(msg: impl Into<String>) -> Self {
        DeltaError {
            msg: msg.into(),
            kind: ErrorKind::Bad,
        }
    }

    pub fn too_large(msg: impl Into<String>) -> Self {
        DeltaError {
            msg: msg.into(),
            kind: ErrorKind::TooLarge,
        }
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn is_too_large(&self) -> bool {
        self.kind == ErrorKind::TooLarge
    }

    pub fn message(&self) -> &str {
        &self.msg
    }

    /// The same error with `prefix: ` in front (e.g. `delta 3: ...`).
    pub fn context(self, prefix: impl fmt::Display) -> Self {
        DeltaError {
            msg: format!("{prefix}: {}", self.msg),
            kind: self.kind,
        }
    }
}

impl fmt::Display for DeltaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for DeltaError {}

pub type Result<T, E = DeltaError> = std::result::Result<T, E>;
