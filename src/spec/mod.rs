//! The YAML cluster spec: its types, the defaults merged under it, and validation.
//!
//! A spec file is read into [`SpecFile`] (every field optional, unknown keys refused, each
//! error carrying the file's line and column), then laid over `config/defaults.yaml` to give a
//! complete [`ClusterSpec`]. [`types`] holds the value types that check themselves as they are
//! read (names, CIDR blocks, instance types, AMI ids), so a bad value is reported with its line
//! and column. Nothing here touches the network.

pub mod cloud;
pub mod types;

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use cloud::{
    Ec2Spec, FileCopy, HostFile, HostSpec, ImageFile, ImageSpec, NetworkFile, NetworkSpec,
    SpotFile, SshAccessSpec, SshFile,
};
use types::{EndpointUrl, InstanceType, Region, TagKey, UserName};

use crate::home;

/// `config/defaults.yaml`, built in.
pub const DEFAULTS_YAML: &str = include_str!("../../config/defaults.yaml");
/// `templates/local.yaml`, built in: the spec `up --local` starts from.
pub const LOCAL_TEMPLATE: &str = include_str!("../../templates/local.yaml");

/// Every template in `templates/`, by name, for `starling init --template NAME`.
pub const TEMPLATES: &[(&str, &str)] = &[
    ("local", LOCAL_TEMPLATE),
    ("ec2", include_str!("../../templates/ec2.yaml")),
    ("ec2-spot", include_str!("../../templates/ec2-spot.yaml")),
    (
        "localstack",
        include_str!("../../templates/localstack.yaml"),
    ),
    ("ssh-hosts", include_str!("../../templates/ssh-hosts.yaml")),
    ("ec2-mpi", include_str!("../../templates/ec2-mpi.yaml")),
];

/// The text of a template, or an error naming the templates there are.
pub fn template(name: &str) -> Result<&'static str, String> {
    TEMPLATES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            let names: Vec<&str> = TEMPLATES.iter().map(|(n, _)| *n).collect();
            format!(
                "there is no template '{name}'; the templates are {}",
                names.join(", ")
            )
        })
}

/// Which provider runs the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Processes on this machine.
    Local,
    /// Listed SSH hosts.
    Ssh,
    /// EC2 instances (or LocalStack).
    Ec2,
}

impl std::fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProviderKind::Local => "local",
            ProviderKind::Ssh => "ssh",
            ProviderKind::Ec2 => "ec2",
        })
    }
}

/// A number, or `auto` for one per core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    N(u32),
    Auto,
}

/// The most engines one node may host: each is a Python process of its own (20–40 MB), and a
/// node's engine process refuses counts its memory cannot hold long before this.
pub const MAX_ENGINES_PER_NODE: u32 = 1024;

impl std::str::FromStr for Count {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(Count::Auto);
        }
        s.parse::<u32>()
            .map(Count::N)
            .map_err(|_| format!("'{s}' is not a whole number or \"auto\""))
    }
}

impl Count {
    /// The number, with `auto` meaning this machine's core count.
    pub fn resolve_here(self) -> u32 {
        match self {
            Count::N(n) => n,
            Count::Auto => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        }
    }
}

