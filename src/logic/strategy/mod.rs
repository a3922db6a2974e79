//! The three ways BatchGetUsers resolves distinct ids into the users that exist, in any order.
//! Ordering, de-duplication and missing ids are the caller's job, so the strategies stay
//! comparable: they differ only in how they use the database.

pub mod batch_query;
pub mod errgroup;
pub mod mapreduce;
