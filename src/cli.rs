//! The command line: clap definitions with examples in every help text.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "kmsguard",
    version,
    about = "Watch AWS KMS through CloudTrail: rules, forensic replay and alerts",
    after_help = "Examples:\n  kmsguard replay samples/\n  kmsguard replay --format table --fail-on high /var/log/cloudtrail/AWSLogs\n  kmsguard rules list\n  kmsguard rules test my-rules.toml\n  kmsguard alerts test oncall-mail --config alerts.toml\n  kmsguard archive verify s3://audit-bucket/archive\n\nExit codes: 0 success; 1 a finding at or above --fail-on, or a rule test failed;\n2 bad arguments, rules or input paths."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Replay CloudTrail log files or folders through the rules and print findings.
    #[command(
        after_help = "Examples:\n  kmsguard replay samples/\n  kmsguard replay --format jsonl --output findings.jsonl AWSLogs/\n  kmsguard replay s3://trail-bucket/prefix --from 2026-10-01 --to 2026-10-02T06:00:00Z --account 111122223333\n  kmsguard replay --rules my-rules.toml --fail-on high trail-export/\n  kmsguard replay --jobs 1 --summary json big.json.gz\n\nFolders are read recursively: *.json.gz and *.json files, CloudTrail-Digest files skipped.\nExit codes: 0 done; 1 a finding at or above --fail-on; 2 bad arguments, rules or paths."
    )]
    Replay(ReplayArgs),
    /// Audit every customer-managed KMS key against best practice (rotation, policies,
    /// grants, tags, multi-Region DR, unused keys) and print posture findings.
    #[command(
        after_help = "Examples:\n  kmsguard posture --region us-east-1 --region eu-west-1\n  kmsguard posture --config kmsguard.toml --format table --fail-on high\n  kmsguard replay --state /var/lib/kmsguard AWSLogs/ && kmsguard posture --state /var/lib/kmsguard\n  kmsguard posture --list-checks\n\nUse-based checks (unused keys, disabled keys still in use) need CloudTrail history recorded\nby `kmsguard replay --state DIR` into the same DIR.\nExit codes: 0 done; 1 a finding at or above --fail-on; 2 bad arguments or config, or the\nkeys of a region could not be listed with the default credentials. An account whose\n[inventory] role cannot be used is skipped with a `health-inventory-role` finding (high),\nwhich counts for --fail-on like any finding."
    )]
    Posture(PostureArgs),
    /// List the rules or run their inline tests.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Run the daemon: long-poll SQS for new CloudTrail files, analyze them, deliver findings.
    #[command(
        after_help = "Examples:\n  kmsguard run --config /etc/kmsguard/kmsguard.toml\n  kmsguard run --config kmsguard.toml --log-format json\n\nSIGTERM stops it gracefully, SIGHUP reloads the rules. See docs/daemon.md.\nExit codes: 0 stopped cleanly; 2 invalid configuration or rules; 3 runtime failure."
    )]
    Run {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Log format on stderr [default: text on a terminal, json otherwise].
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
    },
    /// Validate a daemon configuration file (and its rules) without starting.
    #[command(after_help = "Examples:\n  kmsguard check-config /etc/kmsguard/kmsguard.toml")]
    CheckConfig { file: PathBuf },
    /// Show, export or forget what kmsguard believes is normal per principal.
    #[command(subcommand)]
    Baseline(BaselineCommand),
    /// Show what automatic remediation would do for one finding of the daemon (read-only:
    /// only state reads are sent to KMS).
    #[command(
        after_help = "Examples:\n  kmsguard remediate --dry-run 3f2a9c0e1b7d4e5f8a6b0c1d2e3f4a5b --config /etc/kmsguard/kmsguard.toml\n\nThe finding is looked up by id in the config's [[sinks.file]] JSON Lines files. The plan is\nprinted as one `kind: \"remediation\"` finding (JSON). See docs/remediation.md.\nExit codes: 0 plan shown; 2 bad config, finding not found, or no --dry-run."
    )]
    Remediate {
        /// Show the plan only (required: enforcement runs in the daemon, with its rate
        /// limit and circuit breaker).
        #[arg(long)]
        dry_run: bool,
        /// The finding's `id`.
        #[arg(value_name = "FINDING_ID")]
        finding_id: String,
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Send alerts through the channels of a config file: a test alert, or findings.
    #[command(subcommand)]
    Alerts(AlertsCommand),
    /// Write, list, print, decrypt and verify the encrypted, hash-chained alert archive.
    #[command(subcommand)]
    Archive(ArchiveCommand),
    /// Measure raw decompression speed of log files (used by scripts/bench).
    #[command(after_help = "Examples:\n  kmsguard bench-inflate /var/tmp/kmsguard-bench/AWSLogs")]
    BenchInflate {
        /// Files or folders, as for replay.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One JSON object per finding per line (default when stdout is not a terminal).
    Jsonl,
    /// An aligned table and a summary (default on a terminal).
    Table,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SummaryFormat {
    Text,
    Json,
    None,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// CloudTrail log files (*.json.gz, *.json) or folders of them, or a trail bucket
    /// `s3://BUCKET/PREFIX` (with --from).
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Read only log files whose name stamp is at or after TIME (`2026-10-01T12:00:00Z`
    /// or `2026-10-01`); required for s3:// sources.
    #[arg(long, value_name = "TIME")]
    pub from: Option<String>,
    /// Read only log files whose name stamp is at or before TIME [default: now].
    #[arg(long, value_name = "TIME")]
    pub to: Option<String>,
    /// s3:// sources: read only this account (repeatable) [default: every account found].
    #[arg(long, value_name = "ID")]
    pub account: Vec<String>,
    /// Also write a self-contained HTML report (timeline per hour by operation with the
    /// findings marked, per-principal and per-key tables, filters) to FILE.
    #[arg(long, value_name = "FILE.html")]
    pub report: Option<PathBuf>,
    /// s3:// sources: read only this region (repeatable) [default: every region found].
    #[arg(long, value_name = "REGION")]
    pub region: Vec<String>,
    /// Output format [default: table on a terminal, jsonl otherwise].
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Rules file [default: the rules.toml built into kmsguard].
    #[arg(long, value_name = "FILE")]
    pub rules: Option<PathBuf>,
    /// More rules or [[suppress]] entries on top of --rules (repeatable), e.g. known-good
    /// activity of your CI role.
    #[arg(long, value_name = "FILE")]
    pub extra_rules: Vec<PathBuf>,
    /// State directory for baselines, the ledger of processed files and the key inventory
    /// (with when CloudTrail last showed each key) [default: a temporary one, so anomalies
    /// are still found within the files read].
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Train baselines only (needs --state to be useful): report nothing.
    #[arg(long, requires = "state")]
    pub learn_only: bool,
    /// Rules only: no baselines, no anomaly findings.
    #[arg(long, conflicts_with_all = ["state", "learn_only"])]
    pub no_baselines: bool,
    /// Configuration file; replay uses its [baseline] section (detector settings), with
    /// --enrich its [inventory] roles (keys of other accounts), and with --remediate its
    /// [remediation] and [aws] sections.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Also send the findings as alerts through the channels of FILE (its
    /// [[sinks.email]] and [[sinks.webhook]] tables, docs/alerts.md). Replay never sends
    /// alerts without it.
    #[arg(long, value_name = "FILE")]
    pub alerts: Option<PathBuf>,
    /// Write findings to FILE instead of stdout.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Exit 1 when any finding is at least this severe.
    #[arg(long, value_name = "SEVERITY")]
    pub fail_on: Option<crate_severity::SeverityArg>,
    /// Worker threads [default: number of cores].
    #[arg(long, short, value_name = "N")]
    pub jobs: Option<usize>,
    /// Run summary on stderr [default: text after a table, none with jsonl].
    #[arg(long, value_enum)]
    pub summary: Option<SummaryFormat>,
    /// No progress line and no per-file problem reports on stderr.
    #[arg(long, short)]
    pub quiet: bool,
    /// Largest record accepted, in bytes; larger ones are skipped and reported.
    #[arg(long, default_value_t = 4 << 20, value_name = "BYTES")]
    pub max_record_bytes: usize,
    /// Add each finding's key alias and tags from the KMS API (DescribeKey, ListAliases,
    /// ListResourceTags ...; cached in --state). Without API access the findings stay as
    /// they are and a warning says why. With --state, replay also records when CloudTrail
    /// last showed each key, for `kmsguard posture --state` (a second read of the files).
    #[arg(long)]
    pub enrich: bool,
    /// Run automatic remediation ([remediation] of --config, in its mode) on findings of
    /// events newer than its max_event_age_secs; the remediation findings are output
    /// with the others. Without this flag replay never calls anything that changes state.
    #[arg(long, requires = "config")]
    pub remediate: bool,
    /// Largest decompressed size of one file, in bytes.
    #[arg(long, default_value_t = 4 << 30, value_name = "BYTES")]
    pub max_file_bytes: u64,
    /// Decompression ratio above which a file is treated as a gzip bomb.
    #[arg(long, default_value_t = 200, value_name = "RATIO")]
    pub max_ratio: u64,
    /// With --state: forget, at the end, ledger entries of files more than DAYS older
    /// (by their names' time stamps) than the newest file read.
    #[arg(long, default_value_t = 30, value_name = "DAYS")]
    pub ledger_days: u32,
}

#[derive(Debug, Args)]
pub struct PostureArgs {
    /// Region to audit (repeatable) [default: [posture] regions, else the SDK's region].
    #[arg(long, value_name = "REGION")]
    pub region: Vec<String>,
    /// Config file with a [posture] section (checks to disable, allowlists, tags ...) and
    /// an [inventory] section (roles per account for keys of other accounts); the
    /// daemon's config file works too.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Output format [default: table on a terminal, jsonl otherwise].
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Write findings to FILE instead of stdout.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Exit 1 when any finding is at least this severe.
    #[arg(long, value_name = "SEVERITY")]
    pub fail_on: Option<crate_severity::SeverityArg>,
    /// State directory (the key inventory, and CloudTrail last-seen times recorded by
    /// `replay --state`) [default: a temporary one].
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Reuse inventory records younger than this many seconds instead of reading the API.
    #[arg(long, default_value_t = 0, value_name = "SECS")]
    pub max_age: u64,
    /// No summary line on stderr.
    #[arg(long, short)]
    pub quiet: bool,
    /// Print the checks (id, severity, title) and exit.
    #[arg(long)]
    pub list_checks: bool,
}

#[derive(Debug, Subcommand)]
pub enum BaselineCommand {
    /// Print one principal's baseline as JSON.
    #[command(
        after_help = "Examples:\n  kmsguard baseline show --state /var/lib/kmsguard arn:aws:iam::111122223333:role/app\n  kmsguard baseline show --state st 'arn:aws:iam::111122223333:role/app via s3.amazonaws.com'"
    )]
    Show {
        /// The stable principal: a role ARN (not the session), user ARN, service, or
        /// `ROLE via SERVICE` for calls a service made on its behalf.
        principal: String,
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
    },
    /// Print every baseline as one JSON object keyed by principal.
    #[command(
        after_help = "Examples:\n  kmsguard baseline export --state /var/lib/kmsguard > baselines.json"
    )]
    Export {
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
    },
    /// Delete a principal's baseline (it starts learning again).
    #[command(
        after_help = "Examples:\n  kmsguard baseline forget --state /var/lib/kmsguard arn:aws:iam::111122223333:role/app"
    )]
    Forget {
        principal: String,
        #[arg(long, value_name = "DIR")]
        state: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Show every rule: id, severity, title.
    #[command(
        after_help = "Examples:\n  kmsguard rules list\n  kmsguard rules list --rules my-rules.toml"
    )]
    List {
        /// Rules file [default: the built-in rules].
        #[arg(long, value_name = "FILE")]
        rules: Option<PathBuf>,
    },
    /// Run the inline tests of every rule and report pass/fail per rule.
    #[command(
        after_help = "Examples:\n  kmsguard rules test\n  kmsguard rules test my-rules.toml\n\nExit codes: 0 all passed; 1 a test failed; 2 the file is invalid."
    )]
    Test {
        /// Rules file [default: the built-in rules].
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AlertsCommand {
    /// Send a clearly marked test alert through one channel, to check the path end to end.
    #[command(
        after_help = "Examples:\n  kmsguard alerts test oncall-mail --config /etc/kmsguard/alerts.toml\n  kmsguard alerts test pagerduty --config alerts.toml --retry-for 1m\n\nPrints one JSON line with the outcome. Exit codes: 0 delivered; 1 not delivered\n(the error says whether it was transient or permanent); 2 bad config or channel name."
    )]
    Test {
        /// The channel's `name` in the config file.
        channel: String,
        /// TOML file with [[sinks.email]] and [[sinks.webhook]] tables (docs/alerts.md),
        /// or the daemon's config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Retry transient failures for this long, e.g. 30s, 5m [default: one attempt].
        #[arg(long, value_name = "DURATION", default_value = "0s")]
        retry_for: String,
    },
    /// Route findings (JSON Lines) through grouping, digests and rate limits to every
    /// channel, and deliver the alerts.
    #[command(
        after_help = "Examples:\n  kmsguard replay --format jsonl AWSLogs/ | kmsguard alerts send --config alerts.toml\n  kmsguard alerts send --config alerts.toml findings.jsonl\n\nPrints one JSON line per alert (channel, status, attempts, latency) on stdout and\na summary on stderr. At the end of input, groups still open are sent at once.\nExit codes: 0 every alert delivered; 1 some alert not delivered; 2 bad config or input file."
    )]
    Send {
        /// TOML file with [[sinks.email]] and [[sinks.webhook]] tables (docs/alerts.md).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Findings as JSON Lines [default: standard input].
        findings: Option<PathBuf>,
        /// Rules file whose descriptions are shown in alerts [default: the built-in rules].
        #[arg(long, value_name = "FILE")]
        rules: Option<PathBuf>,
        /// Retry transient failures of an alert for this long, e.g. 30s, 5m.
        #[arg(long, value_name = "DURATION", default_value = "5m")]
        retry_for: String,
    },
    /// List the alerts the daemon has not delivered yet, per channel, and the parked ones.
    #[command(
        after_help = "Examples:\n  kmsguard alerts pending --config /etc/kmsguard/kmsguard.toml\n\nAsks the running daemon (through control.sock in its state directory), or reads the\nstate directory when no daemon runs. Prints one JSON line per alert on stdout and a\nsummary per channel on stderr. Exit codes: 0 nothing parked; 1 some alert parked;\n2 bad config or unreadable state."
    )]
    Pending {
        /// The daemon's config file (its [state] dir holds the alert queue).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Re-queue parked alerts (of one channel, or all) for delivery.
    #[command(
        after_help = "Examples:\n  kmsguard alerts retry --config /etc/kmsguard/kmsguard.toml oncall-mail\n  kmsguard alerts retry --config /etc/kmsguard/kmsguard.toml\n\nParked alerts go back to the front of their channel's queue and are tried at once,\nwith a fresh park_after. Exit codes: 0 done; 2 bad config, channel name or state."
    )]
    Retry {
        /// The daemon's config file.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Only this channel's parked alerts [default: every channel's].
        channel: Option<String>,
    },
}

