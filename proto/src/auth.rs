//! The job token: the secret a job's processes share, so that nobody else
//! can join the coordinator, report for a rank, read the job's state, or
//! take part in the gradient ring. It comes from a file (`--token-file`) or
//! the `TESSERA_JOB_TOKEN` environment variable, never from a command-line
//! flag (other users can read those in `ps`), and it is never logged.
//!
//! Every RPC carries it as `authorization: Bearer TOKEN`; a worker also
//! carries the session secret its Join returned (`x-tessera-session`), which
//! binds its later calls to the rank it joined as.

use anyhow::{bail, Context, Result};
use std::path::Path;

pub const TOKEN_ENV: &str = "TESSERA_JOB_TOKEN";
/// The gRPC metadata key of a worker's session secret.
pub const SESSION_KEY: &str = "x-tessera-session";

/// A job token. Its `Debug` hides the value.
#[derive(Clone, PartialEq, Eq)]
pub struct JobToken(String);

impl std::fmt::Debug for JobToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JobToken(<{} bytes, hidden>)", self.0.len())
    }
}

impl JobToken {
    /// Checks a token's text: it travels in an HTTP header, so printable
    /// ASCII without spaces, and long enough not to be guessed.
    pub fn new(text: &str, source: &str) -> Result<Self> {
        let t = text.trim();
        if t.is_empty() {
            bail!("{source}: the job token is empty");
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            bail!("{source}: the job token must be printable ASCII without spaces (e.g. `openssl rand -hex 32`)");
        }
        if t.len() < 16 {
            bail!("{source}: the job token has {} characters; use at least 16 (e.g. `openssl rand -hex 32`)", t.len());
        }
        Ok(JobToken(t.to_string()))
    }

    /// The token from `file`, else from `TESSERA_JOB_TOKEN`, else none.
    pub fn load(file: Option<&Path>) -> Result<Option<Self>> {
        Self::load_with(file, &|k| std::env::var(k).ok())
    }

    fn load_with(file: Option<&Path>, env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the job token file {}", path.display()))?;
            warn_if_readable_by_others(path);
            return Self::new(&text, &format!("token file {}", path.display())).map(Some);
        }
        match env(TOKEN_ENV) {
            Some(text) => Self::new(&text, TOKEN_ENV).map(Some),
            None => Ok(None),
        }
    }

    pub fn bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// `authorization` metadata value.
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }

    /// Whether an `authorization` value presents this token. Compares in
    /// time independent of where the first difference is.
    pub fn accepts(&self, authorization: Option<&str>) -> bool {
        authorization.and_then(|v| v.strip_prefix("Bearer ")).is_some_and(|t| same_bytes(t.as_bytes(), self.bytes()))
    }
}

/// Constant-time equality (length is not secret).
pub fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A random secret for a worker's session (128 bits, hex).
pub fn new_session_secret() -> String {
    use rand::RngCore;
    let mut b = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        if m.permissions().mode() & 0o077 != 0 {
            tracing::warn!(file = %path.display(), "the job token file can be read by other users: chmod 600 it");
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "0123456789abcdef0123";

    #[test]
    fn a_token_comes_from_the_file_then_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("job.token");
        std::fs::write(&file, format!("{GOOD}\n")).unwrap();
        let env = |k: &str| (k == TOKEN_ENV).then(|| "fromtheenvironment42".to_string());
        let t = JobToken::load_with(Some(&file), &env).unwrap().unwrap();
        assert!(t.accepts(Some(&format!("Bearer {GOOD}"))), "the trailing newline is not part of it");
        let t = JobToken::load_with(None, &env).unwrap().unwrap();
        assert_eq!(t.bytes(), b"fromtheenvironment42");
        assert_eq!(JobToken::load_with(None, &|_| None).unwrap(), None);
        assert!(!format!("{t:?}").contains("environment"), "Debug hides the token");
    }

    #[test]
    fn bad_tokens_are_refused_by_name() {
        let e = JobToken::new("  \n", "token file x").unwrap_err().to_string();
        assert!(e.contains("token file x") && e.contains("empty"), "{e}");
        assert!(JobToken::new("has a space in it, long enough", "t").unwrap_err().to_string().contains("printable"));
        assert!(JobToken::new("short", "t").unwrap_err().to_string().contains("at least 16"));
        let e = JobToken::load_with(Some(Path::new("/nonexistent/job.token")), &|_| None).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/job.token"), "{e}");
    }

    #[test]
    fn only_the_right_bearer_is_accepted() {
        let t = JobToken::new(GOOD, "t").unwrap();
        assert!(t.accepts(Some(&t.bearer())));
        assert!(!t.accepts(None));
        assert!(!t.accepts(Some(GOOD)), "the Bearer scheme is required");
        assert!(!t.accepts(Some("Bearer 0123456789abcdef0124")));
        assert!(!t.accepts(Some("Bearer 0123456789abcdef012")));
        let (a, b) = (new_session_secret(), new_session_secret());
        assert!(a.len() == 32 && a != b);
    }
}
