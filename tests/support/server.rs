//! A private Prosody or ejabberd instance per test: temp dir, free loopback ports,
//! config from `tests/servers/*.in`, daemon run in the foreground as a child.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::free_port;
use super::process::{alive, append_log, is_root, signal, tail, terminate, wait_child, wait_gone};

const PROSODY_CFG: &str = include_str!("../servers/prosody.cfg.lua.in");
const PROSODY_S2S_CFG: &str = include_str!("../servers/prosody-s2s.cfg.lua.in");
const S2S_LOOPBACK_MODULE: &str = include_str!("../servers/mod_s2s_loopback.lua");
const EJABBERD_YML: &str = include_str!("../servers/ejabberd.yml.in");
const EJABBERDCTL_CFG: &str = include_str!("../servers/ejabberdctl.cfg.in");

/// How long a server may take to open its ports.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// What ejabberd logs once its modules (and their Mnesia tables) are ready.
const EJABBERD_READY: &str = "is started in the node";

pub const HOST: &str = "localhost";
pub const COMPONENT_DOMAIN: &str = "reach.localhost";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    Prosody,
    Ejabberd,
}

/// A Prosody of the integrated-mode tests (`tests/servers/prosody-s2s.cfg.lua.in`): its own
/// users' domain, s2s on loopback to the other test servers, message archives, and on the
/// integrated server XEP-0356 privileges for the component plus a mod_firewall script.
#[derive(Debug, Clone)]
pub struct ProsodySetup {
    /// The users' domain, e.g. `localhost` or `remote.localhost`.
    pub host: String,
    /// The component's domain on this server, `reach.` + `host`.
    pub component_domain: String,
    /// Where this server takes s2s connections.
    pub s2s_port: u16,
    /// Every domain of the test with its s2s port, this server's own included (dialback
    /// connects back to the sender's domain).
    pub s2s_routes: Vec<(String, u16)>,
    /// Integrated mode: the mod_firewall script (its text) that copies the users' messages to
    /// the component. With it, mod_privilege grants the component `message = "outgoing"`,
    /// `roster = "both"` and `presence = "roster"`.
    pub firewall: Option<String>,
}

impl ProsodySetup {
    /// A server for `host`, taking s2s on `s2s_port`, reaching the domains of `routes`.
    pub fn new(host: &str, s2s_port: u16, routes: &[(String, u16)]) -> ProsodySetup {
        ProsodySetup {
            host: host.to_owned(),
            component_domain: format!("reach.{host}"),
            s2s_port,
            s2s_routes: routes.to_vec(),
            firewall: None,
        }
    }

    /// The same, with the integrated-mode privileges and `firewall` as the copy rules.
    pub fn integrated(mut self, firewall: &str) -> ProsodySetup {
        self.firewall = Some(firewall.to_owned());
        self
    }
}

/// A running (or stopped) XMPP server owned by one test.
pub struct Server {
    pub kind: ServerKind,
    dir: TempDir,
    c2s_port: u16,
    component_port: u16,
    /// Erlang distribution port (ejabberd only).
    dist_port: u16,
    /// Erlang node name (ejabberd only).
    node: String,
    secret: String,
    child: Option<Child>,
    /// The beam.smp PID (ejabberd only; the child is the ejabberdctl shell script).
    beam_pid: Option<u32>,
    /// How long the last (re)start took until both ports accepted connections.
    pub startup_time: Duration,
    /// The users' domain.
    host: String,
    /// The component's domain.
    component_domain: String,
    /// The integrated-mode set-up (Prosody only), if this server has one.
    setup: Option<ProsodySetup>,
}

impl Server {
    /// Starts a fresh server and waits until its c2s and component ports accept connections.
    pub async fn start(kind: ServerKind) -> Server {
        Server::start_with(kind, None).await
    }

    /// Starts a fresh Prosody set up by `setup` (its own domain, s2s, integrated mode), and
    /// waits until its c2s, component and s2s ports accept connections.
    pub async fn start_prosody(setup: ProsodySetup) -> Server {
        Server::start_with(ServerKind::Prosody, Some(setup)).await
    }

