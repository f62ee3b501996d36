//! The `ec2` provider: a cluster of EC2 instances (or LocalStack's), a master and N nodes.
//!
//! `up` checks the image, imports the SSH key as the cluster's key pair, creates its security
//! group, launches the instances tagged with the cluster, waits for them to run and then
//! bootstraps them over SSH ([`crate::bootstrap`]). The cluster's state is read from the tags
//! ([`api`]), so `list`, `status` and `down` work from any machine with the same account; a
//! failed or interrupted `up` says what exists and `down` removes it.

pub mod api;

use std::time::{Duration, Instant};

use futures::StreamExt as _;

pub use api::{Ec2, Instance, Resources};

use super::remote::{self, Record};
use super::{Cluster, ClusterSummary, Launched, Provider, ProviderError, Terminated};
use crate::bootstrap::{Leaving, NodeReport, NodeTarget, Progress, Transport};
use crate::client::connection::ConnectionInfo;
use crate::client::Client;
use crate::home;
use crate::spec::cloud::Ec2Spec;
use crate::spec::{ClusterSpec, ProviderKind};

/// How long instances may take to reach `running` (or `terminated`, `stopped`).
const STATE_TIMEOUT: Duration = Duration::from_secs(600);
/// Instances launched at once.
const LAUNCH_PARALLEL: usize = 8;

/// The EC2 part of a spec; the spec checker guarantees it for `provider: ec2`.
pub fn ec2_spec(spec: &ClusterSpec) -> Result<&Ec2Spec, ProviderError> {
    spec.ec2
        .as_ref()
        .ok_or_else(|| ProviderError::Invalid("the spec has no EC2 settings".into()))
}

/// The EC2 API for a spec's region and endpoint.
pub async fn api_for(spec: &ClusterSpec) -> Result<Ec2, ProviderError> {
    let e = ec2_spec(spec)?;
    Ok(Ec2::connect(
        e.region.as_str(),
        e.endpoint_url
            .as_ref()
            .map(super::super::spec::types::EndpointUrl::as_str),
    )
    .await)
}

/// The public half of the spec's key: `KEY.pub`, or derived with `ssh-keygen -y`.
fn public_key(spec: &ClusterSpec) -> Result<String, ProviderError> {
    let key = spec
        .ssh
        .key_file
        .as_deref()
        .map(crate::bootstrap::expand_home)
        .ok_or_else(|| {
            ProviderError::Invalid("`ssh.key_file` is required for provider ec2".into())
        })?;
    if !key.exists() {
        return Err(ProviderError::Invalid(format!(
            "the SSH key {} (ssh.key_file) does not exist; create one with `ssh-keygen -t ed25519 -f {}`",
            key.display(),
            key.display()
        )));
    }
    let mut pub_path = key.clone().into_os_string();
    pub_path.push(".pub");
    if let Ok(text) = std::fs::read_to_string(&pub_path) {
        return Ok(text.trim().to_string());
    }
    let out = std::process::Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(&key)
        .stdin(std::process::Stdio::null())
        .output();
    match out {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Ok(o) => Err(ProviderError::Invalid(format!(
            "cannot get the public half of {}: there is no {}, and ssh-keygen -y said: {}",
            key.display(),
            std::path::Path::new(&pub_path).display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ))),
        Err(e) => Err(ProviderError::Invalid(format!(
            "cannot get the public half of {}: there is no {}, and ssh-keygen cannot run: {e}",
            key.display(),
            std::path::Path::new(&pub_path).display()
        ))),
    }
}

/// Node targets for instances (the master first).
pub fn targets(
    instances: &[Instance],
    use_private_ip: bool,
    port: u16,
    user: &str,
) -> Result<Vec<NodeTarget>, ProviderError> {
    let mut out = Vec::new();
    for i in instances {
        out.push(NodeTarget {
            name: i.node.clone(),
            ssh_host: i.address(i.reach_private.unwrap_or(use_private_ip))?,
            private: i
                .private_ip
                .clone()
                .ok_or_else(|| ProviderError::Cloud(format!("{} has no private address", i.id)))?,
            port: i.ssh_port.unwrap_or(port),
            user: i.user.clone().unwrap_or_else(|| user.to_string()),
        });
    }
    out.sort_by_key(|t| (t.name != "master", t.name.clone()));
    Ok(out)
}

