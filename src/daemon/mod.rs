//! `kmsguard run`: the long-running service. Long-polls SQS for notifications of new
//! CloudTrail files, fetches each file from S3, runs it through the same analysis as
//! replay (`pipeline::analyze`), and commits the file's ledger entry, baseline changes
//! and findings (into the outbox) in one transaction before the message is deleted.
//! A separate loop delivers the outbox to the sinks and removes an entry only once its
//! sink accepted it. So a crash at any moment loses nothing: an uncommitted file is
//! redelivered by SQS, a committed one is skipped by the ledger, and an undelivered
//! finding waits in the outbox (a finding may be delivered twice, with the same id).
//!
//! Tasks: one receiver per queue (bounded by a semaphore of `files_in_flight`), one task
//! per message (download, then decode on the blocking pool), one analyzer thread that
//! owns the baselines and does every commit (so commits are serialized), one outbox
//! deliverer, the metrics endpoint, and the signal handler (SIGTERM: stop receiving,
//! finish or release in-flight messages within the grace period, flush, exit 0; SIGHUP:
//! reload rules, keeping the old ones if the new ones are invalid), and with `[inventory]
//! refresh` the inventory refresher (`refresh_loop`: reads every key and runs the
//! posture checks on a schedule, one refresh at a time; new posture findings go to the
//! analyzer as a job like a file's, so they reach the sinks through the outbox).
//!
//! The analyzer adds each finding's key alias and tags from the inventory's cache (no
//! API call) and decides the rules' key conditions (`rule::resolve`) before committing.
//! With `[inventory] refresh`, it also hands every key a committed file shows changed
//! (`inventory::invalidates`) to the re-reader (`reread_loop`), which reads just that key
//! from the KMS API a few seconds later, so the cache does not wait for the next refresh.

use crate::analyze::baseline::Detector;
use crate::analyze::finding::{finding_id, Finding, Kind, Severity};
use crate::config::{Config, OnPermanent};
use crate::decode::{DecodeLimits, Decoder};
use crate::outbox::{self, DeliveryError, Sink};
use crate::pipeline::{self, Analysis};
use commit::{Committer, Input, Job, JobOutcome};

