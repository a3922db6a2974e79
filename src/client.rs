//! How the bundled clients (`get`, `bench`) reach a server: plaintext for `http://` addresses,
//! TLS for `https://` ones, trusting the CA given with `--ca-cert` (the server's name is checked
//! against its certificate).

use std::path::Path;

use anyhow::Context as _;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// An endpoint for `addr`, with TLS when it is `https://`.
///
/// # Errors
/// If `addr` is not a URL, the CA file cannot be read, or an `https://` address comes without a
/// CA (or a CA with an `http://` one).
pub fn endpoint(addr: &str, ca_cert: Option<&Path>) -> anyhow::Result<Endpoint> {
    let endpoint = Endpoint::from_shared(addr.to_owned())
        .with_context(|| format!("invalid server address {addr:?}"))?;
    let https = endpoint.uri().scheme_str() == Some("https");
    match (https, ca_cert) {
        (false, None) => Ok(endpoint),
        (true, Some(ca)) => {
            let pem = std::fs::read(ca)
                .with_context(|| format!("cannot read the CA certificate {}", ca.display()))?;
            endpoint
                .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
                .context("TLS")
        }
        (true, None) => anyhow::bail!(
            "{addr} is https: give --ca-cert, the CA that signed the server's certificate"
        ),
        (false, Some(_)) => {
            anyhow::bail!("--ca-cert is for https:// addresses; {addr} is plaintext")
        }
    }
}