async fn launch_all(
    api: &Ec2,
    spec: &ClusterSpec,
    image: String,
    key_name: String,
    security_group: String,
    nodes: &[(String, &str, String)],
) -> Result<Vec<Instance>, ProviderError> {
    let e = ec2_spec(spec)?;
    let req = api::LaunchRequest {
        cluster: spec.name.clone(),
        image_id: image,
        key_name,
        security_group,
        subnet_id: e.network.subnet_id.clone(),
        user: spec.ssh.user.to_string(),
        ssh_port: spec.ssh.port,
        use_private_ip: e.network.use_private_ip,
        spot: e
            .spot
            .as_ref()
            .map(|s| s.max_price.clone().unwrap_or_default()),
        extra_tags: e
            .tags
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.clone()))
            .collect(),
    };
    let req = &req;
    let results: Vec<Result<Instance, ProviderError>> = futures::stream::iter(
        nodes
            .iter()
            .map(|(node, role, ty)| async move { api.launch(req, node, role, ty).await }),
    )
    .buffer_unordered(LAUNCH_PARALLEL)
    .collect()
    .await;
    results.into_iter().collect()
}

/// The EC2 provider is a region's API: instances tagged with the cluster's name are its nodes.
impl Provider for Ec2 {
    async fn up(spec: &ClusterSpec, progress: &Progress) -> Result<Launched, ProviderError> {
        up(spec, progress).await
    }

    /// What exists of the cluster in EC2 now.
    async fn after_interrupted_up(spec: &ClusterSpec) -> Option<String> {
        Some(match api_for(spec).await {
            Ok(api) => api
                .resources(&spec.name)
                .await
                .map_or_else(|e| format!("unknown ({e})"), |r| r.describe()),
            Err(e) => format!("unknown ({e})"),
        })
    }

    /// Its running instances, the master first.
    async fn nodes(&self, cluster: &Cluster) -> Result<Vec<NodeTarget>, ProviderError> {
        let instances: Vec<Instance> = self
            .instances(Some(&cluster.name))
            .await?
            .into_iter()
            .filter(|i| i.state == "running")
            .collect();
        if instances.is_empty() {
            return Err(ProviderError::NoSuchCluster(cluster.name.clone()));
        }
        let (private, port, user) = reach(cluster.record.as_ref());
        targets(&instances, private, port, &user)
    }

    async fn down(&self, cluster: &Cluster) -> Result<Terminated, ProviderError> {
        let transport = cluster.transport(remote::QUICK_LOGIN);
        down(self, &cluster.name, &transport, cluster.record.as_ref()).await
    }

    fn has(&self, _operation: &str) -> bool {
        true
    }

    async fn add_nodes(
        &self,
        cluster: &Cluster,
        spec: &ClusterSpec,
        count: u32,
        progress: &Progress,
    ) -> Result<Vec<NodeReport>, ProviderError> {
        let transport = cluster.transport(Duration::from_secs(spec.ssh.timeout_s));
        add_nodes(self, spec, count, &transport, progress).await
    }

    async fn remove_node(
        &self,
        cluster: &Cluster,
        node: &str,
    ) -> Result<Vec<String>, ProviderError> {
        let transport = cluster.transport(remote::QUICK_LOGIN);
        remove_node(
            self,
            &cluster.name,
            node,
            &transport,
            cluster.record.as_ref(),
        )
        .await
    }

    async fn stop(&self, cluster: &Cluster) -> Result<(usize, Vec<String>), ProviderError> {
        let transport = cluster.transport(remote::QUICK_LOGIN);
        stop(self, &cluster.name, &transport, cluster.record.as_ref()).await
    }

    async fn start(
        &self,
        cluster: &Cluster,
        spec: &ClusterSpec,
        progress: &Progress,
    ) -> Result<(Vec<String>, u32), ProviderError> {
        let transport = cluster.transport(Duration::from_secs(spec.ssh.timeout_s));
        start(self, spec, &transport, progress).await
    }
}

