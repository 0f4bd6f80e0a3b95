//! The cluster PKI: a generated CA issues every purpose's certificate with the right SANs, key
//! usages and issuer; the planner's rules row by row; the CA's files (0600, reloaded
//! identical, never regenerated over a half-present CA); an operator's CA from PEM; and no
//! private key in any `Debug` output or error message.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;

use chrono::{DateTime, Duration, TimeZone, Utc};
use pgherd::pki::{
    self, Action, CaFiles, CaOrigin, CaPemError, CertFacts, CertKey, CertSpec, ClusterCa,
    DesiredCert, Existing, IssuerCheck, PkiError, PrivateKeyPem, Purpose, ReissueReason, San,
};

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
}

fn ip(s: &str) -> San {
    San::Ip(s.parse::<IpAddr>().unwrap())
}

fn dns(s: &str) -> San {
    San::Dns(s.into())
}

fn set(v: &[San]) -> BTreeSet<San> {
    v.iter().cloned().collect()
}

fn loopback() -> Vec<San> {
    vec![dns("localhost"), ip("127.0.0.1"), ip("::1")]
}

#[test]
fn a_generated_ca_is_named_after_the_cluster_and_valid_ten_years() {
    let ca = ClusterCa::generate("demo", now()).unwrap();
    assert_eq!(ca.subject(), "CN=demo pgherd CA, O=pgherd");
    assert_eq!(
        ca.not_after(),
        now() + Duration::days(i64::from(pki::CA_VALIDITY_DAYS))
    );
    // The CA checks out as its own issuer (self-signed, signature verified).
    let facts = pki::inspect(ca.cert_pem(), &ca).unwrap();
    assert_eq!(facts.issuer, IssuerCheck::ThisCa);
}

#[test]
fn every_purpose_is_issued_with_its_sans_usages_and_the_cluster_ca_as_issuer() {
    let ca = ClusterCa::generate("demo", now()).unwrap();
    // (host, address, its SAN)
    for (host, address, addr_san) in [
        ("db1", "10.0.0.1", ip("10.0.0.1")),
        ("db2", "fd00::2", ip("fd00::2")),
        ("db3", "db3.example.com", dns("db3.example.com")),
    ] {
        for purpose in Purpose::ALL {
            let spec = if purpose == Purpose::Ctl {
                CertSpec::ctl("demo")
            } else {
                CertSpec::node("demo", host, address, purpose)
            };
            let issued = ca.issue(&spec, now()).unwrap();
            let facts = pki::inspect(&issued.cert_pem, &ca).unwrap();
            let what = format!("{host} {purpose}");
            let mut want = match purpose {
                Purpose::Ctl => vec![],
                _ => vec![dns(host), addr_san.clone()],
            };
            if matches!(
                purpose,
                Purpose::EtcdServer | Purpose::RestApi | Purpose::Postgres
            ) {
                want.extend(loopback());
            }
            assert_eq!(facts.sans, set(&want), "{what}");
            let (server, client) = match purpose {
                Purpose::EtcdPeer | Purpose::RestApi | Purpose::Postgres => (true, true),
                Purpose::EtcdServer => (true, false),
                Purpose::EtcdClient | Purpose::Ctl => (false, true),
            };
            assert_eq!(
                (facts.server_auth, facts.client_auth),
                (server, client),
                "{what}"
            );
            assert_eq!(facts.issuer, IssuerCheck::ThisCa, "{what}");
            let cn = if purpose == Purpose::Ctl {
                pki::CTL_COMMON_NAME
            } else {
                host
            };
            assert!(
                facts.subject.starts_with(&format!("CN={cn},")),
                "{what}: {}",
                facts.subject
            );
            assert_eq!(
                facts.not_after,
                now() + Duration::days(i64::from(pki::NODE_CERT_DAYS)),
                "{what}"
            );
            assert!(facts.not_before < now(), "{what}: backdated for clock skew");
            assert_eq!(issued.not_after, facts.not_after);
            assert!(
                issued
                    .key
                    .expose()
                    .starts_with("-----BEGIN PRIVATE KEY-----")
            );
            // A fresh certificate is kept by the planner.
            assert!(
                matches!(
                    pki::plan_one(&DesiredCert::of(&spec), &Existing::Present(facts), now()),
                    Action::Keep(_)
                ),
                "{what}"
            );
        }
    }
}

