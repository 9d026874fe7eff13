//! The `reach` binary under test, run as a child process with its own state folder.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::process::{append_log, terminate, wait_child};
use super::server::Server;

pub struct Reach {
    child: Option<Child>,
    pid: u32,
    state_dir: PathBuf,
    /// Exit status once the process has been reaped.
    status: Option<ExitStatus>,
}

/// Where a Reach under test keeps its store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreAt {
    /// The embedded store in `STATE/store`.
    Sled,
    /// A PostgreSQL database, as the named instance.
    Postgres { url: String, instance: String },
}

impl StoreAt {
    /// The lines of `[store]` for a Reach whose state folder is `state_dir`.
    pub fn toml(&self, state_dir: &Path) -> String {
        match self {
            StoreAt::Sled => format!(
                "path = {}\n",
                toml_str(&state_dir.join("store").display().to_string())
            ),
            StoreAt::Postgres { url, instance } => format!(
                "url = {}\ninstance = {}\n",
                toml_str(url),
                toml_str(instance)
            ),
        }
    }
}

impl Reach {
    /// The base `reach.toml` for `server`, with the store in `state_dir/store`.
    pub fn config(server: &Server, state_dir: &Path) -> String {
        Reach::config_at(server, state_dir, &StoreAt::Sled)
    }

    /// The base `reach.toml` for `server`, with the store at `store`. It ends inside `[store]`.
    pub fn config_at(server: &Server, state_dir: &Path, store: &StoreAt) -> String {
        format!(
            "[component]\n\
             domain = {}\n\
             server = {}\n\
             secret = {}\n\
             \n\
             [users]\n\
             allowed_domains = [{}]\n\
             \n\
             [store]\n\
             {}",
            toml_str(server.component_domain()),
            toml_str(&server.component_addr()),
            toml_str(server.secret()),
            toml_str(server.host()),
            store.toml(state_dir),
        )
    }

    /// Starts Reach against `server`. Does not wait for the component link.
    pub async fn start(server: &Server, state_dir: &Path) -> Reach {
        Reach::start_with(server, state_dir, "").await
    }

    /// Like [`Reach::start`], with `extra_toml` appended to the base config.
    /// `extra_toml` must consist of whole tables (`[email] ...`), since the base
    /// config ends inside `[store]`.
    pub async fn start_with(server: &Server, state_dir: &Path, extra_toml: &str) -> Reach {
        let mut config = Reach::config(server, state_dir);
        if !extra_toml.is_empty() {
            config.push('\n');
            config.push_str(extra_toml);
            config.push('\n');
        }
        Reach::start_config(state_dir, &config).await
    }

    /// Writes `config` verbatim to `state_dir/reach.toml` and starts Reach with it.
    pub async fn start_config(state_dir: &Path, config: &str) -> Reach {
        Reach::start_config_with_log(state_dir, config, "reach=debug").await
    }

    /// Like [`Reach::start_config`], with `rust_log` as Reach's `RUST_LOG` (benches run it at
    /// `warn`, since debug logging of every message would be measured too).
    pub async fn start_config_with_log(state_dir: &Path, config: &str, rust_log: &str) -> Reach {
        std::fs::create_dir_all(state_dir).expect("create state dir");
        let config_path = state_dir.join("reach.toml");
        std::fs::write(&config_path, config).expect("write reach.toml");
        let log_path = state_dir.join("reach.log");
        let (out, err) = append_log(&log_path);
        let child = Command::new(env!("CARGO_BIN_EXE_reach"))
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn reach");
        Reach {
            pid: child.id(),
            child: Some(child),
            state_dir: state_dir.to_path_buf(),
            status: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Everything Reach wrote to stdout/stderr so far (across restarts in the same state dir).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("reach.log")).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        super::within(timeout, || self.log().contains(needle)).await
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => match c.try_wait() {
                Ok(Some(status)) => {
                    self.status = Some(status);
                    self.child = None;
                    false
                }
                _ => true,
            },
            None => false,
        }
    }

    /// Waits for Reach to exit on its own (e.g. after a fatal config error).
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(child) = self.child.as_mut() {
            if let Some(status) = wait_child(child, timeout).await {
                self.status = Some(status);
                self.child = None;
            }
        }
        self.status
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL. Returns the exit status.
    pub async fn stop(&mut self) -> ExitStatus {
        if let Some(mut child) = self.child.take() {
            self.status = Some(terminate(&mut child, Duration::from_secs(10)).await);
        }
        self.status.expect("reach exit status")
    }

    /// SIGKILL (a crash), and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            self.status = child.wait().ok();
        }
    }
}

impl Drop for Reach {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TOML basic string.
pub fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