mod commit;
use crate::source::notification::{parse_body, Notice, ObjectRef};
use crate::store::{LedgerStatus, Store, StoreError};
use crate::telemetry::{Metrics, Notifier};
use crate::RuleSet;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};
use tracing::{error, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Rules(#[from] crate::analyze::rule::RulesError),
    #[error("cannot listen for metrics on {addr}: {source} (change [metrics] listen)")]
    Metrics {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install the signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("alert channel: {0}")]
    Alerts(#[from] crate::act::config::ConfigError),
    #[error(transparent)]
    Control(#[from] crate::act::control::ControlError),
}

/// Why a file could not be analyzed.
#[derive(Debug)]
enum FileError {
    /// Worth another try later (throttling, 5xx, timeouts, a store hiccup).
    Transient(String),
    /// Will not get better (gone, access denied, corrupt): reported as a health finding.
    Permanent,
}

struct Shared {
    cfg: Config,
    rules: RwLock<Arc<RuleSet>>,
    store: Store,
    metrics: Arc<Metrics>,
    s3: aws_sdk_s3::Client,
    jobs: mpsc::Sender<Job>,
    outbox: Arc<Notify>,
    sinks: Arc<Vec<Sink>>,
    limits: DecodeLimits,
    /// Receipt handles of messages being worked on, to release them on shutdown.
    in_flight: Mutex<HashMap<u64, (aws_sdk_sqs::Client, String, String)>>,
}

/// A health finding: something about kmsguard's own operation an operator must see.
pub fn health(rule: &str, severity: Severity, subject: &str, summary: String) -> Finding {
    Finding {
        id: finding_id(rule, &[subject.to_string()]),
        kind: Kind::Health,
        rule: rule.to_string(),
        severity,
        title: "kmsguard could not process an input".into(),
        summary: crate::analyze::rule::clean(&summary, 600).collect(),
        time: iso_now(),
        file: subject.to_string(),
        ..Finding::default()
    }
}

fn iso_now() -> String {
    crate::clock::format_rfc3339(std::time::SystemTime::now())
}

/// Loads the rules named by the config (built-in when none), plus extras.
pub fn load_rules(cfg: &Config) -> Result<RuleSet, crate::analyze::rule::RulesError> {
    let mut rules = RuleSet::load_or_builtin(cfg.rules_path.as_deref())?;
    for extra in &cfg.extra_rules {
        rules.extend(RuleSet::load(extra)?)?;
    }
    Ok(rules)
}

/// Runs the daemon until SIGTERM/SIGINT.
pub async fn run(cfg: Config) -> Result<(), DaemonError> {
    let rules = load_rules(&cfg)?;
    let store = Store::open(&cfg.state_dir)?;
    let sdk = crate::aws::sdk_config(&cfg.aws).await;
    let s3 = crate::aws::s3_client_own_retries(&sdk, &cfg.aws);
    let metrics = Arc::new(Metrics::default());
    metrics.beat();
    metrics
        .outbox_depth
        .store(store.outbox_len() as i64, Ordering::Relaxed);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (jobs_tx, jobs_rx) = mpsc::channel::<Job>(cfg.files_in_flight * 2);
    let wake = Arc::new(Notify::new());
    let mut sink_list: Vec<Sink> = cfg
        .file_sinks
        .iter()
        .cloned()
        .map(Sink::File)
        .chain(cfg.archive_sinks.iter().map(|a| {
            Sink::Archive(Box::new(crate::archive::ArchiveSink::new(
                a.clone(),
                &sdk,
                &cfg.aws,
            )))
        }))
        .chain(cfg.remediation.iter().map(|r| {
            Sink::Remediate(Arc::new(
                crate::remediate::Engine::new(r.clone(), sdk.clone(), Some(store.clone()))
                    .with_metrics(metrics.clone()),
            ))
        }))
        .collect();
    // Alert channels: one sink routes findings into the alert queue, one task per
    // channel delivers from it (secrets are loaded here, before anything starts).
    let mut channels = Vec::new();
    if !cfg.alert_channels.is_empty() {
        for c in &cfg.alert_channels {
            channels.push(crate::act::Channel::build(c)?);
        }
        let descriptions = rules
            .rules()
            .iter()
            .map(|r| (r.id.clone(), r.description.trim().to_string()))
            .collect();
        let alerts = crate::act::sink::AlertsSink::open(
            store.clone(),
            cfg.alert_channels.clone(),
            descriptions,
            metrics.clone(),
        )?;
        sink_list.push(Sink::Alerts(Arc::new(alerts)));
    }
    let names: Vec<String> = cfg
        .alert_channels
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    for (channel, n) in crate::act::queue::orphans(&store, &names)? {
        warn!(channel, alerts = n, "alerts wait for a channel that is not configured (renamed or removed?); they are kept until it is configured again");
    }
    let sinks: Arc<Vec<Sink>> = Arc::new(sink_list);
    match outbox::orphaned(&store, &sinks) {
        Ok(0) => {}
        Ok(n) => warn!(
            entries = n,
            "findings wait in the outbox for a sink that is no longer configured; they stay there until it is configured again"
        ),
        Err(e) => warn!(error = %e, "cannot scan the outbox"),
    }
    let shared = Arc::new(Shared {
        rules: RwLock::new(Arc::new(rules)),
        store: store.clone(),
        metrics: metrics.clone(),
        s3,
        jobs: jobs_tx,
        outbox: wake.clone(),
        sinks: sinks.clone(),
        limits: DecodeLimits::default(),
        in_flight: Mutex::new(HashMap::new()),
        cfg: cfg.clone(),
    });

    let mut tasks = tokio::task::JoinSet::new();
    // Keys that committed files show changed, for the re-reader (with a refresh only).
    let (rereads_tx, rereads_rx) = match cfg.inventory.refresh {
        Some(_) => {
            let (tx, rx) = mpsc::channel::<Reread>(REREAD_QUEUE);
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    // The analyzer: a plain thread, the only writer of baselines and commits. It must
    // not hold `Shared` (which owns the job sender), or the job channel would never close.
    let analyzer = {
        let remediation = match &cfg.remediation {
            Some(_) => Some(store.tree(crate::remediate::TREE)?),
            None => None,
        };
        let inventory = crate::inventory::Inventory::new(store.clone(), None, Default::default());
        let seen = inventory.seen_count()?;
        let shared = Committer {
            inventory,
            store: store.clone(),
            metrics: metrics.clone(),
            sinks: sinks.clone(),
            outbox: shared.outbox.clone(),
            remediation,
            seen_keys: std::sync::atomic::AtomicUsize::new(seen),
            seen_cap_logged: Default::default(),
            rereads: rereads_tx,
        };
        let det = Detector::new(cfg.baseline.clone());
        std::thread::Builder::new()
            .name("kmsguard-analyzer".into())
            .spawn(move || commit::analyzer_loop(jobs_rx, shared, det))
            .map_err(DaemonError::Signals)?
    };
    tasks.spawn(prune_loop(
        store.clone(),
        cfg.ledger_days,
        metrics.clone(),
        shutdown_rx.clone(),
    ));
    let mut refresher = None;
    if let Some(every) = cfg.inventory.refresh {
        if let Some(rx) = rereads_rx {
            tasks.spawn(reread_loop(
                store.clone(),
                sdk.clone(),
                cfg.inventory.roles.clone(),
                metrics.clone(),
                rx,
                REREAD_DEBOUNCE,
                shutdown_rx.clone(),
            ));
        }
        refresher = Some(tokio::spawn(refresh_loop(
            shared.clone(),
            sdk.clone(),
            every,
            shutdown_rx.clone(),
        )));
    }

    if let Some(addr) = cfg.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| DaemonError::Metrics {
                addr: addr.to_string(),
                source,
            })?;
        info!(%addr, "metrics on /metrics, health on /healthz");
        tasks.spawn(crate::telemetry::serve_metrics(
            listener,
            metrics.clone(),
            cfg.visibility_timeout_secs as i64 + 60,
            shutdown_rx.clone(),
        ));
    }
    let mut deliverers = tokio::task::JoinSet::new();
    for i in 0..sinks.len() {
        deliverers.spawn(deliver_loop(shared.clone(), i, shutdown_rx.clone()));
    }
    if !cfg.alert_channels.is_empty() {
        let listener = crate::act::control::bind(&cfg.state_dir)?;
        tasks.spawn(crate::act::control::serve(
            listener,
            store.clone(),
            cfg.alert_channels
                .iter()
                .map(|c| c.name().to_string())
                .collect(),
            wake.clone(),
            shutdown_rx.clone(),
        ));
    }
    for channel in channels {
        let task = crate::act::queue::ChannelTask {
            store: store.clone(),
            channel,
            park_after: cfg.alerts.park_after,
            metrics: metrics.clone(),
            wake: wake.clone(),
            sinks: sinks.clone(),
        };
        deliverers.spawn(crate::act::queue::run_channel(task, shutdown_rx.clone()));
    }

    let notifier = Arc::new(Notifier::from_env());
    let semaphore = Arc::new(Semaphore::new(cfg.files_in_flight));
    let messages = Arc::new(Mutex::new(tokio::task::JoinSet::new()));
    let mut receivers = tokio::task::JoinSet::new();
    for q in &cfg.sqs {
        let sqs = crate::aws::sqs_client(&sdk, q.region.as_deref());
        let on_permanent = check_queue(&sqs, &q.queue_url, cfg.on_permanent_error).await;
        receivers.spawn(receive_loop(
            shared.clone(),
            sqs,
            q.queue_url.clone(),
            on_permanent,
            semaphore.clone(),
            messages.clone(),
            notifier.clone(),
            shutdown_rx.clone(),
        ));
    }
    notifier.notify("READY=1\nSTATUS=waiting for CloudTrail notifications");
    info!(queues = cfg.sqs.len(), state = %cfg.state_dir.display(), "kmsguard running");

    // Signals.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let mut status_tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => reload_rules(&shared),
            _ = status_tick.tick() => {
                let m = &metrics;
                notifier.notify(&format!(
                    "STATUS=files {} records {} KMS {} outbox {}",
                    m.files_processed.load(Ordering::Relaxed),
                    m.records.load(Ordering::Relaxed),
                    m.kms_records.load(Ordering::Relaxed),
                    m.outbox_depth.load(Ordering::Relaxed)
                ));
            }
        }
    }
    notifier.notify("STOPPING=1");
    let _ = shutdown_tx.send(true);
    let grace = Duration::from_secs(cfg.shutdown_grace_secs);
    let deadline = tokio::time::Instant::now() + grace;
    while receivers.join_next().await.is_some() {}
    // Finish in-flight messages within the grace period; release the rest.
    let mut set = std::mem::take(&mut *messages.lock().unwrap_or_else(|e| e.into_inner()));
    let finished =
        tokio::time::timeout_at(deadline, async { while set.join_next().await.is_some() {} }).await;
    if finished.is_err() {
        set.abort_all();
        let left: Vec<_> = shared
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, v)| v)
            .collect();
        warn!(
            messages = left.len(),
            "grace period over: releasing unfinished messages for redelivery"
        );
        for (sqs, queue, receipt) in left {
            let _ = sqs
                .change_message_visibility()
                .queue_url(queue)
                .receipt_handle(receipt)
                .visibility_timeout(0)
                .send()
                .await;
        }
    }
    // Deliver what is committed, within what is left of the grace period.
    if let Some(mut r) = refresher {
        // It stops at the shutdown signal (a refresh in flight is abandoned); it holds
        // the job sender, so it must be gone before the analyzer can finish.
        if tokio::time::timeout_at(deadline, &mut r).await.is_err() {
            r.abort();
            let _ = r.await;
        }
    }
    let _ = tokio::time::timeout_at(deadline + Duration::from_secs(1), async {
        while deliverers.join_next().await.is_some() {}
    })
    .await;
    deliverers.abort_all();
    drop(shared);
    let _ = tokio::task::spawn_blocking(move || analyzer.join()).await;
    tasks.abort_all();
    store.flush()?;
    info!("kmsguard stopped");
    Ok(())
}

