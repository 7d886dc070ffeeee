//! Events -> findings. `rule` holds rules.toml and its evaluation, `matcher` the
//! condition language, `predicates` the named checks rules call, `finding` the output
//! type, `fold` how repeated findings fold into one, `key_facts` what earlier events of a replay said about a key (offline key
//! conditions). Analysis does no I/O.

pub mod baseline;
pub mod finding;
pub mod fold;
pub mod key_facts;
pub mod matcher;
pub mod predicates;
pub mod rule;
