//! The cluster's PKI: one certificate authority per cluster and the per-node certificates it
//! issues for etcd (peer, server, client), the agent's REST API, PostgreSQL and the operator's
//! `ctl` client. It owns:
//! - [`ca`]: the [`ClusterCa`] (generated, or the operator's loaded from PEM) and issuing a
//!   certificate for a [`CertSpec`];
//! - [`inspect`]: the facts of an existing certificate (SANs, expiry, EKU, whether this CA
//!   issued it, signature checked);
//! - [`plan`]: the pure planner that says, per certificate, keep, issue or reissue, and why;
//! - [`store`]: where the CA lives on the operator's machine (beside the secrets file) and
//!   load-or-create with 0600 files written atomically.
//!
//! Everything but [`store`] is pure: the clock is an input (`now`), so issuing and planning are
//! deterministic apart from the keys and serial numbers. The module imports no other module
//! of the crate (the inventory holds plain settings and uses this module's constants).
//!
//! Private keys are [`PrivateKeyPem`]s: no `Display`, a `Debug` that shows no key material,
//! and no error message of this module quotes a key (nor a parser's message about one).

pub mod ca;
pub mod error;
pub mod inspect;
pub mod plan;
pub mod store;

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub use ca::{ClusterCa, IssuedCert};
pub use error::{CaPemError, PkiError};
pub use inspect::{CertFacts, IssuerCheck, inspect};
pub use plan::{Action, CertKey, DesiredCert, Existing, KeepReason, ReissueReason, plan, plan_one};
pub use store::{CaFiles, CaOrigin};

/// How long a CA that pgherd generates is valid: ten years. Replacing a CA means reissuing
/// every node certificate and redistributing the trust anchor to every service at once, so the
/// CA should outlive the cluster's hardware; node certificates (see [`NODE_CERT_DAYS`]) are the
/// ones that rotate.
pub const CA_VALIDITY_DAYS: u32 = 3650;

/// How long a node certificate is valid by default (the inventory's `tls.cert_days` overrides
/// it): 825 days, the longest lifetime Apple's TLS clients accept for a server certificate
/// (and the CA/Browser Forum's former ceiling), so a browser or a macOS `psql` pointed at the
/// REST API or PostgreSQL does not reject it. Rotation is a re-run of `apply` (see
/// [`RENEWAL_WINDOW_DAYS`]), so a shorter lifetime costs nothing but apply runs.
pub const NODE_CERT_DAYS: u32 = 825;

/// The longest `tls.cert_days` accepted: the lifetime of a CA pgherd generates. A certificate
/// never outlives its CA anyway (issuing clamps `not_after` to the CA's).
pub const MAX_CERT_DAYS: u32 = CA_VALIDITY_DAYS;

/// A certificate that expires within this many days is reissued by `apply`. 30 days: an
/// operator who applies monthly (or whose CI applies on every change) renews before expiry,
/// while it is short against [`NODE_CERT_DAYS`], so certificates are not reissued (and every
/// service restarted for them) on nearly every run. `tls.cert_days` must exceed it, or every
/// apply would reissue every certificate.
pub const RENEWAL_WINDOW_DAYS: u32 = 30;

/// `not_before` is set this long before "now": the hosts' clocks may lag the operator's
/// machine a little, and a certificate that is "not yet valid" on a host is refused just like
/// an expired one.
pub const CLOCK_SKEW_ALLOWANCE_SECS: i64 = 3600;

/// The file mode of every private key pgherd writes (the CA's on the operator's machine, the
/// nodes' on the hosts): readable by its owner only.
pub const KEY_FILE_MODE: u32 = 0o600;

