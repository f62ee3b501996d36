//! Authentication: the first frames on every connection, inside TLS.
//!
//! The controller opens with [`Hello`] (protocol version and a fresh random nonce); the peer
//! answers with [`Auth`]: its role, its version and an HMAC-SHA256 of the nonce under the key for
//! that role. The key itself never crosses the wire. The controller answers [`Verdict`] and, on
//! a refusal, closes the connection.
//!
//! Everything here is pure — no sockets — so the handshake is unit-tested on its own; the thin
//! socket code lives in [`super::conn`].

use aws_lc_rs::hmac;
use serde::{Deserialize, Serialize};

use super::PROTOCOL_VERSION;

/// Bytes of the random nonce the controller sends.
pub const NONCE_LEN: usize = 32;

/// Who is connecting; each role has its own key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Client,
    Engine,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Client => "client",
            Role::Engine => "engine",
        })
    }
}

/// A shared secret: 32 random bytes, written as hex in config and connection files.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(…)")
    }
}

impl Key {
    /// A new random key.
    pub fn generate() -> Self {
        use aws_lc_rs::rand::SecureRandom;
        let mut bytes = vec![0u8; 32];
        aws_lc_rs::rand::SystemRandom::new()
            .fill(&mut bytes)
            .expect("the system random source works");
        Self(bytes)
    }

    /// Parses the hex form.
    pub fn from_hex(text: &str) -> Result<Self, String> {
        let bytes = hex::decode(text.trim()).map_err(|e| format!("not a hex key: {e}"))?;
        if bytes.len() < 16 {
            return Err(format!(
                "a key needs at least 16 bytes (32 hex digits), this one has {}",
                bytes.len()
            ));
        }
        Ok(Self(bytes))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(&self.0)
    }

    fn mac(&self, role: Role, version: u32, nonce: &[u8]) -> hmac::Tag {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.0);
        hmac::sign(&key, &transcript(role, version, nonce))
    }
}

impl Serialize for Key {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Key::from_hex(&text).map_err(serde::de::Error::custom)
    }
}

fn transcript(role: Role, version: u32, nonce: &[u8]) -> Vec<u8> {
    let mut t = b"starling-auth\0".to_vec();
    t.extend_from_slice(role.to_string().as_bytes());
    t.push(0);
    t.extend_from_slice(&version.to_be_bytes());
    t.extend_from_slice(nonce);
    t
}

/// Controller → peer, first frame.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub nonce: Vec<u8>,
}

/// Peer → controller, first frame.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Auth {
    pub version: u32,
    pub role: Role,
    pub mac: Vec<u8>,
}

/// Controller → peer, second frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    Welcome,
    Refused(Refusal),
}

/// Why the controller refused a peer. Sent to the peer and logged by the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("protocol version mismatch: the controller speaks version {controller}, this {role} speaks {peer}; use the same starling release on both sides")]
    Version {
        controller: u32,
        peer: u32,
        role: Role,
    },
    #[error("the {0} key is wrong: check that the connection file belongs to this cluster (`starling connect NAME` fetches it again)")]
    BadKey(Role),
}

/// The controller's half of the handshake.
pub struct ServerHandshake {
    nonce: Vec<u8>,
}

impl ServerHandshake {
    /// Starts a handshake with a fresh nonce.
    pub fn new() -> Self {
        use aws_lc_rs::rand::SecureRandom;
        let mut nonce = vec![0u8; NONCE_LEN];
        aws_lc_rs::rand::SystemRandom::new()
            .fill(&mut nonce)
            .expect("the system random source works");
        Self { nonce }
    }

    /// The first frame to send.
    pub fn hello(&self) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            nonce: self.nonce.clone(),
        }
    }

    /// Checks the peer's answer against the keys; returns its role or why it was refused.
    pub fn verify(&self, auth: &Auth, client_key: &Key, engine_key: &Key) -> Result<Role, Refusal> {
        if auth.version != PROTOCOL_VERSION {
            return Err(Refusal::Version {
                controller: PROTOCOL_VERSION,
                peer: auth.version,
                role: auth.role,
            });
        }
        let key = match auth.role {
            Role::Client => client_key,
            Role::Engine => engine_key,
        };
        let hkey = hmac::Key::new(hmac::HMAC_SHA256, &key.0);
        hmac::verify(
            &hkey,
            &transcript(auth.role, auth.version, &self.nonce),
            &auth.mac,
        )
        .map(|()| auth.role)
        .map_err(|_| Refusal::BadKey(auth.role))
    }
}

impl Default for ServerHandshake {
    fn default() -> Self {
        Self::new()
    }
}

/// The peer's half: answers a [`Hello`]. A version mismatch is reported by the controller, which
/// knows both versions, so the peer always answers.
pub fn answer(hello: &Hello, role: Role, key: &Key) -> Auth {
    Auth {
        version: PROTOCOL_VERSION,
        role,
        mac: key
            .mac(role, PROTOCOL_VERSION, &hello.nonce)
            .as_ref()
            .to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn right_key_is_welcome_for_its_role() {
        let (ck, ek) = (Key::generate(), Key::generate());
        let hs = ServerHandshake::new();
        assert_eq!(
            hs.verify(&answer(&hs.hello(), Role::Client, &ck), &ck, &ek),
            Ok(Role::Client)
        );
        assert_eq!(
            hs.verify(&answer(&hs.hello(), Role::Engine, &ek), &ck, &ek),
            Ok(Role::Engine)
        );
    }

    #[test]
    fn a_client_cannot_use_the_engine_key_or_claim_the_engine_role() {
        let (ck, ek) = (Key::generate(), Key::generate());
        let hs = ServerHandshake::new();
        assert_eq!(
            hs.verify(&answer(&hs.hello(), Role::Engine, &ck), &ck, &ek),
            Err(Refusal::BadKey(Role::Engine))
        );
        assert_eq!(
            hs.verify(&answer(&hs.hello(), Role::Client, &ek), &ck, &ek),
            Err(Refusal::BadKey(Role::Client))
        );
    }

    #[test]
    fn an_answer_to_another_nonce_is_refused() {
        let (ck, ek) = (Key::generate(), Key::generate());
        let old = ServerHandshake::new();
        let replayed = answer(&old.hello(), Role::Client, &ck);
        let hs = ServerHandshake::new();
        assert_eq!(
            hs.verify(&replayed, &ck, &ek),
            Err(Refusal::BadKey(Role::Client))
        );
    }

    #[test]
    fn version_mismatch_names_both_versions() {
        let (ck, ek) = (Key::generate(), Key::generate());
        let hs = ServerHandshake::new();
        let mut auth = answer(&hs.hello(), Role::Client, &ck);
        auth.version = PROTOCOL_VERSION + 1;
        let err = hs.verify(&auth, &ck, &ek).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("version {PROTOCOL_VERSION}")),
            "{err}"
        );
    }

    #[test]
    fn keys_round_trip_as_hex_and_short_keys_are_refused() {
        let k = Key::generate();
        assert_eq!(Key::from_hex(&k.to_hex()).unwrap(), k);
        assert!(Key::from_hex("abcd")
            .unwrap_err()
            .contains("at least 16 bytes"));
        assert!(Key::from_hex("zz").unwrap_err().contains("not a hex key"));
    }
}
