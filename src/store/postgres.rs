//! Placeholder until the PostgreSQL engine lands.

use super::engine::{Backend, Engine, Result, Tree};
use super::StoreError;

pub struct Postgres;

impl Postgres {
    pub fn open_with_password(url: &str, _password: Option<&str>) -> Result<Postgres> {
        Self::open(url)
    }

    pub fn open(_url: &str) -> Result<Postgres> {
        Err(StoreError::Engine(
            "PostgreSQL support is not built yet".into(),
        ))
    }
}

/// The URL without its password.
pub fn redact(url: &str) -> String {
    url.to_owned()
}

impl Engine for Postgres {
    fn name(&self) -> &'static str {
        "postgres"
    }
    fn begin(&self) -> Result<Box<dyn Backend + '_>> {
        Err(StoreError::Engine("unbuilt".into()))
    }
    fn hold_instance(&self, _name: &str) -> Result<bool> {
        Ok(false)
    }
    fn instance_alive(&self, _name: &str) -> Result<bool> {
        Ok(false)
    }
    fn listen(&self, _wake: Box<dyn Fn(&str) + Send + Sync>) -> Result<()> {
        Ok(())
    }
    fn len(&self, _tree: Tree) -> Result<u64> {
        Ok(0)
    }
    fn ensure_ids_above(&self, _floor: u64) -> Result<()> {
        Ok(())
    }
}
