//! TLS for a listener (rustls, `ring` provider): a certificate chain and key read from PEM files,
//! kept behind a swap so a new certificate (a renewal) can be loaded while the listener runs.
//!
//! A reload builds the whole new server configuration first and swaps it in only when it is
//! good; a missing file, bad PEM or a key that does not match the certificate keeps the old one
//! serving and says why, naming the file. Handshakes already started keep the configuration they
//! started with. Only TLS 1.2 and 1.3 are spoken (RFC 8996 deprecates 1.0 and 1.1), and ALPN
//! offers `h2` then `http/1.1` (RFC 7301), so a client that can picks HTTP/2.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read, or held no PEM block of the kind wanted.
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    /// rustls refused the pair (e.g. the key does not match the certificate).
    #[error("{} with {}: {message}", cert.display(), key.display())]
    Refused {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    /// The listener was started without TLS; turning it on takes a restart.
    #[error("TLS is off on this listener (started without [tls]); a restart turns it on")]
    Off,
}

/// The TLS side of a listener: the current [`rustls::ServerConfig`], swappable.
#[derive(Debug)]
pub struct TlsAcceptor {
    current: ArcSwap<rustls::ServerConfig>,
}

impl TlsAcceptor {
    /// Loads the PEM certificate chain at `cert` (leaf first) and the PEM private key at `key`
    /// (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            current: ArcSwap::from_pointee(server_config(cert, key)?),
        })
    }

    /// Serves `cert` and `key` from the next handshake on; on an error the certificate served
    /// so far stays and the error says which file and why.
    pub fn reload(&self, cert: &Path, key: &Path) -> Result<(), TlsError> {
        self.current.store(Arc::new(server_config(cert, key)?));
        Ok(())
    }

    /// The acceptor for one handshake, with the configuration current now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }
}

/// A server configuration for one certificate: TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`.
fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, TlsError> {
    let file_error = |path: &Path, message: String| TlsError::File {
        path: path.to_path_buf(),
        message,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_error(cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(cert, format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(file_error(cert, "no CERTIFICATE block in the file".into()));
    }
    let private_key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| file_error(key, format!("no PEM private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let refused = |message: String| TlsError::Refused {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        message,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| refused(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .map_err(|e| refused(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
