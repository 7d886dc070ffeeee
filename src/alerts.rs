//! The `kmsguard alerts` commands (part of the binary): load and validate the channel
//! config, build channels, run `act::dispatch` on a small runtime, and print outcomes
//! (JSON Lines on stdout, progress and a summary on stderr). Exit codes: 0 every alert
//! delivered, 1 some alert not delivered, 2 bad config, channel name or input.
//! `pending` and `retry` work on the daemon's alert queue: through its control socket
//! while it runs, in its state directory otherwise.

use anyhow::{bail, Context, Result};
use kmsguard::act::clock::parse_duration;
use kmsguard::act::config::{AlertsFile, ChannelConfig};
use kmsguard::act::control;
use kmsguard::act::dispatch::{self, DispatchEvent, Jitter, Outcome, Reporter, RetryPolicy};
use kmsguard::act::queue::{self, PendingAlert};
use kmsguard::act::route::Router;
use kmsguard::act::{Alert, Channel};
use kmsguard::RuleSet;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::SystemTime;

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn policy(retry_for: &str) -> Result<RetryPolicy> {
    let retry_for = parse_duration(retry_for).map_err(|m| anyhow::anyhow!("--retry-for: {m}"))?;
    Ok(RetryPolicy {
        retry_for,
        ..RetryPolicy::default()
    })
}

/// Prints outcomes on stdout (one JSON line each) and failed attempts on stderr.
fn reporter() -> Reporter {
    Arc::new(|event| match event {
        DispatchEvent::AttemptFailed {
            channel,
            alert_id,
            attempt,
            error,
            retry_in,
            ..
        } => {
            let next = match retry_in {
                Some(d) => format!("retrying in {:.1}s", d.as_secs_f64()),
                None => "giving up".to_string(),
            };
            eprintln!("warning: channel {channel}: alert {alert_id}: attempt {attempt} failed: {error}; {next}");
        }
        DispatchEvent::BadLine { line, error } => {
            eprintln!("warning: input line {line}: not a finding: {error}")
        }
        DispatchEvent::Done(outcome) => print_outcome(&outcome),
    })
}

