//! A private PostgreSQL server for tests: its own data folder in a temporary directory, its own
//! free loopback port and Unix socket, stopped and deleted when dropped. Never the system's
//! instance, never a fixed port. It needs the PostgreSQL server programs (`initdb`, `pg_ctl`,
//! `postgres`, `psql`: from `$PG_BIN` if set, else the newest `/usr/lib/postgresql/*/bin`, else
//! `PATH`) and, when the tests run as root, the `postgres` system user, because the server
//! refuses to run as root. [`PgCluster::shared`] lets the tests of one binary share a server
//! (each then takes a database of its own with [`PgCluster::create_database`]). Whenever the
//! test process ends without dropping a server (the shared one, or a test killed or aborted), a
//! small guardian shell process stops it and deletes its folder all the same.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// The superuser `initdb` creates; every connection of the tests uses it (trust auth).
pub const SUPERUSER: &str = "postgres";
/// The system user the server runs as when the tests run as root.
const SERVER_USER: &str = "postgres";
/// Settings of the test server: fast to start, quick to detect deadlocks, room for the
/// connections of tests running in parallel.
const SETTINGS: &str = "
max_connections = 200
deadlock_timeout = '200ms'
shared_buffers = '32MB'
log_min_messages = 'warning'
";
/// How long a fast shutdown may take before the server is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a (re)start may keep failing, e.g. while the backends of a killed server exit.
const START_PATIENCE: Duration = Duration::from_secs(15);
/// The guardian (run by `sh` with the cluster's folder as `$1`): waits for the end of its
/// standard input, which comes when the test process drops the cluster or dies; then stops the
/// server if it still runs (fast shutdown, SIGKILL after 10 s) and deletes the folder.
const GUARDIAN: &str = r#"
read -r _
pid=$(head -n 1 "$1/data/postmaster.pid" 2>/dev/null)
if [ -n "$pid" ] && kill -INT "$pid" 2>/dev/null; then
    tries=0
    while kill -0 "$pid" 2>/dev/null && [ "$tries" -lt 100 ]; do
        sleep 0.1
        tries=$((tries + 1))
    done
    kill -KILL "$pid" 2>/dev/null
fi
rm -rf "$1"
"#;

/// A running PostgreSQL server of its own (see the module comment). Panics on failure: it is
/// test support, and a test cannot run without its server.
pub struct PgCluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// `Some` when the server programs must run as another user (we are root).
    run_as: Option<&'static str>,
    port: u16,
    /// How long `initdb` and the first start took.
    startup: Duration,
    /// Serializes stop/start (restart) against each other.
    control: Mutex<()>,
    /// Cleans up if this process dies without dropping the cluster (see [`GUARDIAN`]).
    guardian: Option<Child>,
}

impl PgCluster {
    /// Creates and starts a new server on a free loopback port.
    pub fn start() -> PgCluster {
        let began = Instant::now();
        let bin = server_programs();
        let run_as = running_as_root().then_some(SERVER_USER);
        let dir = tempfile::Builder::new()
            .prefix("reach-pg-")
            .tempdir()
            .expect("a temporary folder for the test server");
        let socket = dir.path().join("socket");
        std::fs::create_dir(&socket).expect("the socket folder");
        if let Some(user) = run_as {
            give_to(user, dir.path());
            give_to(user, &socket);
        }
        let guardian = Command::new("sh")
            .args(["-c", GUARDIAN, "reach-pg-guardian"])
            .arg(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the guardian shell of the test server");
        let mut cluster = PgCluster {
            dir,
            bin,
            run_as,
            port: 0,
            startup: Duration::ZERO,
            control: Mutex::new(()),
            guardian: Some(guardian),
        };
        let data = cluster.data_dir();
        let initdb = cluster
            .server_command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["--auth=trust", "-U", SUPERUSER, "--no-sync", "-E", "UTF8"])
            .args(["--locale=C"])
            .output();
        expect_success("initdb", initdb);
        let initdb_time = began.elapsed();
        // A port found free can be taken before the server binds it: then try another.
        let mut attempts = 0;
        loop {
            attempts += 1;
            cluster.port = free_port();
            cluster.write_settings();
            match cluster.try_start() {
                Ok(()) => break,
                Err(e) if attempts < 5 => eprintln!("test PostgreSQL did not start, retrying: {e}"),
                Err(e) => panic!("test PostgreSQL did not start: {e}"),
            }
        }
        cluster.startup = began.elapsed();
        eprintln!(
            "test PostgreSQL on port {} started in {} ms (initdb {} ms)",
            cluster.port,
            cluster.startup.as_millis(),
            initdb_time.as_millis()
        );
        cluster
    }

    /// The server of this test binary, started by the first test that asks for it and kept
    /// until the binary exits (then its guardian stops it and deletes its folder: a static is
    /// never dropped). Keeping it only while a test holds it would start a new server, `initdb`
    /// included, whenever the tests running at one moment happen not to need it.
    pub fn shared() -> Arc<PgCluster> {
        static SHARED: OnceLock<Arc<PgCluster>> = OnceLock::new();
        Arc::clone(SHARED.get_or_init(|| Arc::new(PgCluster::start())))
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The folder of the server's Unix socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("socket")
    }

