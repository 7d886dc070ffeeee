//! The alert queue's control socket: a running daemon holds the state store's lock, so
//! `kmsguard alerts pending|retry` reach it through a Unix socket in the state directory
//! (`control.sock`, mode 0600: only the daemon's user and root can use it), and open the
//! store themselves only when no daemon is running. One request line (`pending`,
//! `retry`, `retry CHANNEL`), one JSON answer, then the connection closes.

use super::queue::{self, PendingAlert};
use crate::store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Notify};
use tracing::warn;

/// The socket's path in a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// What the daemon answers.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Answer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Vec<PendingAlert>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requeued: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon answered: {0}")]
    Daemon(String),
    #[error("the daemon's answer is not understood: {0}")]
    Answer(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no channel named `{name}`; the channels are: {known}")]
    UnknownChannel { name: String, known: String },
}

/// Binds the socket (replacing a stale one: the caller holds the store's lock, so no
/// other daemon uses this directory).
pub fn bind(state_dir: &Path) -> Result<UnixListener, ControlError> {
    let path = socket_path(state_dir);
    let io = |source| ControlError::Io {
        path: path.display().to_string(),
        source,
    };
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    let listener = UnixListener::bind(&path).map_err(io)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Answers requests until `shutdown`.
pub async fn serve(
    listener: UnixListener,
    store: Store,
    channels: Vec<String>,
    wake: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = shutdown.changed() => return,
        };
        let Ok((sock, _)) = conn else { continue };
        let (store, channels, wake) = (store.clone(), channels.clone(), wake.clone());
        tokio::spawn(async move {
            if let Err(e) = answer(sock, &store, &channels, &wake).await {
                warn!(error = %e, "control socket request failed");
            }
        });
    }
}

async fn answer(
    sock: UnixStream,
    store: &Store,
    channels: &[String],
    wake: &Notify,
) -> std::io::Result<()> {
    let (read, mut write) = sock.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(1024));
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
    let answer = handle(line.trim(), store, channels, wake);
    let mut body = serde_json::to_vec(&answer).unwrap_or_default();
    body.push(b'\n');
    write.write_all(&body).await?;
    write.shutdown().await
}

fn handle(request: &str, store: &Store, channels: &[String], wake: &Notify) -> Answer {
    let mut words = request.split_whitespace();
    let result = match (words.next(), words.next()) {
        (Some("pending"), None) => queue::pending(store).map(|p| Answer {
            pending: Some(p),
            ..Answer::default()
        }),
        (Some("retry"), channel) => {
            if let Some(c) = channel.filter(|c| !channels.iter().any(|k| k == c)) {
                return Answer {
                    error: Some(unknown(c, channels).to_string()),
                    ..Answer::default()
                };
            }
            let r = queue::retry(store, channel, SystemTime::now());
            wake.notify_waiters();
            r.map(|n| Answer {
                requeued: Some(n),
                ..Answer::default()
            })
        }
        _ => {
            return Answer {
                error: Some(format!(
                    "unknown request `{request}`: use `pending` or `retry [CHANNEL]`"
                )),
                ..Answer::default()
            }
        }
    };
    result.unwrap_or_else(|e| Answer {
        error: Some(e.to_string()),
        ..Answer::default()
    })
}

/// The error for a channel name that is not configured.
pub fn unknown(name: &str, channels: &[String]) -> ControlError {
    ControlError::UnknownChannel {
        name: name.to_string(),
        known: if channels.is_empty() {
            "(none)".to_string()
        } else {
            channels.join(", ")
        },
    }
}

/// Sends one request to the daemon of `state_dir`. `Ok(None)` when no daemon listens
/// (no socket, or nobody accepts on it).
pub async fn request(state_dir: &Path, request: &str) -> Result<Option<Answer>, ControlError> {
    let path = socket_path(state_dir);
    let io = |source| ControlError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut sock = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(io(e)),
    };
    sock.write_all(format!("{request}\n").as_bytes())
        .await
        .map_err(io)?;
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), sock.read_to_end(&mut body))
        .await
        .map_err(|_| {
            io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer in 30s",
            ))
        })?
        .map_err(io)?;
    let answer: Answer =
        serde_json::from_slice(&body).map_err(|e| ControlError::Answer(e.to_string()))?;
    match answer.error {
        Some(e) => Err(ControlError::Daemon(e)),
        None => Ok(Some(answer)),
    }
}
