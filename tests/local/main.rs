//! One integration-test binary: every test starts real `starlingd` processes with real `python3`
//! kernels on loopback, through the `local` provider.

mod common;

mod cli_session;
mod client_lib;
mod failures;
mod maps;
mod mpi;
mod readme;
mod scheduling;
mod security;
mod specs;
