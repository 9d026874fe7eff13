//! A private Postfix 3.x for integration tests: its own config folder, queue and data folders in
//! a temporary directory, two SMTP listeners on free loopback ports, logging to a file in that
//! directory. [`Postfix::port`] is Postfix as local programs see it (the client is in
//! `mynetworks` when main.cf says so); [`Postfix::outside_port`] is Postfix as the internet sees
//! its MX: `mynetworks` is empty there, so only `relay_domains` and the like let mail in. It never reads or touches `/etc/postfix` or a system-wide Postfix.
//!
//! The master daemon runs in the foreground (`postfix -c DIR start-fg`) as a child of the test;
//! it is stopped with `postfix -c DIR stop`, then by its PID (SIGTERM, SIGKILL) if need be.
//!
//! Needs root (Postfix's master starts as root and runs its daemons as the `postfix` user) and
//! apt's `postfix` (`scripts/install-deps` installs it with debconf's "No configuration").

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::process::{alive, append_log, signal, tail, terminate, wait_child, wait_gone};

/// The daemons a relay-only Postfix needs, none chrooted (the queue folder holds no copies of
/// /etc files). The SMTP listeners come first, filled in by [`Postfix::start`].
const MASTER_SERVICES: &str = "\
pickup    unix  n  -  n  60     1  pickup
cleanup   unix  n  -  n  -      0  cleanup
qmgr      unix  n  -  n  300    1  qmgr
rewrite   unix  -  -  n  -      -  trivial-rewrite
bounce    unix  -  -  n  -      0  bounce
defer     unix  -  -  n  -      0  bounce
trace     unix  -  -  n  -      0  bounce
verify    unix  -  -  n  -      1  verify
flush     unix  n  -  n  1000?  0  flush
proxymap  unix  -  -  n  -      -  proxymap
smtp      unix  -  -  n  -      -  smtp
relay     unix  -  -  n  -      -  smtp
showq     unix  n  -  n  -      -  showq
error     unix  -  -  n  -      -  error
retry     unix  -  -  n  -      -  error
discard   unix  -  -  n  -      -  discard
anvil     unix  -  -  n  -      1  anvil
scache    unix  -  -  n  -      1  scache
postlog   unix-dgram n  -  n  -  1  postlogd
";

/// One private Postfix instance.
pub struct Postfix {
    dir: tempfile::TempDir,
    port: u16,
    outside_port: u16,
    child: Option<Child>,
}

