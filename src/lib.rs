//! kmsguard watches AWS KMS through CloudTrail.
//!
//! Data flows one way: `source` (where log files come from) -> `decode` (bytes to
//! events, bounded and robust) -> `analyze` (rules and predicates to findings) ->
//! `report` (how findings are shown) and `act` (alert channels: routing, email,
//! webhooks). `pipeline` wires the stages for a replay.
//! `event` is the contract between decode and analyze. `daemon` runs the service, whose
//! findings leave through `outbox` sinks, one of which is `remediate` (KMS API fixes).
//! See ARCHITECTURE.md.

pub mod act;
pub mod analyze;
pub mod archive;
pub mod aws;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod decode;
pub mod event;
pub mod html_report;
pub mod inventory;
pub mod json;
pub mod outbox;
pub mod pipeline;
pub mod posture;
pub mod remediate;
pub mod report;
pub mod source;
pub mod store;
pub mod telemetry;
pub mod timeline;

pub use analyze::finding::{Finding, Kind, Severity};
pub use analyze::rule::RuleSet;
