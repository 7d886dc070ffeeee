//! What an operator sees of a running kmsguard: logs (tracing; human on a terminal,
//! JSON for journald), metrics in Prometheus text format with `/healthz`, and the
//! systemd notification protocol (READY, STATUS, WATCHDOG) spoken directly over
//! `$NOTIFY_SOCKET`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sets up logging: JSON lines when `json`, human otherwise; `RUST_LOG` filters
/// (default `info`).
pub fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

/// Counters and gauges of the daemon.
#[derive(Default)]
pub struct Metrics {
    pub messages_received: AtomicU64,
    pub messages_deleted: AtomicU64,
    pub messages_released: AtomicU64,
    pub messages_dead_lettered: AtomicU64,
    pub files_processed: AtomicU64,
    pub files_duplicate: AtomicU64,
    pub files_failed: AtomicU64,
    pub records: AtomicU64,
    pub kms_records: AtomicU64,
    pub json_bytes: AtomicU64,
    pub files_in_flight: AtomicI64,
    pub outbox_depth: AtomicI64,
    /// Folded findings open (`analyze::fold`), kept in the store.
    pub open_folds: AtomicI64,
    /// Ledger entries after the last pruning, and entries pruned since start.
    pub ledger_entries: AtomicI64,
    pub ledger_pruned: AtomicU64,
    pub delivered: AtomicU64,
    /// Unix seconds of the newest eventTime seen, and of the newest S3 event time.
    pub newest_event_time: AtomicI64,
    pub newest_s3_time: AtomicI64,
    /// Unix seconds of the last turn of a processing loop (liveness).
    pub heartbeat: AtomicI64,
    findings: Mutex<BTreeMap<(String, String), u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    alerts: Mutex<BTreeMap<String, AlertStats>>,
    /// Remediation actions by (action, outcome); remediation metrics are shown once
    /// `remediation_enabled` is set.
    remediations: Mutex<BTreeMap<(String, String), u64>>,
    pub remediation_enabled: std::sync::atomic::AtomicBool,
    /// Unix seconds until which the remediation circuit breaker is open (0: never was).
    pub remediation_breaker_until: AtomicI64,
}

/// Counters and gauges of one alert channel.
#[derive(Debug, Clone, Default)]
pub struct AlertStats {
    /// Alerts the channel accepted.
    pub sent: u64,
    /// Failed attempts.
    pub failed: u64,
    /// Attempts after a failure.
    pub retried: u64,
    /// Alerts parked (given up on until `alerts retry`).
    pub parked: u64,
    /// Alerts held back by the channel's rate limit.
    pub suppressed: u64,
    /// Alerts waiting now, and parked now.
    pub queued: i64,
    pub parked_now: i64,
    /// Unix ms when the oldest waiting alert was queued (0: none).
    pub oldest_ms: u64,
}

pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Metrics {
    pub fn inc(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn finding(&self, rule: &str, severity: &str) {
        let mut m = self.findings.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((rule.to_string(), severity.to_string()))
            .or_default() += 1;
    }

    pub fn error(&self, kind: &str) {
        let mut m = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(kind.to_string()).or_default() += 1;
    }

    /// Updates the stats of alert channel `channel`.
    pub fn alert(&self, channel: &str, f: impl FnOnce(&mut AlertStats)) {
        let mut m = self.alerts.lock().unwrap_or_else(|e| e.into_inner());
        f(m.entry(channel.to_string()).or_default());
    }

    /// Counts one remediation action by its hint and outcome.
    pub fn remediation(&self, action: &str, outcome: &str) {
        let mut m = self.remediations.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((action.to_string(), outcome.to_string()))
            .or_default() += 1;
    }

    pub fn beat(&self) {
        self.heartbeat.store(now_secs(), Ordering::Relaxed);
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            out.push_str(&format!("# HELP kmsguard_{name} {help}\n# TYPE kmsguard_{name} counter\nkmsguard_{name} {v}\n"));
        };
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            "sqs_messages_received_total",
            "SQS messages received.",
            g(&self.messages_received),
        );
        counter(
            "sqs_messages_deleted_total",
            "SQS messages deleted after their files were committed.",
            g(&self.messages_deleted),
        );
        counter(
            "sqs_messages_released_total",
            "SQS messages released for redelivery after transient errors.",
            g(&self.messages_released),
        );
        counter(
            "sqs_messages_dead_lettered_total",
            "SQS messages left for the dead-letter queue.",
            g(&self.messages_dead_lettered),
        );
        counter(
            "files_processed_total",
            "Log files analyzed and committed.",
            g(&self.files_processed),
        );
        counter(
            "files_duplicate_total",
            "Notifications of files already processed (skipped).",
            g(&self.files_duplicate),
        );
        counter(
            "files_failed_total",
            "Log files that failed permanently.",
            g(&self.files_failed),
        );
        counter(
            "ledger_pruned_total",
            "Ledger entries forgotten (older than [state] ledger_days).",
            g(&self.ledger_pruned),
        );
        counter(
            "records_total",
            "CloudTrail records read.",
            g(&self.records),
        );
        counter(
            "kms_records_total",
            "KMS records read.",
            g(&self.kms_records),
        );
        counter(
            "json_bytes_total",
            "Bytes of decompressed CloudTrail JSON read.",
            g(&self.json_bytes),
        );
        counter(
            "findings_delivered_total",
            "Findings accepted by sinks.",
            g(&self.delivered),
        );
        out.push_str("# HELP kmsguard_findings_total Findings committed to the outbox, by rule and severity.\n# TYPE kmsguard_findings_total counter\n");
        for ((rule, sev), n) in self
            .findings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            out.push_str(&format!(
                "kmsguard_findings_total{{rule=\"{rule}\",severity=\"{sev}\"}} {n}\n"
            ));
        }
        out.push_str(
            "# HELP kmsguard_errors_total Errors by kind.\n# TYPE kmsguard_errors_total counter\n",
        );
        for (kind, n) in self.errors.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            out.push_str(&format!("kmsguard_errors_total{{kind=\"{kind}\"}} {n}\n"));
        }
        let alerts = self
            .alerts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        type Pick = fn(&AlertStats, u64) -> String;
        let per_channel: [(&str, &str, &str, Pick); 8] = [
            (
                "alerts_sent_total",
                "counter",
                "Alerts accepted by their channel (SMTP 250, HTTP 2xx).",
                |s, _| s.sent.to_string(),
            ),
            (
                "alerts_failed_total",
                "counter",
                "Failed delivery attempts.",
                |s, _| s.failed.to_string(),
            ),
            (
                "alerts_retried_total",
                "counter",
                "Delivery attempts after a failure.",
                |s, _| s.retried.to_string(),
            ),
            (
                "alerts_parked_total",
                "counter",
                "Alerts parked after park_after or a permanent failure.",
                |s, _| s.parked.to_string(),
            ),
            (
                "alerts_suppressed_total",
                "counter",
                "Alerts held back by the channel's rate limit.",
                |s, _| s.suppressed.to_string(),
            ),
            (
                "alerts_queued",
                "gauge",
                "Alerts waiting for delivery.",
                |s, _| s.queued.to_string(),
            ),
            (
                "alerts_parked",
                "gauge",
                "Alerts parked now (kmsguard alerts retry re-queues them).",
                |s, _| s.parked_now.to_string(),
            ),
            (
                "alerts_outbox_age_seconds",
                "gauge",
                "Age of the oldest alert waiting for delivery.",
                |s, now| {
                    if s.oldest_ms == 0 {
                        "0".into()
                    } else {
                        format!("{:.3}", now.saturating_sub(s.oldest_ms) as f64 / 1000.0)
                    }
                },
            ),
        ];
        if !alerts.is_empty() {
            for (name, kind, help, pick) in per_channel {
                out.push_str(&format!(
                    "# HELP kmsguard_{name} {help}\n# TYPE kmsguard_{name} {kind}\n"
                ));
                for (channel, s) in &alerts {
                    out.push_str(&format!(
                        "kmsguard_{name}{{channel=\"{channel}\"}} {}\n",
                        pick(s, now_ms)
                    ));
                }
            }
        }
        let now = now_secs();
        let lag = |t: i64| if t > 0 { (now - t).max(0) } else { 0 };
        let gauges = [
            (
                "files_in_flight",
                "Files being downloaded or analyzed.",
                self.files_in_flight.load(Ordering::Relaxed),
            ),
            (
                "outbox_depth",
                "Findings waiting for delivery.",
                self.outbox_depth.load(Ordering::Relaxed),
            ),
            (
                "ledger_entries",
                "Files the ledger remembers (after the last hourly pruning).",
                self.ledger_entries.load(Ordering::Relaxed),
            ),
            (
                "open_folds",
                "Folded findings whose window is open (bounded; they stay in the store).",
                self.open_folds.load(Ordering::Relaxed),
            ),
            (
                "lag_event_seconds",
                "Now minus the newest eventTime seen.",
                lag(self.newest_event_time.load(Ordering::Relaxed)),
            ),
            (
                "lag_s3_seconds",
                "Now minus the newest S3 object event time seen.",
                lag(self.newest_s3_time.load(Ordering::Relaxed)),
            ),
        ];
        for (name, help, v) in gauges {
            out.push_str(&format!("# HELP kmsguard_{name} {help}\n# TYPE kmsguard_{name} gauge\nkmsguard_{name} {v}\n"));
        }
        if self.remediation_enabled.load(Ordering::Relaxed) {
            out.push_str("# HELP kmsguard_remediation_actions_total Remediation actions by action and outcome (planned, performed, skipped, failed).\n# TYPE kmsguard_remediation_actions_total counter\n");
            for ((action, outcome), n) in self
                .remediations
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
            {
                out.push_str(&format!(
                    "kmsguard_remediation_actions_total{{action=\"{action}\",outcome=\"{outcome}\"}} {n}\n"
                ));
            }
            let open = i64::from(now < self.remediation_breaker_until.load(Ordering::Relaxed));
            out.push_str(&format!("# HELP kmsguard_remediation_breaker_open 1 while the remediation circuit breaker stops actions.\n# TYPE kmsguard_remediation_breaker_open gauge\nkmsguard_remediation_breaker_open {open}\n"));
        }
        out
    }
}