impl Serialize for Count {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Count::N(n) => s.serialize_u32(*n),
            Count::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Count;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a whole number or \"auto\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Count, E> {
                u32::try_from(v)
                    .map(Count::N)
                    .map_err(|_| E::custom(format!("{v} is too large")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Count, E> {
                Err(E::invalid_value(serde::de::Unexpected::Signed(v), &self))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Count, E> {
                if v == "auto" {
                    Ok(Count::Auto)
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Str(v), &self))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// A spec as written: every field optional, unknown keys refused.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecFile {
    pub name: Option<types::ClusterName>,
    pub provider: Option<ProviderKind>,
    pub engines_per_node: Option<Count>,
    pub python: Option<String>,
    pub heartbeat_ms: Option<u64>,
    pub max_frame_mb: Option<u64>,
    pub register_timeout_s: Option<u64>,
    pub reconnect_s: Option<u64>,
    pub task_attempts: Option<u32>,
    /// The engines' kernels are the ranks of one MPI world, started by `mpiexec`.
    pub mpi: Option<bool>,
    /// Open MPI's MCA parameters for the world and `starling mpirun` (`--mca NAME VALUE`).
    pub mpi_mca: Option<BTreeMap<String, String>>,
    /// The port the controller listens on (on the master; a local cluster picks a free one).
    pub controller_port: Option<u16>,
    /// Shell commands run on every node, in order, before the engines start.
    pub setup: Option<Vec<String>>,
    pub files: Option<Vec<FileCopy>>,
    pub ssh: Option<SshFile>,
    // ec2
    pub region: Option<Region>,
    pub endpoint_url: Option<EndpointUrl>,
    pub image: Option<ImageFile>,
    pub master_type: Option<InstanceType>,
    pub node_type: Option<InstanceType>,
    pub nodes: Option<u32>,
    pub spot: Option<SpotFile>,
    pub network: Option<NetworkFile>,
    pub tags: Option<BTreeMap<TagKey, String>>,
    // ssh
    pub hosts: Option<Vec<HostFile>>,
}

/// A complete, validated spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterSpec {
    pub name: String,
    pub provider: ProviderKind,
    pub engines_per_node: Count,
    pub python: String,
    pub heartbeat_ms: u64,
    pub max_frame_mb: u64,
    pub register_timeout_s: u64,
    /// How long an engine that lost its controller keeps trying to reach it again.
    pub reconnect_s: u64,
    /// How many times a load-balanced task is handed out, at most, when engines running it
    /// are lost.
    pub task_attempts: u32,
    /// The engines' kernels are the ranks of one MPI world (`mpiexec` over the cluster's
    /// nodes); engine id N is rank N.
    pub mpi: bool,
    /// Open MPI's MCA parameters for the world and `starling mpirun`.
    pub mpi_mca: BTreeMap<String, String>,
    pub controller_port: u16,
    pub setup: Vec<String>,
    pub files: Vec<FileCopy>,
    pub ssh: SshAccessSpec,
    /// For `provider: ec2`.
    pub ec2: Option<Ec2Spec>,
    /// For `provider: ssh`.
    pub hosts: Vec<HostSpec>,
}

/// A spec that could not be used; the message names the file, line and column and the fix.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read the cluster spec {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{origin}{location}: {message}")]
    Invalid {
        origin: String,
        location: String,
        message: String,
    },
    /// What the caller of `up` asked for does not fit (the spec, or itself).
    #[error("{0}")]
    Options(String),
}

/// What `up` may say on top of a spec: `starling up [--local] [-f SPEC] [--name] [-n]`, and
/// `starling.Cluster(...)` from Python.
#[derive(Debug, Default, Clone)]
pub struct UpOptions<'a> {
    /// The spec file; without one, `templates/local.yaml`.
    pub file: Option<&'a Path>,
    /// The caller insists on a local cluster.
    pub local: bool,
    pub name: Option<&'a str>,
    /// Engines per node.
    pub engines: Option<Count>,
    /// The kernels' Python interpreter.
    pub python: Option<&'a str>,
    /// Engines as the ranks of one MPI world (`--mpi`).
    pub mpi: bool,
}

/// The spec `up` starts: the file (or the local template) with the caller's overrides.
pub fn for_up(o: &UpOptions) -> Result<ClusterSpec, SpecError> {
    let mut spec = match o.file {
        Some(path) => load(path)?,
        None => parse("templates/local.yaml (built in)", LOCAL_TEMPLATE)?,
    };
    if o.local && spec.provider != ProviderKind::Local {
        return Err(SpecError::Options(format!(
            "--local conflicts with `provider: {}` in the spec; drop one of them",
            spec.provider
        )));
    }
    if let Some(name) = o.name {
        crate::home::check_name("cluster", name).map_err(SpecError::Options)?;
        spec.name = name.to_string();
    }
    if let Some(n) = o.engines {
        match n {
            Count::N(0) => return Err(SpecError::Options("-n must be at least 1".into())),
            Count::N(n) if n > MAX_ENGINES_PER_NODE => {
                return Err(SpecError::Options(format!(
                    "-n {n} is more engines than one node may host ({MAX_ENGINES_PER_NODE}); use more nodes (a spec with `nodes:` or `hosts:`), or \"auto\" for one per core"
                )))
            }
            _ => {}
        }
        spec.engines_per_node = n;
    }
    if let Some(python) = o.python {
        spec.python = python.to_string();
    }
    if o.mpi {
        spec.mpi = true;
    }
    Ok(spec)
}

fn invalid(origin: &str, err: &serde_yaml::Error) -> SpecError {
    let location = err
        .location()
        .map(|l| format!(":{}:{}", l.line(), l.column()))
        .unwrap_or_default();
    let mut message = err.to_string();
    // serde_yaml appends " at line L column C"; the location is already in front.
    if let Some(i) = message.find(" at line ") {
        message.truncate(i);
    }
    if message.contains("unknown field") {
        message.push_str(
            "; see the README's spec reference or `templates/` for the keys a spec may have",
        );
    }
    SpecError::Invalid {
        origin: origin.to_string(),
        location,
        message,
    }
}

