//! The EC2 layer: every call starling makes to the EC2 API (aws-sdk-ec2; LocalStack through
//! `endpoint_url` or `AWS_ENDPOINT_URL`), and what its errors mean for the user.
//!
//! Everything a cluster owns is tagged `starling:cluster=NAME` when it is created (instances
//! and their volumes with `starling:role`, `starling:node` and `Name` too), so the state of a
//! cluster is read back from EC2 — by anyone with the same account — and `down` finds all of
//! it, even after a `up` that was interrupted half-way. Teardown order is what AWS needs:
//! instances terminated and gone, then the security group (retried while AWS still says
//! `DependencyViolation`), then the key pair.

use std::fmt::Write as _;
use std::time::Duration;

use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::primitives::Blob;
use aws_sdk_ec2::types::{
    Filter, InstanceMarketOptionsRequest, InstanceStateName, IpPermission, IpRange, MarketType,
    ResourceType, SpotMarketOptions, Tag, TagSpecification, UserIdGroupPair,
};
use tokio::time::Instant;

use crate::provider::ProviderError;
use crate::spec::cloud::ImageSpec;

/// Tag keys.
pub const TAG_CLUSTER: &str = "starling:cluster";
pub const TAG_ROLE: &str = "starling:role";
pub const TAG_NODE: &str = "starling:node";
pub const TAG_USER: &str = "starling:user";
/// How starling reaches the node: `private` or `public` address, and the SSH port.
pub const TAG_ADDRESS: &str = "starling:address";
pub const TAG_SSH_PORT: &str = "starling:ssh-port";

/// Attempts per API call (the SDK's standard retry: throttling such as RequestLimitExceeded,
/// and transient server errors, with jittered exponential backoff).
pub const API_ATTEMPTS: u32 = 6;
/// How often waits poll EC2.
const POLL: Duration = Duration::from_secs(1);
/// How long `down` keeps retrying to delete a security group that AWS says is still in use.
pub const GROUP_DELETE_PATIENCE: Duration = Duration::from_secs(300);

/// An EC2 region's API, as starling uses it.
#[derive(Clone)]
pub struct Ec2 {
    client: aws_sdk_ec2::Client,
    region: String,
}

/// One instance of a cluster, as its tags and EC2 describe it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Instance {
    pub id: String,
    pub cluster: String,
    /// `master` or `node`.
    pub role: String,
    /// `master`, `node001`, …
    pub node: String,
    pub state: String,
    pub instance_type: String,
    pub private_ip: Option<String>,
    pub public_ip: Option<String>,
    /// Seconds since the epoch.
    pub launched: Option<i64>,
    pub user: Option<String>,
    /// From the tags: reached at its private address.
    pub reach_private: Option<bool>,
    pub ssh_port: Option<u16>,
    pub spot: bool,
}

impl Instance {
    /// The address starling reaches the instance at.
    pub fn address(&self, use_private_ip: bool) -> Result<String, ProviderError> {
        let ip = if use_private_ip {
            self.private_ip.as_ref()
        } else {
            self.public_ip.as_ref()
        };
        ip.cloned().ok_or_else(|| {
            ProviderError::Cloud(if use_private_ip {
                format!("{} ({}) has no private address yet", self.node, self.id)
            } else {
                format!(
                    "{} ({}) has no public address: set `network.use_private_ip: true` when starling runs inside the VPC, or use a subnet that gives instances public addresses",
                    self.node, self.id
                )
            })
        })
    }
}

/// What exists of a cluster in EC2.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Resources {
    pub instances: Vec<Instance>,
    /// Security group ids.
    pub security_groups: Vec<String>,
    /// Key pair names.
    pub key_pairs: Vec<String>,
}

impl Resources {
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty() && self.security_groups.is_empty() && self.key_pairs.is_empty()
    }

    /// One line per kind, for "this is what exists" messages.
    pub fn describe(&self) -> String {
        let mut lines = Vec::new();
        if !self.instances.is_empty() {
            let list: Vec<String> = self
                .instances
                .iter()
                .map(|i| format!("{} {} ({})", i.node, i.id, i.state))
                .collect();
            lines.push(format!(
                "{} instance(s): {}",
                self.instances.len(),
                list.join(", ")
            ));
        }
        if !self.security_groups.is_empty() {
            lines.push(format!(
                "security group {}",
                self.security_groups.join(", ")
            ));
        }
        if !self.key_pairs.is_empty() {
            lines.push(format!("key pair {}", self.key_pairs.join(", ")));
        }
        if lines.is_empty() {
            "nothing".into()
        } else {
            lines.join("; ")
        }
    }
}

