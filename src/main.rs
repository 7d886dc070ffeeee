//! The kmsguard binary: parses the command line, runs one mode of the library, and maps
//! errors to exit codes (0 ok, 1 findings at/above --fail-on, failed rule tests or
//! problems found by `archive verify`, 2 bad arguments, rules, paths or unreadable input).

mod cli;

use anyhow::{Context, Result};
use clap::Parser;
use cli::{ArchiveCommand, AwsArgs, Cli, Command, Format, ReplayArgs, RulesCommand, SummaryFormat};
use kmsguard::archive::{commands as archive_cmd, AlertFilter, ArchiverConfig, Location};
use kmsguard::decode::records::ScanLimits;
use kmsguard::decode::DecodeLimits;
use kmsguard::pipeline::{self, ReplayOptions};
use kmsguard::{report, source, RuleSet};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Replay(args) => replay(args),
        Command::Rules(RulesCommand::List { rules }) => rules_list(rules),
        Command::Rules(RulesCommand::Test { file }) => rules_test(file),
        Command::BenchInflate { paths } => bench_inflate(paths),
        Command::Archive(cmd) => archive(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn replay(args: ReplayArgs) -> Result<ExitCode> {
    let mut rules = RuleSet::load_or_builtin(args.rules.as_deref())?;
    for extra in &args.extra_rules {
        rules.extend(RuleSet::load(extra)?)?;
    }
    let (files, digests) = source::collect_files(&args.paths)?;
    let format = args.format.unwrap_or(
        if std::io::stdout().is_terminal() && args.output.is_none() {
            Format::Table
        } else {
            Format::Jsonl
        },
    );
    let opts = ReplayOptions {
        jobs: args.jobs.unwrap_or_else(pipeline::default_jobs).max(1),
        limits: DecodeLimits {
            scan: ScanLimits {
                max_record_bytes: args.max_record_bytes,
                ..ScanLimits::default()
            },
            max_file_bytes: args.max_file_bytes,
            max_ratio: args.max_ratio,
        },
    };
    let show_progress = !args.quiet && std::io::stderr().is_terminal();
    let mut last_progress = std::time::Instant::now();
    let mut progress_shown = false;
    let quiet = args.quiet;
    let mut outcome = pipeline::replay(&files, &rules, &opts, &mut |done| {
        if !quiet {
            for p in &done.report.problems {
                if progress_shown {
                    eprint!("\r\x1b[2K");
                }
                let level = if p.is_note() { "note" } else { "warning" };
                eprintln!("{level}: {}: {p}", done.file.path.display());
            }
        }
        if show_progress
            && done.started.elapsed().as_secs_f64() > 1.0
            && last_progress.elapsed().as_millis() >= 200
        {
            eprint!("\r\x1b[2K{}", pipeline::progress_line(done));
            progress_shown = true;
            last_progress = std::time::Instant::now();
        }
    });
    if progress_shown {
        eprint!("\r\x1b[2K");
    }
    outcome.stats.digests_skipped = digests;

    let mut out: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p)
                .with_context(|| format!("cannot create output file {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let summary = args.summary.unwrap_or(match format {
        Format::Table => SummaryFormat::Text,
        Format::Jsonl => SummaryFormat::None,
    });
    match format {
        Format::Jsonl => report::write_jsonl(&mut out, &outcome.findings)?,
        Format::Table => {
            report::write_table(&mut out, &outcome.findings)?;
            if summary == SummaryFormat::Text {
                writeln!(
                    out,
                    "\n{}",
                    report::summary_text(&outcome.stats, &outcome.findings)
                )?;
            }
        }
    }
    out.flush().context("cannot write findings")?;
    match summary {
        SummaryFormat::Text if format == Format::Jsonl => {
            eprintln!(
                "{}",
                report::summary_text(&outcome.stats, &outcome.findings)
            )
        }
        SummaryFormat::Json => eprintln!(
            "{}",
            report::summary_json(&outcome.stats, &outcome.findings)
        ),
        _ => {}
    }
    if let Some(threshold) = args.fail_on {
        if outcome.findings.iter().any(|f| f.severity >= threshold.0) {
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
