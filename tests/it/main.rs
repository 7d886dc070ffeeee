//! The one integration-test binary: drives the real `kmsguard` binary on real files
//! (ctgen corpora, the shipped samples, ctgen's malformed inputs).

mod baselines;
mod daemon;
mod moto_smoke;
mod posture;
mod remediate;
mod replay;
mod rules_cli;
mod support;