/// Where and how to reach AWS for archive commands.
#[derive(Debug, Args)]
pub struct AwsArgs {
    /// Default AWS region for S3 [default: AWS_REGION or the profile's]. KMS calls go to
    /// the region in the key ARN.
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
    /// Endpoint for every AWS service, e.g. a local emulator [default: AWS_ENDPOINT_URL].
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// Path-style S3 addressing (needed for local endpoints; on when an endpoint is set).
    #[arg(long)]
    pub s3_path_style: bool,
}

#[derive(Debug, Subcommand)]
pub enum ArchiveCommand {
    /// Archive alerts (JSON Lines, one object per line) from FILE or standard input.
    #[command(
        after_help = "Examples:\n  kmsguard archive write --key arn:aws:kms:us-east-1:111122223333:key/mrk-1234 --dir /var/lib/kmsguard/archive alerts.jsonl\n  kmsguard replay --format jsonl AWSLogs/ | kmsguard archive write --key alias/kmsguard-archive --s3 s3://audit-bucket/archive\n\nEach segment gets one fresh data key from KMS GenerateDataKey and continues the host's hash chain\nfound at the destination. Segments are AWS Encryption SDK messages: aws-encryption-cli --decrypt opens them."
    )]
    Write {
        /// KMS key (ARN, key id or alias) that wraps each segment's data key.
        #[arg(long, value_name = "KEY")]
        key: String,
        /// Local archive folder.
        #[arg(long, value_name = "DIR", required_unless_present = "s3")]
        dir: Option<PathBuf>,
        /// S3 destination, s3://BUCKET/PREFIX.
        #[arg(long, value_name = "S3URL")]
        s3: Option<String>,
        /// Host name in object names and in the chain [default: $KMSGUARD_HOST, $HOSTNAME].
        #[arg(long, value_name = "NAME")]
        host: Option<String>,
        /// Seal a segment when its plaintext reaches this size.
        #[arg(long, default_value_t = 8 << 20, value_name = "BYTES")]
        max_segment_bytes: usize,
        /// Print a JSON summary (alerts, segments, KMS calls, alerts/s) on stderr.
        #[arg(long)]
        stats: bool,
        /// JSON Lines of alerts [default: standard input].
        file: Option<PathBuf>,
        #[command(flatten)]
        aws: AwsArgs,
    },
    /// List segments with host, sequence number, alert times and counts (no KMS calls).
    #[command(
        after_help = "Examples:\n  kmsguard archive list /var/lib/kmsguard/archive\n  kmsguard archive list s3://audit-bucket/archive"
    )]
    List {
        /// Archive folder or s3://BUCKET/PREFIX.
        location: String,
        #[command(flatten)]
        aws: AwsArgs,
    },
    /// Print archived alerts as JSON Lines, optionally filtered.
    #[command(
        after_help = "Examples:\n  kmsguard archive cat s3://audit-bucket/archive --since 2026-10-01T00:00:00Z --rule kms-key-deletion-scheduled\n  kmsguard archive cat /var/lib/kmsguard/archive --principal arn:aws:iam::111122223333:role/ci"
    )]
    Cat {
        /// Archive folder or s3://BUCKET/PREFIX.
        location: String,
        #[command(flatten)]
        read: ReadArgs,
        /// Alerts at or after this time (RFC 3339, UTC, e.g. 2026-10-01T00:00:00Z).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Alerts at or before this time.
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        /// Only alerts of this rule id.
        #[arg(long, value_name = "RULE")]
        rule: Option<String>,
        /// Only alerts of this principal (caller ARN or role ARN).
        #[arg(long, value_name = "ARN")]
        principal: Option<String>,
        #[command(flatten)]
        aws: AwsArgs,
    },
    /// Check every segment (decrypt, commitment, authentication, context) and each host's
    /// hash chain (no gaps, no repeats, each segment recording its predecessor's SHA-256).
    #[command(
        after_help = "Examples:\n  kmsguard archive verify s3://audit-bucket/archive\n  kmsguard archive verify --key arn:aws:kms:eu-west-1:111122223333:key/mrk-1234 /mnt/dr/archive\n\nExit codes: 0 every segment and chain checked out; 1 problems found (each named);\n2 the archive could not be read. Compare the printed head (last segment and SHA-256) with\na copy kept elsewhere: a chain cannot show that its own newest segments were removed."
    )]
    Verify {
        /// Archive folder or s3://BUCKET/PREFIX.
        location: String,
        #[command(flatten)]
        read: ReadArgs,
        #[command(flatten)]
        aws: AwsArgs,
    },
    /// Decrypt every segment to files (JSON Lines), or one message file.
    #[command(
        after_help = "Examples:\n  kmsguard archive decrypt s3://audit-bucket/archive --out ./plain\n  kmsguard archive decrypt report.pdf.encrypted --out ./plain\n\nA single file may be any AWS Encryption SDK message with the committing, unsigned suite\n(aws-encryption-cli --algorithm AES_256_GCM_HKDF_SHA512_COMMIT_KEY)."
    )]
    Decrypt {
        /// Archive folder, s3://BUCKET/PREFIX, or one encrypted file.
        location: String,
        /// Folder for the decrypted files (made if missing; files are never replaced).
        #[arg(long, short, value_name = "DIR")]
        out: PathBuf,
        #[command(flatten)]
        read: ReadArgs,
        #[command(flatten)]
        aws: AwsArgs,
    },
}

/// Options shared by commands that decrypt.
#[derive(Debug, Args)]
pub struct ReadArgs {
    /// KMS key ARN to unwrap data keys with, e.g. a multi-Region replica in your region
    /// [default: the key named in each segment].
    #[arg(long, value_name = "ARN")]
    pub key: Option<String>,
    /// Only segments of this host.
    #[arg(long, value_name = "NAME")]
    pub host: Option<String>,
}

/// Severity as a command-line value.
pub mod crate_severity {
    use kmsguard::Severity;

    #[derive(Debug, Clone, Copy)]
    pub struct SeverityArg(pub Severity);

    impl std::str::FromStr for SeverityArg {
        type Err = String;
        fn from_str(s: &str) -> Result<Self, Self::Err> {
            s.parse().map(SeverityArg)
        }
    }
}