/// What a certificate is for. Decides its extended key usages and whether the loopback names
/// are among its SANs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Purpose {
    /// etcd member to member (`--peer-cert-file`): each member is both the server and the
    /// client of its peers, so serverAuth and clientAuth.
    EtcdPeer,
    /// etcd's client-facing listener (`--cert-file`): serverAuth.
    EtcdServer,
    /// The agent's (and the host's `etcdctl`'s) identity toward etcd when etcd requires client
    /// certificates: clientAuth.
    EtcdClient,
    /// The agent's REST API: serverAuth, and clientAuth because the agent presents the same
    /// certificate when it calls the other members' REST APIs (as Patroni does with its
    /// `restapi.certfile`).
    RestApi,
    /// PostgreSQL's `ssl_cert_file`: serverAuth, and clientAuth because a replica presents it
    /// on its replication and pg_rewind connections to the primary (`sslcert` in
    /// `primary_conninfo`), for a `clientcert=verify-full` pg_hba rule.
    Postgres,
    /// The operator's client certificate for `pgherd`'s day-2 commands and patronictl-style
    /// clients (REST API calls that need a client certificate): clientAuth, no SANs.
    Ctl,
}

impl Purpose {
    pub const ALL: [Purpose; 6] = [
        Purpose::EtcdPeer,
        Purpose::EtcdServer,
        Purpose::EtcdClient,
        Purpose::RestApi,
        Purpose::Postgres,
        Purpose::Ctl,
    ];

    /// A short name, used in file names and messages (`etcd-peer`, `restapi`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::EtcdPeer => "etcd-peer",
            Purpose::EtcdServer => "etcd-server",
            Purpose::EtcdClient => "etcd-client",
            Purpose::RestApi => "restapi",
            Purpose::Postgres => "postgresql",
            Purpose::Ctl => "ctl",
        }
    }

    /// Whether the certificate may authenticate a TLS server.
    pub fn server_auth(self) -> bool {
        matches!(
            self,
            Purpose::EtcdPeer | Purpose::EtcdServer | Purpose::RestApi | Purpose::Postgres
        )
    }

    /// Whether the certificate may authenticate a TLS client.
    pub fn client_auth(self) -> bool {
        matches!(
            self,
            Purpose::EtcdPeer
                | Purpose::EtcdClient
                | Purpose::RestApi
                | Purpose::Postgres
                | Purpose::Ctl
        )
    }

    /// Whether the loopback names (`localhost`, `127.0.0.1`, `::1`) are SANs. Yes for the
    /// listeners that a process on the same host reaches over loopback: the agent and the
    /// host's `etcdctl` talk to the local etcd, `psql` and the agent's local checks to the local
    /// PostgreSQL, `curl` on the host to the local REST API. Not for etcd peer certificates
    /// (peers dial each other's addresses, never loopback) nor client certificates (a client's
    /// SANs are not checked against anything). Anyone who can answer on a host's loopback
    /// already runs on that host, so the loopback SANs open no impersonation path.
    pub fn loopback_sans(self) -> bool {
        matches!(
            self,
            Purpose::EtcdServer | Purpose::RestApi | Purpose::Postgres
        )
    }
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One subject alternative name: a DNS name or an IP address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum San {
    /// Compared case-insensitively (stored lowercase), as DNS names are.
    Dns(String),
    Ip(IpAddr),
}

impl San {
    /// A host name or address as written in the inventory: an IP literal (an IPv6 zone id such
    /// as `%eth0` is dropped: it names the local interface, not the peer, and is not part of a
    /// certificate's IP SAN), otherwise a DNS name.
    pub fn parse(s: &str) -> San {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return San::Ip(ip);
        }
        if let Some((ip, _zone)) = s.split_once('%')
            && let Ok(ip) = ip.parse::<Ipv6Addr>()
        {
            return San::Ip(IpAddr::V6(ip));
        }
        San::Dns(s.to_ascii_lowercase())
    }
}

impl fmt::Display for San {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            San::Dns(d) => write!(f, "DNS:{d}"),
            San::Ip(ip) => write!(f, "IP:{ip}"),
        }
    }
}

