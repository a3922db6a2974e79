//! user-rpc: a gRPC service that fetches users in batches from PostgreSQL through three
//! strategies — Go's errgroup, go-zero's MapReduce, and one `WHERE id = ANY($1)` query — so they
//! can be compared on the same data.
//!
//! Layers, go-zero style; data flows one way, server → logic → strategy → model → pool:
//! - [`config`]: defaults < YAML file < env < flags, validated into a [`config::Config`].
//! - [`svc`]: the [`svc::ServiceContext`] built once at start-up (config, pool, models).
//! - [`logic`]: one logic per RPC, holding every business rule; strategies under it.
//! - [`model`]: typed, parameterised queries on `users`.
//! - [`server`]: tonic glue, health, reflection, binding and serving.
//! - [`concurrency`]: the generic errgroup and map-reduce primitives the strategies use.
//! - [`error`]: the one error type and its mapping to gRPC statuses.
//! - [`loadgen`]: the load generator behind `user-rpc bench` and `user-rpc demo`.
//! - [`client`]: how the bundled clients reach a server (plaintext or TLS).

pub mod cli;
pub mod client;
pub mod codec;
pub mod concurrency;
pub mod config;
pub mod error;
pub mod loadgen;
pub mod logic;
pub mod model;
pub mod server;
pub mod svc;
pub mod telemetry;

/// Generated protobuf types and gRPC stubs of `proto/user/v1/user.proto`.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("user.v1");

    /// The descriptor set of `user.v1`, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("user_descriptor");
}
