//! A real Kannel 1.4.5 for integration tests (bearerbox + smsbox as child processes, config from
//! `tests/servers/kannel.conf.in`, free loopback ports, a temporary folder), and the "handset":
//! the one TCP client Kannel's fake SMSC accepts, which receives every MT and can send MO.
//!
//! What the fake SMSC (Kannel 1.4.5 `smsc_fake`) writes and reads, one line per SMS:
//! - MT: `SENDER RECEIVER text MESSAGE` for 7-bit texts, written raw (UTF-8; a line break in
//!   the message splits the line, so continuation lines are joined back here);
//!   `... ucs-2 URLENCODED` (UTF-16BE bytes, `+` for 0x20) for UCS-2; `... data URLENCODED` for
//!   8-bit; `... udh URLENCODED-UDH data URLENCODED` for each part of a long SMS, whatever its
//!   coding (a UCS-2 part is told apart by its bytes here).
//! - MO: `SENDER RECEIVER text MESSAGE` (7-bit, taken as UTF-8), `... ucs2 URLENCODED-UTF-16BE`
//!   (UCS-2), `... data URLENCODED` (8-bit), `... udh-text` / `udh-data` (parts).
//! - The SMSC shows `online` in bearerbox's status while a client is attached; a second client
//!   waits in the backlog until the first leaves. When bearerbox stops, the handset's socket
//!   ends (EOF): call [`Handset::reconnect`] after [`Kannel::restart`].
//!
//! Processes are stopped by PID only (SIGTERM, then SIGKILL); `Drop` kills what is left.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use percent_encoding::{percent_decode, percent_encode, NON_ALPHANUMERIC};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::process::{append_log, tail, terminate};

const KANNEL_CONF: &str = include_str!("../servers/kannel.conf.in");
const USERNAME: &str = "reach";
const PASSWORD: &str = "kannelpw";

/// bearerbox + smsbox with a fake SMSC.
pub struct Kannel {
    dir: tempfile::TempDir,
    admin_port: u16,
    smsbox_port: u16,
    smsc_port: u16,
    sendsms_port: u16,
    bearerbox: Option<Child>,
    smsbox: Option<Child>,
}

impl Kannel {
    /// Starts Kannel; incoming SMS go to `mo_url` (Reach's webhook incl. `?secret=...`).
    /// Returns once smsbox's sendsms port answers and smsbox is connected to bearerbox.
    pub async fn start(mo_url: &str) -> Kannel {
        assert!(
            mo_url.contains('?'),
            "mo_url must carry a query (the secret): {mo_url}"
        );
        let dir = tempfile::Builder::new()
            .prefix("reach-kannel-")
            .tempdir()
            .expect("temp dir");
        let mut kannel = Kannel {
            dir,
            admin_port: super::free_port(),
            smsbox_port: super::free_port(),
            smsc_port: super::free_port(),
            sendsms_port: super::free_port(),
            bearerbox: None,
            smsbox: None,
        };
        let config = KANNEL_CONF
            .replace("@DIR@", &kannel.dir().display().to_string())
            .replace("@ADMIN_PORT@", &kannel.admin_port.to_string())
            .replace("@SMSBOX_PORT@", &kannel.smsbox_port.to_string())
            .replace("@SMSC_PORT@", &kannel.smsc_port.to_string())
            .replace("@SENDSMS_PORT@", &kannel.sendsms_port.to_string())
            .replace("@USERNAME@", USERNAME)
            .replace("@PASSWORD@", PASSWORD)
            .replace("@MO_URL@", mo_url);
        std::fs::write(kannel.config_path(), config).expect("write kannel.conf");
        std::fs::create_dir_all(kannel.dir().join("dlr-spool")).expect("mkdir dlr-spool");
        kannel.spawn().await;
        kannel
    }

    /// `http://127.0.0.1:PORT/cgi-bin/sendsms`
    pub fn sendsms_url(&self) -> String {
        format!("http://127.0.0.1:{}/cgi-bin/sendsms", self.sendsms_port)
    }

    pub fn username(&self) -> &str {
        USERNAME
    }

    pub fn password(&self) -> &str {
        PASSWORD
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The fake SMSC's port (the handset's).
    pub fn smsc_port(&self) -> u16 {
        self.smsc_port
    }

    pub fn is_running(&self) -> bool {
        self.bearerbox.is_some() && self.smsbox.is_some()
    }

