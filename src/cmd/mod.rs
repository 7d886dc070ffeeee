//! The binary's subcommands that need more than a few lines: each parses nothing (clap
//! did), runs the library, and prints.

pub mod replay;