#[test]
fn an_ipv6_zone_id_is_not_part_of_the_ip_san() {
    let spec = CertSpec::node("demo", "db1", "fe80::1%eth0", Purpose::EtcdPeer);
    assert_eq!(spec.sans(), set(&[dns("db1"), ip("fe80::1")]));
}

#[test]
fn a_certificate_never_outlives_its_ca() {
    let ca = ClusterCa::generate("demo", now()).unwrap();
    let later = now() + Duration::days(i64::from(pki::CA_VALIDITY_DAYS) - 10);
    let issued = ca
        .issue(
            &CertSpec::node("demo", "db1", "10.0.0.1", Purpose::Postgres),
            later,
        )
        .unwrap();
    assert_eq!(issued.not_after, ca.not_after());
}

#[test]
fn an_expired_ca_issues_nothing() {
    let ca = ClusterCa::generate("demo", now()).unwrap();
    let after = ca.not_after() + Duration::seconds(1);
    let err = ca
        .issue(
            &CertSpec::node("demo", "db1", "10.0.0.1", Purpose::Postgres),
            after,
        )
        .unwrap_err();
    assert!(matches!(err, PkiError::CaExpired { .. }), "{err}");
    assert!(err.to_string().contains("CN=demo pgherd CA"), "{err}");
}

