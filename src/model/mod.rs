//! Data access (goctl's `model`): typed queries over the `users` table and nothing else — no
//! gRPC types, no business rules. Every query is parameterised. Lookups run on the connections
//! of a [`ConnectionStash`] (one round trip each, handed over in turn, dead connections retried,
//! abandoned queries cancelled).

pub mod stash;
pub mod user;

pub use stash::{ConnectionStash, Priority, is_connection_failure};
pub use user::{NewUser, User, UserModel};
