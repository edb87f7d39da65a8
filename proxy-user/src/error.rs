//! Errors of the connection lifecycle: where they came from, and whether a
//! retry is safe.

use http::StatusCode;

/// Who caused an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The client sent something wrong or went away.
    Client,
    /// The origin could not be reached, was slow, or answered wrongly.
    Origin,
    /// Sluice itself (a resource or a kernel facility failed).
    Internal,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Client => "client",
            Source::Origin => "origin",
            Source::Internal => "internal",
        })
    }
}

/// An error in one phase of a connection.
#[derive(Debug, thiserror::Error)]
#[error("{source_side} error in {phase}: {reason}")]
pub struct ProxyError {
    /// Who caused it.
    pub source_side: Source,
    /// The lifecycle phase it happened in.
    pub phase: &'static str,
    /// Status sent to the client, if it is still waiting for one.
    pub status: StatusCode,
    /// True if a client may retry the same handshake and expect it to work
    /// (nothing reached the origin, or the origin was only momentarily away).
    pub retry_safe: bool,
    /// Human-readable reason (also the response body).
    pub reason: String,
}

impl ProxyError {
    /// A client error: the request was malformed; retrying it unchanged fails again.
    pub fn client(phase: &'static str, status: StatusCode, reason: impl Into<String>) -> Self {
        ProxyError {
            source_side: Source::Client,
            phase,
            status,
            retry_safe: false,
            reason: reason.into(),
        }
    }

    /// An origin error.
    pub fn origin(
        phase: &'static str,
        status: StatusCode,
        retry_safe: bool,
        reason: impl Into<String>,
    ) -> Self {
        ProxyError {
            source_side: Source::Origin,
            phase,
            status,
            retry_safe,
            reason: reason.into(),
        }
    }

    /// An internal error; the request never reached the origin, so a retry is safe.
    pub fn internal(phase: &'static str, reason: impl Into<String>) -> Self {
        ProxyError {
            source_side: Source::Internal,
            phase,
            status: StatusCode::INTERNAL_SERVER_ERROR,
            retry_safe: true,
            reason: reason.into(),
        }
    }
}
