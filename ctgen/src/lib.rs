//! ctgen: a deterministic generator of realistic AWS CloudTrail corpora for kmsguard's
//! tests and benchmarks.
//!
//! It writes gzipped CloudTrail files in the layout CloudTrail uses in S3, the S3 event
//! notifications (and CloudTrail's SNS form) that announce them, and incidents injected
//! into ordinary traffic with their ground truth in `truth.json`. Other shapes: one very
//! large file (`--single-file-mb`), an organization trail of many tiny files
//! (`--tiny-files`), hostile single files (`--hostile`), and broken inputs
//! (`--malformed`). The same arguments give the same bytes.
//!
//! ```text
//! cargo run --release -p ctgen -- --out DIR --hours 72 --events-per-hour 20000 --scenarios all --seed 7
//! ```
//!
//! Tests call [`run`] in process with the same arguments.

mod incidents;
pub mod json;
mod layout;
mod malformed;
pub mod rng;
mod shapes;
pub mod time;
mod traffic;
pub mod world;

use clap::Parser;
use json::J;
use rng::Rng;
use std::collections::BTreeMap;
use std::path::PathBuf;
use world::World;

pub use incidents::SCENARIOS;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "ctgen",
    about = "Deterministic, realistic CloudTrail corpora (gzipped files in the S3 layout, notifications, truth)"
)]
pub struct Options {
    /// Folder to write the corpus into (created if missing).
    #[arg(long, required_unless_present = "malformed")]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Start of the time range (UTC).
    #[arg(long, default_value = "2026-10-01T00:00:00Z")]
    pub start: String,
    #[arg(long, default_value_t = 24.0)]
    pub hours: f64,
    #[arg(long, default_value_t = 20_000)]
    pub events_per_hour: u64,
    /// Share of the events that are KMS calls.
    #[arg(long, default_value_t = 0.3)]
    pub kms_share: f64,
    /// Incidents to inject: a comma list of scenario names, or `all`.
    #[arg(long, default_value = "")]
    pub scenarios: String,
    /// Share of the time range before any incident (baselines need history).
    #[arg(long, default_value_t = 0.7)]
    pub warmup: f64,
    /// Organization trail layout: `AWSLogs/o-…/ACCOUNT/…`.
    #[arg(long)]
    pub org_trail: bool,
    /// Also write `CloudTrail-Digest/` files (hourly), which consumers must skip.
    #[arg(long)]
    pub digests: bool,
    /// More applications reach KMS through AWS services on their behalf (Secrets
    /// Manager, EBS with `AWS Internal` source addresses) besides S3.
    #[arg(long)]
    pub service_traffic: bool,
    /// One file of about this many MB of JSON (memory and streaming tests).
    #[arg(long, default_value_t = 0)]
    pub single_file_mb: u64,
    /// An organization trail of this many tiny files (one per account, region and five
    /// minutes), `--records-per-file` records each.
    #[arg(long, default_value_t = 0)]
    pub tiny_files: u64,
    #[arg(long, default_value_t = 1)]
    pub records_per_file: u64,
    /// Accounts of the `--tiny-files` organization.
    #[arg(long, default_value_t = 100)]
    pub accounts: u64,
    /// One hostile file: `repeated-denied` (one principal's identical denied Decrypts),
    /// `distinct-denied` (one principal, a different key each time) or
    /// `distinct-principals` (a different IAM user per record).
    #[arg(long, value_parser = ["repeated-denied", "distinct-denied", "distinct-principals"])]
    pub hostile: Option<String>,
    /// Records of a `--hostile` file.
    #[arg(long, default_value_t = 300_000)]
    pub records: u64,
    /// Write the broken and hostile inputs (with `manifest.json`) into this folder.
    #[arg(long)]
    pub malformed: Option<PathBuf>,
}

impl Options {
    /// Options from command-line style arguments (without the program name).
    pub fn from_args<I, S>(args: I) -> Result<Options, clap::Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString> + Clone,
    {
        let argv = std::iter::once(std::ffi::OsString::from("ctgen"))
            .chain(args.into_iter().map(Into::into));
        Options::try_parse_from(argv)
    }
}

/// What a run wrote, for its one line of output.
#[derive(Debug, Default)]
pub struct Summary {
    pub files: u64,
    pub events: u64,
    pub kms_events: u64,
    pub json_bytes: u64,
    pub gzip_bytes: u64,
    pub incidents: usize,
    pub note: String,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.note.is_empty() {
            return f.write_str(&self.note);
        }
        write!(
            f,
            "{} files, {} events ({} KMS), {:.1} MB raw, {:.1} MB gzipped, {} incidents",
            self.files,
            self.events,
            self.kms_events,
            self.json_bytes as f64 / 1e6,
            self.gzip_bytes as f64 / 1e6,
            self.incidents
        )
    }
}

/// Runs the generator as its command line would.
pub fn run(opts: &Options) -> std::io::Result<Summary> {
    if let Some(dir) = &opts.malformed {
        return malformed::write(dir);
    }
    let out = opts
        .out
        .clone()
        .expect("clap requires --out without --malformed");
    let names = scenario_names(&opts.scenarios)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let start = time::parse(&opts.start).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "--start {:?} is not a time like 2026-10-01T00:00:00Z",
                opts.start
            ),
        )
    })?;
    let mut gen = Gen::new(opts.clone(), start, out);
    if opts.single_file_mb > 0 {
        return gen.big_file();
    }
    if opts.tiny_files > 0 {
        return gen.tiny_files();
    }
    if let Some(kind) = &opts.hostile {
        return gen.hostile(kind);
    }
    gen.normal();
    gen.inject(&names);
    gen.write()
}

fn scenario_names(list: &str) -> Result<Vec<String>, String> {
    if list == "all" {
        return Ok(SCENARIOS.iter().map(|s| s.to_string()).collect());
    }
    let names: Vec<String> = list
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let unknown: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| !SCENARIOS.contains(n))
        .collect();
    if unknown.is_empty() {
        Ok(names)
    } else {
        Err(format!(
            "unknown scenarios: {}; known: {}",
            unknown.join(", "),
            SCENARIOS.join(", ")
        ))
    }
}

/// One generation run: the world, its clock range, and the records filed so far by
/// (account, region, five-minute window).
pub(crate) struct Gen {
    pub opts: Options,
    pub rng: Rng,
    pub w: World,
    pub start: i64,
    pub end: i64,
    pub out: PathBuf,
    pub buckets: BTreeMap<(String, String, i64), Vec<(i64, J)>>,
    pub truth: Vec<J>,
}

impl Gen {
    fn new(opts: Options, start: i64, out: PathBuf) -> Gen {
        let mut rng = Rng::new(opts.seed);
        let w = World::new(&mut rng, opts.service_traffic);
        let end = start + (opts.hours * 3600.0) as i64;
        Gen {
            opts,
            rng,
            w,
            start,
            end,
            out,
            buckets: BTreeMap::new(),
            truth: Vec::new(),
        }
    }

    /// Files a record into the delivery of its account, region and five minutes.
    pub(crate) fn file(&mut self, t: i64, r: J) {
        let account = r
            .get("recipientAccountId")
            .and_then(J::as_str)
            .unwrap_or_default()
            .to_string();
        let region = r
            .get("awsRegion")
            .and_then(J::as_str)
            .unwrap_or_default()
            .to_string();
        let window = t - t.rem_euclid(300);
        self.buckets
            .entry((account, region, window))
            .or_default()
            .push((t, r));
    }
}