/// How often the ledger is pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Forgets, every hour (the first a minute after start), ledger entries older than
/// `days`: the queue cannot deliver their notifications again (SQS keeps a message at
/// most 14 days), so the ledger's size follows the trail's rate, not its age.
async fn prune_loop(
    store: Store,
    days: u32,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut wait = Duration::from_secs(60);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        wait = PRUNE_EVERY;
        let s = store.clone();
        let now = crate::inventory::now_secs();
        let cutoff = now - i64::from(days) * 86_400;
        match tokio::task::spawn_blocking(move || s.prune_ledger(cutoff, now)).await {
            Ok(Ok(p)) => {
                metrics
                    .ledger_entries
                    .store(p.kept as i64, Ordering::Relaxed);
                metrics
                    .ledger_pruned
                    .fetch_add(p.removed, Ordering::Relaxed);
                info!(removed = p.removed, kept = p.kept, days, "ledger pruned");
            }
            Ok(Err(e)) => {
                metrics.error("store");
                warn!(error = %e, "cannot prune the ledger; retrying in an hour");
            }
            Err(e) => warn!(error = %e, "the ledger pruning task failed"),
        }
    }
}

/// SIGHUP: re-reads the config file's `[rules]` and the rules it names. Anything wrong
/// is logged and the running rules stay. (Other settings need a restart.)
fn reload_rules(shared: &Shared) {
    let loaded = Config::load(&shared.cfg.path)
        .map_err(|e| e.to_string())
        .and_then(|cfg| load_rules(&cfg).map_err(|e| e.to_string()));
    match loaded {
        Ok(r) => {
            info!(
                rules = r.rules().len(),
                origin = r.origin,
                "SIGHUP: rules reloaded"
            );
            *shared.rules.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(r);
        }
        Err(e) => {
            error!(error = %e, "SIGHUP: the new rules are invalid; keeping the old ones");
            shared.metrics.error("rules-reload");
        }
    }
}

