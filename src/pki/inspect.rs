//! Reading an existing certificate: the facts the planner ([`super::plan`]) decides on. Pure:
//! PEM text in, facts out.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use chrono::{DateTime, Utc};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::San;
use super::ca::{ClusterCa, from_timestamp};
use super::error::BadCertificate;

/// What an existing certificate says about itself, and whether the cluster's CA issued it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    /// `CN=..., O=...`.
    pub subject: String,
    pub sans: BTreeSet<San>,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
    /// May authenticate a TLS server (serverAuth or anyExtendedKeyUsage, or no EKU extension,
    /// which restricts nothing).
    pub server_auth: bool,
    /// May authenticate a TLS client (likewise).
    pub client_auth: bool,
    pub issuer: IssuerCheck,
}

/// Whether a certificate was issued by the cluster's CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IssuerCheck {
    /// Issuer name and authority key id match the CA, and the signature verifies with the CA's
    /// public key.
    ThisCa,
    /// Issued by another CA (or tampered with); why, for the operator.
    OtherCa(String),
}

/// The facts of the (first) certificate in `cert_pem`, its issuer checked against `ca`.
pub fn inspect(cert_pem: &str, ca: &ClusterCa) -> Result<CertFacts, BadCertificate> {
    let der = pem_der(cert_pem)?;
    let cert = parse(&der)?;
    let (server_auth, client_auth) = match cert.extended_key_usage().map_err(bad)? {
        None => (true, true),
        Some(e) => (
            e.value.any || e.value.server_auth,
            e.value.any || e.value.client_auth,
        ),
    };
    let mut sans = BTreeSet::new();
    if let Some(ext) = cert.subject_alternative_name().map_err(bad)? {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(d) => {
                    sans.insert(San::Dns(d.to_ascii_lowercase()));
                }
                GeneralName::IPAddress(b) => {
                    if let Some(ip) = ip_of(b) {
                        sans.insert(San::Ip(ip));
                    }
                }
                // pgherd issues DNS and IP SANs only; other kinds neither help nor hurt.
                _ => {}
            }
        }
    }
    Ok(CertFacts {
        subject: cert.subject().to_string(),
        sans,
        not_before: from_timestamp(cert.validity().not_before.timestamp()),
        not_after: from_timestamp(cert.validity().not_after.timestamp()),
        server_auth,
        client_auth,
        issuer: issuer_check(&cert, ca)?,
    })
}

/// Issuer name, then authority key id, then the signature: the first that does not match
/// says why.
fn issuer_check(cert: &X509Certificate<'_>, ca: &ClusterCa) -> Result<IssuerCheck, BadCertificate> {
    let ca_cert = parse(ca.cert_der())?;
    if cert.issuer().as_raw() != ca_cert.subject().as_raw() {
        return Ok(IssuerCheck::OtherCa(format!(
            "issued by {:?}, not by the cluster's CA {:?}",
            cert.issuer().to_string(),
            ca_cert.subject().to_string()
        )));
    }
    if let (Some(aki), Some(ski)) = (authority_key_id(cert), subject_key_id(&ca_cert))
        && aki != ski
    {
        return Ok(IssuerCheck::OtherCa(
            "its authority key id is not the cluster CA's key id (a CA of the same name)".into(),
        ));
    }
    if cert.verify_signature(Some(ca_cert.public_key())).is_err() {
        return Ok(IssuerCheck::OtherCa(
            "its signature does not verify with the cluster CA's key".into(),
        ));
    }
    Ok(IssuerCheck::ThisCa)
}

fn authority_key_id<'a>(cert: &'a X509Certificate<'_>) -> Option<&'a [u8]> {
    cert.iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => a.key_identifier.as_ref().map(|k| k.0),
            _ => None,
        })
}

fn subject_key_id<'a>(cert: &'a X509Certificate<'_>) -> Option<&'a [u8]> {
    cert.iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0),
            _ => None,
        })
}

fn ip_of(b: &[u8]) -> Option<IpAddr> {
    match b.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(b).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(b).ok()?))),
        _ => None,
    }
}

/// The DER of the first PEM certificate in `pem`.
pub(super) fn pem_der(pem: &str) -> Result<Vec<u8>, BadCertificate> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(bad)?;
    if p.label != "CERTIFICATE" {
        return Err(BadCertificate(format!(
            "a PEM {:?} block, expected CERTIFICATE",
            p.label
        )));
    }
    Ok(p.contents)
}

pub(super) fn parse(der: &[u8]) -> Result<X509Certificate<'_>, BadCertificate> {
    X509Certificate::from_der(der).map(|(_, c)| c).map_err(bad)
}

fn bad(e: impl std::fmt::Display) -> BadCertificate {
    BadCertificate(e.to_string())
}
