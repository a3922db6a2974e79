//! All integration and end-to-end tests, compiled into one binary (fast to build and link).
//!
//! Tests that need PostgreSQL read `DATABASE_URL` (see README); the concurrency tests need nothing.

mod bad_input;
mod batch;
mod cli;
mod defaults;
pub mod e2e;
mod errgroup;
mod faults;
mod live;
mod loadgen;
mod mr;
mod private_pg;
mod security;
mod support;
mod tls;
