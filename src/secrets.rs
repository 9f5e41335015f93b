//! Reading secret files: session cookies, the SCIM token, the TLS key.
//!
//! A secret file must be a regular file (not a symlink, which could be
//! pointed elsewhere by anyone who can write its directory) and must not be
//! readable or writable by group or others. The gateway refuses to start
//! otherwise, with a message that says how to fix it: a cookie is a whole
//! Knoq account.
//!
//! Error messages name the file and the rule, never the content.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Reads a secret file after checking it is a private regular file.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, String> {
    let meta = fs::symlink_metadata(path).map_err(|e| describe_io(path, &e))?;
    if meta.file_type().is_symlink() {
        return Err(format!(
            "{} is a symlink; secret files must be regular files (copy the file instead of linking it)",
            path.display()
        ));
    }
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} has mode {mode:03o}, readable by others; run `chmod 600 {}`",
            path.display(),
            path.display()
        ));
    }
    // Refuse a file owned by another (non-root) user: they could rewrite it.
    let me = current_uid();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(format!(
            "{} belongs to uid {}, not to the gateway's user (uid {me})",
            path.display(),
            meta.uid()
        ));
    }
    fs::read(path).map_err(|e| describe_io(path, &e))
}

/// Reads a secret file holding one line of text (a cookie, a token): the
/// trailing newline an editor adds is removed, surrounding blanks trimmed.
pub fn read_secret_line(path: &Path) -> Result<String, String> {
    let bytes = read_secret_file(path)?;
    let text =
        String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8 text", path.display()))?;
    let line = text.trim();
    if line.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    if line.contains(['\n', '\r']) {
        return Err(format!(
            "{} must hold a single line (the value only)",
            path.display()
        ));
    }
    Ok(line.to_string())
}

fn describe_io(path: &Path, e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => format!("{} does not exist", path.display()),
        io::ErrorKind::PermissionDenied => {
            format!("{} cannot be read by the gateway's user", path.display())
        }
        _ => format!("{}: {e}", path.display()),
    }
}

fn current_uid() -> u32 {
    // /proc/self is owned by the process's effective uid (Linux); this saves
    // a libc dependency for one call.
    fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("kgw-secrets-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write_mode(path: &Path, text: &str, mode: u32) {
        fs::write(path, text).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn private_file_is_read_and_trimmed() {
        let dir = temp_dir("ok");
        let f = dir.join("c");
        write_mode(&f, "knoq_session=abc\n", 0o600);
        assert_eq!(read_secret_line(&f).unwrap(), "knoq_session=abc");
    }

    #[test]
    fn group_readable_file_is_refused_without_showing_content() {
        let dir = temp_dir("mode");
        let f = dir.join("c");
        write_mode(&f, "knoq_session=SECRET", 0o640);
        let err = read_secret_line(&f).unwrap_err();
        assert!(err.contains("chmod 600"), "{err}");
        assert!(!err.contains("SECRET"));
    }

    #[test]
    fn symlink_is_refused() {
        let dir = temp_dir("link");
        let f = dir.join("c");
        write_mode(&f, "v", 0o600);
        let l = dir.join("l");
        symlink(&f, &l).unwrap();
        assert!(read_secret_line(&l).unwrap_err().contains("symlink"));
    }

    #[test]
    fn missing_empty_and_multiline_files_are_refused() {
        let dir = temp_dir("shape");
        assert!(read_secret_line(&dir.join("nope"))
            .unwrap_err()
            .contains("does not exist"));
        let f = dir.join("e");
        write_mode(&f, "  \n", 0o600);
        assert!(read_secret_line(&f).unwrap_err().contains("empty"));
        write_mode(&f, "a\nb", 0o600);
        assert!(read_secret_line(&f).unwrap_err().contains("single line"));
    }
}
