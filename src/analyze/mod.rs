//! Events -> findings. `rule` holds rules.toml and its evaluation, `matcher` the
//! condition language, `predicates` the named checks rules call, `finding` the output
//! type. Analysis does no I/O.

pub mod baseline;
pub mod finding;
pub mod matcher;
pub mod predicates;
pub mod rule;
