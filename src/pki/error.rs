//! The PKI's errors. Callers branch on them (a half-present CA is the operator's to fix, an
//! expired CA needs a new one), so they are `thiserror` enums; file errors name the file.
//!
//! No message quotes a private key. Key parse failures carry no `#[source]` on purpose: the PEM
//! and base64 decoders' messages can quote the offending byte of the key.

use std::path::PathBuf;

/// A certificate that does not parse; the parser's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a PEM X.509 certificate: {0}")]
pub struct BadCertificate(pub String);

/// Why a CA certificate and key (PEM text) are not a usable CA.
#[derive(Debug, thiserror::Error)]
pub enum CaPemError {
    #[error("the certificate is {0}")]
    BadCertificate(#[from] BadCertificate),
    /// No source: see the module doc. Only PKCS#8 is read (rcgen's ring backend): the hint
    /// converts the SEC1 (`EC PRIVATE KEY`) and PKCS#1 (`RSA PRIVATE KEY`) files that older
    /// `openssl` commands write.
    #[error(
        "the key is not a PEM PKCS#8 private key (\"BEGIN PRIVATE KEY\") of a supported type (ECDSA P-256/P-384, Ed25519, RSA); convert an \"EC PRIVATE KEY\" or \"RSA PRIVATE KEY\" file with `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pkcs8`"
    )]
    BadKey,
    #[error("the certificate is not a CA certificate (no basicConstraints CA:TRUE)")]
    NotACa,
    #[error("the key does not belong to the certificate (their public keys differ)")]
    KeyMismatch,
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: cannot write: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} / {}: not a usable CA: {source}", cert.display(), key.display())]
    Ca {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: CaPemError,
    },
    /// One of the CA's two files exists without the other. pgherd never creates a new CA over
    /// a half-present one: a new CA invalidates every certificate the old one issued.
    #[error(
        "{} exists but {} does not: restore it from a backup, or remove {} to have pgherd create a new CA (every node certificate is then reissued)",
        present.display(), missing.display(), present.display()
    )]
    HalfCa { present: PathBuf, missing: PathBuf },
    /// A CA file to load is missing (the operator's `tls.ca_cert` / `tls.ca_key`: pgherd does
    /// not create a CA in its place).
    #[error("{}: the CA file does not exist", path.display())]
    MissingCaFile { path: PathBuf },
    /// A CA key file that others may read: refused, as ssh refuses such a private key.
    #[error("{}: the CA key is readable by others (mode {mode:04o}); chmod 600 it", path.display())]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("the CA ({subject}) expired on {not_after}: replace it")]
    CaExpired {
        subject: String,
        not_after: chrono::DateTime<chrono::Utc>,
    },
    #[error("{name:?} cannot be a certificate name: {source}")]
    BadName {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    /// A CA just generated did not load back (a bug, not the operator's to fix).
    #[error("the generated CA is not usable: {0}")]
    GeneratedCa(#[source] CaPemError),
    #[error("cannot generate or sign: {0}")]
    Crypto(#[source] rcgen::Error),
}
