//! The parts of a spec for clusters on other machines: EC2 instances (or LocalStack) and listed
//! SSH hosts. As written ([`CloudFile`], every key optional, unknown keys refused) and complete
//! ([`Ec2Spec`], [`SshAccessSpec`], [`HostSpec`]).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::types::{AmiId, Cidr, EndpointUrl, HostName, InstanceType, Region, TagKey, UserName};

/// The image instances boot from: an AMI id, or the newest image whose name matches.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageFile {
    pub id: Option<AmiId>,
    /// A name pattern, `*` as wildcard, e.g. `ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-amd64-server-*`.
    pub name: Option<String>,
    /// Account ids (or `amazon`, `self`) that may own a named image.
    pub owners: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ImageSpec {
    Id(AmiId),
    Name {
        pattern: String,
        owners: Vec<String>,
    },
}

/// Spot instances, at most at `max_price` dollars an hour (default: the on-demand price).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpotFile {
    pub max_price: Option<String>,
}

/// How to log in to the nodes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshFile {
    pub user: Option<UserName>,
    /// A private key file; for EC2 its public half (`FILE.pub`) is imported as the cluster's
    /// key pair.
    pub key_file: Option<PathBuf>,
    pub port: Option<u16>,
    /// How long to keep trying to log in to a node (sshd starting, key not yet installed).
    pub timeout_s: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SshAccessSpec {
    pub user: UserName,
    pub key_file: Option<PathBuf>,
    pub port: u16,
    pub timeout_s: u64,
}

/// Where the instances live and who may reach them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkFile {
    pub vpc_id: Option<String>,
    pub subnet_id: Option<String>,
    /// Reach nodes at their private addresses (from inside the VPC, or LocalStack).
    pub use_private_ip: Option<bool>,
    /// Who may reach SSH (port 22 or `ssh.port`).
    pub ssh_cidrs: Option<Vec<Cidr>>,
    /// Who may reach the controller port (clients).
    pub client_cidrs: Option<Vec<Cidr>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkSpec {
    pub vpc_id: Option<String>,
    pub subnet_id: Option<String>,
    pub use_private_ip: bool,
    pub ssh_cidrs: Vec<Cidr>,
    pub client_cidrs: Vec<Cidr>,
}

/// A file to copy to every node before the engines start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCopy {
    /// A file on this machine.
    pub src: PathBuf,
    /// Where it goes on the node, relative to the login user's home unless absolute.
    pub dest: String,
}

/// One host of the `ssh` provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostFile {
    pub host: HostName,
    pub user: Option<UserName>,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostSpec {
    pub host: HostName,
    pub user: UserName,
    pub port: u16,
}

/// What an EC2 cluster needs beyond the common keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ec2Spec {
    pub region: Region,
    pub endpoint_url: Option<EndpointUrl>,
    pub image: ImageSpec,
    pub master_type: InstanceType,
    pub node_type: InstanceType,
    /// Worker nodes besides the master.
    pub nodes: u32,
    /// `None` for on-demand instances.
    pub spot: Option<SpotFile>,
    pub network: NetworkSpec,
    pub tags: BTreeMap<TagKey, String>,
}
