//! Files the simulator writes: the stable self-signed certificate of
//! [`SimTls::SelfSignedIn`](super::SimTls::SelfSignedIn) and the `ca_out`
//! copy of the certificate clients must trust.
//!
//! Every file is written atomically: to a temporary file in the same
//! directory (created with the final mode), flushed with `fsync`, renamed
//! into place, and the directory synced. A crash leaves the old file or the
//! new one, never a torn one.
//!
//! The certificate directory holds `cert.pem` (0644) and `key.pem` (0600).
//! The first start makes both, key first; later starts only read them. A
//! pair that is half there or does not parse is an error naming the file,
//! never regenerated over: clients may trust that certificate. (Two
//! simulators making a pair in the same empty directory at the same moment
//! could mix their files; the next start then fails with "do not fit".)

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// File name of the certificate in a certificate directory.
pub(super) const CERT_FILE: &str = "cert.pem";
/// File name of the private key in a certificate directory.
pub(super) const KEY_FILE: &str = "key.pem";

/// Mode of the private key file.
const KEY_MODE: u32 = 0o600;
/// Mode of certificate files: public, anyone may read them.
pub(super) const PUBLIC_MODE: u32 = 0o644;
/// Mode of a certificate directory the simulator creates.
const DIR_MODE: u32 = 0o700;

/// A certificate and its key as PEM text, with their parsed forms.
pub(super) struct StablePair {
    /// `cert.pem` as it is on disk: what clients trust.
    pub(super) cert_pem: String,
    pub(super) certs: Vec<CertificateDer<'static>>,
    pub(super) key: PrivateKeyDer<'static>,
    /// Whether this start made the pair (rather than reading it).
    pub(super) created: bool,
}

/// Reads the pair in `dir`, or, if neither file exists, makes one with
/// `generate` (returning the certificate and key PEM) and writes it. Creates
/// `dir` (mode 0700) if missing. Errors name the file or directory.
pub(super) fn load_or_create(
    dir: &Path,
    generate: impl FnOnce() -> io::Result<(String, String)>,
) -> io::Result<StablePair> {
    create_dir(dir)?;
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    match (exists(&cert_path)?, exists(&key_path)?) {
        (true, true) => {
            let cert_pem = read_text(&cert_path, dir)?;
            let key_pem = read_text(&key_path, dir)?;
            parse(cert_pem, &cert_path, &key_pem, &key_path, dir, false)
        }
        (false, false) => {
            let (cert_pem, key_pem) = generate()?;
            write_atomic(&key_path, key_pem.as_bytes(), KEY_MODE)?;
            write_atomic(&cert_path, cert_pem.as_bytes(), PUBLIC_MODE)?;
            parse(cert_pem, &cert_path, &key_pem, &key_path, dir, true)
        }
        (true, false) => Err(half_pair(&key_path, &cert_path, dir)),
        (false, true) => Err(half_pair(&cert_path, &key_path, dir)),
    }
}

/// Replaces `path` with `bytes`, atomically (see the module doc); the file
/// ends with `mode` whatever the umask. Errors name `path`.
pub(super) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a file name", path.display()),
            )
        })?
        .to_string_lossy();
    // Unique per write, so two writers never share a temporary file.
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp-{}-{seq}", std::process::id()));
    let result = write_new(&tmp, bytes, mode).and_then(|()| fs::rename(&tmp, path));
    if let Err(error) = result {
        let _ = fs::remove_file(&tmp);
        return Err(context(error, format!("writing {}", path.display())));
    }
    // The rename is done; a failed directory sync only weakens durability.
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    let mut file = options.open(path)?;
    // The umask may have narrowed the mode; set it exactly.
    #[cfg(unix)]
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    #[cfg(not(unix))]
    let _ = mode;
    file.write_all(bytes)?;
    file.sync_all()
}

fn create_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, DIR_MODE);
    #[cfg(not(unix))]
    let _ = DIR_MODE;
    builder.create(dir).map_err(|e| {
        context(
            e,
            format!("creating certificate directory {}", dir.display()),
        )
    })
}

fn exists(path: &Path) -> io::Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(context(e, format!("checking {}", path.display()))),
    }
}

fn read_text(path: &Path, dir: &Path) -> io::Result<String> {
    let bytes = fs::read(path).map_err(|e| context(e, format!("reading {}", path.display())))?;
    String::from_utf8(bytes).map_err(|_| damaged(path, "is not PEM text", dir))
}

/// Parses the pair; `cert_pem` becomes [`StablePair::cert_pem`].
fn parse(
    cert_pem: String,
    cert_path: &Path,
    key_pem: &str,
    key_path: &Path,
    dir: &Path,
    created: bool,
) -> io::Result<StablePair> {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| damaged(cert_path, "is not valid PEM (truncated or damaged?)", dir))?;
    if certs.is_empty() {
        return Err(damaged(cert_path, "holds no certificate", dir));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|_| damaged(key_path, "holds no valid PEM private key", dir))?;
    Ok(StablePair {
        cert_pem,
        certs,
        key,
        created,
    })
}

/// The error for a file of the pair that is there but unusable.
fn damaged(path: &Path, what: &str, dir: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{} {what}; {}", path.display(), remove_both_hint(dir)),
    )
}

/// The error for a pair with one file missing.
fn half_pair(missing: &Path, present: &Path, dir: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{} is missing but {} exists; {}",
            missing.display(),
            present.display(),
            remove_both_hint(dir)
        ),
    )
}

fn remove_both_hint(dir: &Path) -> String {
    let path = |name| -> PathBuf { dir.join(name) };
    format!(
        "not making a new pair over it, as clients may trust the certificate \
         (remove both {} and {} to make a new one)",
        path(CERT_FILE).display(),
        path(KEY_FILE).display()
    )
}

/// `error` with `what` in front of its message, keeping its kind.
fn context(error: io::Error, what: String) -> io::Error {
    io::Error::new(error.kind(), format!("{what}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "knoq-sim-files-{tag}-{}-{}",
            std::process::id(),
            super::super::reply::random_id()
        ));
        fs::create_dir(&dir).unwrap();
        dir
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn atomic_write_replaces_sets_the_mode_and_leaves_no_temporary_file() {
        let dir = temp_dir("atomic");
        let file = dir.join("ca.pem");
        write_atomic(&file, b"one", KEY_MODE).unwrap();
        write_atomic(&file, b"two", PUBLIC_MODE).unwrap();
        assert_eq!(fs::read(&file).unwrap(), b"two");
        #[cfg(unix)]
        assert_eq!(mode(&file), PUBLIC_MODE);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "only ca.pem left");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn atomic_write_into_a_missing_directory_names_the_file() {
        let dir = temp_dir("missing");
        let file = dir.join("no-such-dir").join("ca.pem");
        let error = write_atomic(&file, b"x", PUBLIC_MODE).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        assert!(
            error.to_string().contains(&file.display().to_string()),
            "{error}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_generation_writes_nothing() {
        let dir = temp_dir("generate");
        let certs = dir.join("certs");
        let result = load_or_create(&certs, || Err(io::Error::other("no entropy")));
        assert!(result.is_err());
        assert_eq!(fs::read_dir(&certs).unwrap().count(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }
}