/// What a new instance is.
#[derive(Debug, Clone)]
pub struct LaunchRequest {
    pub cluster: String,
    pub image_id: String,
    pub key_name: String,
    pub security_group: String,
    pub subnet_id: Option<String>,
    pub user: String,
    pub ssh_port: u16,
    pub use_private_ip: bool,
    /// `Some(max price)` for spot (`""` for up to the on-demand price).
    pub spot: Option<String>,
    pub extra_tags: Vec<(String, String)>,
}

/// The name of a cluster's key pair and security group.
pub fn resource_name(cluster: &str) -> String {
    format!("starling-{cluster}")
}

fn tag(key: &str, value: &str) -> Tag {
    Tag::builder().key(key).value(value).build()
}

fn tags_for(kind: ResourceType, tags: &[(String, String)]) -> TagSpecification {
    let mut spec = TagSpecification::builder().resource_type(kind);
    for (k, v) in tags {
        spec = spec.tags(tag(k, v));
    }
    spec.build()
}

fn filter(name: &str, values: &[&str]) -> Filter {
    let mut f = Filter::builder().name(name);
    for v in values {
        f = f.values(*v);
    }
    f.build()
}

/// The HTTPS client for the EC2 API: rustls with aws-lc-rs, like the rest of starling.
fn https_client() -> aws_sdk_ec2::config::SharedHttpClient {
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
    aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::AwsLc))
        .build_https()
}

/// Turns an SDK error into the user's words: what starling was doing, what EC2 said, and what
/// to do about it.
pub(crate) fn explain<E, R>(doing: &str, err: &SdkError<E, R>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let Some(code) = err.code() else {
        // No answer from EC2 at all: the endpoint, the network, the credentials chain.
        let context = DisplayErrorContext(err).to_string();
        let hint = if context.contains("credentials") {
            "set AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or a profile)"
        } else {
            "check the region and `endpoint_url` (or AWS_ENDPOINT_URL), and that the endpoint is reachable"
        };
        return ProviderError::Cloud(format!(
            "{doing}: no answer from the EC2 API ({context}); {hint}"
        ));
    };
    let said = err.message().unwrap_or("");
    let hint = match code {
        "AuthFailure" | "UnauthorizedOperation" | "InvalidClientTokenId" | "SignatureDoesNotMatch" => {
            "check the AWS credentials and that they may use EC2 in this region"
        }
        "InvalidAMIID.NotFound" | "InvalidAMIID.Malformed" | "InvalidAMIID.Unavailable" => {
            "AMIs are per region: look the image up in this region, or use `image: {name: …}`"
        }
        "InsufficientInstanceCapacity" | "InsufficientHostCapacity" => {
            "EC2 has no capacity for this instance type here right now: try another instance type, another subnet (availability zone), or again later"
        }
        "InstanceLimitExceeded" | "VcpuLimitExceeded" | "MaxSpotInstanceCountExceeded" => {
            "the account's instance limit is reached: use fewer or smaller nodes, or ask AWS for a higher limit"
        }
        "RequestLimitExceeded" | "Throttling" => {
            "EC2 throttled starling even after retries: wait a minute and run the command again"
        }
        "InvalidSubnetID.NotFound" | "InvalidVpcID.NotFound" => {
            "check `network.subnet_id` and `network.vpc_id`: they must exist in this region"
        }
        "SpotMaxPriceTooLow" => "raise `spot.max_price`, or drop it to pay up to the on-demand price",
        "InvalidKeyPair.Format" => "the public half of `ssh.key_file` is not an SSH public key EC2 accepts (use ed25519 or RSA)",
        "Unsupported" | "InvalidParameterCombination" => {
            "this instance type is not offered with these settings here: try another instance type or subnet"
        }
        _ => "",
    };
    let mut msg = format!("{doing}: EC2 said {code}");
    if !said.is_empty() {
        let _ = write!(msg, " ({said})");
    }
    if !hint.is_empty() {
        msg.push_str("; ");
        msg.push_str(hint);
    }
    ProviderError::Cloud(msg)
}

