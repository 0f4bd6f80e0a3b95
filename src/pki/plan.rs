//! The certificate planner: for each certificate the cluster needs, keep the one in place,
//! issue a missing one, or reissue one that no longer fits, always with the reason (it goes in
//! `plan` output; no key ever does). Pure: the wanted certificates, the facts of the existing
//! ones and `now` in, actions out. Rotation is this planner run by every `apply`: a
//! certificate within [`RENEWAL_WINDOW_DAYS`] of its expiry is reissued.
//!
//! A reissue has every reason that applies, in a fixed order (unreadable, another CA, not yet
//! valid, expired or expiring, SANs, usages), so the operator sees the whole story at once. A
//! change of `tls.cert_days` alone reissues nothing: the new lifetime applies from the next
//! renewal.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use chrono::{DateTime, Duration, Utc};

use super::inspect::{CertFacts, IssuerCheck};
use super::{CertSpec, Purpose, RENEWAL_WINDOW_DAYS, San};

/// Which certificate: a host's certificate of one purpose.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CertKey {
    pub host: String,
    pub purpose: Purpose,
}

impl fmt::Display for CertKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.host, self.purpose)
    }
}

/// A certificate the cluster needs: what it must say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredCert {
    pub key: CertKey,
    pub sans: BTreeSet<San>,
}

impl DesiredCert {
    pub fn of(spec: &CertSpec) -> DesiredCert {
        DesiredCert {
            key: CertKey {
                host: spec.host.clone(),
                purpose: spec.purpose,
            },
            sans: spec.sans(),
        }
    }
}

/// What is in place for a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Existing {
    Missing,
    /// A file that does not parse as a certificate; the parser's message.
    Unreadable(String),
    Present(CertFacts),
}

/// What to do with one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Keep(KeepReason),
    /// There is none.
    Issue,
    /// Replace it; never empty.
    Reissue(Vec<ReissueReason>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeepReason {
    pub not_after: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReissueReason {
    Unreadable(String),
    /// Issued by another CA (the operator changed `tls.ca_cert`, or the CA was replaced).
    OtherCa(String),
    /// Its validity starts in the future (issued on a machine whose clock was ahead): services
    /// refuse it until then.
    NotYetValid {
        not_before: DateTime<Utc>,
    },
    Expired {
        not_after: DateTime<Utc>,
    },
    /// Expires within [`RENEWAL_WINDOW_DAYS`].
    ExpiresSoon {
        not_after: DateTime<Utc>,
    },
    /// The host's name or address changed (or pgherd's SAN rules did).
    SansChanged {
        added: Vec<San>,
        removed: Vec<San>,
    },
    /// Its extended key usages are not its purpose's (serverAuth/clientAuth).
    UsageChanged {
        purpose: Purpose,
    },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Keep(k) => write!(f, "keep: {k}"),
            Action::Issue => f.write_str("issue: missing"),
            Action::Reissue(reasons) => {
                f.write_str("reissue: ")?;
                for (i, r) in reasons.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    write!(f, "{r}")?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for KeepReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "valid until {}, SANs match",
            self.not_after.format("%Y-%m-%d %H:%M UTC")
        )
    }
}

impl fmt::Display for ReissueReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let day = |t: &DateTime<Utc>| t.format("%Y-%m-%d %H:%M UTC").to_string();
        match self {
            ReissueReason::Unreadable(e) => {
                write!(f, "the certificate in place is unreadable ({e})")
            }
            ReissueReason::OtherCa(why) => write!(f, "issued by another CA: {why}"),
            ReissueReason::NotYetValid { not_before } => {
                write!(f, "not valid before {}", day(not_before))
            }
            ReissueReason::Expired { not_after } => write!(f, "expired on {}", day(not_after)),
            ReissueReason::ExpiresSoon { not_after } => write!(
                f,
                "expires on {} (within the {RENEWAL_WINDOW_DAYS}-day renewal window)",
                day(not_after)
            ),
            ReissueReason::SansChanged { added, removed } => {
                let list = |v: &[San]| v.iter().map(San::to_string).collect::<Vec<_>>().join(", ");
                f.write_str("SANs changed (")?;
                if !added.is_empty() {
                    write!(f, "add {}", list(added))?;
                }
                if !removed.is_empty() {
                    if !added.is_empty() {
                        f.write_str("; ")?;
                    }
                    write!(f, "remove {}", list(removed))?;
                }
                f.write_str(")")
            }
            ReissueReason::UsageChanged { purpose } => write!(
                f,
                "its key usages do not fit its purpose, {purpose} (which wants serverAuth {}, clientAuth {})",
                yes_no(purpose.server_auth()),
                yes_no(purpose.client_auth())
            ),
        }
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// The action for one certificate.
pub fn plan_one(desired: &DesiredCert, existing: &Existing, now: DateTime<Utc>) -> Action {
    let facts = match existing {
        Existing::Missing => return Action::Issue,
        Existing::Unreadable(e) => {
            return Action::Reissue(vec![ReissueReason::Unreadable(e.clone())]);
        }
        Existing::Present(f) => f,
    };
    let mut reasons = vec![];
    if let IssuerCheck::OtherCa(why) = &facts.issuer {
        reasons.push(ReissueReason::OtherCa(why.clone()));
    }
    if facts.not_before > now {
        reasons.push(ReissueReason::NotYetValid {
            not_before: facts.not_before,
        });
    }
    if facts.not_after <= now {
        reasons.push(ReissueReason::Expired {
            not_after: facts.not_after,
        });
    } else if facts.not_after <= now + Duration::days(i64::from(RENEWAL_WINDOW_DAYS)) {
        reasons.push(ReissueReason::ExpiresSoon {
            not_after: facts.not_after,
        });
    }
    if facts.sans != desired.sans {
        reasons.push(ReissueReason::SansChanged {
            added: desired.sans.difference(&facts.sans).cloned().collect(),
            removed: facts.sans.difference(&desired.sans).cloned().collect(),
        });
    }
    let purpose = desired.key.purpose;
    if (facts.server_auth, facts.client_auth) != (purpose.server_auth(), purpose.client_auth()) {
        reasons.push(ReissueReason::UsageChanged { purpose });
    }
    if reasons.is_empty() {
        Action::Keep(KeepReason {
            not_after: facts.not_after,
        })
    } else {
        Action::Reissue(reasons)
    }
}

/// The action for every wanted certificate, in `desired`'s order; a certificate absent from
/// `existing` is missing. Certificates in `existing` that nobody wants any more are not
/// touched (removing a host's files is the departure job's).
pub fn plan(
    desired: &[DesiredCert],
    existing: &BTreeMap<CertKey, Existing>,
    now: DateTime<Utc>,
) -> Vec<(CertKey, Action)> {
    desired
        .iter()
        .map(|d| {
            let e = existing.get(&d.key).unwrap_or(&Existing::Missing);
            (d.key.clone(), plan_one(d, e, now))
        })
        .collect()
}
