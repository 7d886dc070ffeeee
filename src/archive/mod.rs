//! The alert archive: envelope-encrypted, hash-chained segments of alerts in the AWS
//! Encryption SDK message format, so `aws-encryption-cli --decrypt` opens them with the
//! KMS key alone. See docs/archive.md.
//!
//! `message` is the byte format (pure), `kms` wraps and unwraps data keys, `segment` is
//! what a segment says about itself (encryption context, name, chain hash), `store` is
//! where segments live (folder or S3), `writer` has the `Archiver` (buffering for `archive
//! write`, exact one-segment sealing for the daemon), `sink` is the daemon's
//! `[[sinks.archive]]` over the outbox, and `reader` lists, prints, decrypts and verifies.

pub mod commands;
pub mod kms;
pub mod message;
pub mod reader;
pub mod segment;
pub mod sink;
pub mod store;
pub mod writer;

pub use kms::Keyring;
pub use reader::{AlertFilter, VerifyReport};
pub use segment::SegmentInfo;
pub use sink::{ArchiveSink, ArchiveSinkStats};
pub use store::{Location, Store};
pub use writer::{Archiver, ArchiverConfig, ArchiverStats, Sealed, SealedSegment};

/// Why an archive operation failed. Each variant names the segment, file or key, and the
/// message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{segment}: {source}")]
    Format {
        segment: String,
        source: message::FormatError,
    },
    #[error("{segment}: {message}")]
    Segment { segment: String, message: String },
    #[error("KMS {op} with key {key} failed: {message} (check the key ARN, its region, the key policy and your credentials)")]
    Kms {
        op: &'static str,
        key: String,
        message: String,
    },
    #[error("{segment}: no data key could be unwrapped{}: it is wrapped by [{wrapped_by}]{} (pass --key with one of those keys, or a multi-Region replica of it)",
        key.as_ref().map(|k| format!(" with {k}")).unwrap_or_default(),
        last_error.as_ref().map(|e| format!("; last error: {e}")).unwrap_or_default())]
    NoUsableKey {
        segment: String,
        wrapped_by: String,
        key: Option<String>,
        last_error: Option<String>,
    },
    #[error("{location}: {message}")]
    Store { location: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
}
