//! Where starling keeps files on this machine, and the rules for names that end up in paths.
//!
//! Everything lives under `STARLING_HOME` (default `~/.starling`):
//! `clusters/<name>/` holds a cluster's connection file and cache; `node/<cluster>/<node>/`
//! holds what runs on a node (config, secrets, logs, pid files); `history/<cluster>/` keeps the
//! task stores of local clusters after they are gone.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The root of starling's files, as an absolute path in one spelling (no `//`, no trailing
/// `/`): a local cluster's processes are marked with paths under it, compared exactly, and
/// the node's shell and this process must spell them alike.
pub fn home() -> PathBuf {
    let root = match std::env::var_os("STARLING_HOME").filter(|h| !h.is_empty()) {
        Some(h) => PathBuf::from(h),
        None => std::env::var_os("HOME")
            .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from)
            .join(".starling"),
    };
    one_spelling(root)
}

/// `path` made absolute (against the current directory) and spelled without `//` or a
/// trailing `/`.
fn one_spelling(path: PathBuf) -> PathBuf {
    let path = std::path::absolute(&path).unwrap_or(path);
    path.components().collect()
}

/// `clusters/<name>/` under [`home`].
pub fn cluster_dir(name: &str) -> PathBuf {
    home().join("clusters").join(name)
}

/// `node/<cluster>/` under `root` (this machine's [`home`] for local nodes): one directory per
/// node of the cluster below it.
pub fn nodes_dir(root: &Path, cluster: &str) -> PathBuf {
    root.join("node").join(cluster)
}

/// `history/<cluster>/` under [`home`]: task stores that outlive their local clusters.
pub fn history_dir(cluster: &str) -> PathBuf {
    home().join("history").join(cluster)
}

/// The connection file of a cluster.
pub fn connection_path(name: &str) -> PathBuf {
    cluster_dir(name).join("connection.json")
}

/// Checks a cluster or node name before it reaches a path, a tag or a remote shell:
/// 1–40 characters, lowercase letters, digits and `-`, starting with a letter or digit.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{name}' is not a valid {what} name: use 1–40 lowercase letters, digits and '-', starting with a letter or digit (e.g. 'my-cluster')"
        ))
    }
}

/// Writes a file only its owner can read (mode 0600), replacing it atomically.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Creates a directory (and parents) readable by its owner only.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_home_is_spelled_one_way() {
        assert_eq!(one_spelling("/tmp//s/".into()), PathBuf::from("/tmp/s"));
        assert_eq!(
            one_spelling("rel/s".into()),
            std::env::current_dir().unwrap().join("rel/s")
        );
    }

    #[test]
    fn names_are_checked_before_they_reach_paths_or_shells() {
        assert!(check_name("cluster", "my-cluster-2").is_ok());
        for bad in ["", "-x", "a/b", "..", "A", "x y", "x;rm", &"a".repeat(41)] {
            let err = check_name("cluster", bad).unwrap_err();
            assert!(err.contains("not a valid cluster name"), "{err}");
        }
    }

    #[test]
    fn private_files_are_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/secret.json");
        write_private(&p, b"{}").unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"{}");
    }
}