/// Brings up an EC2 cluster.
pub async fn up(spec: &ClusterSpec, progress: &Progress) -> Result<Launched, ProviderError> {
    let started = Instant::now();
    let name = spec.name.as_str();
    let e = ec2_spec(spec)?;
    // What can be checked on this machine is checked before talking to EC2.
    let public_key = public_key(spec)?;
    super::daemon_path()?;
    let api = api_for(spec).await?;
    let existing = api.instances(Some(name)).await?;
    if !existing.is_empty() {
        return Err(ProviderError::Invalid(format!(
            "cluster '{name}' already exists in {} ({} instances); `starling down {name}` first, or pick another name with --name",
            api.region(),
            existing.len()
        )));
    }
    // Everything that can be checked before anything is created, is.
    progress.say(&format!("checking the image in {}", api.region()));
    let image = api.resolve_image(&e.image).await?;
    Record {
        provider: ProviderKind::Ec2,
        spec: spec.clone(),
    }
    .save()?;
    let _ = std::fs::remove_file(remote::known_hosts(name));

    let result = async {
        let vpc = match (&e.network.vpc_id, &e.network.subnet_id) {
            (Some(v), _) => Some(v.clone()),
            (None, Some(s)) => Some(api.subnet_vpc(s).await?),
            (None, None) => None,
        };
        let key_name = api.ensure_key_pair(name, &public_key).await?;
        let cidrs = |c: &[crate::spec::types::Cidr]| {
            c.iter().map(|c| c.as_str().to_string()).collect::<Vec<_>>()
        };
        let group = api
            .ensure_security_group(
                name,
                vpc.as_deref(),
                spec.ssh.port,
                spec.controller_port,
                &cidrs(&e.network.ssh_cidrs),
                &cidrs(&e.network.client_cidrs),
            )
            .await?;
        let mut wanted = vec![(
            "master".to_string(),
            "master",
            e.master_type.as_str().to_string(),
        )];
        for i in 1..=e.nodes as usize {
            wanted.push((
                remote::node_name(i),
                "node",
                e.node_type.as_str().to_string(),
            ));
        }
        progress.say(&format!(
            "launching {} instance(s) from {image}{}",
            wanted.len(),
            if e.spot.is_some() { " (spot)" } else { "" }
        ));
        let launched = launch_all(&api, spec, image.clone(), key_name, group, &wanted).await?;
        let ids: Vec<String> = launched.iter().map(|i| i.id.clone()).collect();
        let running = api
            .wait_running(&ids, e.network.use_private_ip, STATE_TIMEOUT)
            .await?;
        progress.say(&format!(
            "{} instance(s) running after {:.1} s",
            running.len(),
            started.elapsed().as_secs_f64()
        ));
        let nodes = targets(
            &running,
            e.network.use_private_ip,
            spec.ssh.port,
            spec.ssh.user.as_str(),
        )?;
        remote::start_cluster(spec, nodes, started, progress).await
    }
    .await;
    match result {
        Ok(l) => Ok(l),
        Err(err) => Err(with_leftovers(&api, name, err).await),
    }
}

/// Adds to an error what exists of the cluster now, and how to remove it.
async fn with_leftovers(api: &Ec2, cluster: &str, err: ProviderError) -> ProviderError {
    let exists = match api.resources(cluster).await {
        Ok(r) => r.describe(),
        Err(e) => format!("unknown ({e})"),
    };
    ProviderError::Partial {
        cluster: cluster.to_string(),
        error: Box::new(err),
        exists,
    }
}

/// Where a cluster's nodes are reached, from the record or defaults.
pub fn reach(record: Option<&Record>) -> (bool, u16, String) {
    match record.map(|r| (&r.spec, r.spec.ec2.as_ref())) {
        Some((spec, Some(e))) => (
            e.network.use_private_ip,
            spec.ssh.port,
            spec.ssh.user.to_string(),
        ),
        _ => (false, 22, "ubuntu".into()),
    }
}

/// Takes an EC2 cluster down: the controller asked to stop, processes stopped over SSH where
/// the nodes answer, instances terminated, then the security group and the key pair deleted.
pub async fn down(
    api: &Ec2,
    cluster: &str,
    transport: &Transport,
    record: Option<&Record>,
) -> Result<Terminated, ProviderError> {
    let instances = api.instances(Some(cluster)).await?;
    let mut notes = Vec::new();
    if let Ok(info) = ConnectionInfo::load(&home::connection_path(cluster)) {
        if let Ok(Ok(client)) =
            tokio::time::timeout(Duration::from_secs(3), Client::connect_with(info)).await
        {
            let _ = tokio::time::timeout(Duration::from_secs(3), client.shutdown()).await;
        }
    }
    let (private, port, user) = reach(record);
    let running: Vec<Instance> = instances
        .iter()
        .filter(|i| i.state == "running")
        .cloned()
        .collect();
    if let Ok(nodes) = targets(&running, private, port, &user) {
        for f in remote::stop_nodes(cluster, &nodes, transport, Leaving::Cluster).await {
            notes.push(format!(
                "could not stop starlingd over SSH on {f} (terminating the instance stops it)"
            ));
        }
    }
    let removed = api.teardown(cluster, STATE_TIMEOUT).await?;
    let _ = std::fs::remove_dir_all(home::cluster_dir(cluster));
    Ok(Terminated {
        cluster: cluster.to_string(),
        stopped: removed.instances.len(),
        was_dead: removed.is_empty(),
        removed: if removed.is_empty() {
            Vec::new()
        } else {
            vec![removed.describe()]
        },
        notes,
        found: !removed.is_empty(),
    })
}

