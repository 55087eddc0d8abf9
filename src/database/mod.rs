//! The shared database of a cluster.

pub mod managed;