    async fn start_with(kind: ServerKind, setup: Option<ProsodySetup>) -> Server {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let prefix = match kind {
            ServerKind::Prosody => "reach-prosody-",
            ServerKind::Ejabberd => "reach-ejabberd-",
        };
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("create server temp dir");
        let c2s_port = free_port();
        let component_port = free_port();
        let dist_port = if kind == ServerKind::Ejabberd {
            free_port()
        } else {
            0
        };
        let node = format!("reachtest{}x{}@localhost", std::process::id(), seq);
        let secret = format!("secret-{}-{}-{}", std::process::id(), seq, c2s_port);
        let mut server = Server {
            kind,
            dir,
            c2s_port,
            component_port,
            dist_port,
            node,
            secret,
            child: None,
            beam_pid: None,
            startup_time: Duration::ZERO,
            host: setup
                .as_ref()
                .map_or_else(|| HOST.to_owned(), |s| s.host.clone()),
            component_domain: setup.as_ref().map_or_else(
                || COMPONENT_DOMAIN.to_owned(),
                |s| s.component_domain.clone(),
            ),
            setup,
        };
        server.write_config();
        server.spawn().await;
        server
    }

    pub fn c2s_port(&self) -> u16 {
        self.c2s_port
    }

    pub fn component_port(&self) -> u16 {
        self.component_port
    }

    /// "127.0.0.1:PORT" of the XEP-0114 listener, as Reach's `[component] server` wants it.
    pub fn component_addr(&self) -> String {
        format!("127.0.0.1:{}", self.component_port)
    }

    /// The XMPP domain users live on ("localhost" unless a [`ProsodySetup`] says otherwise).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The component domain configured on the server ("reach.localhost" unless a
    /// [`ProsodySetup`] says otherwise).
    pub fn component_domain(&self) -> &str {
        &self.component_domain
    }

    /// The port this server takes s2s connections on (a [`ProsodySetup`] server only).
    pub fn s2s_port(&self) -> Option<u16> {
        self.setup.as_ref().map(|s| s.s2s_port)
    }