#[test]
fn a_certificate_of_another_ca_of_the_same_name_is_recognised() {
    let ours = ClusterCa::generate("demo", now()).unwrap();
    let theirs = ClusterCa::generate("demo", now()).unwrap();
    let cert = theirs
        .issue(
            &CertSpec::node("demo", "db1", "10.0.0.1", Purpose::Postgres),
            now(),
        )
        .unwrap();
    let facts = pki::inspect(&cert.cert_pem, &ours).unwrap();
    match &facts.issuer {
        IssuerCheck::OtherCa(why) => assert!(why.contains("authority key id"), "{why}"),
        other => panic!("{other:?}"),
    }
    let other = ClusterCa::generate("other", now()).unwrap();
    let cert = other
        .issue(
            &CertSpec::node("other", "db1", "10.0.0.1", Purpose::Postgres),
            now(),
        )
        .unwrap();
    match pki::inspect(&cert.cert_pem, &ours).unwrap().issuer {
        IssuerCheck::OtherCa(why) => assert!(why.contains("other pgherd CA"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn garbage_is_not_a_certificate() {
    let ca = ClusterCa::generate("demo", now()).unwrap();
    assert!(pki::inspect("hello", &ca).is_err());
    // A key where a certificate belongs is named by its label, its content not quoted.
    let err = pki::inspect(ca.key_pem().expose(), &ca)
        .unwrap_err()
        .to_string();
    assert!(err.contains("PRIVATE KEY"), "{err}");
    assert_no_key(&err, ca.key_pem());
}

// ---- the planner, one row per rule ----

fn desired(host: &str, purpose: Purpose, sans: &[San]) -> DesiredCert {
    DesiredCert {
        key: CertKey {
            host: host.into(),
            purpose,
        },
        sans: set(sans),
    }
}

/// A fresh db1 etcd-peer certificate of this CA, valid a year from `now()`.
fn facts() -> CertFacts {
    CertFacts {
        subject: "CN=db1, O=demo pgherd, OU=etcd-peer".into(),
        sans: set(&[dns("db1"), ip("10.0.0.1")]),
        not_before: now() - Duration::days(1),
        not_after: now() + Duration::days(365),
        server_auth: true,
        client_auth: true,
        issuer: IssuerCheck::ThisCa,
    }
}

type Row = (
    &'static str,
    fn(&mut CertFacts),
    Option<Existing>,
    &'static str,
);

/// (behaviour, change to the fresh facts, or the existing state instead, expected action text).
const PLAN_ROWS: &[Row] = &[
    (
        "a fresh certificate of this CA with the same SANs is kept",
        |_| {},
        None,
        "keep: valid until 2027-03-01 12:00 UTC, SANs match",
    ),
    (
        "a missing certificate is issued",
        |_| {},
        Some(Existing::Missing),
        "issue: missing",
    ),
    (
        "an unreadable certificate is reissued",
        |_| {},
        Some(Existing::Unreadable(String::new())),
        "reissue: the certificate in place is unreadable ()",
    ),
    (
        "a certificate of another CA is reissued",
        |f| f.issuer = IssuerCheck::OtherCa("issued by X".into()),
        None,
        "reissue: issued by another CA: issued by X",
    ),
    (
        "an expired certificate is reissued",
        |f| f.not_after = now() - Duration::hours(1),
        None,
        "reissue: expired on 2026-03-01 11:00 UTC",
    ),
    (
        "a certificate expiring within the renewal window is reissued",
        |f| f.not_after = now() + Duration::days(29),
        None,
        "reissue: expires on 2026-03-30 12:00 UTC (within the 30-day renewal window)",
    ),
    (
        "a certificate expiring just past the renewal window is kept",
        |f| f.not_after = now() + Duration::days(30) + Duration::minutes(1),
        None,
        "keep: valid until 2026-03-31 12:01 UTC, SANs match",
    ),
    (
        "a certificate not yet valid is reissued",
        |f| f.not_before = now() + Duration::hours(2),
        None,
        "reissue: not valid before 2026-03-01 14:00 UTC",
    ),
    (
        "a changed address reissues with the SAN difference",
        |f| f.sans = set(&[dns("db1"), ip("10.0.0.9")]),
        None,
        "reissue: SANs changed (add IP:10.0.0.1; remove IP:10.0.0.9)",
    ),
    (
        "a missing SAN reissues",
        |f| f.sans = set(&[dns("db1")]),
        None,
        "reissue: SANs changed (add IP:10.0.0.1)",
    ),
    (
        "a server-only certificate for an etcd peer is reissued",
        |f| f.client_auth = false,
        None,
        "reissue: its key usages do not fit its purpose, etcd-peer (which wants serverAuth yes, clientAuth yes)",
    ),
    (
        "every reason is given, in order",
        |f| {
            f.issuer = IssuerCheck::OtherCa("X".into());
            f.not_after = now() + Duration::days(1);
            f.sans = set(&[dns("db1")]);
        },
        None,
        "reissue: issued by another CA: X; expires on 2026-03-02 12:00 UTC (within the 30-day renewal window); SANs changed (add IP:10.0.0.1)",
    ),
];

#[test]
fn the_planner_keeps_issues_or_reissues_with_the_reason() {
    let want = desired("db1", Purpose::EtcdPeer, &[dns("db1"), ip("10.0.0.1")]);
    for (behaviour, change, existing, expected) in PLAN_ROWS {
        let existing = existing.clone().unwrap_or_else(|| {
            let mut f = facts();
            change(&mut f);
            Existing::Present(f)
        });
        let action = pki::plan_one(&want, &existing, now());
        assert_eq!(action.to_string(), *expected, "{behaviour}");
    }
}

#[test]
fn the_planner_reissues_a_client_certificate_that_can_serve() {
    let want = desired("db1", Purpose::EtcdClient, &[dns("db1"), ip("10.0.0.1")]);
    let action = pki::plan_one(&want, &Existing::Present(facts()), now());
    assert_eq!(
        action,
        Action::Reissue(vec![ReissueReason::UsageChanged {
            purpose: Purpose::EtcdClient
        }])
    );
}

#[test]
fn the_plan_covers_every_wanted_certificate_in_order_and_missing_ones_are_issued() {
    let a = desired("db1", Purpose::EtcdPeer, &[dns("db1"), ip("10.0.0.1")]);
    let b = desired("db2", Purpose::Postgres, &[dns("db2")]);
    let existing = BTreeMap::from([
        (a.key.clone(), Existing::Present(facts())),
        // A certificate nobody wants is left alone.
        (
            CertKey {
                host: "gone".into(),
                purpose: Purpose::RestApi,
            },
            Existing::Present(facts()),
        ),
    ]);
    let plan = pki::plan(&[a.clone(), b.clone()], &existing, now());
    assert_eq!(plan.len(), 2);
    assert_eq!(plan[0].0, a.key);
    assert!(matches!(plan[0].1, Action::Keep(_)));
    assert_eq!(plan[1], (b.key, Action::Issue));
}

// ---- the CA's files ----

#[test]
fn the_ca_is_created_0600_beside_the_secrets_file_and_reloaded_identical() {
    let dir = tempfile::tempdir().unwrap();
    let files = CaFiles::beside(&dir.path().join("prod.secrets.yml"), "demo");
    assert_eq!(files.cert, dir.path().join("demo-ca.crt"));
    assert_eq!(files.key, dir.path().join("demo-ca.key"));

    let (created, origin) = pki::store::load_or_create(&files, "demo", now()).unwrap();
    assert_eq!(origin, CaOrigin::Created);
    for f in [&files.cert, &files.key] {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", f.display());
    }
    // No temporary file is left behind.
    let names: BTreeSet<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["demo-ca.crt".into(), "demo-ca.key".into()])
    );

    let (loaded, origin) = pki::store::load_or_create(&files, "demo", now()).unwrap();
    assert_eq!(origin, CaOrigin::Loaded);
    assert_eq!(loaded.cert_pem(), created.cert_pem());
    assert_eq!(loaded.key_pem(), created.key_pem());
    assert_eq!(loaded.subject(), created.subject());
    assert_eq!(loaded.not_after(), created.not_after());
    // What the reloaded CA issues, the created one recognises (same key, same key id).
    let cert = loaded
        .issue(
            &CertSpec::node("demo", "db1", "10.0.0.1", Purpose::RestApi),
            now(),
        )
        .unwrap();
    assert_eq!(
        pki::inspect(&cert.cert_pem, &created).unwrap().issuer,
        IssuerCheck::ThisCa
    );
}

#[test]
fn a_half_present_ca_is_an_error_naming_both_files_and_nothing_is_regenerated() {
    let dir = tempfile::tempdir().unwrap();
    let files = CaFiles::beside(&dir.path().join("s.yml"), "demo");
    pki::store::load_or_create(&files, "demo", now()).unwrap();
    let key_before = std::fs::read_to_string(&files.key).unwrap();
    std::fs::remove_file(&files.cert).unwrap();

    let err = pki::store::load_or_create(&files, "demo", now()).unwrap_err();
    assert!(matches!(err, PkiError::HalfCa { .. }), "{err}");
    let shown = err.to_string();
    assert!(shown.contains(&files.key.display().to_string()), "{shown}");
    assert!(shown.contains(&files.cert.display().to_string()), "{shown}");
    assert!(!files.cert.exists());
    assert_eq!(std::fs::read_to_string(&files.key).unwrap(), key_before);
    assert_no_key(&shown, &PrivateKeyPem::new(key_before));
}

#[test]
fn a_ca_key_readable_by_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let files = CaFiles::beside(&dir.path().join("s.yml"), "demo");
    pki::store::load_or_create(&files, "demo", now()).unwrap();
    std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = pki::store::load(&files).unwrap_err();
    assert!(
        matches!(err, PkiError::KeyPermissions { mode: 0o644, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("chmod 600"), "{err}");
}

#[test]
fn a_missing_operator_ca_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let files = CaFiles {
        cert: dir.path().join("ops-ca.pem"),
        key: dir.path().join("ops-ca.key"),
    };
    let err = pki::store::load(&files).unwrap_err();
    assert!(matches!(err, PkiError::MissingCaFile { .. }), "{err}");
    assert!(err.to_string().contains("ops-ca.pem"), "{err}");
    assert!(!files.cert.exists() && !files.key.exists());
}

// ---- the operator's CA ----

/// An operator's CA made outside pgherd: ECDSA P-384, its own naming.
fn operator_ca() -> (String, PrivateKeyPem) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Example Corp Root");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), PrivateKeyPem::new(key.serialize_pem()))
}

#[test]
fn an_operator_ca_from_pem_issues_certificates_it_is_the_issuer_of() {
    let (cert_pem, key_pem) = operator_ca();
    // Text around the certificate (as some tools write) does not matter.
    let with_text = format!("Example Corp Root\n{cert_pem}");
    let ca = ClusterCa::from_pem(&with_text, &key_pem).unwrap();
    assert_eq!(ca.subject(), "CN=Example Corp Root");
    assert_eq!(ca.cert_pem().trim(), cert_pem.trim());
    let issued = ca
        .issue(
            &CertSpec::node("demo", "db2", "fd00::2", Purpose::EtcdPeer),
            now(),
        )
        .unwrap();
    let facts = pki::inspect(&issued.cert_pem, &ca).unwrap();
    assert_eq!(facts.issuer, IssuerCheck::ThisCa);
    assert_eq!(facts.sans, set(&[dns("db2"), ip("fd00::2")]));
    // pgherd's own CA does not accept it.
    let ours = ClusterCa::generate("demo", now()).unwrap();
    assert!(matches!(
        pki::inspect(&issued.cert_pem, &ours).unwrap().issuer,
        IssuerCheck::OtherCa(_)
    ));
}

#[test]
fn an_operator_ca_is_loaded_from_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_pem, key_pem) = operator_ca();
    let files = CaFiles {
        cert: dir.path().join("ops-ca.pem"),
        key: dir.path().join("ops-ca.key"),
    };
    std::fs::write(&files.cert, &cert_pem).unwrap();
    std::fs::write(&files.key, key_pem.expose()).unwrap();
    std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let ca = pki::store::load(&files).unwrap();
    assert_eq!(ca.subject(), "CN=Example Corp Root");
}

