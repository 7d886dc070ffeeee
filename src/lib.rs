//! kmsguard watches AWS KMS through CloudTrail.
//!
//! Data flows one way: `source` (where log files come from) -> `decode` (bytes to
//! events, bounded and robust) -> `analyze` (rules and predicates to findings) ->
//! `report` (how findings are shown). `pipeline` wires the stages for a replay.
//! `event` is the contract between decode and analyze. See ARCHITECTURE.md.

pub mod analyze;
pub mod archive;
pub mod aws;
pub mod decode;
pub mod event;
pub mod pipeline;
pub mod report;
pub mod source;

pub use analyze::finding::{Finding, Kind, Severity};
pub use analyze::rule::RuleSet;
