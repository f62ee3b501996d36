//! The connection file: everything a client needs to reach a cluster and prove it may.
//!
//! JSON, mode 0600, at `~/.starling/clusters/<name>/connection.json`. Copying it to a teammate
//! is how a cluster is shared. Its `version` is checked before anything else is read.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::ClientError;
use crate::home;
use crate::proto::auth::Key;

/// The connection file format this release writes and reads.
pub const CONNECTION_FORMAT: u32 = 1;

/// How to reach the master by SSH (for tunnels and `starling connect`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshAccess {
    pub host: String,
    pub port: u16,
    pub user: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionInfo {
    pub version: u32,
    pub cluster: String,
    pub provider: String,
    /// `host:port` of the controller.
    pub controller: String,
    /// The cluster's certificate (PEM), pinned: no other is accepted.
    pub certificate: String,
    pub client_key: Key,
    pub ssh: Option<SshAccess>,
    pub max_frame: usize,
}

#[derive(Deserialize)]
struct VersionOnly {
    version: Option<u32>,
}

impl ConnectionInfo {
    /// Reads and checks a connection file.
    pub fn load(path: &Path) -> Result<Self, ClientError> {
        let bad = |reason: String| ClientError::BadConnectionFile {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ClientError::NoConnectionFile(format!(
                    "{} does not exist; is the cluster up? (`starling list` shows the clusters this machine knows)",
                    path.display()
                ))
            } else {
                bad(e.to_string())
            }
        })?;
        let v: VersionOnly =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a connection file: {e}")))?;
        match v.version {
            Some(CONNECTION_FORMAT) => {}
            Some(other) => {
                return Err(bad(format!(
                    "it has format version {other}, this starling reads version {CONNECTION_FORMAT}; use the starling release that created the cluster"
                )))
            }
            None => return Err(bad("it has no \"version\" field".into())),
        }
        serde_json::from_str(&text).map_err(|e| bad(e.to_string()))
    }

    /// Writes the file with mode 0600.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_vec_pretty(self).expect("serializes");
        home::write_private(path, &text)
    }
}

/// Finds the connection file: `--connection PATH`, else `--cluster NAME`, else
/// `STARLING_CLUSTER`, else the only cluster there is.
pub fn find(cluster: Option<&str>, connection: Option<&Path>) -> Result<PathBuf, ClientError> {
    if let Some(p) = connection {
        return Ok(p.to_path_buf());
    }
    let from_env = std::env::var("STARLING_CLUSTER")
        .ok()
        .filter(|s| !s.is_empty());
    if let Some(name) = cluster.map(str::to_string).or(from_env) {
        home::check_name("cluster", &name).map_err(ClientError::NoConnectionFile)?;
        let path = home::connection_path(&name);
        if !path.exists() {
            return Err(ClientError::NoConnectionFile(format!(
                "there is no cluster '{name}' on this machine (no {}); `starling list` shows the clusters there are",
                path.display()
            )));
        }
        return Ok(path);
    }
    let names = known_clusters();
    match names.as_slice() {
        [one] => Ok(home::connection_path(one)),
        [] => Err(ClientError::NoConnectionFile(
            "no cluster is up on this machine; start one with `starling up --local -n 4`, or pass --connection FILE".into(),
        )),
        many => Err(ClientError::NoConnectionFile(format!(
            "there are {} clusters ({}); say which with --cluster NAME or STARLING_CLUSTER",
            many.len(),
            many.join(", ")
        ))),
    }
}

/// Names of the clusters with a connection file under this machine's starling home.
pub fn known_clusters() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(home::home().join("clusters"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("connection.json").exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}