/// Without a redrive policy, "dead-letter" would redeliver a bad message forever.
async fn check_queue(sqs: &aws_sdk_sqs::Client, url: &str, wanted: OnPermanent) -> OnPermanent {
    if wanted == OnPermanent::Delete {
        return wanted;
    }
    let attrs = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy)
        .send()
        .await;
    match attrs {
        Ok(a)
            if a.attributes().is_some_and(|m| {
                m.contains_key(&aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy)
            }) =>
        {
            wanted
        }
        Ok(_) => {
            warn!(queue = url, "the queue has no dead-letter queue (RedrivePolicy): messages of permanently failed files will be deleted after their health finding; add a DLQ to keep them");
            OnPermanent::Delete
        }
        Err(e) => {
            warn!(queue = url, error = %e, "cannot read the queue's attributes; assuming it has a dead-letter queue");
            wanted
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn receive_loop(
    shared: Arc<Shared>,
    sqs: aws_sdk_sqs::Client,
    queue: String,
    on_permanent: OnPermanent,
    semaphore: Arc<Semaphore>,
    messages: Arc<Mutex<tokio::task::JoinSet<()>>>,
    notifier: Arc<Notifier>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new();
    let mut next_task: u64 = 0;
    loop {
        if *shutdown.borrow() {
            return;
        }
        shared.metrics.beat();
        if notifier.watchdog_every.is_some() {
            notifier.notify("WATCHDOG=1");
        }
        // Take one slot (waiting for it), then any others free, up to SQS's batch of 10.
        let first = tokio::select! {
            p = semaphore.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = shutdown.changed() => return,
        };
        let mut permits = vec![first];
        while permits.len() < 10 {
            match semaphore.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        let receive = sqs
            .receive_message()
            .queue_url(&queue)
            .max_number_of_messages(permits.len() as i32)
            .wait_time_seconds(20)
            .visibility_timeout(shared.cfg.visibility_timeout_secs)
            .message_system_attribute_names(
                aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount,
            )
            .send();
        let resp = tokio::select! {
            r = receive => r,
            _ = shutdown.changed() => return,
        };
        let msgs = match resp {
            Ok(r) => {
                backoff.reset();
                r.messages.unwrap_or_default()
            }
            Err(e) => {
                shared.metrics.error("sqs-receive");
                warn!(queue, error = %aws_sdk_sqs::error::DisplayErrorContext(&e), "cannot receive from SQS; retrying");
                tokio::time::sleep(backoff.next()).await;
                continue;
            }
        };
        for m in msgs {
            let Some(permit) = permits.pop() else { break };
            next_task += 1;
            let id = next_task;
            let shared = shared.clone();
            let sqs = sqs.clone();
            let queue = queue.clone();
            messages
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .spawn(async move {
                    handle_message(&shared, &sqs, &queue, on_permanent, m, id).await;
                    drop(permit);
                });
        }
        // Reap finished message tasks so the set stays small.
        let mut set = messages.lock().unwrap_or_else(|e| e.into_inner());
        while set.try_join_next().is_some() {}
    }
}

async fn handle_message(
    shared: &Shared,
    sqs: &aws_sdk_sqs::Client,
    queue: &str,
    on_permanent: OnPermanent,
    m: aws_sdk_sqs::types::Message,
    task: u64,
) {
    let m_id = m.message_id().unwrap_or("?").to_string();
    let Some(receipt) = m.receipt_handle().map(str::to_string) else {
        return;
    };
    shared
        .metrics
        .messages_received
        .fetch_add(1, Ordering::Relaxed);
    shared
        .in_flight
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(task, (sqs.clone(), queue.to_string(), receipt.clone()));
    let outcome = match parse_body(m.body().unwrap_or("")) {
        Ok(Notice::Test) => {
            info!(message = m_id, "s3:TestEvent acknowledged");
            Outcome::Done
        }
        Ok(Notice::Objects(objects)) => {
            let extender = tokio::spawn(extend_visibility(
                sqs.clone(),
                queue.to_string(),
                receipt.clone(),
                shared.cfg.visibility_timeout_secs,
            ));
            let mut outcome = Outcome::Done;
            for obj in objects {
                if let Some(t) = obj
                    .event_time
                    .as_deref()
                    .and_then(crate::analyze::baseline::parse_time)
                {
                    shared
                        .metrics
                        .newest_s3_time
                        .fetch_max(t, Ordering::Relaxed);
                }
                match process_object(shared, &obj).await {
                    Ok(()) => {}
                    Err(FileError::Permanent) => outcome = Outcome::Permanent,
                    Err(FileError::Transient(e)) => {
                        warn!(message = m_id, object = %obj.url(), error = e, "transient failure: releasing the message for redelivery");
                        outcome = Outcome::Release;
                        break;
                    }
                }
            }
            extender.abort();
            outcome
        }
        Err(e) => {
            // Reported once (the ledger remembers the message id), never retried forever.
            let key = format!("msg:{m_id}");
            let f = health(
                "health-unknown-message",
                Severity::Low,
                &key,
                format!("SQS message {m_id} on {queue} is not a notification of new CloudTrail files: {e}"),
            );
            warn!(message = m_id, queue, error = %e, "unrecognized message body");
            shared.metrics.error("unknown-message");
            match submit(shared, key, None, None, vec![f], true).await {
                Ok(_) => Outcome::Permanent,
                Err(_) => Outcome::Release,
            }
        }
    };
    let result = match (outcome, on_permanent) {
        (Outcome::Done, _) | (Outcome::Permanent, OnPermanent::Delete) => {
            let r = sqs
                .delete_message()
                .queue_url(queue)
                .receipt_handle(&receipt)
                .send()
                .await;
            if r.is_ok() {
                shared
                    .metrics
                    .messages_deleted
                    .fetch_add(1, Ordering::Relaxed);
            }
            r.map(|_| ())
                .map_err(|e| aws_sdk_sqs::error::DisplayErrorContext(e).to_string())
        }
        (Outcome::Permanent, OnPermanent::DeadLetter) => {
            // Visible again at once: each receive counts toward maxReceiveCount, after
            // which SQS moves it to the dead-letter queue.
            shared
                .metrics
                .messages_dead_lettered
                .fetch_add(1, Ordering::Relaxed);
            change_visibility(sqs, queue, &receipt, 0).await
        }
        (Outcome::Release, _) => {
            shared
                .metrics
                .messages_released
                .fetch_add(1, Ordering::Relaxed);
            change_visibility(sqs, queue, &receipt, 15).await
        }
    };
    if let Err(e) = result {
        shared.metrics.error("sqs-ack");
        warn!(message = m_id, error = e, "cannot acknowledge the message; SQS will redeliver it and the ledger will skip its files");
    }
    shared
        .in_flight
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&task);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Done,
    Permanent,
    Release,
}

async fn change_visibility(
    sqs: &aws_sdk_sqs::Client,
    queue: &str,
    receipt: &str,
    secs: i32,
) -> Result<(), String> {
    sqs.change_message_visibility()
        .queue_url(queue)
        .receipt_handle(receipt)
        .visibility_timeout(secs)
        .send()
        .await
        .map(|_| ())
        .map_err(|e| aws_sdk_sqs::error::DisplayErrorContext(e).to_string())
}

/// Keeps a message invisible while its files are worked on.
async fn extend_visibility(sqs: aws_sdk_sqs::Client, queue: String, receipt: String, secs: i32) {
    let every = Duration::from_secs((secs as u64 / 3).max(1));
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = change_visibility(&sqs, &queue, &receipt, secs).await {
            warn!(error = e, "cannot extend the message's visibility");
        }
    }
}

/// What the ledger already knows of an input: None when it was never processed, else
/// the outcome to report again (a duplicate is done; a failed input fails again).
fn ledger_says(shared: &Shared, key: &str) -> Option<Result<(), FileError>> {
    match shared.store.ledger_status(key) {
        Ok(Some(LedgerStatus::Done)) => {
            shared
                .metrics
                .files_duplicate
                .fetch_add(1, Ordering::Relaxed);
            Some(Ok(()))
        }
        Ok(Some(LedgerStatus::Failed)) => Some(Err(FileError::Permanent)),
        Ok(None | Some(LedgerStatus::Partial(_))) => None,
        Err(e) => Some(Err(FileError::Transient(e.to_string()))),
    }
}

/// Downloads, analyzes and commits one object.
async fn process_object(shared: &Shared, obj: &ObjectRef) -> Result<(), FileError> {
    // Before downloading: by the notification's ETag, or without one by the key alone.
    let key = match obj.etag {
        Some(_) => obj.ledger_key(),
        None => obj.key_entry(),
    };
    if let Some(done) = ledger_says(shared, &key) {
        return done;
    }
    shared
        .metrics
        .files_in_flight
        .fetch_add(1, Ordering::Relaxed);
    let result = fetch_and_analyze(shared, obj, obj.ledger_key()).await;
    shared
        .metrics
        .files_in_flight
        .fetch_sub(1, Ordering::Relaxed);
    result
}

async fn fetch_and_analyze(shared: &Shared, obj: &ObjectRef, key: String) -> Result<(), FileError> {
    let url = obj.url();
    let mut backoff = Backoff::new();
    let mut attempt = 0;
    let (bytes, etag) = loop {
        attempt += 1;
        match fetch(shared, obj).await {
            Ok(b) => break b,
            Err(Fetch::Transient(e)) if attempt <= shared.cfg.transient_retries => {
                shared.metrics.error("s3-transient");
                warn!(object = %url, attempt, error = e, "transient S3 error; retrying");
                tokio::time::sleep(backoff.next()).await;
            }
            Err(Fetch::Transient(e)) => return Err(FileError::Transient(e)),
            Err(Fetch::Permanent {
                rule,
                severity,
                why,
            }) => {
                shared.metrics.error(rule);
                shared.metrics.files_failed.fetch_add(1, Ordering::Relaxed);
                warn!(object = %url, error = why, "cannot read the object");
                let f = health(rule, severity, &key, format!("{url}: {why}"));
                return match submit(shared, key, Some(obj.key_entry()), None, vec![f], true).await {
                    Ok(_) => Err(FileError::Permanent),
                    Err(e) => Err(FileError::Transient(e)),
                };
            }
        }
    };
    // The ETag of what was read decides: a notification may carry none or another.
    let key = obj.ledger_key_with(etag.as_deref().or(obj.etag.as_deref()));
    if let Some(done) = ledger_says(shared, &key) {
        return done;
    }
    let rules = shared
        .rules
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let limits = shared.limits;
    let name = url.clone();
    let gz_name = obj.key.ends_with(".gz");
    let collect = pipeline::Collect {
        observations: true,
        key_events: shared.cfg.remediation.is_some(),
    };
    let jobs = shared.jobs.clone();
    let chunk_key = key.clone();
    let (analysis, activity, chunked) = tokio::task::spawn_blocking(move || {
        let mut decoder = Decoder::new(limits);
        // When each key was last seen, used and changed: the scheduled inventory
        // refresh's use-based posture checks read it.
        let mut activity = crate::inventory::Activity::default();
        // A large file's chunks are committed as they fill (with a ledger cursor): its
        // baselines and findings never have to fit in memory.
        let mut chunked = ChunkState::default();
        let policies = rules.policies().clone();
        let mut flush = |out: pipeline::ChunkOut| {
            chunked.index += 1;
            if chunked.failed.is_some() || chunked.done_before {
                return;
            }
            let (reply, rx) = oneshot::channel();
            let job = Job::Chunk(commit::ChunkJob {
                key: chunk_key.clone(),
                index: chunked.index,
                out,
                policies: policies.clone(),
                reply,
            });
            if jobs.blocking_send(job).is_err() {
                chunked.failed = Some("the analyzer has stopped".into());
                return;
            }
            match rx.blocking_recv() {
                Ok(Ok(JobOutcome::AlreadyDone | JobOutcome::AlreadyFailed)) => {
                    chunked.done_before = true
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => chunked.failed = Some(e.to_string()),
                Err(_) => chunked.failed = Some("the analyzer has stopped".into()),
            }
        };
        let analysis = pipeline::analyze_streaming(
            &rules,
            &name,
            collect,
            pipeline::OBSERVATION_CHUNK,
            &mut flush,
            |on_event| {
                decoder.decode_bytes(&bytes, gz_name, &mut |ev| {
                    activity.observe(ev);
                    on_event(ev)
                })
            },
        );
        (analysis, activity, chunked)
    })
    .await
    .map_err(|e| FileError::Transient(format!("analysis task failed: {e}")))?;
    if let Some(e) = chunked.failed {
        shared.metrics.error("store");
        return Err(FileError::Transient(e));
    }
    let mut health_findings = Vec::new();
    let failed = analysis.report.is_bad();
    if failed {
        let problems: Vec<String> = analysis
            .report
            .problems
            .iter()
            .map(|p| p.to_string())
            .collect();
        warn!(object = %url, problems = problems.join("; "), "damaged log file; its good records were analyzed");
        shared.metrics.error("corrupt-file");
        shared.metrics.files_failed.fetch_add(1, Ordering::Relaxed);
        health_findings.push(health(
            "health-corrupt-file",
            Severity::Medium,
            &key,
            format!("{url}: {}", problems.join("; ")),
        ));
    }
    match submit(
        shared,
        key,
        Some(obj.key_entry()),
        Some((analysis, activity)),
        health_findings,
        failed,
    )
    .await
    {
        Ok(_) if failed => Err(FileError::Permanent),
        Ok(_) => Ok(()),
        Err(e) => Err(FileError::Transient(e)),
    }
}

/// How a file's chunks went (`fetch_and_analyze`).
#[derive(Default)]
struct ChunkState {
    index: u64,
    /// The ledger had the whole file already (a redelivery).
    done_before: bool,
    failed: Option<String>,
}

/// Hands a file's results to the analyzer and waits for the commit.
async fn submit(
    shared: &Shared,
    key: String,
    alias: Option<String>,
    analysis: Option<(Analysis, crate::inventory::Activity)>,
    health: Vec<Finding>,
    failed: bool,
) -> Result<JobOutcome, String> {
    let (reply, rx) = oneshot::channel();
    let (analysis, activity) = analysis.unzip();
    let policies = shared
        .rules
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .policies()
        .clone();
    shared
        .jobs
        .send(Job::Input(Box::new(Input {
            key: Some(key),
            state: Vec::new(),
            alias,
            analysis,
            activity,
            health,
            failed,
            policies,
            reply,
        })))
        .await
        .map_err(|_| "the analyzer has stopped".to_string())?;
    match rx.await {
        Ok(Ok(o)) => Ok(o),
        Ok(Err(e)) => {
            shared.metrics.error("store");
            Err(e.to_string())
        }
        Err(_) => Err("the analyzer has stopped".into()),
    }
}

enum Fetch {
    Transient(String),
    Permanent {
        rule: &'static str,
        severity: Severity,
        why: String,
    },
}

/// The object's bytes and its ETag.
async fn fetch(shared: &Shared, obj: &ObjectRef) -> Result<(Vec<u8>, Option<String>), Fetch> {
    let resp = shared
        .s3
        .get_object()
        .bucket(&obj.bucket)
        .key(&obj.key)
        .send()
        .await;
    let out = match resp {
        Ok(o) => o,
        Err(e) => {
            use crate::source::s3::{classify_get_error, GetFailure};
            return Err(match classify_get_error(&e) {
                GetFailure::Missing(code) => Fetch::Permanent {
                    rule: "health-object-missing",
                    severity: Severity::Medium,
                    why: format!("the object is gone (deleted before it was read?): {code}"),
                },
                GetFailure::Denied(code) => Fetch::Permanent {
                    rule: "health-access-denied",
                    severity: Severity::High,
                    why: format!("access denied: give the daemon's role s3:GetObject on the trail prefix (docs/iam-policy.json): {code}"),
                },
                // Unclear refusals are retried like transient ones, then released.
                GetFailure::Transient(text) | GetFailure::Other(text) => Fetch::Transient(text),
            });
        }
    };
    if let Some(len) = out.content_length() {
        if len as u64 > shared.cfg.max_object_bytes {
            return Err(Fetch::Permanent {
                rule: "health-object-too-large",
                severity: Severity::Medium,
                why: format!(
                    "{len} bytes is over [daemon] max_object_bytes = {}",
                    shared.cfg.max_object_bytes
                ),
            });
        }
    }
    let etag = out.e_tag().map(str::to_string);
    match out.body.collect().await {
        Ok(b) => Ok((b.into_bytes().to_vec(), etag)),
        Err(e) => Err(Fetch::Transient(format!("download interrupted: {e}"))),
    }
}

/// A key to read again from the KMS API: its ARN and the time of the latest event that
/// changed it.
#[derive(Debug)]
pub(super) struct Reread {
    arn: String,
    changed_at: String,
}

/// Distinct keys waiting to be re-read (and the queue from the analyzer): more are left
/// to the scheduled refresh.
const REREAD_QUEUE: usize = 256;

/// A key is re-read this long after the first change of a burst (later changes of the
/// key within it are read by the same read).
const REREAD_DEBOUNCE: Duration = Duration::from_secs(3);

/// One re-read's time bound (it retries throttling with backoff meanwhile).
const REREAD_TIMEOUT: Duration = Duration::from_secs(60);

/// `[inventory] refresh`: every interval (the first at start), reads every key of the
/// posture regions (`[posture] regions`, else `[aws] region`) with the default
/// credentials and through `[inventory] roles`, runs the posture checks, and hands the
/// findings not reported before (`posture::news`) to the analyzer, which commits them
/// into the outbox with the updated reported set. One refresh at a time (a tick missed
/// while one runs is skipped), each bounded in time; the file pipeline never waits on it.
async fn refresh_loop(
    shared: Arc<Shared>,
    sdk: aws_config::SdkConfig,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let cfg = &shared.cfg;
    let regions: Vec<String> = if !cfg.posture.regions.is_empty() {
        cfg.posture.regions.clone()
    } else {
        sdk.region()
            .map(|r| vec![r.to_string()])
            .unwrap_or_default()
    };
    if regions.is_empty() {
        warn!("[inventory] refresh is set but there is no region to read: set [posture] regions or [aws] region");
        return;
    }
    let inv = crate::inventory::Inventory::new(
        shared.store.clone(),
        Some(sdk),
        crate::inventory::InventoryOptions {
            // A refresh reads every key afresh.
            max_age: Duration::ZERO,
            ..Default::default()
        },
    )
    .with_roles(cfg.inventory.roles.clone());
    let bound = every.max(Duration::from_secs(300));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let started = std::time::Instant::now();
        let calls_before = inv.calls().total();
        let now = crate::inventory::now_secs();
        let audit = tokio::select! {
            r = tokio::time::timeout(bound, crate::posture::audit(&inv, &regions, &cfg.posture, now)) => r,
            _ = shutdown.changed() => return,
        };
        let audit = match audit {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                shared.metrics.error("inventory");
                warn!(error = %e, "inventory refresh failed; the next one is in {} s", every.as_secs());
                continue;
            }
            Err(_) => {
                shared.metrics.error("inventory");
                warn!(
                    secs = bound.as_secs(),
                    "inventory refresh took too long and was abandoned"
                );
                continue;
            }
        };
        for w in &audit.warnings {
            warn!(problem = %w, "inventory refresh");
        }
        let total = audit.findings.len();
        let reported = match inv.reported() {
            Ok(r) => r,
            Err(e) => {
                shared.metrics.error("store");
                warn!(error = %e, "cannot read the reported posture findings");
                continue;
            }
        };
        let (new, state) = crate::posture::news(&reported, audit.findings, &iso_now());
        let n_new = new.len();
        if !state.is_empty() {
            let (reply, rx) = oneshot::channel();
            let job = Job::Input(Box::new(Input {
                key: None,
                state,
                alias: None,
                analysis: None,
                activity: None,
                health: new,
                failed: false,
                policies: Default::default(),
                reply,
            }));
            if shared.jobs.send(job).await.is_err() {
                return;
            }
            match rx.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    shared.metrics.error("store");
                    warn!(error = %e, "cannot commit the posture findings; the next refresh retries");
                    continue;
                }
                Err(_) => return,
            }
        }
        info!(
            keys = audit.keys,
            findings = total,
            new = n_new,
            api_calls = inv.calls().total() - calls_before,
            secs = started.elapsed().as_secs_f64(),
            "inventory refreshed"
        );
    }
}

