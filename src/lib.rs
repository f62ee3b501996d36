//! starling: a compute cluster and a way to use it, in one breath.
//!
//! Layout — data flows top to bottom:
//!
//! - [`spec`]: the YAML cluster spec, its defaults and validation.
//! - [`provider`]: where nodes come from: this machine (`local`), `ec2` instances, `ssh` hosts;
//!   `provider::Cluster` is every operation on a cluster after `up`.
//! - [`bootstrap`]: turns machines into a running cluster (install, setup, start, stop), over
//!   SSH or, for a local cluster, this machine's `sh`.
//! - [`node`]: a node's processes, found by the mark they carry.
//! - [`proto`]: every message between client, controller and engine; frames, TLS, the
//!   authentication handshake.
//! - [`controller`]: engine registry, heartbeats, scheduling, the SQLite task store.
//! - [`engine`]: the engine process and its `python3` and shell kernels (on an MPI cluster,
//!   the ranks `mpiexec` starts, attached to their engines).
//! - [`client`]: the Rust client library — `Client`, `DirectView`, `AsyncResult`.
//! - [`cli`]: the `starling` command line; formatting only.
//! - [`home`]: where starling keeps its files on a machine.
//!
//! Two binaries: `starling` (the CLI) and `starlingd` (`starlingd controller`,
//! `starlingd engine`: what runs on a node).

pub mod bootstrap;
pub mod cli;
pub mod client;
pub mod controller;
pub mod engine;
pub mod home;
pub mod node;
pub mod proto;
pub mod provider;
pub mod spec;
