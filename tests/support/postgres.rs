//! A private PostgreSQL server for integration tests: the same code as the unit tests' (one
//! source file, `src/store/pg_cluster.rs`), so that both start, share and stop it alike.

#[path = "../../src/store/pg_cluster.rs"]
mod pg_cluster;

pub use pg_cluster::PgCluster;