/// Every starling cluster in the API's region.
pub async fn list(api: &Ec2) -> Result<Vec<ClusterSummary>, ProviderError> {
    let all = api.instances(None).await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut names: Vec<String> = all.iter().map(|i| i.cluster.clone()).collect();
    names.dedup();
    let mut out = Vec::new();
    for name in names {
        let mine: Vec<&Instance> = all.iter().filter(|i| i.cluster == name).collect();
        let mut states: Vec<&str> = mine.iter().map(|i| i.state.as_str()).collect();
        states.sort_unstable();
        states.dedup();
        let mut types: Vec<&str> = mine.iter().map(|i| i.instance_type.as_str()).collect();
        types.sort_unstable();
        types.dedup();
        let oldest = mine.iter().filter_map(|i| i.launched).min();
        let engines = remote::engines_of(&name).await;
        out.push(ClusterSummary {
            name: name.clone(),
            provider: ProviderKind::Ec2,
            region: Some(api.region().to_string()),
            state: states.join("+"),
            nodes: mine.len(),
            types: types.join(","),
            age_s: oldest.map(|t| (now - t).max(0) as u64),
            controller: mine
                .iter()
                .find(|i| i.node == "master")
                .and_then(|i| i.public_ip.clone().or_else(|| i.private_ip.clone()))
                .unwrap_or_default(),
            engines,
        });
    }
    Ok(out)
}

/// Launches `count` more nodes and bootstraps them into the running cluster.
pub async fn add_nodes(
    api: &Ec2,
    spec: &ClusterSpec,
    count: u32,
    transport: &Transport,
    progress: &Progress,
) -> Result<Vec<NodeReport>, ProviderError> {
    let e = ec2_spec(spec)?;
    let name = spec.name.as_str();
    let instances = api.instances(Some(name)).await?;
    let master = instances
        .iter()
        .find(|i| i.node == "master" && i.state == "running")
        .ok_or_else(|| ProviderError::NoSuchCluster(name.to_string()))?;
    let highest = instances
        .iter()
        .filter_map(|i| {
            i.node
                .strip_prefix("node")
                .and_then(|n| n.parse::<usize>().ok())
        })
        .max()
        .unwrap_or(0);
    let wanted: Vec<(String, &str, String)> = (1..=count as usize)
        .map(|k| {
            (
                remote::node_name(highest + k),
                "node",
                e.node_type.as_str().to_string(),
            )
        })
        .collect();
    let image = api.resolve_image(&e.image).await?;
    let group = api
        .security_groups(name)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ProviderError::Cloud(format!("cluster '{name}' has no security group")))?;
    progress.say(&format!("launching {count} instance(s)"));
    let launched = launch_all(api, spec, image, api::resource_name(name), group, &wanted).await?;
    let ids: Vec<String> = launched.iter().map(|i| i.id.clone()).collect();
    let running = api
        .wait_running(&ids, e.network.use_private_ip, STATE_TIMEOUT)
        .await?;
    let user = spec.ssh.user.to_string();
    let nodes = targets(&running, e.network.use_private_ip, spec.ssh.port, &user)?;
    let master = targets(
        std::slice::from_ref(master),
        e.network.use_private_ip,
        spec.ssh.port,
        &user,
    )?
    .remove(0);
    remote::join_cluster(spec, &master, nodes, transport, progress).await
}

/// Stops one node's processes and terminates its instance.
pub async fn remove_node(
    api: &Ec2,
    cluster: &str,
    node: &str,
    transport: &Transport,
    record: Option<&Record>,
) -> Result<Vec<String>, ProviderError> {
    if node == "master" {
        return Err(ProviderError::Invalid(
            "the master holds the controller; `starling down` takes the whole cluster down".into(),
        ));
    }
    let instances = api.instances(Some(cluster)).await?;
    let Some(inst) = instances.iter().find(|i| i.node == node) else {
        let names: Vec<&str> = instances.iter().map(|i| i.node.as_str()).collect();
        return Err(ProviderError::Invalid(format!(
            "cluster '{cluster}' has no node '{node}'; its nodes are {}",
            names.join(", ")
        )));
    };
    let (private, port, user) = reach(record);
    let mut notes = Vec::new();
    // On an MPI cluster the world starts again without the node's ranks before the node goes
    // (else it would keep starting ranks there). Without the local record, whether this is an
    // MPI cluster is the master's to say.
    if record.map_or(true, |r| r.spec.mpi) {
        let master = instances
            .iter()
            .find(|i| i.node == "master" && i.state == "running");
        let left = match master {
            Some(m) => {
                let t = targets(std::slice::from_ref(m), private, port, &user)?.remove(0);
                crate::bootstrap::mpi::leave_world(&t, transport, cluster, node).await
            }
            None => Err("the master is not running".into()),
        };
        match left {
            Ok(_) => {}
            Err(e) if record.is_some() => {
                return Err(ProviderError::Ssh(format!(
                    "cannot take {node}'s ranks out of the cluster's MPI world on the master: {e}; nothing was removed"
                )))
            }
            Err(e) => notes.push(format!(
                "could not check the master for an MPI world to take {node}'s ranks out of: {e}"
            )),
        }
    }
    if inst.state == "running" {
        let t = targets(std::slice::from_ref(inst), private, port, &user)?;
        for f in remote::stop_nodes(cluster, &t, transport, Leaving::Node).await {
            notes.push(format!("could not stop starlingd over SSH on {f}"));
        }
    }
    api.terminate(std::slice::from_ref(&inst.id), STATE_TIMEOUT)
        .await?;
    Ok(notes)
}

