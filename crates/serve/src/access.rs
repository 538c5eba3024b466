//! Who may use the server: bearer tokens checked in constant time, and TLS
//! (rustls) so that tokens and payloads do not cross networks in clear.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// The tokens that may call the API, kept as SHA-256 digests so that every
/// comparison takes the same time whatever the presented token's length.
#[derive(Clone)]
pub struct Tokens(Arc<Vec<[u8; 32]>>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} configured)", self.0.len())
    }
}

impl Tokens {
    /// Tokens from a file: one per line, blank lines and `#` comments
    /// ignored. Refuses a file without tokens and tokens shorter than 16
    /// characters (guessable).
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let tokens: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        if tokens.is_empty() {
            return Err(format!("{} holds no token (one per line)", path.display()));
        }
        if let Some(short) = tokens.iter().position(|t| t.len() < 16) {
            return Err(format!(
                "token on line {} of {} is shorter than 16 characters; use e.g. `openssl rand -hex 32`",
                short + 1,
                path.display()
            ));
        }
        Ok(Self::new(tokens))
    }

    /// Tokens given directly.
    pub fn new<'a>(tokens: impl IntoIterator<Item = &'a str>) -> Self {
        Self(Arc::new(tokens.into_iter().map(|t| Sha256::digest(t).into()).collect()))
    }

    fn accepts(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        // Every configured token is compared: no early exit on a match.
        self.0
            .iter()
            .fold(subtle::Choice::from(0), |found, t| found | t.ct_eq(&digest))
            .into()
    }
}

/// Middleware: 401 unless `Authorization: Bearer <token>` names a token.
pub(crate) async fn require_token(State(tokens): State<Tokens>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    match presented {
        Some(token) if tokens.accepts(token) => next.run(request).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            axum::Json(frankensplit_api::ErrorBody {
                error: "missing or wrong bearer token (Authorization: Bearer <token>)".into(),
            }),
        )
            .into_response(),
    }
}

/// A rustls server configuration from PEM files: the certificate chain
/// (leaf first) and its private key.
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificates from {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{} holds no PEM certificate", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read a private key from {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("certificate and key do not make a TLS identity: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Handshakes slower than this are dropped (a client that opens a
/// connection and sends nothing must not hold a slot).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; beyond, new connections wait in the
/// kernel's backlog.
const MAX_HANDSHAKES: usize = 256;

/// A TLS listener for `axum::serve`: connections are accepted and their
/// handshakes run concurrently, so one slow client cannot stall the others.
pub(crate) struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, std::net::SocketAddr)>,
    addr: std::net::SocketAddr,
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(config);
        let (tx, ready) = tokio::sync::mpsc::channel(MAX_HANDSHAKES);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let accepted = tokio::select! {
                    // The server is gone: stop listening (frees the port).
                    () = tx.closed() => return,
                    accepted = listener.accept() => accepted,
                };
                let (tcp, peer) = match accepted {
                    Ok(c) => c,
                    Err(_) => {
                        // Out of descriptors, say: back off instead of spinning.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    if let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        let _ = tx.send((tls, peer)).await;
                    }
                });
            }
        });
        Ok(Self { ready, addr })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(connection) => connection,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_configured_tokens_are_accepted() {
        let tokens = Tokens::new(["0123456789abcdef-first", "0123456789abcdef-second"]);
        assert!(tokens.accepts(b"0123456789abcdef-first"));
        assert!(tokens.accepts(b"0123456789abcdef-second"));
        assert!(!tokens.accepts(b"0123456789abcdef-firs"));
        assert!(!tokens.accepts(b""));
    }

    #[test]
    fn token_files_refuse_empty_and_short_tokens() {
        let dir = std::env::temp_dir().join(format!("fs-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tokens");
        std::fs::write(&file, "# comment\n\n").unwrap();
        assert!(Tokens::from_file(&file).unwrap_err().contains("no token"));
        std::fs::write(&file, "short\n").unwrap();
        assert!(Tokens::from_file(&file).unwrap_err().contains("16 characters"));
        std::fs::write(&file, "# ops\n0123456789abcdef0123\n").unwrap();
        assert!(Tokens::from_file(&file).unwrap().accepts(b"0123456789abcdef0123"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
