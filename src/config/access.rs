//! Who may call the REST API's mutating verbs, by address: Patroni's `restapi.allowlist` and
//! `restapi.allowlist_include_members` (patroni.md §2.1). A caller outside the list gets **403
//! "Access is denied"** before any credential is looked at; the read-only endpoints (health
//! checks, `/patroni`, `/cluster`, ...) stay open to everyone, as in Patroni.
//!
//! Entries are IP addresses or CIDR networks (`10.0.0.5`, `10.0.0.0/24`, `fd00::/64`). Patroni
//! also resolves host names; pgherd refuses them at config load instead: a name resolved once
//! could point elsewhere later, and resolving on every request would make a DNS outage an
//! outage of the mutating verbs.
//!
//! With `allowlist_include_members`, the members registered in the DCS are allowed too: the
//! hosts of their `api_url` and `conn_url` (the agents call each other's `POST /failsafe` and
//! patronictl runs on the members). An empty allowlist without members admits everyone (Basic
//! auth still applies), which is Patroni's default.

use std::net::IpAddr;

use crate::dcs::ClusterView;

/// One allowlist entry: an address and how many leading bits must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `10.0.0.5`, `10.0.0.0/24`, `::1`, `fd00::/64`; `None` for anything else (host names,
    /// a prefix longer than the address).
    pub fn parse(s: &str) -> Option<Cidr> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().ok()?)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim_matches(|c| c == '[' || c == ']').parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    /// Whether `ip` is inside. An IPv4 address mapped into IPv6 (`::ffff:10.0.0.5`, what a
    /// dual-stack listener reports) is compared as the IPv4 address it is.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn prefix_eq(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let full = usize::from(prefix / 8);
    let rest = prefix % 8;
    if a[..full] != b[..full] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    (a[full] & mask) == (b[full] & mask)
}

/// The validated `restapi.allowlist` settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessList {
    pub nets: Vec<Cidr>,
    pub include_members: bool,
}

impl AccessList {
    /// From the config's strings; `Err(entry)` names the first entry that is not an address or
    /// network.
    pub fn parse(entries: &[String], include_members: bool) -> Result<AccessList, String> {
        let nets = entries
            .iter()
            .map(|e| Cidr::parse(e).ok_or_else(|| e.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AccessList {
            nets,
            include_members,
        })
    }

    /// Whether any rule is set (without one everyone is admitted).
    pub fn restricts(&self) -> bool {
        !self.nets.is_empty() || self.include_members
    }

    /// Whether `peer` may call a mutating verb. `members`: the cluster view to take member
    /// addresses from, or `None` where Patroni skips that check (`POST /failsafe`: the DCS is
    /// down then). An unknown peer address is refused whenever a rule is set (fail closed).
    pub fn admits(&self, peer: Option<IpAddr>, members: Option<&ClusterView>) -> bool {
        if !self.restricts() {
            return true;
        }
        let Some(peer) = peer else {
            return false;
        };
        if self.nets.iter().any(|n| n.contains(peer)) {
            return true;
        }
        self.include_members
            && members.is_some_and(|v| {
                v.members.values().any(|m| {
                    [&m.data.api_url, &m.data.conn_url]
                        .into_iter()
                        .filter_map(|u| url_ip(u))
                        .any(|ip| canonical(ip) == canonical(peer))
                })
            })
    }
}

/// The IP address in a URL's authority (`http://10.0.0.1:8008/patroni`,
/// `postgres://[fd00::1]:5432/postgres`); `None` for a host name.
fn url_ip(url: &str) -> Option<IpAddr> {
    crate::dcs::url_host(url)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn entries_match_by_address_and_prefix() {
        let rows: &[(&str, &str, bool)] = &[
            ("10.0.0.5", "10.0.0.5", true),
            ("10.0.0.5", "10.0.0.6", false),
            ("10.0.0.0/24", "10.0.0.200", true),
            ("10.0.0.0/24", "10.0.1.1", false),
            ("10.0.0.0/23", "10.0.1.1", true),
            ("10.0.0.0/25", "10.0.0.128", false),
            ("0.0.0.0/0", "192.168.1.1", true),
            ("fd00::/64", "fd00::1234", true),
            ("fd00::/64", "fd00:0:0:1::1", false),
            ("[::1]", "::1", true),
            // A dual-stack listener reports IPv4 peers as mapped IPv6 addresses.
            ("10.0.0.0/24", "::ffff:10.0.0.9", true),
            ("10.0.0.5", "fd00::5", false),
        ];
        for (entry, peer, want) in rows {
            let c = Cidr::parse(entry).unwrap_or_else(|| panic!("{entry}"));
            assert_eq!(c.contains(ip(peer)), *want, "{entry} ∋ {peer}");
        }
    }

    #[test]
    fn host_names_and_bad_prefixes_are_not_entries() {
        for bad in [
            "db1.example.com",
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0.0/x",
            "",
        ] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
        assert_eq!(
            AccessList::parse(&["10.0.0.0/8".into(), "admin-host".into()], false),
            Err("admin-host".to_string())
        );
    }

    #[test]
    fn without_rules_everyone_is_admitted_and_with_rules_an_unknown_peer_is_not() {
        let open = AccessList::default();
        assert!(open.admits(None, None));
        let closed = AccessList::parse(&["10.0.0.0/24".into()], false).unwrap();
        assert!(closed.admits(Some(ip("10.0.0.3")), None));
        assert!(!closed.admits(Some(ip("10.9.0.3")), None));
        assert!(!closed.admits(None, None));
    }

    #[test]
    fn members_are_admitted_by_the_hosts_of_their_urls_when_included() {
        let mut view = ClusterView::default();
        let mut m = crate::dcs::Member {
            name: crate::types::MemberName::new("pg1"),
            data: Default::default(),
            lease: None,
            revision: crate::types::Revision(1),
        };
        m.data.api_url = "http://10.1.0.11:8008/patroni".into();
        m.data.conn_url = "postgres://[fd00::11]:5432/postgres".into();
        view.members.insert(m.name.clone(), m);
        let list = AccessList::parse(&["127.0.0.1".into()], true).unwrap();
        assert!(list.admits(Some(ip("10.1.0.11")), Some(&view)));
        assert!(list.admits(Some(ip("fd00::11")), Some(&view)));
        assert!(!list.admits(Some(ip("10.1.0.12")), Some(&view)));
        // Where the members are not consulted (POST /failsafe), the static list alone counts.
        assert!(!list.admits(Some(ip("10.1.0.11")), None));
        assert!(list.admits(Some(ip("127.0.0.1")), None));
        // Not included: members are strangers.
        let static_only = AccessList::parse(&["127.0.0.1".into()], false).unwrap();
        assert!(!static_only.admits(Some(ip("10.1.0.11")), Some(&view)));
    }
}