    /// How long `initdb` and the first start took.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// The URL of `database` over TCP.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{database}", self.port)
    }

    /// The URL of `database` over the Unix socket (the socket folder percent-encoded as host).
    pub fn socket_url(&self, database: &str) -> String {
        let folder = self.socket_dir();
        format!(
            "postgres://{SUPERUSER}@{}:{}/{database}",
            percent_encode(&folder.to_string_lossy()),
            self.port
        )
    }

    /// Creates a database with a name no other call gave, and returns its URL.
    pub fn create_database(&self) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(1);
        let name = format!(
            "reach_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// Runs SQL with `psql` in `database` and returns what it printed (unaligned, tuples only).
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let output = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(self.socket_dir())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
                "-d",
                database,
            ])
            .args(["-c", sql])
            .stdin(Stdio::null())
            .output();
        let output = expect_success("psql", output);
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// The process id of the running server (its postmaster), if it runs.
    pub fn pid(&self) -> Option<u32> {
        let pid = read_pid(&self.data_dir().join("postmaster.pid"))?;
        is_running(pid).then_some(pid)
    }

    /// Kills the server with SIGKILL, as a crash would, and waits until it is gone. Its data
    /// stays: [`PgCluster::restart`] starts it again (with crash recovery).
    pub fn kill(&self) {
        let _control = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(pid) = self.pid() {
            signal(pid, "KILL");
            assert!(wait_gone(pid, STOP_GRACE), "server {pid} survived SIGKILL");
        }
    }

    /// Stops the server if it runs (fast shutdown) and starts it again on the same port and data.
    pub fn restart(&self) {
        let _control = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        self.stop_server();
        let deadline = Instant::now() + START_PATIENCE;
        loop {
            match self.try_start() {
                Ok(()) => return,
                // After a kill the old backends may still hold the shared memory for a moment.
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(e) => panic!("test PostgreSQL did not restart: {e}"),
            }
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// A command running server program `name`, as the server's user if we are root.
    fn server_command(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        let mut command = match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        };
        command.stdin(Stdio::null());
        command
    }

    /// Appends this cluster's settings to postgresql.conf (a later line overrides an earlier).
    fn write_settings(&self) {
        use std::io::Write;
        let path = self.data_dir().join("postgresql.conf");
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("postgresql.conf of the test server");
        write!(
            conf,
            "{SETTINGS}listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n",
            self.port,
            self.socket_dir().display()
        )
        .expect("writing postgresql.conf");
    }

    /// Starts the server and waits until it accepts connections.
    fn try_start(&self) -> Result<(), String> {
        let output = self
            .server_command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_file())
            .args(["-w", "-t", "30", "-s", "start"])
            .output()
            .map_err(|e| format!("cannot run pg_ctl: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "pg_ctl start failed ({}): {}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim(),
                self.log_tail()
            ))
        }
    }

    /// Fast shutdown (SIGINT), then SIGKILL if the server is still there after the grace time.
    fn stop_server(&self) {
        let Some(pid) = self.pid() else {
            return;
        };
        signal(pid, "INT");
        if !wait_gone(pid, STOP_GRACE) {
            signal(pid, "KILL");
            wait_gone(pid, STOP_GRACE);
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_file()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _control = self.control.lock().unwrap_or_else(PoisonError::into_inner);
        self.stop_server();
        if let Some(mut guardian) = self.guardian.take() {
            // Closing its input lets it finish (nothing left to stop); the folder goes anyway.
            drop(guardian.stdin.take());
            let _ = guardian.wait();
        }
    }
}

/// The folder of the PostgreSQL server programs (see the module comment).
fn server_programs() -> PathBuf {
    if let Some(bin) = std::env::var_os("PG_BIN") {
        return PathBuf::from(bin);
    }
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .max();
    // Empty: the programs are looked up on PATH.
    newest.map(|(_, bin)| bin).unwrap_or_default()
}

/// Whether this process runs as root (`/proc/self` belongs to the process's user).
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Makes `path` belong to `user` (and its group).
fn give_to(user: &str, path: &Path) {
    let output = Command::new("chown")
        .arg(format!("{user}:"))
        .arg(path)
        .output();
    expect_success("chown", output);
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a free loopback port");
    listener.local_addr().expect("the bound port").port()
}

fn expect_success(what: &str, output: std::io::Result<Output>) -> Output {
    let output = output.unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The first line of postmaster.pid: the server's process id.
fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Whether process `pid` exists and is not a zombie.
fn is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

fn signal(pid: u32, name: &str) {
    // The process may be gone already: that is what the caller waits for anyway.
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// Waits until process `pid` is gone; false if it still runs after `patience`.
fn wait_gone(pid: u32, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    while is_running(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// `text` with every byte but unreserved URL characters percent-encoded.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
