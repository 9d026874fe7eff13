//! Mail for integration tests: a real SMTP relay that stores what it receives (aiosmtpd's
//! Mailbox handler, a child process on a free loopback port), and a raw SMTP client that submits
//! replies to Reach's listener and reports every reply code, as an MTA would see them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// aiosmtpd storing every mail in a Maildir.
pub struct MailSink {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// A mail the sink stored.
#[derive(Debug, Clone)]
pub struct SinkMail {
    pub raw: Vec<u8>,
    pub path: PathBuf,
}

impl SinkMail {
    /// The decoded value of a header (first occurrence).
    pub fn header(&self, name: &str) -> Option<String> {
        let message = mail_parser::MessageParser::default().parse(&self.raw)?;
        message.header(name).map(|h| match h {
            mail_parser::HeaderValue::Text(t) => t.to_string(),
            mail_parser::HeaderValue::Address(a) => a
                .iter()
                .filter_map(|addr| addr.address.as_ref().map(|s| s.to_string()))
                .collect::<Vec<_>>()
                .join(", "),
            other => format!("{other:?}"),
        })
    }

    /// The raw header line's value, unparsed (e.g. to check Message-ID spelling).
    pub fn raw_header(&self, name: &str) -> Option<String> {
        let text = String::from_utf8_lossy(&self.raw);
        let prefix = format!("{}:", name.to_ascii_lowercase());
        text.lines()
            .take_while(|l| !l.is_empty())
            .find(|l| l.to_ascii_lowercase().starts_with(&prefix))
            .map(|l| l[prefix.len()..].trim().to_owned())
    }

    pub fn text(&self) -> String {
        mail_parser::MessageParser::default()
            .parse(&self.raw)
            .and_then(|m| m.body_text(0).map(|t| t.into_owned()))
            .unwrap_or_default()
    }

    /// The reply alias the mail came from.
    pub fn reply_to(&self) -> String {
        let message = mail_parser::MessageParser::default()
            .parse(&self.raw)
            .expect("parsable mail");
        message
            .reply_to()
            .and_then(|a| a.first())
            .and_then(|a| a.address.as_ref())
            .map(|s| s.to_string())
            .expect("a Reply-To address")
    }

    pub fn message_id(&self) -> String {
        mail_parser::MessageParser::default()
            .parse(&self.raw)
            .and_then(|m| m.message_id().map(str::to_owned))
            .expect("a Message-ID")
    }
}

impl MailSink {
    pub async fn start() -> MailSink {
        let dir = tempfile::tempdir().expect("temp dir");
        for sub in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(dir.path().join("mail").join(sub)).unwrap();
        }
        let mut sink = MailSink {
            port: super::free_port(),
            dir,
            child: None,
        };
        sink.resume().await;
        sink
    }