    /// bearerbox's `status.txt`, or None when it does not answer.
    pub async fn status(&self) -> Option<String> {
        let request = format!(
            "GET /status.txt?password={PASSWORD}-status HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"
        );
        let exchange = async {
            let mut stream = TcpStream::connect(("127.0.0.1", self.admin_port))
                .await
                .ok()?;
            stream.write_all(request.as_bytes()).await.ok()?;
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).await.ok()?;
            Some(String::from_utf8_lossy(&answer).into_owned())
        };
        let answer = tokio::time::timeout(Duration::from_secs(2), exchange)
            .await
            .ok()??;
        answer
            .starts_with("HTTP/1.")
            .then(|| answer.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()))
            .flatten()
    }

    /// Whether the fake SMSC has a client (the handset) attached.
    pub async fn smsc_online(&self) -> bool {
        self.status()
            .await
            .is_some_and(|s| s.contains(&format!("FAKE:{} (online", self.smsc_port)))
    }

    /// Stops smsbox and bearerbox (SIGTERM to both, SIGKILL after 10 s). Idempotent. Messages
    /// Kannel accepted but has not sent stay in its store.
    pub async fn stop(&mut self) {
        for child in [self.smsbox.as_ref(), self.bearerbox.as_ref()]
            .into_iter()
            .flatten()
        {
            super::process::signal(child.id(), "TERM");
        }
        if let Some(mut smsbox) = self.smsbox.take() {
            terminate(&mut smsbox, Duration::from_secs(10)).await;
        }
        if let Some(mut bearerbox) = self.bearerbox.take() {
            terminate(&mut bearerbox, Duration::from_secs(10)).await;
        }
    }

    /// SIGKILL to both: a crash.
    pub async fn kill(&mut self) {
        for child in [self.smsbox.as_mut(), self.bearerbox.as_mut()]
            .into_iter()
            .flatten()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.smsbox = None;
        self.bearerbox = None;
    }

    /// Stops Kannel (if running) and starts it again: same ports, config and store.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.spawn().await;
    }

    /// The last lines of both logs and both consoles, for failure messages.
    pub fn logs(&self, lines: usize) -> String {
        ["bearerbox.log", "bearerbox.out", "smsbox.log", "smsbox.out"]
            .iter()
            .map(|name| format!("--- {name} ---\n{}", tail(&self.dir().join(name), lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn config_path(&self) -> PathBuf {
        self.dir().join("kannel.conf")
    }

    fn launch(&self, program: &str) -> Child {
        let (out, err) = append_log(&self.dir().join(format!("{program}.out")));
        Command::new(program)
            .arg("-v")
            .arg("1")
            .arg(self.config_path())
            .current_dir(self.dir())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program} (apt: kannel): {e}"))
    }

    async fn spawn(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        self.bearerbox = Some(self.launch("bearerbox"));
        // smsbox gives up if bearerbox's box port is not there yet.
        while self.status().await.is_none() || !port_open(self.smsbox_port).await {
            self.check_alive("bearerbox", deadline);
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        self.smsbox = Some(self.launch("smsbox"));
        loop {
            self.check_alive("smsbox", deadline);
            if port_open(self.sendsms_port).await
                && self.status().await.is_some_and(|s| s.contains("smsbox:"))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }

    fn check_alive(&mut self, what: &str, deadline: Instant) {
        let exited = [self.bearerbox.as_mut(), self.smsbox.as_mut()]
            .into_iter()
            .flatten()
            .find_map(|child| child.try_wait().ok().flatten());
        if let Some(status) = exited {
            panic!(
                "{what}: a Kannel process exited ({status})\n{}",
                self.logs(30)
            );
        }
        if Instant::now() > deadline {
            panic!("{what} not ready within 15 s\n{}", self.logs(30));
        }
    }
}

impl Drop for Kannel {
    fn drop(&mut self) {
        for child in [self.smsbox.as_mut(), self.bearerbox.as_mut()]
            .into_iter()
            .flatten()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn port_open(port: u16) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_millis(500),
            TcpStream::connect(("127.0.0.1", port))
        )
        .await,
        Ok(Ok(_))
    )
}

/// An SMS the handset received (parts of a long SMS joined).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mt {
    pub from: String,
    pub to: String,
    pub text: String,
    /// How many SMS it took (1, or the number of `udh` parts).
    pub parts: usize,
    /// The lines as the fake SMSC wrote them.
    pub raw: Vec<String>,
}

/// The phone: the fake SMSC's only client.
pub struct Handset {
    port: u16,
    stream: Option<TcpStream>,
    buffer: Vec<u8>,
    /// Parts of long SMS, by (from, to, reference): total and parts so far.
    partial: HashMap<(String, String, u32), Partial>,
}

struct Partial {
    total: usize,
    parts: Vec<Option<(bool, Vec<u8>)>>,
    raw: Vec<String>,
}

/// One decoded line.
enum Line {
    Whole(Mt),
    Part {
        from: String,
        to: String,
        reference: u32,
        total: usize,
        seq: usize,
        ucs2: bool,
        bytes: Vec<u8>,
        raw: String,
    },
}

impl Handset {
    /// Connects to Kannel's fake SMSC, retrying until bearerbox listens and shows it online.
    pub async fn connect(kannel: &Kannel) -> Handset {
        let mut handset = Handset {
            port: kannel.smsc_port(),
            stream: None,
            buffer: Vec::new(),
            partial: HashMap::new(),
        };
        handset.reconnect(kannel).await;
        handset
    }

    /// Drops the connection (if any) and connects again: needed after Kannel restarted.
    pub async fn reconnect(&mut self, kannel: &Kannel) {
        self.disconnect();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(stream) = TcpStream::connect(("127.0.0.1", self.port)).await {
                stream.set_nodelay(true).expect("nodelay");
                self.stream = Some(stream);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "fake SMSC port not open within 15 s\n{}",
                kannel.logs(20)
            );
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        while !kannel.smsc_online().await {
            assert!(
                Instant::now() < deadline,
                "fake SMSC did not take the handset within 15 s (another client attached?)\n{}",
                kannel.logs(20)
            );
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }

    /// Hangs up (Kannel then queues MT until a handset connects again).
    pub fn disconnect(&mut self) {
        self.stream = None;
        self.buffer.clear();
        self.partial.clear();
    }

    /// Whether the connection is gone (Kannel stopped, or [`Handset::disconnect`]).
    pub fn is_closed(&self) -> bool {
        self.stream.is_none()
    }

    /// The next whole SMS within `timeout` (parts of a long SMS are collected first).
    pub async fn recv_mt(&mut self, timeout: Duration) -> Option<Mt> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let line = self.next_line(deadline).await?;
            // A 7-bit text with a line break arrives as several lines: join the ones that do
            // not start a new SMS (they come in the same write, so a short wait is enough).
            let mut line = line;
            if split_header(&line).is_some_and(|(_, _, kind, _)| kind == "text") {
                loop {
                    let soon = tokio::time::Instant::now() + Duration::from_millis(50);
                    if !self.has_line() && !self.fill(soon.min(deadline)).await {
                        break;
                    }
                    let Some(end) = self.buffer.iter().position(|&b| b == b'\n') else {
                        break;
                    };
                    if split_header(&self.buffer[..end]).is_some() {
                        break;
                    }
                    let next: Vec<u8> = self.buffer.drain(..=end).collect();
                    line.push(b'\n');
                    line.extend_from_slice(&next[..next.len() - 1]);
                }
            }
            match parse_line(&line) {
                Some(Line::Whole(mt)) => return Some(mt),
                Some(Line::Part {
                    from,
                    to,
                    reference,
                    total,
                    seq,
                    ucs2,
                    bytes,
                    raw,
                }) => {
                    let key = (from.clone(), to.clone(), reference);
                    let partial = self.partial.entry(key.clone()).or_insert_with(|| Partial {
                        total,
                        parts: vec![None; total],
                        raw: Vec::new(),
                    });
                    partial.raw.push(raw);
                    if (1..=partial.total).contains(&seq) {
                        partial.parts[seq - 1] = Some((ucs2, bytes));
                    }
                    if partial.parts.iter().all(Option::is_some) {
                        let partial = self.partial.remove(&key).expect("partial");
                        let ucs2 = partial.parts.iter().flatten().any(|(u, _)| *u);
                        let bytes: Vec<u8> = partial
                            .parts
                            .into_iter()
                            .flatten()
                            .flat_map(|(_, b)| b)
                            .collect();
                        return Some(Mt {
                            from,
                            to,
                            text: decode_guess(&bytes, ucs2),
                            parts: partial.total,
                            raw: partial.raw,
                        });
                    }
                }
                None => panic!(
                    "handset: cannot read line from Kannel: {:?}",
                    String::from_utf8_lossy(&line)
                ),
            }
        }
    }

    /// Sends an SMS from the phone `from` to `to`, as a phone would: printable ASCII as 7-bit
    /// `text`, anything else (accents, Cyrillic, emoji, line breaks) as UCS-2.
    pub async fn send_mo(&mut self, from: &str, to: &str, text: &str) {
        let line = if text.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            format!("{from} {to} text {text}")
        } else {
            let bytes: Vec<u8> = text.encode_utf16().flat_map(u16::to_be_bytes).collect();
            format!(
                "{from} {to} ucs2 {}",
                percent_encode(&bytes, NON_ALPHANUMERIC)
            )
        };
        self.send_line(&line).await;
    }

    /// Writes one raw line (without its `\n`) to the fake SMSC.
    pub async fn send_line(&mut self, line: &str) {
        let stream = self.stream.as_mut().expect("handset not connected");
        let mut bytes = line.as_bytes().to_vec();
        bytes.push(b'\n');
        stream.write_all(&bytes).await.expect("write to fake SMSC");
    }

    fn has_line(&self) -> bool {
        self.buffer.contains(&b'\n')
    }

    /// Reads more bytes until `deadline`; false on timeout or a closed connection.
    async fn fill(&mut self, deadline: tokio::time::Instant) -> bool {
        let Some(stream) = self.stream.as_mut() else {
            return false;
        };
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                self.stream = None;
                false
            }
            Ok(Ok(n)) => {
                self.buffer.extend_from_slice(&chunk[..n]);
                true
            }
            Err(_) => false,
        }
    }

    async fn next_line(&mut self, deadline: tokio::time::Instant) -> Option<Vec<u8>> {
        loop {
            if let Some(end) = self.buffer.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buffer.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if !line.is_empty() {
                    return Some(line);
                }
                continue;
            }
            if !self.fill(deadline).await {
                return None;
            }
        }
    }
}

