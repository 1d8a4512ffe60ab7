//! The one error type of the engine: bad input (malformed JSON or delta, or a delta that
//! cannot apply). The Python binding maps it to `DeltaError(ValueError)`.

use std::fmt;

/// An error caused by the input, with a message meant for people (it names the failing
/// operation index and JSON Pointer when there is one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaError {
    msg: String,
}

impl DeltaError {
    pub fn new(msg: impl Into<String>) -> Self {
        DeltaError { msg: msg.into() }
    }

    pub fn message(&self) -> &str {
        &self.msg
    }

    /// The same error with `prefix: ` in front (e.g. `delta 3: ...`).
    pub fn context(self, prefix: impl fmt::Display) -> Self {
        DeltaError {
            msg: format!("{prefix}: {}", self.msg),
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
