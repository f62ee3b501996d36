//! The `ssh` provider: a cluster on machines that already exist, listed in the spec's `hosts`
//! (the first is the master). The same bootstrap as EC2 nodes get; `down` stops everything
//! starling started there and removes its files, and leaves the machines alone.

use std::time::{Duration, Instant};

use super::remote::{self, Record};
use super::{Cluster, ClusterSummary, Launched, Provider, ProviderError, Terminated};
use crate::bootstrap::{Leaving, NodeTarget, Progress, Transport};
use crate::client::connection::ConnectionInfo;
use crate::client::Client;
use crate::home;
use crate::spec::{ClusterSpec, ProviderKind};

/// The ssh provider: the hosts a spec lists.
#[derive(Debug, Clone, Copy)]
pub struct Ssh;

impl Provider for Ssh {
    async fn up(spec: &ClusterSpec, progress: &Progress) -> Result<Launched, ProviderError> {
        up(spec, progress).await
    }

    async fn after_interrupted_up(spec: &ClusterSpec) -> Option<String> {
        Some(what_may_exist(spec))
    }

    async fn nodes(&self, cluster: &Cluster) -> Result<Vec<NodeTarget>, ProviderError> {
        match &cluster.record {
            Some(r) => Ok(remote::ssh_nodes(&r.spec)),
            None => Err(ProviderError::NoSuchCluster(cluster.name.clone())),
        }
    }

    async fn down(&self, cluster: &Cluster) -> Result<Terminated, ProviderError> {
        match &cluster.record {
            Some(record) => down(record).await,
            None => Err(ProviderError::NoSuchCluster(cluster.name.clone())),
        }
    }
}

pub async fn up(spec: &ClusterSpec, progress: &Progress) -> Result<Launched, ProviderError> {
    let started = Instant::now();
    let name = spec.name.as_str();
    if let Some(old) = Record::load(name) {
        return Err(ProviderError::Invalid(format!(
            "cluster '{name}' (provider {}) already exists on this machine; `starling down {name}` first, or pick another name with --name",
            old.provider
        )));
    }
    if home::connection_path(name).exists() {
        return Err(ProviderError::Invalid(format!(
            "a cluster named '{name}' exists on this machine; take it down first or pick another name"
        )));
    }
    Record {
        provider: ProviderKind::Ssh,
        spec: spec.clone(),
    }
    .save()?;
    let _ = std::fs::remove_file(remote::known_hosts(name));
    let nodes = remote::ssh_nodes(spec);
    remote::start_cluster(spec, nodes, started, progress)
        .await
        .map_err(|e| ProviderError::Partial {
            cluster: name.to_string(),
            error: Box::new(e),
            exists: what_may_exist(spec),
        })
}

/// What a failed or interrupted `up` may have left on the spec's hosts.
pub fn what_may_exist(spec: &ClusterSpec) -> String {
    format!(
        "starlingd may run, and files may be, on {}",
        spec.hosts
            .iter()
            .map(|h| h.host.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

pub async fn down(record: &Record) -> Result<Terminated, ProviderError> {
    let spec = &record.spec;
    let name = spec.name.as_str();
    if let Ok(info) = ConnectionInfo::load(&home::connection_path(name)) {
        if let Ok(Ok(client)) =
            tokio::time::timeout(Duration::from_secs(3), Client::connect_with(info)).await
        {
            let _ = tokio::time::timeout(Duration::from_secs(3), client.shutdown()).await;
        }
    }
    let nodes = remote::ssh_nodes(spec);
    let transport = Transport::Ssh(remote::login(spec, Some(remote::QUICK_LOGIN)));
    let failed = remote::stop_nodes(name, &nodes, &transport, Leaving::Cluster).await;
    if !failed.is_empty() {
        return Err(ProviderError::Ssh(format!(
            "could not stop cluster '{name}' on every host, so its record is kept; fix the access and run `starling down {name}` again:\n{}",
            failed.join("\n")
        )));
    }
    let _ = std::fs::remove_dir_all(home::cluster_dir(name));
    Ok(Terminated {
        cluster: name.to_string(),
        stopped: nodes.len(),
        was_dead: false,
        removed: vec![format!(
            "starlingd and its files on {} host(s)",
            nodes.len()
        )],
        notes: Vec::new(),
        found: true,
    })
}

pub async fn summary(record: &Record) -> ClusterSummary {
    let spec = &record.spec;
    let engines = remote::engines_of(&spec.name).await;
    ClusterSummary {
        name: spec.name.clone(),
        provider: ProviderKind::Ssh,
        region: None,
        state: if engines.is_some() {
            "running"
        } else {
            "unreachable"
        }
        .into(),
        nodes: spec.hosts.len(),
        types: String::new(),
        age_s: None,
        controller: spec
            .hosts
            .first()
            .map(|h| format!("{}:{}", h.host, spec.controller_port))
            .unwrap_or_default(),
        engines,
    }
}
