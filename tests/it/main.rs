//! The one integration-test binary: drives the real `kmsguard` binary on real files
//! (ctgen corpora, the shipped samples, ctgen's malformed inputs) and real servers
//! (moto, aiosmtpd, HTTP receivers written in the tests).

mod alerts;
mod archive;
mod baselines;
mod daemon;
mod daemon_alerts;
mod daemon_archive;
mod forensic;
mod moto_smoke;
mod posture;
mod remediate;
mod replay;
mod rules_cli;
mod servers;
mod standalone;
mod support;
