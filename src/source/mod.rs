//! Where CloudTrail log files come from. Today: local files and folders (`files`).
//! Every source yields `LogFile`s; the decoder does not know where bytes came from
//! beyond the name carried into findings.

pub mod files;
pub mod notification;

pub use files::{collect_files, LogFile, SourceError};
