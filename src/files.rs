//! Writing a file on the operator's machine so that a crash never leaves half of it and a
//! secret is never briefly readable by others: a temporary file beside the target, created with
//! the final mode (set exactly, past the umask), written and synced, then put in place. Used by
//! the inventory (secrets file, `pgherd replace`'s edit) and the PKI (the cluster CA's files).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// How the temporary file takes the target's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// `rename` over the target: the old content or the new, never a mix.
    Replace,
    /// `link` to the target, which must not exist (`AlreadyExists` otherwise): never
    /// overwrites what another run wrote meanwhile. The directory is synced too (best effort),
    /// so the new name survives a crash.
    CreateNew,
}

/// Writes `text` to `path` with `mode`, placed as `place` says. The temporary file is removed
/// in every case.
pub fn write_atomic(path: &Path, text: &str, mode: u32, place: Place) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // `mode` is filtered by the umask at creation; set it exactly.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        match place {
            Place::Replace => std::fs::rename(&tmp, path),
            Place::CreateNew => {
                std::fs::hard_link(&tmp, path)?;
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    // Best effort: some file systems refuse to sync a directory.
                    let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
                }
                Ok(())
            }
        }
    })();
    // After a rename the temporary name is gone already; after a link or a failure it is not.
    let _ = std::fs::remove_file(&tmp);
    result
}