impl Postfix {
    /// Prepares the folders and picks the SMTP port; nothing runs yet. Write map files with
    /// [`Postfix::write_file`] and [`Postfix::postmap`], then [`Postfix::start`].
    pub fn new() -> Postfix {
        let dir = tempfile::Builder::new()
            .prefix("reach-postfix-")
            .tempdir()
            .expect("temp dir");
        // Postfix's daemons run as `postfix` and must traverse into the queue folder.
        set_mode(dir.path(), 0o755);
        for sub in ["etc", "spool", "data"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("mkdir");
        }
        let data = dir.path().join("data");
        let ok = Command::new("chown")
            .arg("postfix")
            .arg(&data)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "chown postfix {} failed (apt: postfix; tests run as root)",
            data.display()
        );
        Postfix {
            dir,
            port: super::free_port(),
            outside_port: super::free_port(),
            child: None,
        }
    }

    /// The SMTP port Postfix listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The SMTP port (127.0.0.1) where every client counts as an outside host (`mynetworks`
    /// is empty for this listener): what a sender on the internet meets at the MX.
    pub fn outside_port(&self) -> u16 {
        self.outside_port
    }

    /// The instance's config folder (main.cf, master.cf, maps): what `/etc/postfix` is to a
    /// system-wide Postfix.
    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file (e.g. a lookup table) into the config folder.
    pub fn write_file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.config_dir().join(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// `postmap` on a table in the config folder (main.cf must exist: call after writing it,
    /// i.e. after [`Postfix::write_main_cf`] or from inside [`Postfix::start`]).
    pub fn postmap(&self, name: &str) {
        let out = self
            .postfix_cmd("postmap")
            .arg(self.config_dir().join(name))
            .output()
            .expect("run postmap");
        assert!(
            out.status.success(),
            "postmap {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Writes main.cf: the instance's own settings (folders, loopback, logging, no local
    /// delivery), then `site` (the settings under test), which may override them.
    pub fn write_main_cf(&self, site: &str) {
        let d = self.dir().display().to_string();
        let base = format!(
            "# A private test instance (tests/support/postfix.rs).\n\
             compatibility_level = 3.6\n\
             queue_directory = {d}/spool\n\
             data_directory = {d}/data\n\
             mail_owner = postfix\n\
             setgid_group = postdrop\n\
             inet_interfaces = 127.0.0.1\n\
             inet_protocols = ipv4\n\
             myhostname = mx.postfix.test\n\
             mydestination =\n\
             alias_maps =\n\
             alias_database =\n\
             local_recipient_maps =\n\
             smtp_dns_support_level = disabled\n\
             maillog_file_prefixes = {d}\n\
             maillog_file = {d}/maillog\n\
             \n\
             # ---- the settings under test ----\n\
             {site}\n"
        );
        self.write_file("main.cf", &base);
    }

    /// Starts the master in the foreground with the main.cf written before
    /// ([`Postfix::write_main_cf`]), and waits until the SMTP port greets.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "postfix already running");
        assert!(
            self.config_dir().join("main.cf").exists(),
            "write_main_cf first"
        );
        let master = format!(
            "127.0.0.1:{} inet  n  -  n  -  -  smtpd\n\
             127.0.0.1:{} inet  n  -  n  -  -  smtpd\n  -o mynetworks=\n\
             {MASTER_SERVICES}",
            self.port, self.outside_port
        );
        self.write_file("master.cf", &master);
        let check = self
            .postfix_cmd("postfix")
            .arg("check")
            .output()
            .expect("run postfix check (apt: postfix)");
        assert!(
            check.status.success(),
            "postfix check: {}{}\n{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr),
            self.log_tail(20)
        );
        let (out, err) = append_log(&self.dir().join("console.log"));
        let child = self
            .postfix_cmd("postfix")
            .arg("start-fg")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn postfix start-fg");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!("postfix exited during start-up ({status})\n{}", self.logs());
            }
            if greets(self.port).await && greets(self.outside_port).await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postfix did not greet on port {} within 15 s\n{}",
                self.port,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The mail log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir().join("maillog")).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.dir().join("maillog"), lines)
    }

    /// The mail log's and the console's last lines, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- maillog ---\n{}\n--- console ---\n{}",
            self.log_tail(40),
            tail(&self.dir().join("console.log"), 20)
        )
    }

    /// Waits until the mail log contains a line with all of `needles`.
    pub async fn wait_for_log(&self, needles: &[&str], timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self
                .log()
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return Some(line.to_owned());
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `postfix -c DIR stop`, then waits for the foreground master to exit; SIGTERM and
    /// SIGKILL to the master's PID if it does not. Idempotent.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let master = self.master_pid();
        let _ = self
            .postfix_cmd("postfix")
            .arg("stop")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if wait_child(&mut child, Duration::from_secs(10))
            .await
            .is_none()
        {
            if let Some(pid) = master {
                signal(pid, "TERM");
                if !wait_gone(pid, Duration::from_secs(5)).await {
                    signal(pid, "KILL");
                }
            }
            terminate(&mut child, Duration::from_secs(2)).await;
        }
    }

    /// The master daemon's PID, from its pid file in the queue folder.
    fn master_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir().join("spool/pid/master.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
            .filter(|pid| alive(*pid))
    }

    fn postfix_cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.arg("-c").arg(self.config_dir());
        c
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The master stops its daemons on `postfix stop`; a SIGKILL would orphan them.
            let _ = self
                .postfix_cmd("postfix")
                .arg("stop")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Some(pid) = self.master_pid() {
                signal(pid, "KILL");
                super::process::wait_gone_blocking(pid, Duration::from_secs(5));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether an SMTP server on the port sends its 220 greeting.
async fn greets(port: u16) -> bool {
    use tokio::io::AsyncReadExt;
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).await.ok()?;
        Some(buf[..n].starts_with(b"220"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Some(true))
    )
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}
