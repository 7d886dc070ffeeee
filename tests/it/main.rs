//! The one integration-test binary: drives the real `kmsguard` binary on real files
//! (ctgen corpora, the shipped samples, ctgen's malformed inputs).

mod archive;
mod moto_smoke;
mod replay;
mod rules_cli;
mod support;
