//! `kmsguard replay`: gathers the inputs (a streaming folder walk, an S3 window, the
//! CloudTrail API), runs the library's pipeline with enrichment as its settle step, then
//! streams the findings from the pipeline's on-disk spool to the output, the summary,
//! the HTML report, remediation and alerts. Nothing here holds every finding or every
//! path in memory.

use crate::cli::{Format, ReplayArgs, SummaryFormat};
use crate::{alerts, baseline_config, runtime};
use anyhow::{Context, Result};
use kmsguard::analyze::key_facts::FactEvent;
use kmsguard::decode::records::ScanLimits;
use kmsguard::decode::DecodeLimits;
use kmsguard::inventory::{self, Inventory, InventoryOptions};
use kmsguard::pipeline::{self, ReplayOptions};
use kmsguard::posture::PostureConfig;
use kmsguard::report::{self, TableRows, Tally};
use kmsguard::store::Store;
use kmsguard::{source, Finding, RuleSet};
use std::io::{IsTerminal, Write};
use std::process::ExitCode;

/// Findings the HTML report embeds at most (most severe first).
const MAX_REPORT_FINDINGS: usize = 10_000;

pub fn replay(args: ReplayArgs) -> Result<ExitCode> {
    let mut rules = RuleSet::load_or_builtin(args.rules.as_deref())?;
    for extra in &args.extra_rules {
        rules.extend(RuleSet::load(extra)?)?;
    }
    let inputs = gather_inputs(&args)?;
    let format = args.format.unwrap_or(
        if std::io::stdout().is_terminal() && args.output.is_none() {
            Format::Table
        } else {
            Format::Jsonl
        },
    );
    let opts = ReplayOptions {
        // Remote inputs wait on the network: more workers than cores keep it busy (each
        // holds at most one object in memory).
        jobs: args
            .jobs
            .unwrap_or_else(|| {
                if inputs.remote {
                    (pipeline::default_jobs() * 4).max(8)
                } else {
                    pipeline::default_jobs()
                }
            })
            .max(1),
        limits: DecodeLimits {
            scan: ScanLimits {
                max_record_bytes: args.max_record_bytes,
                ..ScanLimits::default()
            },
            max_file_bytes: args.max_file_bytes,
            max_ratio: args.max_ratio,
        },
        baselines: if args.no_baselines {
            None
        } else {
            Some(baseline_config(args.config.as_deref())?)
        },
        learn_only: args.learn_only,
        track_activity: args.state.is_some(),
        timeline: args.report.is_some(),
        s3: inputs.s3.clone(),
        lookup: inputs.lookup.clone(),
        key_events: args.remediate,
        ledger_days: args.ledger_days,
        ..ReplayOptions::default()
    };
    let store = match &args.state {
        Some(dir) => Store::open_with_cache(dir, kmsguard::store::REPLAY_CACHE_BYTES)?,
        None => Store::temporary()?,
    };
    let mut enrich = if args.enrich {
        Some(Enricher::new(&args, &store)?)
    } else {
        None
    };
    let show_progress = !args.quiet && std::io::stderr().is_terminal();
    let mut last_progress = std::time::Instant::now();
    let mut progress_shown = false;
    let quiet = args.quiet;
    let digests = inputs.digests.clone();
    let total = inputs.total;
    let mut settle = |found: &mut Vec<Finding>, facts: &[FactEvent]| {
        if let Some(e) = enrich.as_mut() {
            e.enrich(found, facts);
        }
    };
    let mut outcome = pipeline::replay(
        inputs.stream,
        total,
        &rules,
        &opts,
        &store,
        &mut settle,
        &mut |done| {
            if !quiet {
                for p in &done.report.problems {
                    if progress_shown {
                        eprint!("\r\x1b[2K");
                    }
                    let level = if p.is_note() { "note" } else { "warning" };
                    eprintln!("{level}: {}: {p}", done.name);
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
        },
    )?;
    if progress_shown {
        eprint!("\r\x1b[2K");
    }
    let invalidated = enrich.as_ref().map_or(0, |e| e.invalidated);
    if let Some(e) = &enrich {
        e.report();
    }
    let s = &mut outcome.stats;
    s.digests_skipped = digests.load(std::sync::atomic::Ordering::Relaxed);
    s.list_requests = inputs.list_requests;
    if let Some(r) = &inputs.s3 {
        s.get_requests = r.requests.load(std::sync::atomic::Ordering::Relaxed);
        s.get_retries = r.retries.load(std::sync::atomic::Ordering::Relaxed);
    }
    if let Some(l) = &inputs.lookup {
        s.api_requests = l.requests.load(std::sync::atomic::Ordering::Relaxed);
        s.api_throttled = l.throttled.load(std::sync::atomic::Ordering::Relaxed);
    }
    if let Some(activity) = outcome.activity.take() {
        record_activity(&store, &activity, invalidated, args.quiet)?;
    }
    if args.remediate {
        if let Some(cfg) = args.config.as_deref() {
            let key_events = std::mem::take(&mut outcome.key_events);
            replay_remediate(cfg, &store, &key_events, &mut outcome.findings, args.quiet)?;
        }
    }
    outcome.stats.findings = outcome.findings.len() as u64;
    write_out(&args, format, &outcome)
}

/// Streams the spooled findings to every output of the run.
fn write_out(
    args: &ReplayArgs,
    format: Format,
    outcome: &pipeline::ReplayOutcome,
) -> Result<ExitCode> {
    let mut out: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p)
                .with_context(|| format!("cannot create output file {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    // With --alerts the findings also go to a temporary JSON Lines file, read back by
    // the alert channels.
    let mut alerts_file = match &args.alerts {
        Some(_) => Some(TempJsonl::create()?),
        None => None,
    };
    let mut tally = Tally::default();
    let mut table = TableRows::default();
    let mut for_report = TableRows::default();
    for f in outcome.findings.iter() {
        let f = f?;
        tally.add(&f);
        match format {
            Format::Jsonl => report::write_jsonl_one(&mut out, &f)?,
            Format::Table => table.add(f.clone()),
        }
        if let Some(tmp) = alerts_file.as_mut() {
            report::write_jsonl_one(&mut tmp.file, &f)?;
        }
        if args.report.is_some() && for_report.len() < MAX_REPORT_FINDINGS {
            for_report.add(f);
        }
    }
    let summary = args.summary.unwrap_or(match format {
        Format::Table => SummaryFormat::Text,
        Format::Jsonl => SummaryFormat::None,
    });
    if format == Format::Table {
        report::write_table(&mut out, &table.rows(), table.more)?;
        if summary == SummaryFormat::Text {
            writeln!(out, "\n{}", report::summary_text(&outcome.stats, &tally))?;
        }
    }
    out.flush().context("cannot write findings")?;
    if let (Some(path), Some(timeline)) = (&args.report, &outcome.timeline) {
        let sources: Vec<String> = args.paths.iter().map(|p| p.display().to_string()).collect();
        let mut title = format!("kmsguard replay of {}", sources.join(", "));
        if args.from.is_some() || args.to.is_some() {
            title.push_str(&format!(
                " from {} to {}",
                args.from.as_deref().unwrap_or("the start"),
                args.to.as_deref().unwrap_or("now")
            ));
        }
        let mut shown = for_report.rows();
        shown.sort_by(|a, b| (&a.time, &a.rule, &a.id).cmp(&(&b.time, &b.rule, &b.id)));
        let page = kmsguard::html_report::render(&title, timeline, &shown, &outcome.stats);
        std::fs::write(path, page)
            .with_context(|| format!("cannot write the report {}", path.display()))?;
    }
    match summary {
        SummaryFormat::Text if format == Format::Jsonl => {
            eprintln!("{}", report::summary_text(&outcome.stats, &tally))
        }
        SummaryFormat::Json => eprintln!("{}", report::summary_json(&outcome.stats, &tally)),
        _ => {}
    }
    if let (Some(channels), Some(tmp)) = (&args.alerts, alerts_file.as_mut()) {
        tmp.file.flush()?;
        let code = alerts::send_from(
            channels,
            alerts::Source::File(Some(&tmp.path)),
            args.rules.as_deref(),
            "5m",
        )?;
        if code != ExitCode::SUCCESS {
            eprintln!("error: some alerts were not delivered (see above)");
            return Ok(code);
        }
    }
    if let (Some(threshold), Some(max)) = (args.fail_on, tally.max) {
        if max >= threshold.0 {
            return Ok(ExitCode::from(1));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A JSON Lines file in the temporary folder, removed when dropped.
struct TempJsonl {
    path: std::path::PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl TempJsonl {
    fn create() -> Result<TempJsonl> {
        let path = std::env::temp_dir().join(format!(
            "kmsguard-alerts-{}-{}.jsonl",
            std::process::id(),
            inventory::now_secs()
        ));
        let file = std::fs::File::create(&path)
            .with_context(|| format!("cannot create {} for the alerts", path.display()))?;
        Ok(TempJsonl {
            path,
            file: std::io::BufWriter::new(file),
        })
    }
}

impl Drop for TempJsonl {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What a replay reads, and how.
struct Inputs {
    stream: Box<dyn Iterator<Item = source::LogInput> + Send>,
    /// Inputs and bytes in all, when known before reading (remote sources).
    total: Option<(usize, u64)>,
    /// Digest files skipped (counted as the walk goes).
    digests: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Some when an input is in S3.
    s3: Option<kmsguard::source::s3::S3Reader>,
    /// Some when an input is the CloudTrail API.
    lookup: Option<kmsguard::source::lookup_events::LookupReader>,
    remote: bool,
    list_requests: u64,
    /// Keeps the runtime the S3 reader blocks on alive for the replay.
    _runtime: Option<tokio::runtime::Runtime>,
}

/// Expands the replay's PATH arguments (local paths and s3:// URLs) into inputs in time
/// order, within --from/--to. Local folders are walked as the replay goes.
fn gather_inputs(args: &ReplayArgs) -> Result<Inputs> {
    use kmsguard::source::s3::{self, ListScope, Window};
    let from = match &args.from {
        Some(t) => Some(s3::parse_when(t).with_context(|| {
            format!("--from {t}: not a time (write 2026-10-01T12:00:00Z or 2026-10-01)")
        })?),
        None => None,
    };
    let to = match &args.to {
        Some(t) => s3::parse_when(t).with_context(|| {
            format!("--to {t}: not a time (write 2026-10-01T12:00:00Z or 2026-10-01)")
        })?,
        None => inventory::now_secs(),
    };
    if let Some(f) = from {
        if f > to {
            anyhow::bail!("--from is after --to: nothing to read");
        }
    }
    use kmsguard::source::lookup_events;
    let (mut urls, mut apis, mut local) = (Vec::new(), Vec::new(), Vec::new());
    for p in &args.paths {
        let text = p.to_string_lossy().into_owned();
        if text.starts_with("s3://") {
            urls.push(text);
        } else if text.starts_with("cloudtrail://") {
            apis.push(lookup_events::parse_url(&text)?);
        } else {
            local.push(p.clone());
        }
    }
    let window = Window {
        from: from.unwrap_or(i64::MIN / 2),
        to,
    };
    let remote = !urls.is_empty() || !apis.is_empty();
    if remote && from.is_none() {
        anyhow::bail!(
            "s3:// and cloudtrail:// sources need --from TIME (and optionally --to TIME): only that range is read"
        );
    }
    let windowed = args.from.is_some() || args.to.is_some();
    let in_window = move |i: &source::LogInput| -> bool {
        !windowed || i.start_secs().is_some_and(|t| window.contains(t))
    };
    let digests = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let walk = if local.is_empty() {
        None
    } else {
        Some(source::walk(&local)?.counting_digests(digests.clone()))
    };
    let mut out = Inputs {
        stream: Box::new(std::iter::empty()),
        total: None,
        digests,
        s3: None,
        lookup: None,
        remote,
        list_requests: 0,
        _runtime: None,
    };
    if !remote {
        let walk = walk.expect("local paths without remote ones");
        out.stream = Box::new(walk.map(source::LogInput::from).filter(in_window));
        return Ok(out);
    }
    // Remote sources are listed up front (by day prefix); local files given with them
    // join the list, so that everything is read in one time order.
    let mut inputs: Vec<source::LogInput> = walk
        .into_iter()
        .flatten()
        .map(source::LogInput::from)
        .filter(in_window)
        .collect();
    let rt = runtime()?;
    let settings = kmsguard::aws::AwsSettings::from_env();
    let sdk = rt.block_on(kmsguard::aws::sdk_config(&settings));
    if !apis.is_empty() {
        apis.sort();
        apis.dedup();
        for region in &apis {
            inputs.extend(
                lookup_events::slices(region, window.from, window.to)
                    .into_iter()
                    .map(source::LogInput::Api),
            );
        }
        out.lookup = Some(lookup_events::LookupReader::new(
            &sdk,
            &apis,
            rt.handle().clone(),
        ));
    }
    if !urls.is_empty() {
        let client = kmsguard::aws::s3_client_own_retries(&sdk, &settings);
        let scope = ListScope {
            accounts: args.account.clone(),
            regions: args.region.clone(),
        };
        for url in &urls {
            let (bucket, prefix) = s3::parse_url(url)?;
            let listing = rt
                .block_on(s3::list_window(&client, &bucket, &prefix, window, &scope))
                .with_context(|| format!("cannot read the trail bucket {url}"))?;
            out.list_requests += listing.requests;
            out.digests
                .fetch_add(listing.digests, std::sync::atomic::Ordering::Relaxed);
            inputs.extend(listing.objects.into_iter().map(source::LogInput::S3));
        }
        let mut reader = s3::S3Reader::new(client, rt.handle().clone());
        reader.max_bytes = args.max_file_bytes;
        out.s3 = Some(reader);
    }
    out._runtime = Some(rt);
    // Time order across every source (baselines depend on it).
    inputs.sort_by_cached_key(|i| (i.start_secs().unwrap_or_default(), i.name()));
    out.total = Some((inputs.len(), inputs.iter().map(|i| i.size()).sum()));
    out.stream = Box::new(inputs.into_iter());
    Ok(out)
}

/// `[remediation]` and `[aws]` of a config file used by replay (other sections ignored).
fn remediation_section(
    path: &std::path::Path,
) -> Result<(
    kmsguard::remediate::RemediationConfig,
    kmsguard::aws::AwsSettings,
)> {
    #[derive(serde::Deserialize)]
    struct File {
        remediation: Option<kmsguard::remediate::RawRemediation>,
        #[serde(default)]
        aws: kmsguard::config::RawAws,
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let file: File =
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))?;
    let raw = file.remediation.with_context(|| {
        format!(
            "--remediate needs a [remediation] section in {} (see docs/remediation.md)",
            path.display()
        )
    })?;
    let mut problems = Vec::new();
    let cfg = kmsguard::remediate::RemediationConfig::from_raw(&raw, &mut problems);
    if !problems.is_empty() {
        anyhow::bail!("{}: {}", path.display(), problems.join("; "));
    }
    let mut aws = kmsguard::aws::AwsSettings::from_env();
    if file.aws.region.is_some() {
        aws.region = file.aws.region;
    }
    if let Some(e) = file.aws.endpoint_url {
        aws.endpoint_url = Some(e);
    }
    Ok((cfg, aws))
}

/// `replay --remediate`: the engine on findings of recent events only; the remediation
/// findings join the output.
fn replay_remediate(
    config: &std::path::Path,
    store: &Store,
    key_events: &[kmsguard::remediate::history::KeyEvent],
    findings: &mut pipeline::Findings,
    quiet: bool,
) -> Result<()> {
    let (cfg, aws) = remediation_section(config)?;
    // The replay's key events first: a later revert or confirmation in the replayed
    // files settles a finding, and their closed policies are snapshots to restore.
    let tree = store.tree(kmsguard::remediate::TREE)?;
    store
        .commit(&kmsguard::store::Commit {
            state: kmsguard::remediate::history::writes(&tree, key_events),
            ..Default::default()
        })
        .context("cannot record the replay's key events in the state store")?;
    let rt = runtime()?;
    let sdk = rt.block_on(kmsguard::aws::sdk_config(&aws));
    let max_age = cfg.max_event_age_secs as i64;
    let engine = kmsguard::remediate::Engine::new(cfg, sdk, Some(store.clone()));
    let now = inventory::now_secs();
    let (mut old, mut done) = (0usize, Vec::new());
    for f in findings.iter() {
        let f = f?;
        if !engine.accepts(&f) {
            continue;
        }
        let recent = inventory::parse_time(&f.time).is_some_and(|t| now - t <= max_age);
        if !recent {
            old += 1;
            continue;
        }
        done.extend(rt.block_on(engine.handle(&f)));
    }
    if !quiet {
        eprintln!(
            "note: --remediate: {} remediation finding(s); {old} finding(s) of events older than max_event_age_secs = {max_age} left alone",
            done.len()
        );
    }
    for f in &done {
        findings.put(f)?;
    }
    Ok(())
}

/// With --enrich: adds key aliases and tags from the KMS API to findings as the replay
/// settles them (through the state store's inventory cache), then escalates sensitive
/// keys' first uses. Once the API is unreachable, only the cache is used.
struct Enricher {
    inv: Inventory,
    rt: tokio::runtime::Runtime,
    unreachable: bool,
    problem: Option<String>,
    enriched: usize,
    seen: usize,
    /// Cached records dropped because an event of the replay changed their key.
    invalidated: usize,
}

impl Enricher {
    fn new(args: &ReplayArgs, store: &Store) -> Result<Enricher> {
        let rt = runtime()?;
        let sdk = rt.block_on(kmsguard::aws::sdk_config(
            &kmsguard::aws::AwsSettings::from_env(),
        ));
        let roles = match &args.config {
            Some(p) => PostureConfig::load_with_inventory(p)?.1.roles,
            None => Default::default(),
        };
        let inv =
            Inventory::new(store.clone(), Some(sdk), InventoryOptions::default()).with_roles(roles);
        Ok(Enricher {
            inv,
            rt,
            unreachable: false,
            problem: None,
            enriched: 0,
            seen: 0,
            invalidated: 0,
        })
    }

    /// Enriches a file's findings, then drops the cached records of the keys whose
    /// tags or aliases the file's events changed: findings of later events see the key
    /// as it became (read again from the API), those before it as it was.
    fn enrich(&mut self, found: &mut [Finding], facts: &[FactEvent]) {
        // In event time order: a change invalidates the cache for the findings after it.
        found.sort_by(|a, b| a.time.cmp(&b.time));
        let mut facts: Vec<&FactEvent> = facts.iter().collect();
        facts.sort_by(|a, b| a.time.cmp(&b.time));
        let mut next = 0;
        let mut start = 0;
        for i in 0..=found.len() {
            let due = facts[next..]
                .iter()
                .take_while(|e| i == found.len() || e.time <= found[i].time)
                .count();
            if due > 0 {
                self.enrich_findings(&mut found[start..i]);
                start = i;
                self.invalidate(&facts[next..next + due]);
                next += due;
            }
        }
        self.enrich_findings(&mut found[start..]);
    }

    /// Drops the cached records of the keys these changes changed.
    fn invalidate(&mut self, facts: &[&FactEvent]) {
        let mut changed = inventory::activity::Activity::default();
        for e in facts {
            let a = changed.keys.entry(e.key.clone()).or_default();
            if a.last_change.as_deref().is_none_or(|t| t < e.time.as_str()) {
                a.last_change = Some(e.time.clone());
            }
        }
        match self.inv.apply_activity(&changed) {
            Ok(n) => self.invalidated += n,
            Err(e) => {
                self.problem.get_or_insert(e.to_string());
            }
        }
    }

    fn enrich_findings(&mut self, found: &mut [Finding]) {
        if found.is_empty() {
            return;
        }
        self.seen += found.len();
        if self.unreachable {
            for f in found.iter_mut() {
                if matches!(self.inv.enrich_cached(f), Ok(true)) {
                    self.enriched += 1;
                }
            }
        } else {
            let report = self.rt.block_on(self.inv.enrich_all(found));
            self.enriched += report.enriched;
            self.unreachable = report.unreachable;
            if let Some(p) = report.problem {
                self.problem.get_or_insert(p);
            }
        }
        for f in found.iter_mut() {
            kmsguard::analyze::baseline::escalate_for_tags(f);
        }
    }

    fn report(&self) {
        if let Some(problem) = &self.problem {
            eprintln!(
                "warning: --enrich: {problem}; {} of {} finding(s) enriched (the others are as the events say)",
                self.enriched, self.seen
            );
        }
    }
}

/// With --state: records when CloudTrail last showed each key, and drops cached
/// inventory records that events changed.
fn record_activity(
    store: &Store,
    activity: &inventory::activity::Activity,
    before: usize,
    quiet: bool,
) -> Result<()> {
    let inv = Inventory::new(store.clone(), None, InventoryOptions::default());
    let invalidated = before
        + inv
            .apply_activity(activity)
            .context("cannot record key activity in the state store")?;
    if !quiet {
        eprintln!(
            "note: recorded CloudTrail activity of {} key(s); {invalidated} cached inventory record(s) invalidated by later changes",
            activity.keys.len()
        );
    }
    store.flush()?;
    Ok(())
}