#[test]
fn a_leaf_certificate_is_not_a_ca() {
    let ca = ClusterCa::generate("demo", now()).unwrap();
    let leaf = ca
        .issue(
            &CertSpec::node("demo", "db1", "10.0.0.1", Purpose::Postgres),
            now(),
        )
        .unwrap();
    let err = ClusterCa::from_pem(&leaf.cert_pem, &leaf.key).unwrap_err();
    assert!(matches!(err, CaPemError::NotACa), "{err}");
}

#[test]
fn a_ca_with_another_key_is_refused_without_showing_either_key() {
    let (cert_pem, _) = operator_ca();
    let (_, other_key) = operator_ca();
    let err = ClusterCa::from_pem(&cert_pem, &other_key).unwrap_err();
    assert!(matches!(err, CaPemError::KeyMismatch), "{err}");
    assert_no_key(&err.to_string(), &other_key);
}

// ---- no key in any output ----

/// `text` contains no line of the key's base64 body.
fn assert_no_key(text: &str, key: &PrivateKeyPem) {
    for line in key.expose().lines().filter(|l| !l.starts_with("-----")) {
        assert!(
            !text.contains(line),
            "a line of the private key in:\n{text}"
        );
    }
}

#[test]
fn a_private_key_never_appears_in_debug_output_or_errors() {
    let ca = ClusterCa::generate("demo", now()).unwrap();
    let issued = ca
        .issue(
            &CertSpec::node("demo", "db1", "10.0.0.1", Purpose::Postgres),
            now(),
        )
        .unwrap();
    for shown in [
        format!("{ca:?}"),
        format!("{ca:#?}"),
        format!("{:?}", ca.key_pem()),
        format!("{issued:?}"),
        format!("{issued:#?}"),
    ] {
        assert_no_key(&shown, ca.key_pem());
        assert_no_key(&shown, &issued.key);
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    }
    assert!(format!("{:?}", issued.key).contains("********"));

    // A damaged key: its error says what is wrong, not what the key says.
    let damaged = PrivateKeyPem::new(ca.key_pem().expose().replacen('M', "!", 1));
    let err = ClusterCa::from_pem(ca.cert_pem(), &damaged).unwrap_err();
    assert!(matches!(err, CaPemError::BadKey), "{err}");
    assert_no_key(&format!("{err} {err:?}"), &damaged);

    // Key and certificate swapped in the files: the error names the files, quotes neither.
    let dir = tempfile::tempdir().unwrap();
    let files = CaFiles {
        cert: dir.path().join("ca.key"),
        key: dir.path().join("ca.crt"),
    };
    std::fs::write(&files.cert, ca.key_pem().expose()).unwrap();
    std::fs::write(&files.key, ca.cert_pem()).unwrap();
    std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let err = pki::store::load(&files).unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(shown.contains("ca.key"), "{shown}");
    assert_no_key(&shown, ca.key_pem());
}