fn instance_from(i: &aws_sdk_ec2::types::Instance) -> Option<Instance> {
    let tag_value = |key: &str| {
        i.tags()
            .iter()
            .find(|t| t.key() == Some(key))
            .and_then(|t| t.value())
            .map(str::to_string)
    };
    Some(Instance {
        id: i.instance_id()?.to_string(),
        cluster: tag_value(TAG_CLUSTER)?,
        role: tag_value(TAG_ROLE).unwrap_or_default(),
        node: tag_value(TAG_NODE).unwrap_or_default(),
        state: i
            .state()
            .and_then(|s| s.name())
            .map_or_else(|| "unknown".into(), |n| n.as_str().to_string()),
        instance_type: i
            .instance_type()
            .map(|t| t.as_str().to_string())
            .unwrap_or_default(),
        private_ip: i.private_ip_address().map(str::to_string),
        public_ip: i.public_ip_address().map(str::to_string),
        launched: i.launch_time().map(aws_sdk_ec2::primitives::DateTime::secs),
        user: tag_value(TAG_USER),
        reach_private: tag_value(TAG_ADDRESS).map(|v| v == "private"),
        ssh_port: tag_value(TAG_SSH_PORT).and_then(|p| p.parse().ok()),
        spot: i.instance_lifecycle().is_some_and(|l| l.as_str() == "spot"),
    })
}