/// The targeted re-read (with `[inventory] refresh`): keys a processed file showed
/// changed arrive from the analyzer; each is read from the KMS API (`Inventory::reread`:
/// DescribeKey, aliases, tags, rotation, policy, grants, through its account's role)
/// `debounce` after it first arrived, so a burst of changes costs one read, and stored
/// with the record it replaces kept as `previous/` (remediation's state before a change).
/// At most `REREAD_QUEUE` distinct keys wait; one read at a time, each bounded; a failed
/// read is logged and left to the next scheduled refresh. The analyzer never waits on it.
async fn reread_loop(
    store: Store,
    sdk: aws_config::SdkConfig,
    roles: crate::aws::Roles,
    metrics: Arc<Metrics>,
    mut rx: mpsc::Receiver<Reread>,
    debounce: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    use tokio::time::Instant;
    let inv =
        crate::inventory::Inventory::new(store, Some(sdk), Default::default()).with_roles(roles);
    // Key -> (when to read it, the latest change time asked for).
    let mut pending: HashMap<String, (Instant, String)> = HashMap::new();
    let mut open = true;
    while open || !pending.is_empty() {
        let next = pending.values().map(|(at, _)| *at).min();
        tokio::select! {
            got = rx.recv(), if open => match got {
                Some(r) => {
                    let full = pending.len() >= REREAD_QUEUE;
                    match pending.get_mut(&r.arn) {
                        Some((_, t)) => {
                            if r.changed_at > *t {
                                *t = r.changed_at;
                            }
                        }
                        None if full => metrics.error("inventory-reread-dropped"),
                        None => {
                            pending.insert(r.arn, (Instant::now() + debounce, r.changed_at));
                        }
                    }
                }
                None => open = false,
            },
            _ = tokio::time::sleep_until(next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))), if next.is_some() => {
                let now = Instant::now();
                let mut due: Vec<(String, String)> = pending
                    .iter()
                    .filter(|(_, (at, _))| *at <= now)
                    .map(|(k, (_, t))| (k.clone(), t.clone()))
                    .collect();
                due.sort();
                for (arn, changed_at) in due {
                    pending.remove(&arn);
                    let started = std::time::Instant::now();
                    let calls = inv.calls().total();
                    let read = tokio::select! {
                        r = tokio::time::timeout(REREAD_TIMEOUT, inv.reread(&arn, &changed_at)) => r,
                        _ = shutdown.changed() => return,
                    };
                    match read {
                        Ok(Ok(rec)) => info!(
                            key = %arn,
                            changed_at = %changed_at,
                            refreshed_at = %rec.refreshed_at,
                            api_calls = inv.calls().total() - calls,
                            secs = started.elapsed().as_secs_f64(),
                            "inventory key re-read"
                        ),
                        Ok(Err(e)) => {
                            metrics.error("inventory-reread");
                            warn!(key = %arn, error = %e, "cannot re-read a changed key; the next scheduled refresh reads it");
                        }
                        Err(_) => {
                            metrics.error("inventory-reread");
                            warn!(key = %arn, secs = REREAD_TIMEOUT.as_secs(), "re-reading a changed key took too long; the next scheduled refresh reads it");
                        }
                    }
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// Delivers one sink's outbox entries in order; an entry leaves the outbox only once
/// the sink accepted it. One task per sink, so a sink that is down holds up no other.
async fn deliver_loop(shared: Arc<Shared>, sink: usize, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Backoff::new();
    let name = shared.sinks[sink].name();
    loop {
        let notified = shared.outbox.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let batch = match outbox::pending(
            &shared.store,
            &shared.sinks[sink],
            shared.sinks[sink].batch_limit(),
        ) {
            Ok(b) => b,
            Err(e) => {
                error!(sink = name, error = %e, "cannot read the outbox");
                shared.metrics.error("outbox");
                Vec::new()
            }
        };
        if batch.is_empty() {
            if *shutdown.borrow() {
                return;
            }
            // A sink with timed output (alert groups, digests) is called with nothing.
            if !shared.sinks[sink].tick_due(std::time::SystemTime::now()) {
                tokio::select! {
                    _ = &mut notified => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
        }
        let (mut keys, findings): (Vec<String>, Vec<Finding>) = batch.into_iter().unzip();
        match shared.sinks[sink].deliver(&findings).await {
            Ok(outbox::Delivery {
                accepted: 0,
                follow_ups,
                state,
            }) if follow_ups.is_empty() && state.is_empty() => {
                // The sink waits for more (or for time to pass) before it takes these.
                // At most four calls a second: each one reads the whole batch again.
                backoff.reset();
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = shutdown.changed() => {}
                }
                tokio::select! {
                    _ = &mut notified => {}
                    _ = tokio::time::sleep(Duration::from_millis(1000)) => {}
                    _ = shutdown.changed() => {}
                }
                if *shutdown.borrow() {
                    return;
                }
            }
            Ok(outbox::Delivery {
                accepted,
                follow_ups,
                state,
            }) => {
                backoff.reset();
                keys.truncate(accepted.min(keys.len()));
                let n = keys.len();
                let wake = !follow_ups.is_empty() || !state.is_empty();
                if let Err(e) =
                    outbox::delivered(&shared.store, &shared.sinks, keys, &follow_ups, state)
                {
                    error!(sink = name, error = %e, "delivered, but cannot record it: the batch may be delivered again");
                    shared.metrics.error("outbox");
                    continue;
                }
                if wake {
                    shared.outbox.notify_waiters();
                }
                shared
                    .metrics
                    .delivered
                    .fetch_add(n as u64, Ordering::Relaxed);
                shared
                    .metrics
                    .outbox_depth
                    .store(shared.store.outbox_len() as i64, Ordering::Relaxed);
            }
            Err(e) => {
                shared.metrics.error(match e {
                    DeliveryError::Transient(_) => "sink-transient",
                    DeliveryError::Permanent(_) => "sink-permanent",
                });
                warn!(sink = name, error = %e, "cannot deliver findings; they stay in the outbox and will be retried");
                let wait = backoff.next();
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => {}
                }
                if *shutdown.borrow() {
                    return;
                }
            }
        }
    }
}

/// Capped exponential backoff with jitter: 0.5 s, 1 s, 2 s ... up to 30 s.
struct Backoff {
    n: u32,
}

impl Backoff {
    fn new() -> Self {
        Backoff { n: 0 }
    }
    fn reset(&mut self) {
        self.n = 0;
    }
    fn next(&mut self) -> Duration {
        let base = 500u64.saturating_mul(1 << self.n.min(6)).min(30_000);
        self.n += 1;
        // Jitter from the clock's nanoseconds: no RNG dependency needed for this.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as u64);
        Duration::from_millis(base / 2 + nanos % (base / 2 + 1))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn iso_now_is_iso() {
        let s = super::iso_now();
        assert_eq!(s.len(), 20);
        assert_eq!(
            crate::analyze::baseline::parse_time(&s)
                .map(|t| (t - crate::telemetry::now_secs()).abs() < 5),
            Some(true)
        );
    }
}
