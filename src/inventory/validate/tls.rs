//! The `tls` section: on or off, the operator's CA (both files or neither), the node
//! certificates' lifetime and the REST API's client-certificate policy. The CA files are not
//! read here (validation touches no file): loading them, with errors naming the file, is
//! [`crate::pki::store`]'s.

use std::path::{Path, PathBuf};

use serde_saphyr::Spanned;

use super::Checker;
use crate::inventory::model::{Tls, TlsCa, VerifyClient};
use crate::inventory::raw::RawTls;
use crate::pki::{MAX_CERT_DAYS, NODE_CERT_DAYS, RENEWAL_WINDOW_DAYS};

/// Whether the services are deployed with the cluster CA's certificates. When they are, TLS is
/// on by default and `tls.enabled: false` turns it off (with [`Tls::warning`]); until then it is
/// off, and `tls.enabled: true` is an error.
const TLS_DEPLOYED: bool = false;

/// `inventory_dir` anchors the relative CA paths, as it does the secrets file.
pub(super) fn tls(c: &mut Checker, raw: &RawTls, inventory_dir: &Path) -> Tls {
    let cert = path(c, &raw.ca_cert, "tls.ca_cert", inventory_dir);
    let key = path(c, &raw.ca_key, "tls.ca_key", inventory_dir);
    let ca = match (&raw.ca_cert, &raw.ca_key, cert, key) {
        (_, _, Some(cert), Some(key)) => {
            if cert == key {
                let k = raw.ca_key.as_ref().expect("a key path was given");
                c.at(
                    k,
                    "tls.ca_key",
                    "is the same file as tls.ca_cert: the CA's key must be a file of its own",
                );
            }
            TlsCa::Operator { cert, key }
        }
        (Some(given), None, _, _) => {
            c.at(
                given,
                "tls.ca_cert",
                "needs tls.ca_key too: the operator's CA is its certificate and its key",
            );
            TlsCa::Generated
        }
        (None, Some(given), _, _) => {
            c.at(
                given,
                "tls.ca_key",
                "needs tls.ca_cert too: the operator's CA is its certificate and its key",
            );
            TlsCa::Generated
        }
        // Neither given, or one of them empty (already reported).
        _ => TlsCa::Generated,
    };
    let cert_days = match &raw.cert_days {
        Some(d) if d.value <= RENEWAL_WINDOW_DAYS => {
            c.at(
                d,
                "tls.cert_days",
                format!(
                    "must be more than the {RENEWAL_WINDOW_DAYS}-day renewal window (got {}): every apply would reissue every certificate",
                    d.value
                ),
            );
            NODE_CERT_DAYS
        }
        Some(d) if d.value > MAX_CERT_DAYS => {
            c.at(
                d,
                "tls.cert_days",
                format!("must be at most {MAX_CERT_DAYS} (got {})", d.value),
            );
            NODE_CERT_DAYS
        }
        Some(d) => d.value,
        None => NODE_CERT_DAYS,
    };
    let verify_client = match &raw.verify_client {
        Some(v) => VerifyClient::parse(&v.value).unwrap_or_else(|| {
            c.at(
                v,
                "tls.verify_client",
                format!(
                    "bad verify_client {:?} (expected required, optional or none)",
                    v.value
                ),
            );
            VerifyClient::default()
        }),
        None => VerifyClient::default(),
    };
    // Until the services are deployed with certificates, asking for TLS is refused rather than
    // accepted and ignored: a run must never look like it secured what it did not.
    if let Some(e) = &raw.enabled
        && e.value
        && !TLS_DEPLOYED
    {
        c.at(
            e,
            "tls.enabled",
            "TLS is not deployed yet: this pgherd issues no certificates to etcd, the REST API \
             or PostgreSQL (the cluster CA exists; wiring it in is the open TLS issue), so \
             remove the line or set it to false",
        );
    }
    Tls {
        enabled: raw.enabled.as_ref().map_or(TLS_DEPLOYED, |e| e.value) && TLS_DEPLOYED,
        ca,
        cert_days,
        verify_client,
    }
}

/// A CA path resolved against the inventory's directory; `None` when absent or empty (the
/// latter reported).
fn path(c: &mut Checker, v: &Option<Spanned<String>>, field: &str, dir: &Path) -> Option<PathBuf> {
    let s = v.as_ref()?;
    if s.value.trim().is_empty() {
        c.at(s, field, "must not be empty");
        return None;
    }
    Some(dir.join(&s.value))
}
