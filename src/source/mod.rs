//! Where CloudTrail log files come from: local files and folders (`files`), a trail
//! bucket in S3 (`s3`), and SQS notifications (`notification`, for the daemon). Every
//! source yields `LogInput`s in time order; the decoder does not know where bytes came
//! from beyond the name carried into findings.

pub mod files;
pub mod lookup_events;
pub mod notification;
pub mod s3;

pub use files::{collect_files, walk, LogFile, SourceError, Walk, Walked};

impl From<Walked> for LogInput {
    fn from(w: Walked) -> LogInput {
        match w {
            Walked::File(f) => LogInput::Local(f),
            Walked::Problem { path, why } => LogInput::Unreadable { name: path, why },
        }
    }
}
pub use lookup_events::ApiSlice;
pub use s3::S3Object;

/// One unit of input for the replay pipeline: a file on disk, an object in S3 or a slice
/// of time from the CloudTrail API (both fetched by a worker), or a batch already in memory (a `{"Records":[...]}` document, e.g.
/// events from the CloudTrail API).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogInput {
    Local(LogFile),
    S3(S3Object),
    /// A slice of time read from the CloudTrail API (LookupEvents).
    Api(ApiSlice),
    Memory {
        /// Shown in findings' `file` and in problem reports.
        name: String,
        /// The ledger entry of this batch.
        ledger: String,
        bytes: Vec<u8>,
    },
    /// Something a source found but cannot read (a folder it cannot list, a FIFO): the
    /// replay reports it once, counts it bad and goes on.
    Unreadable {
        name: String,
        why: String,
    },
}

impl LogInput {
    /// The name shown in findings and problem reports.
    pub fn name(&self) -> String {
        match self {
            LogInput::Local(f) => f.path.display().to_string(),
            LogInput::S3(o) => o.url(),
            LogInput::Api(s) => s.name(),
            LogInput::Memory { name, .. } => name.clone(),
            LogInput::Unreadable { name, .. } => name.clone(),
        }
    }

    /// Bytes to read (compressed size), for progress.
    pub fn size(&self) -> u64 {
        match self {
            LogInput::Local(f) => f.size,
            LogInput::S3(o) => o.size,
            // Unknown until read; progress counts slices.
            LogInput::Api(_) => 0,
            LogInput::Memory { bytes, .. } => bytes.len() as u64,
            LogInput::Unreadable { .. } => 0,
        }
    }

    /// When the input starts, in seconds since the epoch: the stamp in a log file's name,
    /// a slice's start; None when unknown (sorted first).
    pub fn start_secs(&self) -> Option<i64> {
        match self {
            LogInput::Local(f) => s3::stamp_secs(&f.path.to_string_lossy()),
            LogInput::S3(o) => o.stamp_secs(),
            LogInput::Api(s) => Some(s.from),
            LogInput::Memory { .. } => None,
            LogInput::Unreadable { name, .. } => s3::stamp_secs(name),
        }
    }

    /// The ledger key under which the input's baseline effects are committed once.
    pub fn ledger_key(&self) -> String {
        match self {
            LogInput::Local(f) => files::ledger_key(f),
            LogInput::S3(o) => o.ledger_key(),
            LogInput::Api(s) => s.ledger_key(),
            LogInput::Memory { ledger, .. } => ledger.clone(),
            LogInput::Unreadable { name, .. } => format!("unreadable:{name}"),
        }
    }
}
