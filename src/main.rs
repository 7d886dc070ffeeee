//! The kmsguard binary: parses the command line, runs one mode of the library, and maps
//! errors to exit codes (0 ok, 1 findings at/above --fail-on, failed rule tests or
//! problems found by `archive verify`, 2 bad arguments, rules, paths or unreadable input).
//! `kmsguard alerts`: 0 delivered, 1 some alert not delivered, 2 bad config.

mod alerts;
mod cli;
mod cmd;

use anyhow::{Context, Result};
use clap::Parser;
use cli::{
    AlertsCommand, ArchiveCommand, AwsArgs, BaselineCommand, Cli, Command, Format, LogFormat,
    PostureArgs, RulesCommand,
};
use kmsguard::analyze::baseline::BaselineConfig;
use kmsguard::archive::{commands as archive_cmd, AlertFilter, ArchiverConfig, Location};
use kmsguard::inventory::{self, Inventory, InventoryOptions};
use kmsguard::posture::{self, PostureConfig};
use kmsguard::store::Store;
use kmsguard::{report, source, RuleSet};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Replay(args) => cmd::replay::replay(args),
        Command::Posture(args) => posture_cmd(args),
        Command::Rules(RulesCommand::List { rules }) => rules_list(rules),
        Command::Rules(RulesCommand::Test { file }) => rules_test(file),
        Command::Alerts(AlertsCommand::Test {
            channel,
            config,
            retry_for,
        }) => alerts::test(&channel, &config, &retry_for),
        Command::Alerts(AlertsCommand::Send {
            config,
            findings,
            rules,
            retry_for,
        }) => alerts::send(&config, findings.as_deref(), rules.as_deref(), &retry_for),
        Command::Alerts(AlertsCommand::Pending { config }) => alerts::pending(&config),
        Command::Alerts(AlertsCommand::Retry { config, channel }) => {
            alerts::retry(&config, channel.as_deref())
        }
        Command::BenchInflate { paths } => bench_inflate(paths),
        Command::Baseline(cmd) => baseline(cmd),
        Command::Run { config, log_format } => run_daemon(config, log_format),
        Command::CheckConfig { file } => check_config(file),
        Command::Remediate {
            dry_run,
            finding_id,
            config,
        } => remediate_cmd(dry_run, &finding_id, &config),
        Command::Archive(cmd) => archive(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", describe(e.as_ref()));
            ExitCode::from(2)
        }
    }
}

/// An error and its causes on one line, leaving out a cause whose text the message
/// already includes (the library's errors name their cause in their own sentence, with
/// the fix after it; printing it again would only repeat it).
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    let mut next = Some(e);
    while let Some(cause) = next {
        next = cause.source();
        let part = cause.to_string();
        if text.is_empty() {
            text = part;
        } else if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
    }
    text
}

