//! Mail: Postfix's `smtp-sink` as Reach's relay (its running counter read with timestamps),
//! `smtp-source` for the sink's ceiling, a private Postfix (smtpd + its durable queue) as the
//! baseline for Reach's listener, and a pipelining SMTP client that submits replies.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::support::process::{signal, terminate};

/// `smtp-sink` on a free loopback port; with `dump`, every message is written to a file there.
pub struct Sink {
    pub port: u16,
    child: Child,
    /// (when, messages accepted so far), from the sink's `-c` counter.
    pub marks: Arc<Mutex<Vec<(Instant, u64)>>>,
}

impl Sink {
    pub async fn start(dump: Option<&Path>) -> Sink {
        let port = super::port();
        let mut cmd = Command::new("smtp-sink");
        cmd.arg("-c").args(["-u", "nobody"]);
        if let Some(dir) = dump {
            cmd.arg("-d").arg(format!("{}/m.", dir.display()));
        }
        cmd.arg(format!("127.0.0.1:{port}"))
            .arg("1024")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("start smtp-sink (apt: postfix)");
        let stdout = child.stdout.take().expect("sink stdout");
        let marks = Arc::new(Mutex::new(Vec::new()));
        let seen = marks.clone();
        // The counter line "sess=N quit=N mesg=N\r" is written (and flushed) at every ".".
        std::thread::spawn(move || {
            use std::io::Read;
            let mut stdout = stdout;
            let mut buf = [0u8; 8192];
            let mut text = String::new();
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let now = Instant::now();
                text.push_str(&String::from_utf8_lossy(&buf[..n]));
                let mut last = None;
                while let Some(end) = text.find('\r') {
                    if let Some(m) = text[..end].rsplit("mesg=").next() {
                        last = m.trim().parse::<u64>().ok().or(last);
                    }
                    text.drain(..=end);
                }
                if let Some(count) = last {
                    seen.lock().unwrap().push((now, count));
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(Instant::now() < deadline, "smtp-sink did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Sink { port, child, marks }
    }

    /// Messages accepted so far.
    pub fn count(&self) -> u64 {
        self.marks.lock().unwrap().last().map_or(0, |m| m.1)
    }

    /// When the counter first reached each of `from+1 ..= from+n` (None where it never did).
    pub fn times(&self, from: u64, n: u64) -> Vec<Option<Instant>> {
        let marks = self.marks.lock().unwrap();
        let mut out = Vec::with_capacity(n as usize);
        let mut j = 0;
        for k in from + 1..=from + n {
            while j < marks.len() && marks[j].1 < k {
                j += 1;
            }
            out.push(marks.get(j).map(|m| m.0));
        }
        out
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `smtp-source` into a fresh `smtp-sink`: `sessions` parallel connections, each reused for
/// many messages (`-d`). Returns messages per second.
pub async fn source_to_sink(messages: u64, sessions: u32) -> f64 {
    let sink = Sink::start(None).await;
    let started = Instant::now();
    let port = sink.port;
    let status = tokio::task::spawn_blocking(move || {
        Command::new("smtp-source")
            .args([
                "-s",
                &sessions.to_string(),
                "-m",
                &messages.to_string(),
                "-d",
            ])
            .args(["-f", "bench@localhost", "-t", "u0@mail.example"])
            .arg(format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run smtp-source (apt: postfix)")
    })
    .await
    .expect("smtp-source task");
    assert!(status.success(), "smtp-source failed");
    super::wait_until(Duration::from_secs(10), || sink.count() >= messages).await;
    super::rate(messages, started.elapsed())
}

/// A private Postfix: smtpd on a free loopback port, its queue in a temporary folder. Every
/// message for any recipient from 127.0.0.1 is accepted into the durable queue and put on hold
/// (so nothing is delivered while we measure acceptance).
pub struct Postfix {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Postfix {
    pub async fn start() -> Postfix {
        let dir = tempfile::Builder::new()
            .prefix("reach-bench-postfix-")
            .tempdir()
            .expect("temp dir");
        let port = super::port();
        let d = dir.path().display().to_string();
        let master = std::fs::read_to_string("/etc/postfix/master.cf")
            .expect("/etc/postfix/master.cf (apt: postfix)");
        let mut lines: Vec<String> = master
            .lines()
            .filter(|l| !l.starts_with("smtp      inet"))
            .map(str::to_owned)
            .collect();
        lines.push(format!(
            "127.0.0.1:{port} inet n - n - - smtpd\npostlog unix-dgram n - n - 1 postlogd"
        ));
        std::fs::write(dir.path().join("master.cf"), lines.join("\n") + "\n").unwrap();
        let main = format!(
            "compatibility_level = 3.6\nqueue_directory = {d}/queue\ndata_directory = {d}/data\n\
             mail_owner = postfix\nsetgid_group = postdrop\nmyhostname = bench.localhost\n\
             mydomain = localhost\nmyorigin = localhost\nmydestination =\ninet_interfaces = 127.0.0.1\n\
             inet_protocols = ipv4\nmynetworks = 127.0.0.0/8\nrelay_domains = reach.localhost\n\
             smtpd_recipient_restrictions = check_client_access static:HOLD, permit_mynetworks, reject\n\
             smtpd_client_connection_count_limit = 0\nsmtpd_client_connection_rate_limit = 0\n\
             smtpd_client_message_rate_limit = 0\ndefault_process_limit = 100\nbiff = no\n\
             maillog_file = /dev/stdout\n"
        );
        std::fs::write(dir.path().join("main.cf"), main).unwrap();
        for sub in ["queue", "data"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        run(Command::new("chmod").arg("755").arg(dir.path()));
        run(Command::new("chown")
            .arg("postfix")
            .arg(dir.path().join("data")));
        // Creates the queue folders (and warns that they are not owned by root: harmless).
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(dir.path())
            .arg("check")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let log = std::fs::File::create(dir.path().join("start-fg.log")).unwrap();
        let child = Command::new("postfix")
            .arg("-c")
            .arg(dir.path())
            .arg("start-fg")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("postfix start-fg");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "private Postfix did not come up; see {}",
                dir.path().join("start-fg.log").display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Postfix {
            port,
            dir,
            child: Some(child),
        }
    }

    /// Messages in the hold queue (accepted and durable).
    pub fn held(&self) -> usize {
        fn count(dir: &Path) -> usize {
            std::fs::read_dir(dir)
                .map(|d| {
                    d.flatten()
                        .map(|e| {
                            if e.path().is_dir() {
                                count(&e.path())
                            } else {
                                1
                            }
                        })
                        .sum()
                })
                .unwrap_or(0)
        }
        count(&self.dir.path().join("queue/hold"))
    }

    pub async fn stop(&mut self) {
        let dir = self.dir.path().to_path_buf();
        let _ = tokio::task::spawn_blocking(move || {
            Command::new("postfix")
                .arg("-c")
                .arg(dir)
                .arg("stop")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
        })
        .await;
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, Duration::from_secs(10)).await;
        }
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("queue/pid/master.pid")) {
            if let Ok(pid) = pid.trim().parse::<u32>() {
                if crate::support::process::alive(pid) {
                    signal(pid, "TERM");
                    crate::support::process::wait_gone(pid, Duration::from_secs(10)).await;
                }
            }
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("queue/pid/master.pid")) {
            if let Ok(pid) = pid.trim().parse::<u32>() {
                if crate::support::process::alive(pid) {
                    signal(pid, "KILL");
                }
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run a Postfix set-up command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One message to submit.
#[derive(Debug, Clone)]
pub struct Submission {
    pub mail_from: String,
    pub rcpt: String,
    /// Headers and body, CRLF line ends, dot-stuffed, without the final ".".
    pub data: String,
}

/// Submits `messages` over `connections` parallel connections (each reused, MAIL/RCPT/DATA
/// pipelined). Returns (accepted with 250, refused, elapsed).
pub async fn submit_all(
    port: u16,
    messages: Vec<Submission>,
    connections: usize,
) -> (u64, u64, Duration) {
    let mut shares: Vec<Vec<Submission>> = vec![Vec::new(); connections];
    for (i, m) in messages.into_iter().enumerate() {
        shares[i % connections].push(m);
    }
    let started = Instant::now();
    let jobs: Vec<_> = shares
        .into_iter()
        .map(|share| tokio::spawn(submit_share(port, share)))
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for job in jobs {
        let (o, r) = job.await.expect("submitter");
        ok += o;
        refused += r;
    }
    (ok, refused, started.elapsed())
}

async fn submit_share(port: u16, share: Vec<Submission>) -> (u64, u64) {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the SMTP server");
    stream.set_nodelay(true).ok();
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    expect_code(&mut read, 220).await;
    write
        .write_all(b"EHLO bench.mail.example\r\n")
        .await
        .unwrap();
    expect_code(&mut read, 250).await;
    let (mut ok, mut refused) = (0, 0);
    for m in share {
        let head = format!(
            "MAIL FROM:<{}>\r\nRCPT TO:<{}>\r\nDATA\r\n",
            m.mail_from, m.rcpt
        );
        write.write_all(head.as_bytes()).await.unwrap();
        let (mail, rcpt, data) = (
            reply_code(&mut read).await,
            reply_code(&mut read).await,
            reply_code(&mut read).await,
        );
        if data != 354 {
            refused += 1;
            if mail == 250 && rcpt == 250 {
                panic!("DATA refused with {data}");
            }
            write.write_all(b"RSET\r\n").await.unwrap();
            reply_code(&mut read).await;
            continue;
        }
        write.write_all(m.data.as_bytes()).await.unwrap();
        write.write_all(b".\r\n").await.unwrap();
        if reply_code(&mut read).await == 250 {
            ok += 1;
        } else {
            refused += 1;
        }
    }
    let _ = write.write_all(b"QUIT\r\n").await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), read.read_to_end(&mut rest)).await;
    (ok, refused)
}

async fn expect_code(read: &mut BufReader<tokio::net::tcp::OwnedReadHalf>, code: u16) {
    let got = reply_code(read).await;
    assert_eq!(got, code, "unexpected SMTP reply");
}

/// Reads one (possibly multi-line) reply and returns its code.
async fn reply_code(read: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> u16 {
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(60), read.read_line(&mut line))
            .await
            .expect("SMTP reply within 60 s")
            .expect("read SMTP reply");
        assert!(n > 0, "SMTP server closed the connection");
        if line.as_bytes().get(3) != Some(&b'-') {
            return line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
        }
    }
}

/// What a forwarded email tells a replying user.
#[derive(Debug, Clone)]
pub struct Forwarded {
    pub to: String,
    pub alias: String,
    pub message_id: String,
}

/// Reads the mails `smtp-sink -d` dumped into `dir`.
pub fn dumped(dir: &Path) -> Vec<Forwarded> {
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files
        .into_iter()
        .filter_map(|path| {
            let raw = std::fs::read(&path).ok()?;
            let message = mail_parser::MessageParser::default().parse(&raw)?;
            let first = |a: Option<&mail_parser::Address>| {
                a.and_then(|a| a.first())
                    .and_then(|a| a.address.as_ref())
                    .map(|s| s.to_string())
            };
            Some(Forwarded {
                to: first(message.to())?,
                alias: first(message.reply_to())?,
                message_id: message.message_id()?.to_owned(),
            })
        })
        .collect()
}

/// A plain-text reply from `from` to `alias`, threaded under `in_reply_to`.
pub fn reply(from: &str, alias: &str, in_reply_to: &str, id: &str, text: &str) -> Submission {
    let data = format!(
        "From: {from}\r\nTo: {alias}\r\nSubject: Re: IM\r\nMessage-ID: <{id}>\r\n\
         In-Reply-To: <{in_reply_to}>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\
         {text}\r\n\r\nOn Wed, 25 Nov 2026 at 10:00, bob via Reach wrote:\r\n> earlier text\r\n"
    );
    Submission {
        mail_from: from.to_owned(),
        rcpt: alias.to_owned(),
        data,
    }
}