fn field_error(origin: &str, field: &str, message: &str) -> SpecError {
    SpecError::Invalid {
        origin: origin.to_string(),
        location: String::new(),
        message: format!("{field}: {message}"),
    }
}

/// Parses spec text (`origin` names it in errors) and completes it with the defaults.
pub fn parse(origin: &str, text: &str) -> Result<ClusterSpec, SpecError> {
    let file: SpecFile = if text.trim().is_empty() {
        SpecFile::default()
    } else {
        serde_yaml::from_str(text).map_err(|e| invalid(origin, &e))?
    };
    let defaults: SpecFile =
        serde_yaml::from_str(DEFAULTS_YAML).map_err(|e| invalid("config/defaults.yaml", &e))?;
    let spec = ClusterSpec {
        name: file
            .name
            .as_ref()
            .map_or_else(|| "local".to_string(), ToString::to_string),
        provider: file
            .provider
            .or(defaults.provider)
            .unwrap_or(ProviderKind::Local),
        engines_per_node: file
            .engines_per_node
            .or(defaults.engines_per_node)
            .unwrap_or(Count::Auto),
        python: file
            .python
            .clone()
            .or_else(|| defaults.python.clone())
            .unwrap_or_else(|| "python3".into()),
        heartbeat_ms: file.heartbeat_ms.or(defaults.heartbeat_ms).unwrap_or(1000),
        max_frame_mb: file.max_frame_mb.or(defaults.max_frame_mb).unwrap_or(64),
        register_timeout_s: file
            .register_timeout_s
            .or(defaults.register_timeout_s)
            .unwrap_or(60),
        reconnect_s: file.reconnect_s.or(defaults.reconnect_s).unwrap_or(600),
        task_attempts: file.task_attempts.or(defaults.task_attempts).unwrap_or(2),
        mpi: file.mpi.or(defaults.mpi).unwrap_or(false),
        mpi_mca: file.mpi_mca.clone().unwrap_or_default(),
        controller_port: file
            .controller_port
            .or(defaults.controller_port)
            .unwrap_or(7120),
        setup: file.setup.clone().unwrap_or_default(),
        files: file.files.clone().unwrap_or_default(),
        ssh: ssh_access(
            file.ssh.clone().unwrap_or_default(),
            defaults.ssh.clone().unwrap_or_default(),
        ),
        ec2: None,
        hosts: Vec::new(),
    };
    spec.validate(origin)?;
    let mut spec = spec;
    check_provider_keys(origin, spec.provider, &file)?;
    match spec.provider {
        ProviderKind::Local => {}
        ProviderKind::Ec2 => spec.ec2 = Some(ec2_spec(origin, &file, &defaults, &spec.ssh)?),
        ProviderKind::Ssh => {
            let hosts = file.hosts.clone().unwrap_or_default();
            if hosts.is_empty() {
                return Err(field_error(origin, "hosts", "provider ssh needs the hosts to use, e.g.\n  hosts:\n    - host: 192.0.2.10\n    - host: node2.example.org\n      user: admin"));
            }
            spec.hosts = hosts
                .into_iter()
                .map(|h| HostSpec {
                    host: h.host,
                    user: h.user.unwrap_or_else(|| spec.ssh.user.clone()),
                    port: h.port.unwrap_or(spec.ssh.port),
                })
                .collect();
        }
    }
    Ok(spec)
}

fn ssh_access(file: SshFile, defaults: SshFile) -> SshAccessSpec {
    SshAccessSpec {
        user: file
            .user
            .or(defaults.user)
            .unwrap_or_else(|| UserName::new("ubuntu").expect("a valid user name")),
        key_file: file.key_file.or(defaults.key_file),
        port: file.port.or(defaults.port).unwrap_or(22),
        timeout_s: file.timeout_s.or(defaults.timeout_s).unwrap_or(300),
    }
}