const KINDS: [&str; 5] = ["text", "data", "ucs-2", "ucs2", "udh"];

/// `SENDER RECEIVER KIND REST` when `line` starts an SMS.
fn split_header(line: &[u8]) -> Option<(String, String, String, &[u8])> {
    let mut fields = line.splitn(4, |&b| b == b' ');
    let from = std::str::from_utf8(fields.next()?).ok()?;
    let to = std::str::from_utf8(fields.next()?).ok()?;
    let kind = std::str::from_utf8(fields.next()?).ok()?;
    let rest = fields.next().unwrap_or(b"");
    (!from.is_empty() && !to.is_empty() && KINDS.contains(&kind))
        .then(|| (from.to_owned(), to.to_owned(), kind.to_owned(), rest))
}

fn parse_line(line: &[u8]) -> Option<Line> {
    let (from, to, kind, rest) = split_header(line)?;
    let raw = String::from_utf8_lossy(line).into_owned();
    let whole = |text: String| {
        Some(Line::Whole(Mt {
            from: from.clone(),
            to: to.clone(),
            text,
            parts: 1,
            raw: vec![raw.clone()],
        }))
    };
    match kind.as_str() {
        "text" => whole(String::from_utf8_lossy(rest).into_owned()),
        "data" => whole(decode_guess(&url_decode(rest), false)),
        "ucs-2" | "ucs2" => whole(utf16be(&url_decode(rest))),
        "udh" => {
            // `udh UDH data|ucs-2 PAYLOAD` (1.4.5), or `udh UDH PAYLOAD` (older).
            let mut fields = rest.splitn(3, |&b| b == b' ');
            let udh = url_decode(fields.next()?);
            let second = fields.next().unwrap_or(b"");
            let (ucs2, payload) = match (second, fields.next()) {
                (b"data" | b"text", Some(payload)) => (false, payload),
                (b"ucs-2" | b"ucs2", Some(payload)) => (true, payload),
                (payload, _) => (false, payload),
            };
            let (reference, total, seq) = concatenation(&udh)?;
            Some(Line::Part {
                from,
                to,
                reference,
                total,
                seq,
                ucs2,
                bytes: url_decode(payload),
                raw,
            })
        }
        _ => None,
    }
}