fn print_outcome(o: &Outcome) {
    let mut out = std::io::stdout().lock();
    if let Ok(line) = serde_json::to_string(o) {
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// The channels of `path`: a stand-alone alerts file, or the daemon's config (told
/// apart by its `[state]` or `[sources]` table).
fn load_channels(path: &Path) -> Result<Vec<ChannelConfig>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let is_daemon = toml::from_str::<toml::Table>(&text)
        .map(|t| t.contains_key("state") || t.contains_key("sources"))
        .unwrap_or(false);
    if is_daemon {
        Ok(kmsguard::config::Config::load(path)?.alert_channels)
    } else {
        Ok(AlertsFile::load(path)?)
    }
}

/// `kmsguard alerts test CHANNEL --config FILE`
pub fn test(channel: &str, config: &Path, retry_for: &str) -> Result<ExitCode> {
    let policy = policy(retry_for)?;
    let configs = load_channels(config)?;
    let Some(cfg) = configs.iter().find(|c| c.name() == channel) else {
        let names: Vec<&str> = configs.iter().map(|c| c.name()).collect();
        bail!(
            "{}: no channel named `{channel}`; the channels are: {}",
            config.display(),
            if names.is_empty() {
                "(none)".to_string()
            } else {
                names.join(", ")
            }
        );
    };
    let channel = Channel::build(cfg)?;
    let alert = Alert::test(channel.name(), SystemTime::now());
    let report = reporter();
    let (result, attempts) = runtime()?.block_on(async {
        dispatch::deliver_with_retry(
            &channel,
            &alert,
            tokio::time::Instant::now(),
            &policy,
            &mut Jitter::from_clock(),
            &report,
        )
        .await
    });
    let ok = result.is_ok();
    let outcome = dispatch::outcome(channel.name(), &alert, result, attempts, None);
    print_outcome(&outcome);
    match &outcome.error {
        None => eprintln!(
            "test alert delivered through {} ({})",
            outcome.channel,
            outcome.response.as_deref().unwrap_or("")
        ),
        Some(e) => eprintln!(
            "error: test alert not delivered through {}: {e}",
            outcome.channel
        ),
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `kmsguard alerts send --config FILE [FINDINGS]`
pub fn send(
    config: &Path,
    findings: Option<&Path>,
    rules: Option<&Path>,
    retry_for: &str,
) -> Result<ExitCode> {
    send_from(config, Source::File(findings), rules, retry_for)
}

/// Where `send_from` reads findings (JSON Lines).
pub enum Source<'a> {
    /// A file, or standard input for None or `-`.
    File(Option<&'a Path>),
}

pub fn send_from(
    config: &Path,
    findings: Source<'_>,
    rules: Option<&Path>,
    retry_for: &str,
) -> Result<ExitCode> {
    let policy = policy(retry_for)?;
    let configs = AlertsFile::load(config)?;
    if configs.is_empty() {
        bail!(
            "{}: no [[sinks.email]] or [[sinks.webhook]] channel; add one (see docs/alerts.md)",
            config.display()
        );
    }
    let rules = RuleSet::load_or_builtin(rules)?;
    let descriptions = rules
        .rules()
        .iter()
        .map(|r| (r.id.clone(), r.description.trim().to_string()))
        .collect();
    let mut channels = Vec::new();
    for cfg in &configs {
        let channel = Channel::build(cfg)?;
        channels.push((channel, Router::new(cfg.name(), cfg.route().clone())));
    }
    let rt = runtime()?;
    let started = std::time::Instant::now();
    let report = rt.block_on(async {
        let input: Box<dyn tokio::io::AsyncBufRead + Unpin + Send> = match findings {
            Source::File(Some(p)) if p != Path::new("-") => Box::new(tokio::io::BufReader::new(
                tokio::fs::File::open(p)
                    .await
                    .with_context(|| format!("cannot open findings file {}", p.display()))?,
            )),
            Source::File(_) => Box::new(tokio::io::BufReader::new(tokio::io::stdin())),
        };
        anyhow::Ok(dispatch::send(channels, input, descriptions, policy, reporter()).await)
    })?;
    let delivered: Vec<&Outcome> = report
        .outcomes
        .iter()
        .filter(|o| o.status == "delivered")
        .collect();
    let mut lat: Vec<f64> = delivered.iter().filter_map(|o| o.latency_ms).collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .copied()
    };
    let latency = match (pct(0.5), lat.last()) {
        (Some(m), Some(max)) => {
            format!("; latency finding -> accepted: median {m:.0} ms, max {max:.0} ms")
        }
        _ => String::new(),
    };
    eprintln!(
        "{} findings ({} bad lines) -> {} alerts: {} delivered, {} not delivered in {:.1}s{latency}",
        report.findings,
        report.bad_lines,
        report.outcomes.len(),
        delivered.len(),
        report.failed(),
        started.elapsed().as_secs_f64()
    );
    Ok(if report.failed() > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// Asks the running daemon, or else opens its state directory.
fn with_queue<T>(
    config: &Path,
    request: &str,
    from_daemon: impl FnOnce(control::Answer) -> Option<T>,
    from_store: impl FnOnce(&kmsguard::store::Store, &[String]) -> Result<T>,
) -> Result<T> {
    let cfg = kmsguard::config::Config::load(config)?;
    let names: Vec<String> = cfg
        .alert_channels
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    if let Some(answer) = runtime()?.block_on(control::request(&cfg.state_dir, request))? {
        return from_daemon(answer).context("the daemon's answer lacks the result");
    }
    if !cfg.state_dir.join("db").exists() {
        bail!(
            "{}: no state in {} yet (has the daemon run with this config?)",
            config.display(),
            cfg.state_dir.display()
        );
    }
    let store = kmsguard::store::Store::open(&cfg.state_dir).with_context(|| {
        format!(
            "no daemon answers on {} and the state cannot be opened",
            control::socket_path(&cfg.state_dir).display()
        )
    })?;
    from_store(&store, &names)
}

/// `kmsguard alerts pending --config FILE`
pub fn pending(config: &Path) -> Result<ExitCode> {
    let alerts: Vec<PendingAlert> = with_queue(
        config,
        "pending",
        |a| a.pending,
        |store, _| Ok(queue::pending(store)?),
    )?;
    let mut out = std::io::stdout().lock();
    for a in &alerts {
        if let Ok(line) = serde_json::to_string(a) {
            let _ = writeln!(out, "{line}");
        }
    }
    let _ = out.flush();
    let mut channels: Vec<&str> = alerts.iter().map(|a| a.channel.as_str()).collect();
    channels.dedup();
    if channels.is_empty() {
        eprintln!("no alert waits: every alert was delivered");
    }
    for c in channels {
        let of = |state: &str| {
            alerts
                .iter()
                .filter(|a| a.channel == c && a.state == state)
                .collect::<Vec<_>>()
        };
        let (queued, parked) = (of("queued"), of("parked"));
        let mut line = format!("{c}: {} queued, {} parked", queued.len(), parked.len());
        if let Some(first) = queued.first() {
            line.push_str(&format!("; oldest queued at {}", first.queued_at));
        }
        if let Some(e) = queued
            .iter()
            .chain(&parked)
            .filter_map(|a| a.last_error.as_deref())
            .next_back()
        {
            line.push_str(&format!("; last error: {e}"));
        }
        eprintln!("{line}");
    }
    Ok(if alerts.iter().any(|a| a.state == "parked") {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// `kmsguard alerts retry --config FILE [CHANNEL]`
pub fn retry(config: &Path, channel: Option<&str>) -> Result<ExitCode> {
    let request = match channel {
        Some(c) => format!("retry {c}"),
        None => "retry".to_string(),
    };
    let n = with_queue(
        config,
        &request,
        |a| a.requeued,
        |store, names| {
            if let Some(c) = channel.filter(|c| !names.iter().any(|n| n == c)) {
                return Err(control::unknown(c, names).into());
            }
            Ok(queue::retry(store, channel, SystemTime::now())?)
        },
    )?;
    eprintln!(
        "{n} parked alert(s) re-queued{}",
        channel.map(|c| format!(" on {c}")).unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}