/// Keys that mean something for one provider only are refused for the others, so a spec never
/// silently ignores what its author wrote.
fn check_provider_keys(
    origin: &str,
    provider: ProviderKind,
    file: &SpecFile,
) -> Result<(), SpecError> {
    let ec2_only = [
        ("region", file.region.is_some()),
        ("endpoint_url", file.endpoint_url.is_some()),
        ("image", file.image.is_some()),
        ("master_type", file.master_type.is_some()),
        ("node_type", file.node_type.is_some()),
        ("nodes", file.nodes.is_some()),
        ("spot", file.spot.is_some()),
        ("network", file.network.is_some()),
        ("tags", file.tags.is_some()),
    ];
    for (key, present) in ec2_only {
        if present && provider != ProviderKind::Ec2 {
            return Err(field_error(
                origin,
                key,
                &format!("applies to provider ec2 only; this spec's provider is {provider}"),
            ));
        }
    }
    if file.hosts.is_some() && provider != ProviderKind::Ssh {
        return Err(field_error(
            origin,
            "hosts",
            &format!("applies to provider ssh only; this spec's provider is {provider}"),
        ));
    }
    let remote_only = [
        ("setup", file.setup.is_some()),
        ("files", file.files.is_some()),
        ("ssh", file.ssh.is_some()),
    ];
    for (key, present) in remote_only {
        if present && provider == ProviderKind::Local {
            return Err(field_error(origin, key, "applies to clusters on other machines (provider ec2 or ssh); a local cluster runs where you are"));
        }
    }
    Ok(())
}

fn ec2_spec(
    origin: &str,
    file: &SpecFile,
    defaults: &SpecFile,
    ssh: &SshAccessSpec,
) -> Result<Ec2Spec, SpecError> {
    let region = file
        .region
        .clone()
        .or_else(|| defaults.region.clone())
        .ok_or_else(|| {
            field_error(
                origin,
                "region",
                "provider ec2 needs a region, e.g. region: us-east-1",
            )
        })?;
    let image = match file.image.clone().unwrap_or_default() {
        ImageFile {
            id: Some(id),
            name: None,
            owners: None,
        } => ImageSpec::Id(id),
        ImageFile {
            id: None,
            name: Some(pattern),
            owners,
        } => ImageSpec::Name {
            pattern,
            owners: owners.unwrap_or_default(),
        },
        ImageFile { id: Some(_), .. } => {
            return Err(field_error(
                origin,
                "image",
                "give either image.id or image.name (with image.owners), not both",
            ))
        }
        ImageFile {
            id: None,
            name: None,
            ..
        } => {
            return Err(field_error(
                origin,
                "image",
                "provider ec2 needs an image: image.id (ami-…) or image.name (a name pattern)",
            ))
        }
    };
    if ssh.key_file.is_none() {
        return Err(field_error(origin, "ssh.key_file", "provider ec2 needs a private key file; its public half (FILE.pub) becomes the cluster's key pair"));
    }
    if let Some(price) = file.spot.as_ref().and_then(|s| s.max_price.as_ref()) {
        if !price.parse::<f64>().is_ok_and(|p| p.is_finite() && p > 0.0) {
            return Err(field_error(
                origin,
                "spot.max_price",
                &format!("'{price}' is not a price; write dollars per hour, e.g. \"0.25\""),
            ));
        }
    }
    let net = file.network.clone().unwrap_or_default();
    let net_defaults = defaults.network.clone().unwrap_or_default();
    let ssh_cidrs = net.ssh_cidrs.ok_or_else(|| {
        field_error(origin, "network.ssh_cidrs", "say who may reach SSH on the nodes, e.g. [203.0.113.7/32] (your address); starling opens nothing to the world unasked")
    })?;
    let client_cidrs = net.client_cidrs.ok_or_else(|| {
        field_error(origin, "network.client_cidrs", "say who may reach the controller, e.g. [203.0.113.7/32]; [] keeps it reachable from inside the cluster only")
    })?;
    let nodes = file.nodes.or(defaults.nodes).unwrap_or(1);
    if nodes > 1000 {
        return Err(field_error(
            origin,
            "nodes",
            &format!("{nodes} is more than starling starts at once (1000)"),
        ));
    }
    Ok(Ec2Spec {
        region,
        endpoint_url: file.endpoint_url.clone(),
        image,
        master_type: file
            .master_type
            .clone()
            .or_else(|| defaults.master_type.clone())
            .expect("defaults name a master type"),
        node_type: file
            .node_type
            .clone()
            .or_else(|| defaults.node_type.clone())
            .expect("defaults name a node type"),
        nodes,
        spot: file.spot.clone(),
        network: NetworkSpec {
            vpc_id: net.vpc_id,
            subnet_id: net.subnet_id,
            use_private_ip: net
                .use_private_ip
                .or(net_defaults.use_private_ip)
                .unwrap_or(false),
            ssh_cidrs,
            client_cidrs,
        },
        tags: file.tags.clone().unwrap_or_default(),
    })
}

/// Reads a spec file.
pub fn load(path: &Path) -> Result<ClusterSpec, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&path.display().to_string(), &text)
}