impl Ec2 {
    /// The EC2 API of `region`, at `endpoint` if given (else AWS_ENDPOINT_URL_EC2 /
    /// AWS_ENDPOINT_URL, else AWS). Credentials come from the usual AWS chain.
    pub async fn connect(region: &str, endpoint: Option<&str>) -> Self {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_string()))
            .http_client(https_client())
            .retry_config(
                aws_config::retry::RetryConfig::standard().with_max_attempts(API_ATTEMPTS),
            );
        if let Some(url) = endpoint {
            loader = loader.endpoint_url(url);
        }
        let config = loader.load().await;
        Self {
            client: aws_sdk_ec2::Client::new(&config),
            region: region.to_string(),
        }
    }

    /// Wraps a ready client (tests give one that replays recorded responses).
    pub fn from_client(client: aws_sdk_ec2::Client, region: &str) -> Self {
        Self {
            client,
            region: region.to_string(),
        }
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// The live (not terminated) instances of one cluster, or of every starling cluster.
    pub async fn instances(&self, cluster: Option<&str>) -> Result<Vec<Instance>, ProviderError> {
        let states = ["pending", "running", "stopping", "stopped", "shutting-down"];
        let by_tag = match cluster {
            Some(c) => filter(&format!("tag:{TAG_CLUSTER}"), &[c]),
            None => filter("tag-key", &[TAG_CLUSTER]),
        };
        let mut out = Vec::new();
        let mut pages = self
            .client
            .describe_instances()
            .filters(by_tag)
            .filters(filter("instance-state-name", &states))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| explain("listing the cluster's instances", &e))?;
            for r in page.reservations() {
                out.extend(r.instances().iter().filter_map(instance_from));
            }
        }
        out.sort_by(|a, b| (&a.cluster, &a.node).cmp(&(&b.cluster, &b.node)));
        Ok(out)
    }

    /// Checks that the image exists here and returns its id (the newest match for a name).
    pub async fn resolve_image(&self, image: &ImageSpec) -> Result<String, ProviderError> {
        match image {
            ImageSpec::Id(id) => {
                let out = self
                    .client
                    .describe_images()
                    .image_ids(id.as_str())
                    .send()
                    .await;
                let missing = || {
                    ProviderError::Cloud(format!(
                        "the AMI {} does not exist in {} (or this account may not use it); AMIs are per region: look the image up in this region, or use `image: {{name: …}}`",
                        id.as_str(),
                        self.region
                    ))
                };
                match out {
                    Ok(o) if !o.images().is_empty() => Ok(id.as_str().to_string()),
                    Ok(_) => Err(missing()),
                    Err(e) if e.code().is_some_and(|c| c.starts_with("InvalidAMIID")) => {
                        Err(missing())
                    }
                    Err(e) => Err(explain("looking up the AMI", &e)),
                }
            }
            ImageSpec::Name { pattern, owners } => {
                let mut req = self
                    .client
                    .describe_images()
                    .filters(filter("name", &[pattern.as_str()]))
                    .filters(filter("state", &["available"]));
                for o in owners {
                    req = req.owners(o);
                }
                let out = req
                    .send()
                    .await
                    .map_err(|e| explain("looking up the AMI by name", &e))?;
                out.images()
                    .iter()
                    .filter(|i| i.image_id().is_some())
                    .max_by(|a, b| a.creation_date().cmp(&b.creation_date()))
                    .and_then(|i| i.image_id())
                    .map(str::to_string)
                    .ok_or_else(|| {
                        ProviderError::Cloud(format!(
                            "no available AMI in {} matches the name '{pattern}'{}; check the pattern (`*` is the wildcard) and `image.owners`",
                            self.region,
                            if owners.is_empty() { String::new() } else { format!(" owned by {}", owners.join(", ")) }
                        ))
                    })
            }
        }
    }

    /// Imports `public_key` as the cluster's key pair, unless a key pair of that name exists.
    pub async fn ensure_key_pair(
        &self,
        cluster: &str,
        public_key: &str,
    ) -> Result<String, ProviderError> {
        let name = resource_name(cluster);
        if !self.key_pairs(cluster).await?.is_empty() {
            return Ok(name);
        }
        let tags = vec![
            (TAG_CLUSTER.to_string(), cluster.to_string()),
            ("Name".to_string(), name.clone()),
        ];
        let out = self
            .client
            .import_key_pair()
            .key_name(&name)
            .public_key_material(Blob::new(public_key.trim().as_bytes()))
            .tag_specifications(tags_for(ResourceType::KeyPair, &tags))
            .send()
            .await;
        match out {
            Ok(_) => Ok(name),
            Err(e) if e.code() == Some("InvalidKeyPair.Duplicate") => Ok(name),
            Err(e) => Err(explain(
                "importing the SSH key as the cluster's key pair",
                &e,
            )),
        }
    }

    /// The cluster's key pairs (by name: `starling-NAME`).
    pub async fn key_pairs(&self, cluster: &str) -> Result<Vec<String>, ProviderError> {
        let name = resource_name(cluster);
        let out = self
            .client
            .describe_key_pairs()
            .key_names(&name)
            .send()
            .await;
        match out {
            Ok(o) => Ok(o
                .key_pairs()
                .iter()
                .filter_map(|k| k.key_name().map(str::to_string))
                .collect()),
            Err(e) if e.code() == Some("InvalidKeyPair.NotFound") => Ok(Vec::new()),
            Err(e) => Err(explain("looking up the cluster's key pair", &e)),
        }
    }

    /// The VPC of a subnet.
    pub async fn subnet_vpc(&self, subnet: &str) -> Result<String, ProviderError> {
        let out = self
            .client
            .describe_subnets()
            .subnet_ids(subnet)
            .send()
            .await
            .map_err(|e| explain(&format!("looking up the subnet {subnet}"), &e))?;
        out.subnets()
            .first()
            .and_then(|s| s.vpc_id())
            .map(str::to_string)
            .ok_or_else(|| {
                ProviderError::Cloud(format!(
                    "the subnet {subnet} does not exist in {}",
                    self.region
                ))
            })
    }

    /// The cluster's security groups.
    pub async fn security_groups(&self, cluster: &str) -> Result<Vec<String>, ProviderError> {
        let out = self
            .client
            .describe_security_groups()
            .filters(filter(&format!("tag:{TAG_CLUSTER}"), &[cluster]))
            .send()
            .await
            .map_err(|e| explain("looking up the cluster's security group", &e))?;
        Ok(out
            .security_groups()
            .iter()
            .filter_map(|g| g.group_id().map(str::to_string))
            .collect())
    }

    /// Creates the cluster's security group (unless it exists): SSH from `ssh_cidrs`, the
    /// controller port from `client_cidrs`, and everything between members of the group.
    pub async fn ensure_security_group(
        &self,
        cluster: &str,
        vpc_id: Option<&str>,
        ssh_port: u16,
        controller_port: u16,
        ssh_cidrs: &[String],
        client_cidrs: &[String],
    ) -> Result<String, ProviderError> {
        if let Some(id) = self.security_groups(cluster).await?.into_iter().next() {
            return Ok(id);
        }
        let name = resource_name(cluster);
        let tags = vec![
            (TAG_CLUSTER.to_string(), cluster.to_string()),
            ("Name".to_string(), name.clone()),
        ];
        let mut req = self
            .client
            .create_security_group()
            .group_name(&name)
            .description(format!("starling cluster {cluster}"))
            .tag_specifications(tags_for(ResourceType::SecurityGroup, &tags));
        if let Some(vpc) = vpc_id {
            req = req.vpc_id(vpc);
        }
        let id = req
            .send()
            .await
            .map_err(|e| explain("creating the cluster's security group", &e))?
            .group_id()
            .map(str::to_string)
            .ok_or_else(|| {
                ProviderError::Cloud("EC2 created a security group without an id".into())
            })?;
        let tcp = |port: u16, cidrs: &[String]| {
            let mut p = IpPermission::builder()
                .ip_protocol("tcp")
                .from_port(i32::from(port))
                .to_port(i32::from(port));
            for c in cidrs {
                p = p.ip_ranges(IpRange::builder().cidr_ip(c).build());
            }
            p.build()
        };
        let mut req = self
            .client
            .authorize_security_group_ingress()
            .group_id(&id)
            .ip_permissions(
                IpPermission::builder()
                    .ip_protocol("-1")
                    .user_id_group_pairs(UserIdGroupPair::builder().group_id(&id).build())
                    .build(),
            );
        if !ssh_cidrs.is_empty() {
            req = req.ip_permissions(tcp(ssh_port, ssh_cidrs));
        }
        if !client_cidrs.is_empty() && controller_port != ssh_port {
            req = req.ip_permissions(tcp(controller_port, client_cidrs));
        }
        req.send()
            .await
            .map_err(|e| explain("opening the security group's ports", &e))?;
        Ok(id)
    }

    /// Launches one instance for `node`, tagged at launch so that nothing of the cluster is
    /// ever untagged.
    pub async fn launch(
        &self,
        req: &LaunchRequest,
        node: &str,
        role: &str,
        instance_type: &str,
    ) -> Result<Instance, ProviderError> {
        let mut tags = vec![
            (TAG_CLUSTER.to_string(), req.cluster.clone()),
            (TAG_ROLE.to_string(), role.to_string()),
            (TAG_NODE.to_string(), node.to_string()),
            (TAG_USER.to_string(), req.user.clone()),
            (TAG_SSH_PORT.to_string(), req.ssh_port.to_string()),
            (
                TAG_ADDRESS.to_string(),
                if req.use_private_ip {
                    "private"
                } else {
                    "public"
                }
                .to_string(),
            ),
            (
                "Name".to_string(),
                format!("starling-{}-{node}", req.cluster),
            ),
        ];
        tags.extend(req.extra_tags.iter().cloned());
        let mut run = self
            .client
            .run_instances()
            .image_id(&req.image_id)
            .instance_type(instance_type.into())
            .min_count(1)
            .max_count(1)
            .key_name(&req.key_name)
            .security_group_ids(&req.security_group)
            .tag_specifications(tags_for(ResourceType::Instance, &tags))
            .tag_specifications(tags_for(ResourceType::Volume, &tags));
        if let Some(subnet) = &req.subnet_id {
            run = run.subnet_id(subnet);
        }
        if let Some(price) = &req.spot {
            let mut opts = SpotMarketOptions::builder();
            if !price.is_empty() {
                opts = opts.max_price(price);
            }
            run = run.instance_market_options(
                InstanceMarketOptionsRequest::builder()
                    .market_type(MarketType::Spot)
                    .spot_options(opts.build())
                    .build(),
            );
        }
        let out = run.send().await.map_err(|e| {
            explain(
                &format!("launching {node} ({instance_type}, {})", req.image_id),
                &e,
            )
        })?;
        out.instances()
            .first()
            .and_then(instance_from)
            .ok_or_else(|| ProviderError::Cloud(format!("EC2 launched no instance for {node}")))
    }

    /// Waits until every instance in `ids` is running with an address; returns them.
    pub async fn wait_running(
        &self,
        ids: &[String],
        use_private_ip: bool,
        timeout: Duration,
    ) -> Result<Vec<Instance>, ProviderError> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self
                .client
                .describe_instances()
                .set_instance_ids(Some(ids.to_vec()))
                .send()
                .await
                .map_err(|e| explain("waiting for the instances to run", &e))?;
            let all: Vec<Instance> = out
                .reservations()
                .iter()
                .flat_map(aws_sdk_ec2::types::Reservation::instances)
                .filter_map(instance_from)
                .collect();
            if let Some(gone) = all
                .iter()
                .find(|i| matches!(i.state.as_str(), "terminated" | "shutting-down"))
            {
                return Err(ProviderError::Cloud(format!(
                    "{} ({}) was terminated while starting (a spot instance outbid, or a failed boot); see the instance's state reason in the EC2 console",
                    gone.node, gone.id
                )));
            }
            let ready = all.len() == ids.len()
                && all
                    .iter()
                    .all(|i| i.state == "running" && i.address(use_private_ip).is_ok());
            if ready {
                return Ok(all);
            }
            if Instant::now() >= deadline {
                let waiting: Vec<String> = all
                    .iter()
                    .filter(|i| i.state != "running")
                    .map(|i| format!("{} {} is {}", i.node, i.id, i.state))
                    .collect();
                return Err(ProviderError::Cloud(format!(
                    "the instances did not all run within {} s: {}",
                    timeout.as_secs(),
                    waiting.join(", ")
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Terminates instances and waits until EC2 reports them terminated.
    pub async fn terminate(&self, ids: &[String], timeout: Duration) -> Result<(), ProviderError> {
        if ids.is_empty() {
            return Ok(());
        }
        self.client
            .terminate_instances()
            .set_instance_ids(Some(ids.to_vec()))
            .send()
            .await
            .map_err(|e| explain("terminating the instances", &e))?;
        self.wait_state(ids, InstanceStateName::Terminated, timeout)
            .await
    }

    /// Stops (EBS-backed) instances and waits until they are stopped.
    pub async fn stop(&self, ids: &[String], timeout: Duration) -> Result<(), ProviderError> {
        self.client
            .stop_instances()
            .set_instance_ids(Some(ids.to_vec()))
            .send()
            .await
            .map_err(|e| explain("stopping the instances", &e))?;
        self.wait_state(ids, InstanceStateName::Stopped, timeout)
            .await
    }

    /// Starts stopped instances (the caller waits for them to run).
    pub async fn start(&self, ids: &[String]) -> Result<(), ProviderError> {
        self.client
            .start_instances()
            .set_instance_ids(Some(ids.to_vec()))
            .send()
            .await
            .map_err(|e| explain("starting the instances", &e))?;
        Ok(())
    }

    async fn wait_state(
        &self,
        ids: &[String],
        want: InstanceStateName,
        timeout: Duration,
    ) -> Result<(), ProviderError> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self
                .client
                .describe_instances()
                .set_instance_ids(Some(ids.to_vec()))
                .send()
                .await;
            let pending: Vec<String> = match out {
                Ok(o) => o
                    .reservations()
                    .iter()
                    .flat_map(aws_sdk_ec2::types::Reservation::instances)
                    .filter(|i| i.state().and_then(|s| s.name()) != Some(&want))
                    .filter_map(|i| i.instance_id().map(str::to_string))
                    .collect(),
                // Terminated instances eventually vanish from describe altogether.
                Err(e) if e.code() == Some("InvalidInstanceID.NotFound") => Vec::new(),
                Err(e) => return Err(explain("waiting for the instances", &e)),
            };
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ProviderError::Cloud(format!(
                    "{} did not reach '{}' within {} s; run the command again to keep waiting",
                    pending.join(", "),
                    want.as_str(),
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Deletes a security group, retrying while AWS says it is still in use
    /// (`DependencyViolation`: terminated instances hold their network interfaces for a while).
    pub async fn delete_security_group(
        &self,
        id: &str,
        patience: Duration,
    ) -> Result<(), ProviderError> {
        let deadline = Instant::now() + patience;
        let mut pause = Duration::from_secs(2);
        loop {
            match self.client.delete_security_group().group_id(id).send().await {
                Ok(_) => return Ok(()),
                Err(e) if e.code() == Some("InvalidGroup.NotFound") => return Ok(()),
                Err(e) if e.code() == Some("DependencyViolation") && Instant::now() < deadline => {
                    tracing::debug!("security group {id} still in use; retrying");
                    tokio::time::sleep(pause.min(deadline - Instant::now())).await;
                    pause = (pause * 2).min(Duration::from_secs(15));
                }
                Err(e) if e.code() == Some("DependencyViolation") => {
                    return Err(ProviderError::Cloud(format!(
                        "the security group {id} is still in use after {} s (an instance or network interface outside starling may use it); delete it in the EC2 console, or run `starling down` again",
                        patience.as_secs()
                    )))
                }
                Err(e) => return Err(explain(&format!("deleting the security group {id}"), &e)),
            }
        }
    }

    /// Deletes the cluster's key pair.
    pub async fn delete_key_pair(&self, name: &str) -> Result<(), ProviderError> {
        match self.client.delete_key_pair().key_name(name).send().await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("InvalidKeyPair.NotFound") => Ok(()),
            Err(e) => Err(explain(&format!("deleting the key pair {name}"), &e)),
        }
    }

    /// Everything of the cluster that exists in EC2.
    pub async fn resources(&self, cluster: &str) -> Result<Resources, ProviderError> {
        Ok(Resources {
            instances: self.instances(Some(cluster)).await?,
            security_groups: self.security_groups(cluster).await?,
            key_pairs: self.key_pairs(cluster).await?,
        })
    }

    /// Removes everything of the cluster, in the order AWS needs: instances (terminated and
    /// waited for), then security groups, then the key pair. Idempotent.
    pub async fn teardown(
        &self,
        cluster: &str,
        timeout: Duration,
    ) -> Result<Resources, ProviderError> {
        let found = self.resources(cluster).await?;
        let ids: Vec<String> = found.instances.iter().map(|i| i.id.clone()).collect();
        self.terminate(&ids, timeout).await?;
        for g in &found.security_groups {
            self.delete_security_group(g, GROUP_DELETE_PATIENCE).await?;
        }
        for k in &found.key_pairs {
            self.delete_key_pair(k).await?;
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    //! The EC2 layer against responses recorded from AWS, for what LocalStack does more
    //! leniently than AWS: a security group still in use, capacity errors, throttling.
    use super::*;
    use aws_smithy_http_client::test_util::{ReplayEvent, StaticReplayClient};
    use aws_smithy_types::body::SdkBody;

    fn response(status: u16, body: &str) -> http::Response<SdkBody> {
        http::Response::builder()
            .status(status)
            .body(SdkBody::from(body.to_string()))
            .unwrap()
    }

    fn ec2_with(responses: Vec<http::Response<SdkBody>>) -> (Ec2, StaticReplayClient) {
        let events = responses
            .into_iter()
            .map(|r| {
                let req = http::Request::builder()
                    .uri("https://ec2.us-east-1.amazonaws.com/")
                    .body(SdkBody::empty())
                    .unwrap();
                ReplayEvent::new(req, r)
            })
            .collect();
        let replay = StaticReplayClient::new(events);
        let config = aws_sdk_ec2::Config::builder()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(aws_sdk_ec2::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_ec2::config::Credentials::for_tests())
            .http_client(replay.clone())
            .retry_config(
                aws_sdk_ec2::config::retry::RetryConfig::standard().with_max_attempts(API_ATTEMPTS),
            )
            .build();
        (
            Ec2::from_client(aws_sdk_ec2::Client::from_conf(config), "us-east-1"),
            replay,
        )
    }

    fn actions(replay: &StaticReplayClient) -> Vec<String> {
        replay
            .actual_requests()
            .map(|r| {
                let body = std::str::from_utf8(r.body().bytes().unwrap_or_default()).unwrap_or("");
                body.split('&')
                    .find_map(|kv| kv.strip_prefix("Action="))
                    .unwrap_or("")
                    .to_string()
            })
            .collect()
    }

    const DEPENDENCY_VIOLATION: &str =
        include_str!("../../../tests/recorded/ec2/delete_security_group_dependency_violation.xml");
    const DELETED: &str = include_str!("../../../tests/recorded/ec2/delete_security_group_ok.xml");
    const NO_CAPACITY: &str =
        include_str!("../../../tests/recorded/ec2/run_instances_insufficient_capacity.xml");
    const THROTTLED: &str = include_str!("../../../tests/recorded/ec2/request_limit_exceeded.xml");
    const DESCRIBED: &str = include_str!("../../../tests/recorded/ec2/describe_instances.xml");

    #[tokio::test(start_paused = true)]
    async fn a_group_still_in_use_is_deleted_once_aws_lets_go() {
        let (ec2, replay) = ec2_with(vec![
            response(400, DEPENDENCY_VIOLATION),
            response(400, DEPENDENCY_VIOLATION),
            response(400, DEPENDENCY_VIOLATION),
            response(200, DELETED),
        ]);
        ec2.delete_security_group("sg-0d1f2e3c4b5a69788", GROUP_DELETE_PATIENCE)
            .await
            .expect("deleted after the instances let go");
        assert_eq!(actions(&replay), vec!["DeleteSecurityGroup"; 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_group_that_stays_in_use_is_reported_with_what_to_do() {
        let (ec2, replay) = ec2_with(
            (0..40)
                .map(|_| response(400, DEPENDENCY_VIOLATION))
                .collect(),
        );
        let err = ec2
            .delete_security_group("sg-0d1f2e3c4b5a69788", Duration::from_secs(30))
            .await
            .expect_err("gives up after its patience");
        let msg = err.to_string();
        assert!(
            msg.contains("sg-0d1f2e3c4b5a69788 is still in use"),
            "{msg}"
        );
        assert!(msg.contains("starling down"), "{msg}");
        let tries = actions(&replay).len();
        assert!(
            (3..40).contains(&tries),
            "retried with backoff: {tries} calls"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_capacity_names_the_instance_type_and_the_way_out() {
        let (ec2, replay) = ec2_with(
            (0..API_ATTEMPTS as usize)
                .map(|_| response(500, NO_CAPACITY))
                .collect(),
        );
        let req = LaunchRequest {
            cluster: "science".into(),
            image_id: "ami-0fc5d935ebf8bc3bc".into(),
            key_name: "starling-science".into(),
            security_group: "sg-0d1f2e3c4b5a69788".into(),
            subnet_id: None,
            user: "ubuntu".into(),
            ssh_port: 22,
            use_private_ip: false,
            spot: None,
            extra_tags: vec![],
        };
        let err = ec2
            .launch(&req, "node001", "node", "c7i.48xlarge")
            .await
            .expect_err("no capacity");
        let msg = err.to_string();
        assert!(msg.contains("launching node001 (c7i.48xlarge"), "{msg}");
        assert!(msg.contains("InsufficientInstanceCapacity"), "{msg}");
        assert!(msg.contains("try another instance type"), "{msg}");
        assert_eq!(actions(&replay).len(), API_ATTEMPTS as usize);
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_is_retried_until_ec2_answers() {
        let (ec2, replay) = ec2_with(vec![
            response(503, THROTTLED),
            response(503, THROTTLED),
            response(200, DESCRIBED),
        ]);
        let found = ec2
            .instances(Some("science"))
            .await
            .expect("answered on the third try");
        assert_eq!(actions(&replay), vec!["DescribeInstances"; 3]);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].node, "master");
        assert_eq!(found[0].private_ip.as_deref(), Some("127.0.1.17"));
        assert_eq!(found[1].node, "node001");
        assert_eq!(found[1].role, "node");
        assert_eq!(found[1].user.as_deref(), Some("ubuntu"));
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_that_never_ends_says_so() {
        let (ec2, _replay) = ec2_with(
            (0..API_ATTEMPTS as usize)
                .map(|_| response(503, THROTTLED))
                .collect(),
        );
        let err = ec2.instances(None).await.expect_err("still throttled");
        let msg = err.to_string();
        assert!(msg.contains("RequestLimitExceeded"), "{msg}");
        assert!(msg.contains("wait a minute"), "{msg}");
    }
}
