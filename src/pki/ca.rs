//! The cluster CA: generating one (ECDSA P-256), loading the operator's or a stored one from
//! PEM, and issuing node certificates with it. Pure apart from the randomness of keys and serial
//! numbers: `now` is an argument.

use std::fmt;

use chrono::{DateTime, Duration, Utc};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use super::error::{BadCertificate, CaPemError, PkiError};
use super::inspect::{parse, pem_der};
use super::{CA_VALIDITY_DAYS, CLOCK_SKEW_ALLOWANCE_SECS, CertSpec, PrivateKeyPem, San};

/// A cluster's certificate authority: its certificate and its signing key. `Debug` shows the
/// subject and expiry only; there is no `Display`.
pub struct ClusterCa {
    cert_pem: String,
    cert_der: Vec<u8>,
    key_pem: PrivateKeyPem,
    issuer: Issuer<'static, KeyPair>,
    subject: String,
    not_after: DateTime<Utc>,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("subject", &self.subject)
            .field("not_after", &self.not_after)
            .field("key", &self.key_pem)
            .finish()
    }
}

/// The CA's common name for `cluster`.
pub fn ca_common_name(cluster: &str) -> String {
    format!("{cluster} pgherd CA")
}

impl ClusterCa {
    /// A new CA for `cluster`: an ECDSA P-256 key, CN `<cluster> pgherd CA`, valid from
    /// `now` (less the clock-skew allowance) for [`CA_VALIDITY_DAYS`], allowed to sign leaf
    /// certificates only (path length 0: pgherd never makes intermediates).
    pub fn generate(cluster: &str, now: DateTime<Utc>) -> Result<ClusterCa, PkiError> {
        let key = KeyPair::generate().map_err(PkiError::Crypto)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, ca_common_name(cluster));
        dn.push(DnType::OrganizationName, "pgherd");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        params.not_before = to_time(now - Duration::seconds(CLOCK_SKEW_ALLOWANCE_SECS));
        params.not_after = to_time(now + Duration::days(i64::from(CA_VALIDITY_DAYS)));
        let cert = params.self_signed(&key).map_err(PkiError::Crypto)?;
        let key_pem = PrivateKeyPem::new(key.serialize_pem());
        // Through the loader, so a generated CA and the same CA reloaded from its files are
        // built the same way (key identifiers, subject) and sign the same way.
        ClusterCa::from_pem(&cert.pem(), &key_pem).map_err(PkiError::GeneratedCa)
    }

    /// A CA from its PEM certificate (the first one in `cert_pem`) and PEM PKCS#8 key: the
    /// certificate must be a CA's, and the key its own.
    pub fn from_pem(cert_pem: &str, key_pem: &PrivateKeyPem) -> Result<ClusterCa, CaPemError> {
        let cert_der = pem_der(cert_pem)?;
        let x509 = parse(&cert_der)?;
        let is_ca = x509
            .basic_constraints()
            .map_err(|e| CaPemError::from(BadCertificate(e.to_string())))?
            .is_some_and(|bc| bc.value.ca);
        if !is_ca {
            return Err(CaPemError::NotACa);
        }
        let key = KeyPair::from_pem(key_pem.expose()).map_err(|_| CaPemError::BadKey)?;
        if key.public_key_raw() != x509.public_key().subject_public_key.data.as_ref() {
            return Err(CaPemError::KeyMismatch);
        }
        let subject = x509.subject().to_string();
        let not_after = from_timestamp(x509.validity().not_after.timestamp());
        // Re-encode the one certificate we use, so extra text or further certificates in the
        // operator's file do not travel to the hosts.
        let cert_pem = pem_encode("CERTIFICATE", &cert_der);
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| CaPemError::from(BadCertificate(e.to_string())))?;
        Ok(ClusterCa {
            cert_pem,
            cert_der,
            key_pem: key_pem.clone(),
            issuer,
            subject,
            not_after,
        })
    }

    /// The CA certificate (PEM): the trust anchor every service gets.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate (DER), for checking issuers.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA's private key, to write its 0600 file.
    pub fn key_pem(&self) -> &PrivateKeyPem {
        &self.key_pem
    }

    /// The subject, as `CN=..., O=...`.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    pub fn not_after(&self) -> DateTime<Utc> {
        self.not_after
    }

    /// Issues the certificate `spec` asks for, with a new ECDSA P-256 key: CN the host, the
    /// SANs of [`CertSpec::sans`], digitalSignature, the EKUs of its purpose, CA:FALSE, the
    /// CA's key identifier as authority key id, valid from `now` (less the clock-skew
    /// allowance) for `spec.days`, but never past the CA's own expiry.
    pub fn issue(&self, spec: &CertSpec, now: DateTime<Utc>) -> Result<IssuedCert, PkiError> {
        if now >= self.not_after {
            return Err(PkiError::CaExpired {
                subject: self.subject.clone(),
                not_after: self.not_after,
            });
        }
        let key = KeyPair::generate().map_err(PkiError::Crypto)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, spec.host.as_str());
        dn.push(DnType::OrganizationName, format!("{} pgherd", spec.cluster));
        dn.push(DnType::OrganizationalUnitName, spec.purpose.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = spec
            .sans()
            .into_iter()
            .map(|s| match s {
                San::Ip(ip) => Ok(SanType::IpAddress(ip)),
                San::Dns(d) => d
                    .as_str()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|source| PkiError::BadName { name: d, source }),
            })
            .collect::<Result<_, _>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        // ECDSA keys sign (the handshake); they never encipher a key, so no keyEncipherment.
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if spec.purpose.server_auth() {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if spec.purpose.client_auth() {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let not_after = (now + Duration::days(i64::from(spec.days))).min(self.not_after);
        params.not_before = to_time(now - Duration::seconds(CLOCK_SKEW_ALLOWANCE_SECS));
        params.not_after = to_time(not_after);
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(PkiError::Crypto)?;
        Ok(IssuedCert {
            spec: spec.clone(),
            cert_pem: cert.pem(),
            key: PrivateKeyPem::new(key.serialize_pem()),
            not_after: from_timestamp(not_after.timestamp()),
        })
    }
}

/// A certificate just issued, with its private key. `Debug` hides the key.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub spec: CertSpec,
    pub cert_pem: String,
    pub key: PrivateKeyPem,
    pub not_after: DateTime<Utc>,
}

/// 16 random bytes with the first one in 1..=127: positive (a serial is an INTEGER) and of a
/// fixed length. RFC 5280 wants serials unique per CA; 126 random bits make a collision out of
/// the question, and reissued certificates (same subject) stay distinguishable.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn to_time(t: DateTime<Utc>) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(t.timestamp())
        .expect("a chrono timestamp is within time's range")
}

/// Seconds since the epoch as a UTC time (clamped into chrono's range, which every X.509 time
/// is within).
pub(super) fn from_timestamp(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// PEM armour for `der` with 64-character lines.
fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
