//! Small file-system helpers with the durability the job's files need:
//! atomic replacement, fsync of files and directories, hashing, and walks.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` through a temporary file in the same folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    let res = (|| -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        bail!("{}: cannot write: {e}", path.display());
    }
    Ok(())
}

/// A temporary name beside `path`, unique to this process.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Lowercase hex of a hash.
fn hex(hash: &[u8]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Size and hex SHA-256 of a file, read in 1 MiB pieces.
pub fn digest(path: &Path) -> Result<(u64, String)> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok((bytes, hex(&hasher.finalize())))
}

pub fn sync_file(path: &Path) -> Result<()> {
    let f = File::options().write(true).open(path).with_context(|| format!("cannot open {}", path.display()))?;
    f.sync_all().with_context(|| format!("cannot fsync {}", path.display()))
}

pub fn sync_dir(path: &Path) -> Result<()> {
    let d = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    d.sync_all().with_context(|| format!("cannot fsync {}", path.display()))
}

/// `path` relative to `root`, `/`-separated on every platform (the
/// manifest's form).
pub fn relative(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
}

/// Every regular file below `root`, sorted.
pub fn files_under(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    walk(root, &mut |p, is_dir| {
        if !is_dir {
            out.push(p.to_path_buf())
        }
    })?;
    out.sort();
    Ok(out)
}

/// `root` and every directory below it, deepest first (children are
/// synced before the entries that name them).
pub fn dirs_under(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = vec![root.to_path_buf()];
    walk(root, &mut |p, is_dir| {
        if is_dir {
            out.push(p.to_path_buf())
        }
    })?;
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    Ok(out)
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path, bool)) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let path = entry.path();
        let is_dir = entry.file_type().with_context(|| format!("cannot stat {}", path.display()))?.is_dir();
        f(&path, is_dir);
        if is_dir {
            walk(&path, f)?;
        }
    }
    Ok(())
}
