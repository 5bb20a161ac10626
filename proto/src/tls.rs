//! TLS for the coordinator's gRPC service (rustls, through tonic). The
//! coordinator presents a certificate; workers check it against a CA file.
//! With a client CA on the coordinator, workers must present a certificate
//! of their own (mutual TLS). PEM files throughout. The gradient ring
//! between workers is authenticated by the job token but not encrypted.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The coordinator's side.
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Workers must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

/// A worker's (or `coordinator status`'s) side.
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// The CA that signed the coordinator's certificate.
    pub ca: PathBuf,
    /// This client's certificate and key, for a coordinator that wants them.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl ServerTls {
    pub fn config(&self) -> Result<ServerTlsConfig> {
        let identity = Identity::from_pem(read_pem(&self.cert, "--tls-cert")?, read_pem(&self.key, "--tls-key")?);
        let mut cfg = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            cfg = cfg.client_ca_root(Certificate::from_pem(read_pem(ca, "--tls-client-ca")?));
        }
        Ok(cfg)
    }
}

impl ClientTls {
    /// From the command line: a CA, and a certificate and key that come
    /// together or not at all.
    pub fn from_flags(ca: Option<PathBuf>, cert: Option<PathBuf>, key: Option<PathBuf>) -> Result<Option<Self>> {
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => bail!("--tls-cert and --tls-key go together (a client certificate for mutual TLS)"),
        };
        match ca {
            Some(ca) => Ok(Some(ClientTls { ca, identity })),
            None if identity.is_some() => bail!("--tls-cert needs --tls-ca: the CA of the coordinator's certificate"),
            None => Ok(None),
        }
    }

    /// The config for `url` (an `https://` URL; its host is the name the
    /// coordinator's certificate must carry).
    pub fn config(&self, url: &str) -> Result<ClientTlsConfig> {
        let Some(rest) = url.strip_prefix("https://") else {
            bail!("coordinator URL {url:?}: TLS needs an https:// URL");
        };
        let host = rest.split(['/', '?']).next().unwrap_or(rest);
        let host = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(v6),
            None => host.rsplit_once(':').map_or(host, |(h, _)| h),
        };
        let mut cfg = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read_pem(&self.ca, "--tls-ca")?))
            .domain_name(host.to_string());
        if let Some((cert, key)) = &self.identity {
            cfg = cfg.identity(Identity::from_pem(read_pem(cert, "--tls-cert")?, read_pem(key, "--tls-key")?));
        }
        Ok(cfg)
    }
}

/// A PEM file's text, refused early with its flag's name when it is not PEM.
fn read_pem(path: &Path, flag: &str) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{flag} {}: cannot read it", path.display()))?;
    if !text.contains("-----BEGIN ") {
        bail!("{flag} {}: not a PEM file (no -----BEGIN line)", path.display());
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_flags_come_in_the_right_combinations() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert!(ClientTls::from_flags(None, None, None).unwrap().is_none());
        assert!(ClientTls::from_flags(p("ca"), None, None).unwrap().unwrap().identity.is_none());
        assert!(ClientTls::from_flags(p("ca"), p("c"), p("k")).unwrap().unwrap().identity.is_some());
        assert!(ClientTls::from_flags(p("ca"), p("c"), None).unwrap_err().to_string().contains("go together"));
        assert!(ClientTls::from_flags(None, p("c"), p("k")).unwrap_err().to_string().contains("--tls-ca"));
    }

    #[test]
    fn bad_files_and_urls_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.txt");
        std::fs::write(&not_pem, "hello").unwrap();
        let tls = ClientTls { ca: not_pem, identity: None };
        let e = tls.config("https://head:29500").unwrap_err().to_string();
        assert!(e.contains("--tls-ca") && e.contains("not a PEM file"), "{e}");
        let e = tls.config("http://head:29500").unwrap_err().to_string();
        assert!(e.contains("https://"), "{e}");
        let missing = ServerTls { cert: dir.path().join("none.pem"), key: dir.path().join("k.pem"), client_ca: None };
        let e = missing.config().unwrap_err().to_string();
        assert!(e.contains("--tls-cert") && e.contains("none.pem"), "{e}");
    }
}
