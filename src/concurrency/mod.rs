//! Generic concurrency primitives ported from Go: [`errgroup`] (golang.org/x/sync/errgroup) and
//! [`mr`] (go-zero's core/mr).
//!
//! Nothing here knows about users, databases or gRPC: both modules are usable by any tokio
//! program, and the service's strategies are built on them, not the other way round.

pub mod errgroup;
pub mod mr;
