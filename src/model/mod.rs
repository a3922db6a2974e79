//! Data access (goctl's `model`): typed queries over the `users` table and nothing else — no
//! gRPC types, no business rules. Every query is parameterised.

pub mod user;

pub use user::{ConnectionStash, NewUser, User, UserModel, is_connection_failure};