    /// Starts (again) on the same port with the same mailbox.
    pub async fn resume(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("sink.log"))
            .unwrap();
        let child = Command::new("python3")
            .args([
                "-m",
                "aiosmtpd",
                "-n",
                "-l",
                &format!("127.0.0.1:{}", self.port),
                "-c",
                "aiosmtpd.handlers.Mailbox",
            ])
            .arg(self.dir.path().join("mail"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start aiosmtpd (pip install aiosmtpd)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            assert!(Instant::now() < deadline, "aiosmtpd did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the relay (as if it went down).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn mailbox(&self) -> &Path {
        self.dir.path()
    }

    /// Every mail stored so far, oldest first.
    pub fn mails(&self) -> Vec<SinkMail> {
        let mut files: Vec<_> = std::fs::read_dir(self.mailbox().join("mail").join("new"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        files
            .into_iter()
            .filter_map(|path| std::fs::read(&path).ok().map(|raw| SinkMail { raw, path }))
            .collect()
    }

    /// Waits until at least `count` mails are stored; panics after `timeout`.
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> Vec<SinkMail> {
        let deadline = Instant::now() + timeout;
        loop {
            let mails = self.mails();
            if mails.len() >= count {
                return mails;
            }
            assert!(
                Instant::now() < deadline,
                "expected {count} mails at the relay, got {}",
                mails.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for MailSink {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What an SMTP client heard while submitting one message.
#[derive(Debug, Clone, Default)]
pub struct Submission {
    pub mail_from: (u16, String),
    pub rcpt: Vec<(u16, String)>,
    /// The answer after the message data (None if DATA was not reached).
    pub data: Option<(u16, String)>,
}

impl Submission {
    /// The final answer: the data answer, or the first refusal before it.
    pub fn outcome(&self) -> (u16, String) {
        if let Some(d) = &self.data {
            return d.clone();
        }
        if self.mail_from.0 >= 400 {
            return self.mail_from.clone();
        }
        self.rcpt
            .iter()
            .find(|r| r.0 >= 400)
            .cloned()
            .unwrap_or_default()
    }
}

async fn read_reply(reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> (u16, String) {
    let mut text = String::new();
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(20), reader.read_line(&mut line))
            .await
            .expect("SMTP reply in time")
            .expect("read SMTP reply");
        assert!(n > 0, "SMTP connection closed; heard so far: {text}");
        let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
        text.push_str(line.get(4..).unwrap_or("").trim_end());
        if line.as_bytes().get(3) != Some(&b'-') {
            return (code, text);
        }
        text.push('\n');
    }
}

async fn command(
    write: &mut tokio::net::tcp::OwnedWriteHalf,
    reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    line: &str,
) -> (u16, String) {
    write
        .write_all(format!("{line}\r\n").as_bytes())
        .await
        .expect("write SMTP command");
    read_reply(reader).await
}

/// Submits `message` (headers and body, LF or CRLF) to the SMTP server on `port`.
pub async fn submit(port: u16, mail_from: &str, rcpts: &[&str], message: &str) -> Submission {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the SMTP listener");
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let greeting = read_reply(&mut reader).await;
    assert_eq!(greeting.0, 220, "greeting: {greeting:?}");
    assert_eq!(
        command(&mut write, &mut reader, "EHLO test.example")
            .await
            .0,
        250
    );
    let mut out = Submission {
        mail_from: command(&mut write, &mut reader, &format!("MAIL FROM:<{mail_from}>")).await,
        ..Submission::default()
    };
    if out.mail_from.0 >= 400 {
        return out;
    }
    for rcpt in rcpts {
        out.rcpt
            .push(command(&mut write, &mut reader, &format!("RCPT TO:<{rcpt}>")).await);
    }
    if out.rcpt.iter().all(|r| r.0 >= 400) {
        let _ = write.write_all(b"QUIT\r\n").await;
        return out;
    }
    write.write_all(b"DATA\r\n").await.unwrap();
    let go = read_reply(&mut reader).await;
    assert_eq!(go.0, 354, "DATA: {go:?}");
    let mut data = String::new();
    for line in message.replace("\r\n", "\n").split('\n') {
        if line.starts_with('.') {
            data.push('.');
        }
        data.push_str(line);
        data.push_str("\r\n");
    }
    data.push_str(".\r\n");
    write.write_all(data.as_bytes()).await.unwrap();
    out.data = Some(read_reply(&mut reader).await);
    let _ = write.write_all(b"QUIT\r\n").await;
    out
}

/// A raw SMTP connection for abuse tests: it sends what a test says, as slowly as it likes,
/// from the loopback source address it is given (127.0.0.1, 127.0.0.2, ...).
pub struct SmtpConn {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    write: tokio::net::tcp::OwnedWriteHalf,
}

impl SmtpConn {
    /// Connects from `source` (an IPv4 loopback address) to the listener on `port`.
    pub async fn try_connect(source: &str, port: u16) -> Option<SmtpConn> {
        let socket = tokio::net::TcpSocket::new_v4().ok()?;
        socket.bind(format!("{source}:0").parse().ok()?).ok()?;
        let stream = socket.connect(([127, 0, 0, 1], port).into()).await.ok()?;
        let (read, write) = stream.into_split();
        Some(SmtpConn {
            reader: BufReader::new(read),
            write,
        })
    }

    /// Sends a command line (CRLF added). A connection the server closed is ignored here: the
    /// next read tells.
    pub async fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\r\n").as_bytes()).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.write.write_all(bytes).await;
    }

    /// The next reply (code and text, lines joined by '\n'), or None if the connection closed.
    /// Panics after 20 s of silence.
    pub async fn reply(&mut self) -> Option<(u16, String)> {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(20), self.reader.read_line(&mut line))
                .await
                .expect("SMTP reply in time")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
            text.push_str(line.get(4..).unwrap_or("").trim_end());
            if line.as_bytes().get(3) != Some(&b'-') {
                return Some((code, text));
            }
            text.push('\n');
        }
    }

    /// A reply if the server starts one within `limit` (nothing read is lost otherwise).
    pub async fn reply_within(&mut self, limit: Duration) -> Option<(u16, String)> {
        match tokio::time::timeout(limit, self.reader.fill_buf()).await {
            Ok(Ok(buf)) if !buf.is_empty() => self.reply().await,
            _ => None,
        }
    }

    /// Sends a command and returns its reply; panics if the connection closed instead.
    pub async fn command(&mut self, line: &str) -> (u16, String) {
        self.send(line).await;
        self.reply()
            .await
            .unwrap_or_else(|| panic!("connection closed instead of answering {line:?}"))
    }

    /// True once the server has closed the connection (within 20 s), with nothing more said.
    pub async fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        match tokio::time::timeout(Duration::from_secs(20), self.reader.read_to_end(&mut rest))
            .await
        {
            Ok(Ok(_)) | Ok(Err(_)) => rest.is_empty(),
            Err(_) => false,
        }
    }
}