impl ClusterSpec {
    fn validate(&self, origin: &str) -> Result<(), SpecError> {
        home::check_name("cluster", &self.name).map_err(|m| field_error(origin, "name", &m))?;
        if self.engines_per_node == Count::N(0) {
            return Err(field_error(
                origin,
                "engines_per_node",
                "must be at least 1, or \"auto\"",
            ));
        }
        if let Count::N(n) = self.engines_per_node {
            if n > MAX_ENGINES_PER_NODE {
                return Err(field_error(
                    origin,
                    "engines_per_node",
                    &format!("{n} is more engines than one node may host ({MAX_ENGINES_PER_NODE}); use more nodes, or \"auto\" for one per core"),
                ));
            }
        }
        for (name, value) in &self.mpi_mca {
            let word = |t: &str| {
                !t.is_empty()
                    && t.chars().all(|c| {
                        c.is_ascii_alphanumeric()
                            || matches!(c, '_' | ',' | '.' | '/' | ':' | '-' | '^')
                    })
            };
            if !word(name) || name.contains(['/', ':', ',']) {
                return Err(field_error(
                    origin,
                    "mpi_mca",
                    &format!(
                        "'{name}' is not an MCA parameter name; write e.g. btl_tcp_if_include"
                    ),
                ));
            }
            if !word(value) {
                return Err(field_error(origin, "mpi_mca", &format!("the value of {name}, '{value}', must be one word of letters, digits and _ , . / : - ^ (e.g. eth0, self,tcp or 10.0.0.0/16)")));
            }
        }
        if !self.mpi_mca.is_empty() && !self.mpi {
            return Err(field_error(
                origin,
                "mpi_mca",
                "is only used with `mpi: true`; add that, or remove mpi_mca",
            ));
        }
        if !(1..=100).contains(&self.task_attempts) {
            return Err(field_error(
                origin,
                "task_attempts",
                &format!(
                    "{} is out of range; use 1 (never run a task twice) to 100",
                    self.task_attempts
                ),
            ));
        }
        if self.reconnect_s > 7 * 24 * 3600 {
            return Err(field_error(
                origin,
                "reconnect_s",
                &format!(
                    "{} is out of range; use 0 to 604800 (a week)",
                    self.reconnect_s
                ),
            ));
        }
        if !(10..=600_000).contains(&self.heartbeat_ms) {
            return Err(field_error(
                origin,
                "heartbeat_ms",
                &format!("{} is out of range; use 10 to 600000", self.heartbeat_ms),
            ));
        }
        if !(1..=4096).contains(&self.max_frame_mb) {
            return Err(field_error(
                origin,
                "max_frame_mb",
                &format!("{} is out of range; use 1 to 4096", self.max_frame_mb),
            ));
        }
        if self.python.trim().is_empty() {
            return Err(field_error(
                origin,
                "python",
                "must name an interpreter, e.g. python3",
            ));
        }
        Ok(())
    }

    /// The frame limit in bytes.
    pub fn max_frame(&self) -> usize {
        (self.max_frame_mb as usize) * 1024 * 1024
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_template_and_an_empty_spec_are_valid() {
        let s = parse("templates/local.yaml", LOCAL_TEMPLATE).unwrap();
        assert_eq!(
            (s.name.as_str(), s.provider, s.engines_per_node),
            ("local", ProviderKind::Local, Count::N(4))
        );
        let s = parse("empty.yaml", "").unwrap();
        assert_eq!(s.heartbeat_ms, 1000);
        assert_eq!(s.engines_per_node, Count::Auto);
    }

    #[test]
    fn errors_name_the_file_line_column_and_fix() {
        let err = parse("c.yaml", "name: x\nengines_per_nod: 3\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("c.yaml:2:1: unknown field `engines_per_nod`"),
            "{err}"
        );
        assert!(
            err.contains("expected one of") && err.contains("README"),
            "{err}"
        );

        let err = parse("c.yaml", "name: x\nheartbeat_ms: soon\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("c.yaml:2:15: heartbeat_ms: invalid type"),
            "{err}"
        );

        let err = parse("c.yaml", "name: x\nsetup: [\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.yaml:3:"), "{err}");

        let err = parse("c.yaml", "engines_per_node: many\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("engines_per_node"), "{err}");

        let err = parse("c.yaml", "name: 'My Cluster'\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("c.yaml:1:7: name: 'My Cluster' is not a valid cluster name"),
            "{err}"
        );

        let err = parse("c.yaml", "engines_per_node: 0\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "c.yaml: engines_per_node: must be at least 1, or \"auto\""
        );
    }
}