/// Stops (EBS-backed) every instance of the cluster; the disks and tags stay. starlingd is
/// stopped first over SSH, so the controller closes its task store cleanly.
pub async fn stop(
    api: &Ec2,
    cluster: &str,
    transport: &Transport,
    record: Option<&Record>,
) -> Result<(usize, Vec<String>), ProviderError> {
    let instances = api.instances(Some(cluster)).await?;
    let ids: Vec<String> = instances
        .iter()
        .filter(|i| i.state != "stopped")
        .map(|i| i.id.clone())
        .collect();
    if ids.is_empty() {
        return Err(ProviderError::NoSuchCluster(cluster.to_string()));
    }
    let (private, port, user) = reach(record);
    let running: Vec<Instance> = instances
        .into_iter()
        .filter(|i| i.state == "running")
        .collect();
    let mut notes = Vec::new();
    if let Ok(nodes) = targets(&running, private, port, &user) {
        let stops = remote::run_on_each(
            &nodes,
            transport,
            |n| crate::bootstrap::stop_script(cluster, &n.name),
            &[],
        )
        .await;
        for f in remote::failures(stops) {
            notes.push(format!("could not stop starlingd first on {f}"));
        }
    }
    api.stop(&ids, STATE_TIMEOUT).await?;
    Ok((ids.len(), notes))
}

/// Starts a stopped cluster again: instances running, then controller and engines restarted
/// from the config their nodes kept, and the connection file renewed with the master's address.
pub async fn start(
    api: &Ec2,
    spec: &ClusterSpec,
    transport: &Transport,
    progress: &Progress,
) -> Result<(Vec<String>, u32), ProviderError> {
    let e = ec2_spec(spec)?;
    let name = spec.name.as_str();
    let instances = api.instances(Some(name)).await?;
    if instances.is_empty() {
        return Err(ProviderError::NoSuchCluster(name.to_string()));
    }
    let ids: Vec<String> = instances.iter().map(|i| i.id.clone()).collect();
    api.start(&ids).await?;
    let running = api
        .wait_running(&ids, e.network.use_private_ip, STATE_TIMEOUT)
        .await?;
    let nodes = targets(
        &running,
        e.network.use_private_ip,
        spec.ssh.port,
        spec.ssh.user.as_str(),
    )?;
    progress.say(&format!(
        "{} instance(s) running; restarting starlingd",
        nodes.len()
    ));
    let master = nodes[0].clone();
    let restart =
        |n: &NodeTarget| crate::bootstrap::restart_script(name, &n.name, n.name == "master");
    // The controller first, so that engines find it at once; then every other node together.
    let mut results =
        remote::run_on_each(std::slice::from_ref(&master), transport, restart, &[]).await;
    results.extend(remote::run_on_each(&nodes[1..], transport, restart, &[]).await);
    // Each node prints its engine count last.
    let engines = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .filter_map(|out| out.trim().lines().last()?.trim().parse::<u32>().ok())
        .sum();
    let failures = remote::failures(results);
    if !failures.is_empty() {
        return Err(ProviderError::Ssh(failures.join("\n")));
    }
    // The master's public address may have changed.
    let path = home::connection_path(name);
    if let Ok(mut info) = ConnectionInfo::load(&path) {
        info.controller = format!("{}:{}", master.ssh_host, spec.controller_port);
        if let Some(s) = info.ssh.as_mut() {
            s.host.clone_from(&master.ssh_host);
        }
        info.save(&path)?;
    }
    Ok((nodes.iter().map(|n| n.name.clone()).collect(), engines))
}
