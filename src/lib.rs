//! user-rpc: a gRPC service that fetches users in batches from PostgreSQL through three
//! strategies — Go's errgroup, go-zero's MapReduce, and one `WHERE id = ANY($1)` query — so they
//! can be compared on the same data.

pub mod concurrency;
