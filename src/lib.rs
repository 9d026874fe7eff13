//! Reach: an XMPP external component (XEP-0114) that gives each registered user a reach address
//! and delivers what buddies send to wherever the user is.
//!
//! Layout (see README "Architecture"): `core` is the sans-IO decision maker, deciding in a
//! `core::Transaction` over its records (`core::model`); `store` implements that transaction
//! once over two engines, sled (embedded, the default) and PostgreSQL (several instances), and
//! is the only module that knows either; `xmpp` holds the component link and stanza helpers;
//! `email` and `sms` the terminals' adapters; `config` reads the TOML file; `address` holds the
//! identifier types (handles, XEP-0106 escaping, terminals); `runtime` wires them together;
//! `delivery` drains the email and SMS queues; `metrics` counts what happens and serves it to
//! Prometheus; `admin` holds the admin commands (`reach stats`, `export`, `purge`, `migrate`).

pub mod address;
pub mod admin;
pub mod clock;
pub mod config;
pub mod core;
pub mod delivery;
pub mod email;
mod http;
pub mod metrics;
pub mod runtime;
pub mod sms;
pub mod store;
pub mod xmpp;
