//! Secrets of alert channels: `Secret` (a loaded value whose `Debug` is redacted),
//! `SecretRef` (where it comes from: an environment variable or a file, e.g. systemd
//! `LoadCredential=`; never the config file), and `Redacted`, which wraps raw config
//! values that may be secret so that printing a parsed config cannot leak them.

use super::config::ConfigError;
use serde::Deserialize;
use std::fmt;
use std::path::PathBuf;

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// A raw config value that may hold a secret (an inline URL, a rejected inline
/// password): deserialized as is, shown as `<redacted>`.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct Redacted<T>(pub T);

impl<T> fmt::Debug for Redacted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A secret's value. `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Where a secret comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    Env(String),
    File(PathBuf),
}

impl SecretRef {
    /// Reads the secret; `key` names the config key in errors.
    pub fn load(&self, key: &str) -> Result<Secret, ConfigError> {
        let value = match self {
            SecretRef::Env(var) => std::env::var(var).map_err(|_| {
                invalid(
                    format!("{key}_env"),
                    format!("environment variable {var} is not set (or not UTF-8); set it, or use {key}_file = \"/run/credentials/...\""),
                )
            })?,
            SecretRef::File(path) => std::fs::read_to_string(path).map_err(|e| {
                invalid(
                    format!("{key}_file"),
                    format!("cannot read {}: {e}; check the path and that kmsguard may read it", path.display()),
                )
            })?,
        };
        let value = value.trim_end_matches(['\r', '\n']).to_string();
        if value.is_empty() {
            let which = match self {
                SecretRef::Env(v) => format!("{key}_env: environment variable {v}"),
                SecretRef::File(p) => format!("{key}_file: {}", p.display()),
            };
            return Err(invalid(which, "is empty; put the secret there"));
        }
        Ok(Secret(value))
    }
}

pub(crate) fn secret_ref(
    key: &str,
    env: &Option<String>,
    file: &Option<PathBuf>,
) -> Result<Option<SecretRef>, ConfigError> {
    match (env, file) {
        (Some(_), Some(_)) => Err(invalid(
            key,
            format!(
                "both {0}_env and {0}_file are set; keep one",
                key.rsplit('.').next().unwrap_or(key)
            ),
        )),
        (Some(v), None) if v.trim().is_empty() => Err(invalid(
            format!("{key}_env"),
            "is empty; name an environment variable",
        )),
        (Some(v), None) => Ok(Some(SecretRef::Env(v.clone()))),
        (None, Some(p)) => Ok(Some(SecretRef::File(p.clone()))),
        (None, None) => Ok(None),
    }
}

pub(crate) fn reject_inline<T>(key: &str, value: &Option<Redacted<T>>) -> Result<(), ConfigError> {
    if value.is_some() {
        let leaf = key.rsplit('.').next().unwrap_or(key);
        return Err(invalid(
            key,
            format!("secrets are not accepted in the config file; use {leaf}_env = \"VARIABLE\" or {leaf}_file = \"/run/credentials/kmsguard/{leaf}\""),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_load_from_env_and_files_and_never_print() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, "s3cret\n").unwrap();
        let s = SecretRef::File(p.clone()).load("x.secret").unwrap();
        assert_eq!(s.expose(), "s3cret");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert_eq!(format!("{:?}", Redacted("s3cret")), "<redacted>");
        std::fs::write(&p, "\n").unwrap();
        let e = SecretRef::File(p).load("x.secret").unwrap_err().to_string();
        assert!(e.contains("x.secret_file") && e.contains("empty"), "{e}");
        let e = SecretRef::Env("KMSGUARD_TEST_SURELY_UNSET_VAR".into())
            .load("x.password")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x.password_env") && e.contains("KMSGUARD_TEST_SURELY_UNSET_VAR"),
            "{e}"
        );
    }
}