/// Serves `/metrics` and `/healthz` (200 while a processing loop turned in the last
/// `stale_secs`, else 503) until `shutdown` resolves.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: std::sync::Arc<Metrics>,
    stale_secs: i64,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let accept = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let Ok((mut sock, _)) = accept else { continue };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n =
                match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match path {
                "/metrics" => ("200 OK", metrics.render()),
                "/healthz" => {
                    let age = now_secs() - metrics.heartbeat.load(Ordering::Relaxed);
                    if age <= stale_secs {
                        ("200 OK", "ok\n".to_string())
                    } else {
                        (
                            "503 Service Unavailable",
                            format!("processing loop silent for {age} s\n"),
                        )
                    }
                }
                _ => ("404 Not Found", "try /metrics or /healthz\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}

/// The systemd notification socket, when run under `Type=notify`.
pub struct Notifier {
    socket: Option<(std::os::unix::net::UnixDatagram, std::path::PathBuf)>,
    /// Half the watchdog interval, when systemd asked for pings.
    pub watchdog_every: Option<std::time::Duration>,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|p| {
            let path = std::path::PathBuf::from(p);
            // Abstract sockets (leading '@') are not supported here; systemd uses a path.
            if path.to_string_lossy().starts_with('@') {
                return None;
            }
            std::os::unix::net::UnixDatagram::unbound()
                .ok()
                .map(|s| (s, path))
        });
        let watchdog_every = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(|us| std::time::Duration::from_micros(us / 2));
        Notifier {
            socket,
            watchdog_every,
        }
    }

    pub fn notify(&self, state: &str) {
        if let Some((sock, path)) = &self.socket {
            let _ = sock.send_to(state.as_bytes(), path);
        }
    }
}