/// (reference, total, sequence) from a UDH with a concatenation element (8- or 16-bit reference).
fn concatenation(udh: &[u8]) -> Option<(u32, usize, usize)> {
    let length = *udh.first()? as usize;
    let mut elements = udh.get(1..=length)?;
    while elements.len() >= 2 {
        let (id, len) = (elements[0], elements[1] as usize);
        let data = elements.get(2..2 + len)?;
        match (id, len) {
            (0x00, 3) => return Some((data[0] as u32, data[1] as usize, data[2] as usize)),
            (0x08, 4) => {
                return Some((
                    u32::from(u16::from_be_bytes([data[0], data[1]])),
                    data[2] as usize,
                    data[3] as usize,
                ))
            }
            _ => elements = &elements[2 + len..],
        }
    }
    None
}

/// `+` is 0x20, then `%XX`.
fn url_decode(input: &[u8]) -> Vec<u8> {
    let spaced: Vec<u8> = input
        .iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect();
    percent_decode(&spaced).collect()
}

fn utf16be(bytes: &[u8]) -> String {
    let units: Vec<u16> = bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))
        .collect();
    String::from_utf16_lossy(&units)
}

/// The fake SMSC does not say a `udh`/`data` payload's coding: UCS-2 when told so, or when the
/// bytes hold control characters that no 7-bit text has (UTF-16BE of Latin or Cyrillic text is
/// full of 0x00 and 0x04); UTF-8 otherwise.
fn decode_guess(bytes: &[u8], ucs2: bool) -> String {
    let controls = bytes
        .iter()
        .any(|&b| b < 0x20 && !matches!(b, b'\n' | b'\r' | b'\t'));
    if ucs2 || (controls && bytes.len().is_multiple_of(2)) {
        utf16be(bytes)
    } else {
        String::from_utf8_lossy(bytes).into_owned()
    }
}
