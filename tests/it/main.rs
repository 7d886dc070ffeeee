//! The one integration-test binary: drives the real `kmsguard` binary on real files
//! (ctgen corpora, the shipped samples, ctgen's malformed inputs) and real servers
//! (moto, aiosmtpd, HTTP receivers written in the tests).

mod alerts;
mod moto_smoke;
mod replay;
mod rules_cli;
mod servers;
mod support;
