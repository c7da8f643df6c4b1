//! TLS for registry clients: the system's roots, loaded at the first TLS
//! handshake rather than when a client is built.
//!
//! reqwest's own rustls setup builds `rustls-platform-verifier`'s verifier
//! in `ClientBuilder::build`, which on Linux reads and parses every
//! certificate under `/etc/ssl/certs` (about 20 ms here). A process that
//! only ever talks plain HTTP (a local registry listed as insecure) or
//! talks to no registry at all paid that at every start: `strata rpull`,
//! each lazy mount's daemon, the snapshotter's first pull. The verifier
//! here is the same platform verifier, built on first use and shared by
//! every connection of the client; verification itself is unchanged.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

/// The TLS settings of a registry client: TLS 1.2 and 1.3, HTTP/1.1 by
/// ALPN (reqwest is built without HTTP/2), no client certificate, and
/// the platform's verifier made at the first handshake.
pub(crate) fn client_config() -> Result<ClientConfig, rustls::Error> {
    let provider = CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    let verifier = LazyVerifier {
        provider: provider.clone(),
        inner: OnceLock::new(),
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous() // the platform verifier, as reqwest itself installs it
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// `rustls_platform_verifier::Verifier`, built at its first use.
#[derive(Debug)]
struct LazyVerifier {
    provider: Arc<CryptoProvider>,
    /// The verifier, or why the system's roots could not be loaded (every
    /// handshake then fails with that reason).
    inner: OnceLock<Result<rustls_platform_verifier::Verifier, rustls::Error>>,
}

impl LazyVerifier {
    fn get(&self) -> Result<&rustls_platform_verifier::Verifier, rustls::Error> {
        self.inner
            .get_or_init(|| rustls_platform_verifier::Verifier::new(self.provider.clone()))
            .as_ref()
            .map_err(|e| rustls::Error::General(format!("loading the system's TLS roots: {e}")))
    }
}

impl ServerCertVerifier for LazyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.get()?
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.get()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.get()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        // what the platform verifier answers, without loading any root
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_are_loaded_at_the_first_handshake_not_at_build() {
        let config = client_config().unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let v = LazyVerifier {
            provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            inner: OnceLock::new(),
        };
        assert!(!v.supported_verify_schemes().is_empty());
        assert!(v.inner.get().is_none(), "schemes alone load no root");
        // a certificate that is not one: refused by the real verifier,
        // which had to be built for it
        let bogus = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
        let name = ServerName::try_from("registry.invalid").unwrap();
        let err = v
            .verify_server_cert(&bogus, &[], &name, &[], UnixTime::now())
            .unwrap_err();
        assert!(v.inner.get().is_some());
        assert!(!matches!(err, rustls::Error::General(ref m) if m.contains("TLS roots")));
    }
}