    /// The component secret configured on the server.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// The server's private working folder (config, data, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the daemon is currently running (started and not stopped).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The server's console output (both kinds log at info level there).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.console_log()).unwrap_or_default()
    }

    /// The last `lines` lines of the server's console output.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.console_log(), lines)
    }

    /// Creates a user account `user@localhost` through the server's CLI.
    /// ejabberd needs to be running for this; Prosody does not.
    pub async fn register(&self, user: &str, password: &str) {
        let mut cmd = match self.kind {
            ServerKind::Prosody => {
                let mut c = Command::new("prosodyctl");
                c.arg("--config").arg(self.config_path());
                c
            }
            ServerKind::Ejabberd => self.ejabberdctl(),
        };
        cmd.args(["register", user, &self.host, password]);
        let (status, out) = run_blocking(cmd, Duration::from_secs(30)).await;
        assert!(
            status,
            "{:?}: registering {user}@{} failed:\n{out}\n--- server log tail ---\n{}",
            self.kind,
            self.host,
            self.log_tail(30)
        );
    }

    /// Stops the daemon and waits until it is gone. Idempotent.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        match self.kind {
            ServerKind::Prosody => {
                terminate(&mut child, Duration::from_secs(10)).await;
            }
            ServerKind::Ejabberd => {
                // `ejabberdctl stop` (~1.3 s), then the VM needs ~1 s more to exit.
                // Fallbacks: SIGTERM to beam (also a clean shutdown), then SIGKILL.
                let mut cmd = self.ejabberdctl();
                cmd.arg("stop");
                let (stopped, _) = run_blocking(cmd, Duration::from_secs(20)).await;
                if !stopped {
                    if let Some(pid) = self.beam_pid {
                        signal(pid, "TERM");
                    }
                }
                let exited = wait_child(&mut child, Duration::from_secs(15))
                    .await
                    .is_some();
                let beam_gone = match self.beam_pid {
                    Some(pid) => wait_gone(pid, Duration::from_secs(5)).await,
                    None => true,
                };
                if !exited || !beam_gone {
                    if let Some(pid) = self.beam_pid {
                        signal(pid, "KILL");
                        wait_gone(pid, Duration::from_secs(5)).await;
                    }
                    terminate(&mut child, Duration::from_secs(2)).await;
                }
                self.beam_pid = None;
            }
        }
    }

    /// Stops the server, then starts it again on the same ports with the same data.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.spawn().await;
    }

    // ---- internals -------------------------------------------------------------------

    fn config_path(&self) -> PathBuf {
        match self.kind {
            ServerKind::Prosody => self.dir().join("prosody.cfg.lua"),
            ServerKind::Ejabberd => self.dir().join("ejabberd.yml"),
        }
    }

    fn console_log(&self) -> PathBuf {
        self.dir().join("console.log")
    }

    fn fill(&self, template: &str) -> String {
        template
            .replace("@DIR@", &self.dir().display().to_string())
            .replace("@C2S_PORT@", &self.c2s_port.to_string())
            .replace("@COMPONENT_PORT@", &self.component_port.to_string())
            .replace("@DIST_PORT@", &self.dist_port.to_string())
            .replace("@NODE@", &self.node)
            .replace("@SECRET@", &self.secret)
            .replace("@COMPONENT_DOMAIN@", &self.component_domain)
    }

    /// The integrated-mode template filled for `setup`.
    fn fill_s2s(&self, setup: &ProsodySetup) -> String {
        let routes: String = setup
            .s2s_routes
            .iter()
            .map(|(domain, port)| format!("[{domain:?}] = {port}; "))
            .collect();
        let (modules, host_settings, component_modules) = match setup.firewall {
            Some(_) => (
                "\"privilege\"; \"firewall\";",
                format!(
                    "  privileged_entities = {{\n    [\"{d}\"] = {{ roster = \"both\"; message = \"outgoing\"; presence = \"roster\" }};\n  }}\n  \
                     firewall_scripts = {{ \"{dir}/reach-copy.pfw\" }}\n",
                    d = setup.component_domain,
                    dir = self.dir().display()
                ),
                "\"privilege\";",
            ),
            None => ("", String::new(), ""),
        };
        self.fill(PROSODY_S2S_CFG)
            .replace("@HOST@", &setup.host)
            .replace("@S2S_PORT@", &setup.s2s_port.to_string())
            .replace("@S2S_ROUTES@", routes.trim_end())
            .replace("@INTEGRATED_MODULES@", modules)
            .replace("@VIRTUALHOST_SETTINGS@", &host_settings)
            .replace("@COMPONENT_MODULES@", component_modules)
    }

    fn write_config(&self) {
        let dir = self.dir();
        let write = |name: &str, text: String| {
            std::fs::write(dir.join(name), text).unwrap_or_else(|e| panic!("write {name}: {e}"));
        };
        match self.kind {
            ServerKind::Prosody => {
                for sub in ["data", "certs"] {
                    std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
                }
                match &self.setup {
                    None => write("prosody.cfg.lua", self.fill(PROSODY_CFG)),
                    Some(setup) => {
                        std::fs::create_dir_all(dir.join("modules")).expect("mkdir");
                        write("prosody.cfg.lua", self.fill_s2s(setup));
                        write(
                            "modules/mod_s2s_loopback.lua",
                            S2S_LOOPBACK_MODULE.to_owned(),
                        );
                        if let Some(rules) = &setup.firewall {
                            write("reach-copy.pfw", rules.clone());
                        }
                    }
                }
            }
            ServerKind::Ejabberd => {
                write("ejabberd.yml", self.fill(EJABBERD_YML));
                write("ejabberdctl.cfg", self.fill(EJABBERDCTL_CFG));
                write("inetrc", String::new());
                for sub in ["spool", "logs"] {
                    std::fs::create_dir_all(dir.join(sub)).expect("mkdir");
                }
                // As root, ejabberdctl re-executes itself as the `ejabberd` user,
                // which must be able to enter and write the whole folder.
                if is_root() {
                    let ok = Command::new("chown")
                        .arg("-R")
                        .arg("ejabberd:ejabberd")
                        .arg(dir)
                        .status()
                        .map(|s| s.success())
                        .unwrap_or(false);
                    assert!(ok, "chown -R ejabberd:ejabberd {} failed", dir.display());
                }
            }
        }
    }

    fn ejabberdctl(&self) -> Command {
        let d = self.dir();
        let mut c = Command::new("ejabberdctl");
        c.arg("--config-dir")
            .arg(d)
            .arg("--config")
            .arg(d.join("ejabberd.yml"))
            .arg("--ctl-config")
            .arg(d.join("ejabberdctl.cfg"))
            .arg("--spool")
            .arg(d.join("spool"))
            .arg("--logs")
            .arg(d.join("logs"));
        c
    }

    fn pid_file(&self) -> PathBuf {
        self.dir().join("ejabberd.pid")
    }

    /// Starts the daemon and waits until both ports accept TCP connections.
    async fn spawn(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let (out, err) = append_log(&self.console_log());
        let starts_before = self.log().matches(EJABBERD_READY).count();
        let mut cmd = match self.kind {
            ServerKind::Prosody => {
                let mut c = Command::new("prosody");
                c.arg("--config").arg(self.config_path()).arg("-F");
                c
            }
            ServerKind::Ejabberd => {
                let _ = std::fs::remove_file(self.pid_file());
                let mut c = self.ejabberdctl();
                c.arg("foreground");
                c
            }
        };
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let started = Instant::now();
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{:?}: cannot spawn the server: {e}", self.kind));
        self.child = Some(child);

        let deadline = started + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "{:?} exited during start-up ({status}).\n--- log tail ({}) ---\n{}",
                    self.kind,
                    self.console_log().display(),
                    self.log_tail(40)
                );
            }
            // ejabberd opens its listeners before its modules have created their
            // Mnesia tables; `register` then aborts. It is ready once it says so.
            if port_open(self.c2s_port).await
                && port_open(self.component_port).await
                && match self.s2s_port() {
                    Some(port) => port_open(port).await,
                    None => true,
                }
                && (self.kind == ServerKind::Prosody
                    || self.log().matches(EJABBERD_READY).count() > starts_before)
            {
                break;
            }
            if Instant::now() >= deadline {
                let log = self.log_tail(40);
                self.kill_now();
                panic!(
                    "{:?} did not open c2s port {} and component port {} within {:?}.\n--- log tail ---\n{}",
                    self.kind, self.c2s_port, self.component_port, START_TIMEOUT, log
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        self.startup_time = started.elapsed();

        if self.kind == ServerKind::Ejabberd {
            self.beam_pid = self.find_beam().await;
            assert!(
                self.beam_pid.is_some(),
                "ejabberd is up but its beam PID was not found (pid file {})",
                self.pid_file().display()
            );
        }
    }

    /// The beam.smp PID, from EJABBERD_PID_PATH, or else from /proc by the unique node name.
    async fn find_beam(&self) -> Option<u32> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(text) = std::fs::read_to_string(self.pid_file()) {
                if let Ok(pid) = text.trim().parse::<u32>() {
                    if alive(pid) {
                        return Some(pid);
                    }
                }
            }
            if let Some(pid) = find_process_with_arg(&self.node) {
                return Some(pid);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Synchronous hard kill (for Drop and failed start-ups).
    fn kill_now(&mut self) {
        if let Some(pid) = self.beam_pid.take() {
            signal(pid, "KILL");
            super::process::wait_gone_blocking(pid, Duration::from_secs(5));
        }
        if let Some(mut child) = self.child.take() {
            if self.kind == ServerKind::Ejabberd {
                // Start-up failed before we learned the beam PID: look for it by node name.
                if let Some(pid) = find_process_with_arg(&self.node) {
                    signal(pid, "KILL");
                    super::process::wait_gone_blocking(pid, Duration::from_secs(5));
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill_now();
    }
}

async fn port_open(port: u16) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(("127.0.0.1", port))
        )
        .await,
        Ok(Ok(_))
    )
}

/// A beam.smp process whose command line contains `arg` as one whole argument.
fn find_process_with_arg(arg: &str) -> Option<u32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        if !comm.trim().starts_with("beam") {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if cmdline.split(|b| *b == 0).any(|a| a == arg.as_bytes()) && alive(pid) {
            return Some(pid);
        }
    }
    None
}

/// Runs a short CLI command off the async runtime; returns (success, stdout+stderr).
async fn run_blocking(mut cmd: Command, timeout: Duration) -> (bool, String) {
    cmd.stdin(Stdio::null());
    let desc = format!("{cmd:?}");
    let job = tokio::task::spawn_blocking(move || cmd.output());
    match tokio::time::timeout(timeout, job).await {
        Ok(Ok(Ok(out))) => (
            out.status.success(),
            format!(
                "{desc}: {}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
        Ok(Ok(Err(e))) => (false, format!("{desc}: cannot run: {e}")),
        Ok(Err(e)) => (false, format!("{desc}: {e}")),
        Err(_) => (false, format!("{desc}: timed out after {timeout:?}")),
    }
}
