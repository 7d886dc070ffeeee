//! The kmsguard binary: parses the command line, runs one mode of the library, and maps
//! errors to exit codes (0 ok, 1 findings at/above --fail-on or failed rule tests,
//! 2 bad arguments, rules or paths). `kmsguard alerts`: 0 delivered, 1 some alert not
//! delivered, 2 bad config.

mod alerts;
mod cli;

use anyhow::{Context, Result};
use clap::Parser;
use cli::{AlertsCommand, Cli, Command, Format, ReplayArgs, RulesCommand, SummaryFormat};
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
        Command::BenchInflate { paths } => bench_inflate(paths),
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
