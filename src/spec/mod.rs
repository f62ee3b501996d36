//! The YAML cluster spec: its types, the defaults merged under it, and validation.
//!
//! A spec file is read into [`SpecFile`] (every field optional, unknown keys refused, each
//! error carrying the file's line and column), then laid over `config/defaults.yaml` to give a
//! complete [`ClusterSpec`]. [`types`] holds the value types that check themselves as they are
//! read (names, CIDR blocks, instance types, AMI ids), so a bad value is reported with its line
//! and column. Nothing here touches the network.

pub mod types;

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::home;

/// `config/defaults.yaml`, built in.
pub const DEFAULTS_YAML: &str = include_str!("../../config/defaults.yaml");
/// `templates/local.yaml`, built in: the spec `up --local` starts from.
pub const LOCAL_TEMPLATE: &str = include_str!("../../templates/local.yaml");

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
    pub name: Option<String>,
    pub provider: Option<ProviderKind>,
    pub engines_per_node: Option<Count>,
    pub python: Option<String>,
    pub heartbeat_ms: Option<u64>,
    pub max_frame_mb: Option<u64>,
    pub register_timeout_s: Option<u64>,
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
        name: file.name.unwrap_or_else(|| "local".to_string()),
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
            .or(defaults.python)
            .unwrap_or_else(|| "python3".into()),
        heartbeat_ms: file.heartbeat_ms.or(defaults.heartbeat_ms).unwrap_or(1000),
        max_frame_mb: file.max_frame_mb.or(defaults.max_frame_mb).unwrap_or(64),
        register_timeout_s: file
            .register_timeout_s
            .or(defaults.register_timeout_s)
            .unwrap_or(60),
    };
    spec.validate(origin)?;
    Ok(spec)
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

        let err = parse("c.yaml", "name: x\n  bad: [\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.yaml:2:"), "{err}");

        let err = parse("c.yaml", "engines_per_node: many\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("engines_per_node"), "{err}");

        let err = parse("c.yaml", "name: 'My Cluster'\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("name: 'My Cluster' is not a valid cluster name"),
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