/// What to issue: one certificate of one purpose for one host (or, for [`Purpose::Ctl`], for
/// the operator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSpec {
    pub cluster: String,
    /// The member name (the certificate's CN and a DNS SAN); for `Ctl`, the operator's name.
    pub host: String,
    /// The host's address as written in the inventory (IPv4, IPv6 or a DNS name); `None` for
    /// `Ctl`.
    pub address: Option<String>,
    pub purpose: Purpose,
    /// Lifetime in days (see [`NODE_CERT_DAYS`]).
    pub days: u32,
}

impl CertSpec {
    /// A node certificate with the default lifetime.
    pub fn node(cluster: &str, host: &str, address: &str, purpose: Purpose) -> CertSpec {
        CertSpec {
            cluster: cluster.to_string(),
            host: host.to_string(),
            address: Some(address.to_string()),
            purpose,
            days: NODE_CERT_DAYS,
        }
    }

    /// The operator's `ctl` client certificate with the default lifetime; its CN is
    /// [`CTL_COMMON_NAME`].
    pub fn ctl(cluster: &str) -> CertSpec {
        CertSpec {
            cluster: cluster.to_string(),
            host: CTL_COMMON_NAME.to_string(),
            address: None,
            purpose: Purpose::Ctl,
            days: NODE_CERT_DAYS,
        }
    }

    /// The SANs the certificate must carry: the host name and the address (for a client-only
    /// certificate too: they name the host in logs and let a server match the peer), plus the
    /// loopback names for local listeners (see [`Purpose::loopback_sans`]); none for `Ctl`.
    pub fn sans(&self) -> BTreeSet<San> {
        let mut out = BTreeSet::new();
        if self.purpose == Purpose::Ctl {
            return out;
        }
        out.insert(San::parse(&self.host));
        if let Some(a) = &self.address {
            out.insert(San::parse(a));
        }
        if self.purpose.loopback_sans() {
            out.insert(San::Dns("localhost".into()));
            out.insert(San::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)));
            out.insert(San::Ip(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        }
        out
    }
}

/// The common name of the operator's `ctl` client certificate.
pub const CTL_COMMON_NAME: &str = "pgherd-ctl";

/// A PEM private key. Never printed: no `Display`, and `Debug` shows only that it is one; use
/// [`PrivateKeyPem::expose`] to write it to its 0600 file.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKeyPem(String);

impl PrivateKeyPem {
    pub fn new(pem: String) -> PrivateKeyPem {
        PrivateKeyPem(pem)
    }

    /// The PEM text, for writing the key file (mode [`KEY_FILE_MODE`]) and nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PrivateKeyPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKeyPem(********)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_an_ip_san_when_it_parses_as_one_else_a_lowercase_dns_san() {
        for (written, san) in [
            ("10.0.0.1", San::Ip("10.0.0.1".parse().unwrap())),
            ("fd00::2", San::Ip("fd00::2".parse().unwrap())),
            ("fe80::1%eth0", San::Ip("fe80::1".parse().unwrap())),
            ("DB1.Example.com", San::Dns("db1.example.com".into())),
            ("db1%x", San::Dns("db1%x".into())),
        ] {
            assert_eq!(San::parse(written), san, "{written}");
        }
    }

    #[test]
    fn a_host_whose_address_is_its_name_has_that_san_once() {
        let spec = CertSpec::node("demo", "db1", "DB1", Purpose::EtcdPeer);
        assert_eq!(spec.sans(), BTreeSet::from([San::Dns("db1".into())]));
    }

    #[test]
    fn every_purpose_authenticates_a_server_or_a_client_and_only_listeners_get_loopback() {
        for p in Purpose::ALL {
            assert!(p.server_auth() || p.client_auth(), "{p}");
            assert!(!p.loopback_sans() || p.server_auth(), "{p}");
        }
    }

    #[test]
    fn a_private_key_debugs_as_stars() {
        let k = PrivateKeyPem::new("-----BEGIN PRIVATE KEY-----\nsecret\n".into());
        assert_eq!(format!("{k:?}"), "PrivateKeyPem(********)");
    }
}
