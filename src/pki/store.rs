//! Where the cluster CA lives on the operator's machine, and loading or creating it.
//!
//! pgherd's own CA sits beside the inventory's secrets file, as `<cluster>-ca.crt` and
//! `<cluster>-ca.key`, both mode 0600 (the certificate is public, but nothing on the operator's
//! machine needs it world-readable). An existing CA is always loaded, never regenerated: a new
//! CA would invalidate every certificate the old one issued, so a half-present CA (one file
//! without the other) is an error that names both files, not a reason to start over. The
//! operator's own CA (`tls.ca_cert` / `tls.ca_key`) is only ever loaded.
//!
//! A new file is written to a temporary file beside it (created 0600, synced) and then
//! hard-linked into place, which fails if the name exists: a crash leaves no half-written file,
//! and a concurrent run cannot replace a CA that another run just created.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};

use super::error::PkiError;
use super::{ClusterCa, KEY_FILE_MODE, PrivateKeyPem};

/// The two files of a CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Whether [`load_or_create`] found the CA or made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaOrigin {
    Loaded,
    Created,
}

impl CaFiles {
    /// pgherd's CA for `cluster`, in the directory of the secrets file.
    pub fn beside(secrets_file: &Path, cluster: &str) -> CaFiles {
        let dir = secrets_file.parent().unwrap_or(Path::new(""));
        CaFiles {
            cert: dir.join(format!("{cluster}-ca.crt")),
            key: dir.join(format!("{cluster}-ca.key")),
        }
    }
}

/// The CA in `files`, or, when neither file exists, a new one for `cluster` written there.
/// One file without the other is [`PkiError::HalfCa`].
pub fn load_or_create(
    files: &CaFiles,
    cluster: &str,
    now: DateTime<Utc>,
) -> Result<(ClusterCa, CaOrigin), PkiError> {
    match (exists(&files.cert)?, exists(&files.key)?) {
        (true, true) => Ok((load(files)?, CaOrigin::Loaded)),
        (true, false) => Err(PkiError::HalfCa {
            present: files.cert.clone(),
            missing: files.key.clone(),
        }),
        (false, true) => Err(PkiError::HalfCa {
            present: files.key.clone(),
            missing: files.cert.clone(),
        }),
        (false, false) => {
            let ca = ClusterCa::generate(cluster, now)?;
            write_new(&files.key, ca.key_pem().expose(), KEY_FILE_MODE)?;
            if let Err(e) = write_new(&files.cert, ca.cert_pem(), KEY_FILE_MODE) {
                // Nothing was issued with the key yet: leave no half CA behind.
                let _ = std::fs::remove_file(&files.key);
                return Err(e);
            }
            Ok((ca, CaOrigin::Created))
        }
    }
}

/// The CA in `files` (the operator's, or pgherd's stored one): both files must exist, the key
/// must be readable by its owner only.
pub fn load(files: &CaFiles) -> Result<ClusterCa, PkiError> {
    for path in [&files.cert, &files.key] {
        if !exists(path)? {
            return Err(PkiError::MissingCaFile { path: path.clone() });
        }
    }
    let cert = read(&files.cert)?;
    let mode = std::fs::metadata(&files.key)
        .map_err(|source| PkiError::Read {
            path: files.key.clone(),
            source,
        })?
        .permissions()
        .mode()
        & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PkiError::KeyPermissions {
            path: files.key.clone(),
            mode,
        });
    }
    let key = PrivateKeyPem::new(read(&files.key)?);
    ClusterCa::from_pem(&cert, &key).map_err(|source| PkiError::Ca {
        cert: files.cert.clone(),
        key: files.key.clone(),
        source,
    })
}

fn exists(path: &Path) -> Result<bool, PkiError> {
    path.try_exists().map_err(|source| PkiError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `text` to `path`, which must not exist, with `mode` (see the module doc).
fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), PkiError> {
    crate::files::write_atomic(path, text, mode, crate::files::Place::CreateNew).map_err(|source| {
        PkiError::Write {
            path: path.to_path_buf(),
            source,
        }
    })
}