/// `kmsguard remediate --dry-run ID --config FILE`: the plan for one finding of the daemon.
fn remediate_cmd(dry_run: bool, id: &str, path: &std::path::Path) -> Result<ExitCode> {
    if !dry_run {
        anyhow::bail!("only --dry-run is supported here: enforcement runs in the daemon (`kmsguard run`), under its rate limit and circuit breaker");
    }
    let cfg = kmsguard::config::Config::load(path)?;
    let rem = cfg.remediation.clone().with_context(|| {
        format!(
            "{} has no [remediation] section (see docs/remediation.md)",
            path.display()
        )
    })?;
    let paths: Vec<_> = cfg.file_sinks.iter().map(|s| s.path.clone()).collect();
    let finding = kmsguard::remediate::find_in_jsonl(&paths, id)
        .context("cannot read the file sinks")?
        .with_context(|| {
            format!(
                "no finding with id {id} in {}",
                paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    let rt = runtime()?;
    let sdk = rt.block_on(kmsguard::aws::sdk_config(&cfg.aws));
    // The daemon may hold the store's lock: the plan goes without the inventory cache
    // when it cannot be opened.
    let store = Store::open(&cfg.state_dir).ok();
    let engine = kmsguard::remediate::Engine::new(rem, sdk, store);
    let out =
        rt.block_on(engine.handle_with_mode(&finding, Some(kmsguard::remediate::Mode::DryRun)));
    let mut stdout = std::io::stdout().lock();
    report::write_jsonl(&mut stdout, &out)?;
    Ok(ExitCode::SUCCESS)
}

/// A runtime for the AWS calls of one command (the replay itself runs on its own threads).
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn open_store(dir: Option<&std::path::Path>) -> Result<Store> {
    Ok(match dir {
        Some(d) => {
            std::fs::create_dir_all(d)
                .with_context(|| format!("cannot create state directory {}", d.display()))?;
            Store::open(d)?
        }
        None => Store::temporary()?,
    })
}

fn posture_cmd(args: PostureArgs) -> Result<ExitCode> {
    if args.list_checks {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{:<36}  {:<8}  TITLE", "ID", "SEVERITY")?;
        for c in posture::CHECKS {
            writeln!(out, "{:<36}  {:<8}  {}", c.id, c.severity.as_str(), c.title)?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let started = std::time::Instant::now();
    let (cfg, inv_cfg) = match &args.config {
        Some(p) => PostureConfig::load_with_inventory(p)?,
        None => Default::default(),
    };
    let rt = runtime()?;
    let sdk = rt.block_on(kmsguard::aws::sdk_config(
        &kmsguard::aws::AwsSettings::from_env(),
    ));
    let regions: Vec<String> = if !args.region.is_empty() {
        args.region.clone()
    } else if !cfg.regions.is_empty() {
        cfg.regions.clone()
    } else if let Some(r) = sdk.region() {
        vec![r.to_string()]
    } else {
        anyhow::bail!(
            "no region to audit: pass --region R (repeatable), set [posture] regions, or set AWS_REGION"
        );
    };
    let store = open_store(args.state.as_deref())?;
    let inv = Inventory::new(
        store.clone(),
        Some(sdk),
        InventoryOptions {
            max_age: std::time::Duration::from_secs(args.max_age),
            ..InventoryOptions::default()
        },
    )
    .with_roles(inv_cfg.roles.clone());
    let audit = rt.block_on(posture::audit(&inv, &regions, &cfg, inventory::now_secs()))?;
    for w in &audit.warnings {
        eprintln!("warning: {w}");
    }
    store.flush()?;
    let findings = audit.findings;
    let keys = audit.keys;
    if !args.quiet {
        if audit.coverage.from.is_none() {
            eprintln!(
                "note: no CloudTrail history in the state: {} and {} were not evaluated (run `kmsguard replay --state DIR` and pass the same --state)",
                posture::UNUSED_KEY.id,
                posture::UNUSABLE_KEY_IN_USE.id
            );
        }
        let calls = inv.calls().total();
        eprintln!(
            "posture: {keys} key(s) ({} customer-managed) in {} region(s){}, {} finding(s); {calls} KMS API call(s) ({:.2} per key, {} throttled) in {:.2} s",
            audit.customer,
            regions.len(),
            match (inv_cfg.roles.len(), audit.skipped_accounts.len()) {
                (0, _) => String::new(),
                (n, 0) => format!(" (also through {n} account role(s))"),
                (n, s) => format!(
                    " (also through {n} account role(s); {s} not audited: {})",
                    audit.skipped_accounts.join(", ")
                ),
            },
            findings.len(),
            calls as f64 / keys.max(1) as f64,
            inv.calls().throttled(),
            started.elapsed().as_secs_f64()
        );
    }
    let format = args.format.unwrap_or(
        if std::io::stdout().is_terminal() && args.output.is_none() {
            Format::Table
        } else {
            Format::Jsonl
        },
    );
    let mut out: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p)
                .with_context(|| format!("cannot create output file {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    match format {
        Format::Jsonl => report::write_jsonl(&mut out, &findings)?,
        Format::Table => report::write_table(&mut out, &findings, 0)?,
    }
    out.flush().context("cannot write findings")?;
    if let Some(threshold) = args.fail_on {
        if findings.iter().any(|f| f.severity >= threshold.0) {
            return Ok(ExitCode::from(1));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn rules_list(path: Option<std::path::PathBuf>) -> Result<ExitCode> {
    let rules = RuleSet::load_or_builtin(path.as_deref())?;
    let mut out = std::io::stdout().lock();
    let w = rules.rules().iter().map(|r| r.id.len()).max().unwrap_or(2);
    writeln!(out, "{:<w$}  {:<8}  TITLE", "ID", "SEVERITY")?;
    for r in rules.rules() {
        writeln!(out, "{:<w$}  {:<8}  {}", r.id, r.severity.as_str(), r.title)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn rules_test(path: Option<std::path::PathBuf>) -> Result<ExitCode> {
    let rules = RuleSet::load_or_builtin(path.as_deref())?;
    let outcomes = rules.run_tests();
    let mut out = std::io::stdout().lock();
    let mut failed_rules = 0;
    let mut passed_rules = 0;
    for r in rules.rules() {
        let mine: Vec<_> = outcomes.iter().filter(|o| o.rule == r.id).collect();
        let failures: Vec<_> = mine.iter().filter(|o| o.result.is_err()).collect();
        if mine.is_empty() {
            writeln!(out, "WARN  {} (no inline tests)", r.id)?;
        } else if failures.is_empty() {
            passed_rules += 1;
            writeln!(out, "ok    {} ({} tests)", r.id, mine.len())?;
        } else {
            failed_rules += 1;
            writeln!(out, "FAIL  {} (line {})", r.id, r.line)?;
            for f in failures {
                if let Err(e) = &f.result {
                    writeln!(out, "      {}: {e}", f.test)?;
                }
            }
        }
    }
    let total = outcomes.len();
    let failed = outcomes.iter().filter(|o| o.result.is_err()).count();
    writeln!(
        out,
        "\n{passed_rules} rules passed, {failed_rules} rules failed ({} of {total} tests passed) in {}",
        total - failed,
        rules.origin
    )?;
    Ok(if failed_rules > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn bench_inflate(paths: Vec<std::path::PathBuf>) -> Result<ExitCode> {
    let (files, _) = source::collect_files(&paths)?;
    let mut scratch = Vec::new();
    for (name, whole) in [
        ("libdeflate (whole file)", true),
        ("flate2 zlib-rs (streaming)", false),
    ] {
        let started = std::time::Instant::now();
        let mut total = 0u64;
        for f in &files {
            total += kmsguard::decode::inflate_only(&f.path, whole, &mut scratch)
                .with_context(|| format!("cannot inflate {}", f.path.display()))?;
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "gunzip {name}: {:.1} MB in {secs:.2} s = {:.0} MB/s (one thread)",
            total as f64 / 1e6,
            total as f64 / 1e6 / secs
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The [baseline] section of a config file (defaults without one).
fn baseline_config(path: Option<&std::path::Path>) -> Result<BaselineConfig> {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        baseline: BaselineConfig,
    }
    let Some(path) = path else {
        return Ok(BaselineConfig::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let file: File =
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))?;
    Ok(file.baseline)
}

fn open_existing_state(dir: &std::path::Path) -> Result<Store> {
    if !dir.join("db").exists() {
        anyhow::bail!(
            "{} holds no kmsguard state (give the --state DIR used by replay or the daemon)",
            dir.display()
        );
    }
    Ok(Store::open(dir)?)
}

fn baseline(cmd: BaselineCommand) -> Result<ExitCode> {
    use kmsguard::analyze::baseline::Baseline;
    let mut out = std::io::stdout().lock();
    match cmd {
        BaselineCommand::Show { principal, state } => {
            let store = open_existing_state(&state)?;
            let Some(raw) = store.baseline_raw(&principal)? else {
                eprintln!(
                    "error: no baseline for `{principal}` in {} (`kmsguard baseline export` lists them; assumed roles are keyed by role ARN, not session)",
                    state.display()
                );
                return Ok(ExitCode::from(2));
            };
            let b: Baseline = kmsguard::store::decode("baselines", &principal, &raw)?;
            serde_json::to_writer_pretty(&mut out, &b)?;
            writeln!(out)?;
        }
        BaselineCommand::Export { state } => {
            let store = open_existing_state(&state)?;
            let mut all = serde_json::Map::new();
            for entry in store.baselines_raw() {
                let (p, raw) = entry?;
                let b: Baseline = kmsguard::store::decode("baselines", &p, &raw)?;
                all.insert(p, serde_json::to_value(b)?);
            }
            serde_json::to_writer_pretty(&mut out, &all)?;
            writeln!(out)?;
        }
        BaselineCommand::Forget { principal, state } => {
            let store = open_existing_state(&state)?;
            if store.forget_baseline(&principal)? {
                store.flush()?;
                writeln!(out, "forgot the baseline of {principal}")?;
            } else {
                eprintln!(
                    "error: no baseline for `{principal}` in {}",
                    state.display()
                );
                return Ok(ExitCode::from(2));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn check_config(file: std::path::PathBuf) -> Result<ExitCode> {
    let cfg = kmsguard::config::Config::load(&file)?;
    let rules = kmsguard::daemon::load_rules(&cfg)?;
    println!(
        "{}: ok ({} queue(s), {} file sink(s), {} alert channel(s), {} rules from {}, state in {})",
        file.display(),
        cfg.sqs.len(),
        cfg.file_sinks.len(),
        cfg.alert_channels.len(),
        rules.rules().len(),
        rules.origin,
        cfg.state_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn run_daemon(file: std::path::PathBuf, log_format: Option<LogFormat>) -> Result<ExitCode> {
    let json = match log_format {
        Some(LogFormat::Json) => true,
        Some(LogFormat::Text) => false,
        None => !std::io::stderr().is_terminal(),
    };
    kmsguard::telemetry::init_logs(json);
    // Validate everything before any task starts.
    let cfg = kmsguard::config::Config::load(&file)?;
    kmsguard::daemon::load_rules(&cfg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kmsguard")
        .build()
        .context("cannot start the async runtime")?;
    match runtime.block_on(kmsguard::daemon::run(cfg)) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            tracing::error!(error = %e, "kmsguard stopped on an error");
            eprintln!("error: {}", describe(&e));
            Ok(ExitCode::from(3))
        }
    }
}

fn aws_settings(a: &AwsArgs) -> kmsguard::aws::AwsSettings {
    let mut s = kmsguard::aws::AwsSettings::from_env();
    if a.region.is_some() {
        s.region = a.region.clone();
    }
    if a.endpoint_url.is_some() {
        s.endpoint_url = a.endpoint_url.clone();
        s.s3_force_path_style = true;
    }
    s.s3_force_path_style |= a.s3_path_style;
    s
}

/// `kmsguard archive ...`: parses locations, runs the library command, prints.
fn archive(cmd: ArchiveCommand) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let aws = match &cmd {
            ArchiveCommand::Write { aws, .. }
            | ArchiveCommand::List { aws, .. }
            | ArchiveCommand::Cat { aws, .. }
            | ArchiveCommand::Verify { aws, .. }
            | ArchiveCommand::Decrypt { aws, .. } => aws_settings(aws),
        };
        let clients = archive_cmd::Clients::new(&aws).await;
        match cmd {
            ArchiveCommand::Write {
                key,
                dir,
                s3,
                host,
                max_segment_bytes,
                stats,
                file,
                ..
            } => {
                let mut dests: Vec<Location> = dir.into_iter().map(Location::Dir).collect();
                if let Some(s3) = s3 {
                    dests.push(Location::parse(&s3)?);
                }
                let mut cfg =
                    ArchiverConfig::new(key, &host.unwrap_or_else(archive_cmd::default_host));
                cfg.max_segment_bytes = max_segment_bytes.max(1);
                let (mut input, name): (Box<dyn std::io::BufRead>, String) = match &file {
                    Some(p) => (
                        Box::new(std::io::BufReader::new(
                            std::fs::File::open(p)
                                .with_context(|| format!("cannot open {}", p.display()))?,
                        )),
                        p.display().to_string(),
                    ),
                    None => (Box::new(std::io::stdin().lock()), "standard input".into()),
                };
                let o = archive_cmd::write(&clients, cfg, dests, &mut input, &name).await?;
                eprintln!(
                    "{}",
                    if stats {
                        o.summary_json()
                    } else {
                        o.summary_text()
                    }
                );
                Ok(ExitCode::SUCCESS)
            }
            ArchiveCommand::List { location, .. } => {
                let listed = archive_cmd::list(&clients, Location::parse(&location)?).await?;
                archive_cmd::write_list(&mut std::io::stdout().lock(), &listed)?;
                Ok(ExitCode::SUCCESS)
            }
            ArchiveCommand::Cat {
                location,
                read,
                since,
                until,
                rule,
                principal,
                ..
            } => {
                let filter = AlertFilter {
                    since,
                    until,
                    rule,
                    principal,
                    host: read.host,
                };
                let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                archive_cmd::cat(
                    &clients,
                    Location::parse(&location)?,
                    read.key.as_deref(),
                    &filter,
                    &mut out,
                )
                .await?;
                out.flush()?;
                Ok(ExitCode::SUCCESS)
            }
            ArchiveCommand::Verify { location, read, .. } => {
                let loc = Location::parse(&location)?;
                let r =
                    archive_cmd::verify(&clients, loc, read.key.as_deref(), read.host.as_deref())
                        .await?;
                let ok = archive_cmd::print_verify_report(
                    &mut std::io::stdout().lock(),
                    &mut std::io::stderr().lock(),
                    &r,
                    &location,
                )?;
                Ok(if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                })
            }
            ArchiveCommand::Decrypt {
                location,
                out,
                read,
                ..
            } => {
                let files = archive_cmd::decrypt(
                    &clients,
                    Location::parse(&location)?,
                    read.key.as_deref(),
                    &out,
                )
                .await?;
                for f in &files {
                    println!("{}", f.display());
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}
