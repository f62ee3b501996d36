//! Value types of the spec that check themselves while the YAML is read, so a bad value is
//! reported with the file's line and column like any syntax error.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::home;

macro_rules! checked_string {
    ($(#[$doc:meta])* $name:ident, $check:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn new(text: &str) -> Result<Self, String> {
                let check: fn(&str) -> Result<(), String> = $check;
                check(text).map(|()| Self(text.to_string()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str(concat!("a ", stringify!($name)))
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$name, E> {
                        $name::new(v).map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

checked_string!(
    /// A cluster name: 1–40 lowercase letters, digits and `-`. Checked before it reaches a
    /// tag, a path or a remote shell.
    ClusterName,
    |s| home::check_name("cluster", s)
);

checked_string!(
    /// An IPv4 or IPv6 network in CIDR notation, e.g. `203.0.113.0/24`.
    Cidr,
    |s| {
        let bad = || format!("'{s}' is not a CIDR block; write an address and a prefix length, e.g. 203.0.113.7/32");
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        let ip: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
        let len: u8 = len.parse().map_err(|_| bad())?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(format!("'{s}': a prefix length is at most {max}"));
        }
        Ok(())
    }
);

checked_string!(
    /// An EC2 instance type, e.g. `t3.medium` or `c6i.2xlarge`.
    InstanceType,
    |s| {
        let ok = s.split_once('.').is_some_and(|(family, size)| {
            !family.is_empty()
                && !size.is_empty()
                && family.starts_with(|c: char| c.is_ascii_lowercase())
                && family.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && size.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        });
        if ok {
            Ok(())
        } else {
            Err(format!("'{s}' is not an EC2 instance type; write family.size, e.g. t3.medium or c6i.2xlarge"))
        }
    }
);

checked_string!(
    /// An AMI id, e.g. `ami-0abcdef1234567890`.
    AmiId,
    |s| {
        let ok = s.strip_prefix("ami-").is_some_and(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_hexdigit()));
        if ok {
            Ok(())
        } else {
            Err(format!("'{s}' is not an AMI id; AMI ids look like ami-0abcdef1234567890 (or give image.name to search by name)"))
        }
    }
);

checked_string!(
    /// An AWS region, e.g. `us-east-1`.
    Region,
    |s| {
        let parts: Vec<&str> = s.split('-').collect();
        let ok = parts.len() >= 3
            && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()))
            && parts.last().is_some_and(|p| p.chars().all(|c| c.is_ascii_digit()));
        if ok {
            Ok(())
        } else {
            Err(format!("'{s}' is not an AWS region; write e.g. us-east-1 or eu-west-2"))
        }
    }
);

checked_string!(
    /// A URL for the EC2 endpoint, e.g. `http://127.0.0.1:4566` for LocalStack.
    EndpointUrl,
    |s| {
        let rest = s.strip_prefix("http://").or_else(|| s.strip_prefix("https://"));
        if rest.is_some_and(|r| !r.is_empty() && !r.contains(char::is_whitespace)) {
            Ok(())
        } else {
            Err(format!("'{s}' is not an endpoint URL; write e.g. http://127.0.0.1:4566"))
        }
    }
);

checked_string!(
    /// A host name or address to reach by SSH.
    HostName,
    |s| {
        let ok = !s.is_empty()
            && s.len() <= 253
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'))
            && !s.starts_with('-');
        if ok {
            Ok(())
        } else {
            Err(format!("'{s}' is not a host name or address"))
        }
    }
);

checked_string!(
    /// A login user name.
    UserName,
    |s| {
        let ok = !s.is_empty()
            && s.len() <= 32
            && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            && !s.starts_with('-');
        if ok {
            Ok(())
        } else {
            Err(format!("'{s}' is not a user name; use letters, digits, '_', '-' and '.'"))
        }
    }
);

checked_string!(
    /// An EC2 tag key: 1–128 characters, not starting with `aws:` or `starling:` (reserved).
    TagKey,
    |s| {
        if s.is_empty() || s.len() > 128 {
            Err(format!("tag key '{s}' must have 1 to 128 characters"))
        } else if s.starts_with("aws:") || s.starts_with("starling:") {
            Err(format!("tag key '{s}' is reserved: keys starting with aws: or starling: are not yours to set"))
        } else {
            Ok(())
        }
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_checked_with_a_fix_in_the_message() {
        assert!(Cidr::new("127.0.0.0/8").is_ok());
        assert!(Cidr::new("::1/128").is_ok());
        assert!(Cidr::new("127.0.0.1")
            .unwrap_err()
            .contains("e.g. 203.0.113.7/32"));
        assert!(Cidr::new("127.0.0.0/33")
            .unwrap_err()
            .contains("at most 32"));
        assert!(InstanceType::new("c6i.2xlarge").is_ok());
        assert!(InstanceType::new("large")
            .unwrap_err()
            .contains("e.g. t3.medium"));
        assert!(AmiId::new("ami-0abc123").is_ok());
        assert!(AmiId::new("ubuntu").unwrap_err().contains("image.name"));
        assert!(Region::new("us-east-1").is_ok());
        assert!(Region::new("useast").is_err());
        assert!(EndpointUrl::new("http://127.0.0.1:4566").is_ok());
        assert!(EndpointUrl::new("127.0.0.1:4566").is_err());
        assert!(HostName::new("127.0.0.5").is_ok());
        assert!(HostName::new("a;rm -rf").is_err());
        assert!(UserName::new("ubuntu").is_ok());
        assert!(UserName::new("$(id)").is_err());
        assert!(TagKey::new("team").is_ok());
        assert!(TagKey::new("starling:cluster")
            .unwrap_err()
            .contains("reserved"));
    }
}
