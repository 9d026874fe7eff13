//! Reach's own inbound SMTP listener: it receives users' email replies addressed to the per-session
//! reply aliases `r-TOKEN@REPLY_DOMAIN`.
//!
//! The listener speaks SMTP (RFC 5321, with PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES,
//! SMTPUTF8 and STARTTLS) and nothing else: it knows nothing of aliases, tokens or storage. The
//! application decides through an [`SmtpHandler`] whether a recipient exists and when a message is
//! stored; the listener sends the handler's answer as the SMTP reply, so a 250 after DATA means the
//! message is durably stored.
//!
//! Layout: the byte-level parts are sans-IO and tested with input split at every point
//! ([`LineFramer`] for command lines, [`DataReceiver`] for the DATA phase, [`parse_command`] for
//! one line); [`session`] drives one connection over any `AsyncRead + AsyncWrite`, under the
//! deadlines of [`SmtpConfig`] (per command line, per transaction, for the message data, and
//! an idle clock that only a received message restarts); [`serve`] accepts TCP connections under
//! a global and a per-client-address cap until shutdown.
//!
//! Logging: connection events at `debug` with the peer address; message content never, envelope
//! addresses never above `debug`.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

/// Longest command line, in octets including the line end (RFC 5321 4.5.3.1.4).
pub const MAX_COMMAND_LINE: usize = 1000;
/// Protocol errors (syntax, sequence) a client may make before it is disconnected with 421.
const MAX_PROTOCOL_ERRORS: u32 = 20;
/// How much is read from the socket at once.
const READ_CHUNK: usize = 16 * 1024;
/// Upper bound on how long [`serve`] waits for running sessions after shutdown.
const SHUTDOWN_GRACE_MAX: Duration = Duration::from_secs(30);
/// How long [`serve`] may spend telling a connection over the cap that it is refused.
const REFUSE_WRITE_TIMEOUT: Duration = Duration::from_millis(200);
/// How long a newcomer waits for the place an idle session was asked to give up.
const ROOM_WAIT: Duration = Duration::from_secs(2);
/// Longest path (address with angle brackets), RFC 5321 4.5.3.1.3.
const MAX_PATH: usize = 256;

/// What Reach answers to a command: the SMTP reply code, enhanced status (RFC 3463) and text.
///
/// `text` may hold several lines separated by `\n`; they become a multi-line reply. An empty
/// `enhanced` leaves the enhanced status out (greeting, EHLO, 354).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// e.g. "5.1.1"
    pub enhanced: String,
    pub text: String,
}

impl Reply {
    pub fn new(code: u16, enhanced: impl Into<String>, text: impl Into<String>) -> Reply {
        Reply {
            code,
            enhanced: enhanced.into(),
            text: text.into(),
        }
    }

    /// `250 2.0.0 text`
    pub fn ok(text: impl Into<String>) -> Reply {
        Reply::new(250, "2.0.0", text)
    }

    /// 2xx: the command succeeded.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// 4xx: the client should try again later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// Writes the reply in wire form. Never produces a malformed reply, whatever a handler put in
    /// the struct: a code outside 200..=599 becomes `451 4.3.0`, an enhanced status that is not
    /// `class.subject.detail` of the code's class is replaced by `class.0.0`, control characters in
    /// the text (so also CR and LF: no reply injection) become spaces.
    fn render(&self, out: &mut Vec<u8>) {
        let (code, enhanced) = if (200..=599).contains(&self.code) {
            (self.code, self.enhanced.as_str())
        } else {
            (451, "4.3.0")
        };
        let class = code / 100;
        let enhanced = if enhanced.is_empty() || is_enhanced_status(enhanced, class) {
            enhanced
        } else {
            match class {
                2 => "2.0.0",
                4 => "4.0.0",
                5 => "5.0.0",
                _ => "",
            }
        };
        let lines: Vec<&str> = self.text.split('\n').collect();
        for (i, line) in lines.iter().enumerate() {
            out.extend_from_slice(code.to_string().as_bytes());
            let line: String = line
                .trim_end_matches('\r')
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            let rest = match (enhanced.is_empty(), line.is_empty()) {
                (true, true) => String::new(),
                (true, false) => line,
                (false, true) => enhanced.to_string(),
                (false, false) => format!("{enhanced} {line}"),
            };
            let last = i + 1 == lines.len();
            if !last {
                out.push(b'-');
            } else if !rest.is_empty() {
                out.push(b' ');
            }
            out.extend_from_slice(rest.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = Vec::new();
        self.render(&mut out);
        let text = String::from_utf8_lossy(&out);
        f.write_str(text.trim_end())
    }
}

/// `class.subject.detail`, RFC 3463: class is the reply code's first digit (2, 4 or 5).
fn is_enhanced_status(s: &str, class: u16) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && parts[0].len() == 1
        && parts[0].parse::<u16>().ok() == Some(class)
        && matches!(class, 2 | 4 | 5)
        && parts[1..]
            .iter()
            .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
}

/// The SMTP envelope of the transaction in progress.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub peer: SocketAddr,
    /// The name the client gave in HELO/EHLO.
    pub helo: String,
    /// The reverse path without angle brackets; "" for the null sender `<>` (bounces).
    pub mail_from: String,
    /// The recipients accepted so far, without angle brackets.
    pub rcpt_to: Vec<String>,
}

/// The application's side of a session. The listener knows nothing of aliases or storage.
pub trait SmtpHandler: Send + Sync + 'static {
    /// RCPT TO: accept (2xx) or refuse (e.g. 550 5.1.1) one recipient. `envelope.rcpt_to` holds
    /// the recipients accepted before this one.
    fn check_recipient(
        &self,
        envelope: &Envelope,
        rcpt: &str,
    ) -> impl Future<Output = Reply> + Send;

    /// After DATA: the whole message (dot-unstuffed, CRLF line ends). Must return 250 only after the
    /// message is durably stored; the listener sends exactly this reply.
    fn deliver(&self, envelope: Envelope, message: Vec<u8>) -> impl Future<Output = Reply> + Send;
}

/// Listener settings.
///
/// The deadlines bound how long a client can hold one of the `max_connections` places without
/// handing over mail: a client that trickles bytes, or keeps a session open with NOOP, RSET,
/// HELP or VRFY, is answered `421 4.4.2` and disconnected when the first deadline passes.
#[derive(Clone)]
pub struct SmtpConfig {
    /// Name in the greeting and the EHLO reply.
    pub hostname: String,
    /// Advertised as `SIZE n`; bigger messages get 552 5.3.4 (at `MAIL FROM ... SIZE=` and while
    /// receiving DATA).
    pub max_message_bytes: usize,
    /// Connections beyond this get `421 4.7.0` and are closed (at least 1 is allowed), unless an
    /// idle session of an address holding more places makes room (see [`serve`]).
    pub max_connections: usize,
    /// Connections from one client address (IPv4 address, or IPv6 /64 network) beyond this get
    /// `421 4.7.0` and are closed, while other addresses still get in (at least 1 is allowed).
    pub max_connections_per_ip: usize,
    /// Recipients per transaction; more get 452 4.5.3.
    pub max_recipients: usize,
    /// Time to receive one whole command line, counted from the reply to the previous one (so a
    /// client sending a byte now and then gains nothing). Also bounds each write, each read
    /// inside DATA, the TLS handshake and, capped at 30 s, the shutdown grace of [`serve`].
    pub command_timeout: Duration,
    /// Time without a message received (counted from the greeting, then from the end of the last
    /// message's data, whatever its reply). Commands that do not hand over mail (NOOP, RSET,
    /// HELP, VRFY, EHLO, refused or accepted envelope commands) do not restart it; STARTTLS does
    /// not either. Not applied while the message data is being received.
    pub idle_timeout: Duration,
    /// Time from MAIL to the end of the message data.
    pub transaction_timeout: Duration,
    /// Time to receive the message data after 354, at least: the whole data must arrive within
    /// this plus `max_message_bytes / data_min_bytes_per_second` ([`SmtpConfig::data_deadline`]).
    pub data_timeout: Duration,
    /// The slowest transfer of the message data allowed for a message of the maximum size.
    pub data_min_bytes_per_second: u64,
    /// Some: advertise and accept STARTTLS.
    pub tls: Option<Arc<ServerConfig>>,
}

impl SmtpConfig {
    /// How long the message data may take after 354: `data_timeout` plus the time a message of
    /// `max_message_bytes` takes at `data_min_bytes_per_second`.
    pub fn data_deadline(&self) -> Duration {
        let rate = self.data_min_bytes_per_second.max(1);
        self.data_timeout
            .saturating_add(Duration::from_secs(self.max_message_bytes as u64 / rate))
    }
}

/// Errors of the listener.
#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    #[error("cannot read TLS certificate file {path}: {source}")]
    ReadCertificate { path: PathBuf, source: io::Error },
    #[error("no certificate found in {path} (expected PEM \"BEGIN CERTIFICATE\" blocks)")]
    NoCertificate { path: PathBuf },
    #[error("cannot read TLS private key file {path}: {source}")]
    ReadKey { path: PathBuf, source: io::Error },
    #[error("no private key found in {path} (expected a PEM PKCS#8, PKCS#1 or SEC1 private key)")]
    NoPrivateKey { path: PathBuf },
    #[error("TLS certificate {cert} and key {key} cannot be used: {source}")]
    TlsConfig {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(io::Error),
    #[error("SMTP connection I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Reads a PEM certificate chain and private key into a rustls server configuration (ring
/// provider, TLS 1.2 and 1.3). Errors name the file at fault.
pub fn load_tls(cert_pem: &Path, key_pem: &Path) -> Result<Arc<ServerConfig>, SmtpError> {
    let cert_bytes = std::fs::read(cert_pem).map_err(|source| SmtpError::ReadCertificate {
        path: cert_pem.to_path_buf(),
        source,
    })?;
    let certs = rustls_pemfile::certs(&mut &cert_bytes[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| SmtpError::ReadCertificate {
            path: cert_pem.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(SmtpError::NoCertificate {
            path: cert_pem.to_path_buf(),
        });
    }
    let key_bytes = std::fs::read(key_pem).map_err(|source| SmtpError::ReadKey {
        path: key_pem.to_path_buf(),
        source,
    })?;
    let key = rustls_pemfile::private_key(&mut &key_bytes[..])
        .map_err(|source| SmtpError::ReadKey {
            path: key_pem.to_path_buf(),
            source,
        })?
        .ok_or_else(|| SmtpError::NoPrivateKey {
            path: key_pem.to_path_buf(),
        })?;
    let tls_error = |source| SmtpError::TlsConfig {
        cert: cert_pem.to_path_buf(),
        key: key_pem.to_path_buf(),
        source,
    };
    // An explicit provider: the process-wide default is ambiguous (and `builder()` panics) as soon
    // as another crate in the build enables rustls' aws-lc-rs feature.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(tls_error)?;
    Ok(Arc::new(config))
}

// ---------------------------------------------------------------------------------------------
// Sans-IO: command lines
// ---------------------------------------------------------------------------------------------

/// One framed command line.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// The line without its line end (CRLF or a bare LF).
    Command(Vec<u8>),
    /// The line was longer than [`MAX_COMMAND_LINE`]; its bytes were discarded.
    TooLong,
}

/// Cuts command lines out of the input buffer. Accepts CRLF and bare LF. Keeps at most
/// [`MAX_COMMAND_LINE`] bytes of an unfinished line: beyond that it discards until the next LF and
/// then reports [`Line::TooLong`].
#[derive(Debug, Default)]
struct LineFramer {
    discarding: bool,
}

impl LineFramer {
    /// Takes the next complete line out of `buf`, or returns None when more input is needed.
    fn next_line(&mut self, buf: &mut Vec<u8>) -> Option<Line> {
        match buf.iter().position(|&b| b == b'\n') {
            Some(lf) => {
                let mut line: Vec<u8> = buf.drain(..=lf).collect();
                if std::mem::take(&mut self.discarding) || line.len() > MAX_COMMAND_LINE {
                    return Some(Line::TooLong);
                }
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                Some(Line::Command(line))
            }
            None => {
                if self.discarding || buf.len() > MAX_COMMAND_LINE {
                    self.discarding = true;
                    buf.clear();
                }
                None
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sans-IO: the DATA phase
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataState {
    /// At the start of a line.
    LineStart,
    /// A line started with '.'.
    Dot,
    /// A line started with ".\r".
    DotCr,
    /// Inside a line.
    Middle,
}

/// Receives the message after `354`: finds the terminating `.` line (after CRLF or a bare LF),
/// removes dot-stuffing, turns bare LF into CRLF and counts the size. Beyond `max` bytes it keeps
/// counting but drops the content, so the session can answer 552 and go on.
#[derive(Debug)]
struct DataReceiver {
    state: DataState,
    body: Vec<u8>,
    size: usize,
    max: usize,
    overflow: bool,
    last: u8,
}

impl DataReceiver {
    fn new(max: usize) -> DataReceiver {
        DataReceiver {
            state: DataState::LineStart,
            body: Vec::new(),
            size: 0,
            max,
            overflow: false,
            last: 0,
        }
    }

    /// Feeds input; returns how many bytes were consumed and whether the terminating line was
    /// reached. Bytes after the terminator are not consumed: they are the next commands.
    fn feed(&mut self, input: &[u8]) -> (usize, bool) {
        for (i, &b) in input.iter().enumerate() {
            match self.state {
                DataState::LineStart if b == b'.' => self.state = DataState::Dot,
                DataState::Dot if b == b'\r' => self.state = DataState::DotCr,
                DataState::Dot | DataState::DotCr if b == b'\n' => return (i + 1, true),
                DataState::DotCr => {
                    // ".\rX": the dot is stuffing; the CR is content.
                    self.push(b'\r');
                    self.content(b);
                }
                // "..": the first dot is stuffing.
                DataState::LineStart | DataState::Dot | DataState::Middle => self.content(b),
            }
        }
        (input.len(), false)
    }

    fn content(&mut self, b: u8) {
        self.push(b);
        self.state = if b == b'\n' {
            DataState::LineStart
        } else {
            DataState::Middle
        };
    }

    fn push(&mut self, b: u8) {
        if b == b'\n' && self.last != b'\r' {
            self.emit(b'\r');
        }
        self.emit(b);
    }

    fn emit(&mut self, b: u8) {
        self.last = b;
        self.size = self.size.saturating_add(1);
        if self.size > self.max {
            if !self.overflow {
                self.overflow = true;
                self.body = Vec::new();
            }
        } else {
            self.body.push(b);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sans-IO: command parsing
// ---------------------------------------------------------------------------------------------

/// BODY= of MAIL FROM (RFC 6152).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    SevenBit,
    EightBitMime,
}

/// One parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Command {
    Ehlo(String),
    Helo(String),
    Mail {
        from: String,
        /// SIZE=; u64::MAX when the number does not fit.
        size: Option<u64>,
        body: Option<Body>,
        smtputf8: bool,
    },
    Rcpt(String),
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Help,
    StartTls,
}

fn syntax_error(text: &str) -> Reply {
    Reply::new(501, "5.5.4", text)
}

/// Parses one command line (without its line end). The error is the reply to send.
fn parse_command(line: &[u8]) -> Result<Command, Reply> {
    let Ok(line) = std::str::from_utf8(line) else {
        return Err(Reply::new(500, "5.5.2", "syntax error: invalid characters"));
    };
    let line = line.trim_matches([' ', '\t']);
    let (verb, args) = match line.find([' ', '\t']) {
        Some(i) => (&line[..i], line[i..].trim_start_matches([' ', '\t'])),
        None => (line, ""),
    };
    let no_args = |command: Command| {
        if args.is_empty() {
            Ok(command)
        } else {
            Err(syntax_error("syntax error: no parameters allowed"))
        }
    };
    match verb.to_ascii_uppercase().as_str() {
        "EHLO" | "HELO" => {
            let Some(name) = args.split([' ', '\t']).next().filter(|n| !n.is_empty()) else {
                return Err(syntax_error(
                    "syntax error: give a domain or address literal",
                ));
            };
            Ok(if verb.eq_ignore_ascii_case("EHLO") {
                Command::Ehlo(name.to_string())
            } else {
                Command::Helo(name.to_string())
            })
        }
        "MAIL" => parse_mail(args),
        "RCPT" => parse_rcpt(args),
        "DATA" => no_args(Command::Data),
        "RSET" => no_args(Command::Rset),
        "QUIT" => no_args(Command::Quit),
        "STARTTLS" => no_args(Command::StartTls),
        "NOOP" => Ok(Command::Noop),
        "HELP" => Ok(Command::Help),
        "VRFY" => Ok(Command::Vrfy),
        "EXPN" | "TURN" | "ETRN" | "ATRN" | "BDAT" | "BURL" | "AUTH" | "SEND" | "SOML" | "SAML" => {
            Err(Reply::new(502, "5.5.1", "command not implemented"))
        }
        "" => Err(Reply::new(500, "5.5.2", "syntax error: empty command")),
        _ => Err(Reply::new(500, "5.5.1", "command unrecognized")),
    }
}

/// Splits `FROM:<path> params` / `TO:<path> params` into the address (brackets, source route
/// removed) and the parameter text. Lenient: a space after the colon and a path without angle
/// brackets are accepted.
fn split_path<'a>(args: &'a str, keyword: &str) -> Option<(String, &'a str)> {
    let head = args.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = args[keyword.len()..].trim_start_matches([' ', '\t']);
    let rest = rest.strip_prefix(':')?.trim_start_matches([' ', '\t']);
    let (path, params) = if let Some(inner) = rest.strip_prefix('<') {
        let mut quoted = false;
        let mut escaped = false;
        let mut end = None;
        for (i, c) in inner.char_indices() {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                quoted = !quoted;
            } else if c == '>' && !quoted {
                end = Some(i);
                break;
            }
        }
        let end = end?;
        (&inner[..end], &inner[end + 1..])
    } else {
        match rest.find([' ', '\t']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        }
    };
    if !params.is_empty() && !params.starts_with([' ', '\t']) {
        return None;
    }
    if path.len() + 2 > MAX_PATH {
        return None;
    }
    // A source route "@a,@b:user@host" is ignored (RFC 5321 4.1.1.3, C.).
    let path = match path.strip_prefix('@') {
        Some(route) => &route[route.find(':')? + 1..],
        None => path,
    };
    Some((path.to_string(), params.trim_matches([' ', '\t'])))
}

/// `KEY[=VALUE]` parameters: (upper-case key, value).
fn esmtp_params(params: &str) -> impl Iterator<Item = (String, Option<&str>)> {
    params
        .split([' ', '\t'])
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_ascii_uppercase(), Some(v)),
            None => (p.to_ascii_uppercase(), None),
        })
}

fn parse_mail(args: &str) -> Result<Command, Reply> {
    let Some((from, params)) = split_path(args, "FROM") else {
        return Err(Reply::new(501, "5.5.4", "syntax: MAIL FROM:<address>"));
    };
    if !from.is_empty() && !is_valid_mailbox(&from) {
        return Err(Reply::new(501, "5.1.7", "bad sender address syntax"));
    }
    let (mut size, mut body, mut smtputf8) = (None, None, false);
    for (key, value) in esmtp_params(params) {
        match (key.as_str(), value) {
            ("SIZE", Some(v)) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
                size = Some(v.parse::<u64>().unwrap_or(u64::MAX));
            }
            ("SIZE", _) => return Err(syntax_error("bad SIZE parameter")),
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => body = Some(Body::SevenBit),
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => {
                body = Some(Body::EightBitMime)
            }
            ("BODY", _) => {
                return Err(Reply::new(555, "5.5.4", "unsupported BODY type"));
            }
            ("SMTPUTF8", None) => smtputf8 = true,
            _ => return Err(Reply::new(555, "5.5.4", "unsupported MAIL parameter")),
        }
    }
    Ok(Command::Mail {
        from,
        size,
        body,
        smtputf8,
    })
}

fn parse_rcpt(args: &str) -> Result<Command, Reply> {
    let Some((to, params)) = split_path(args, "TO") else {
        return Err(Reply::new(501, "5.5.4", "syntax: RCPT TO:<address>"));
    };
    if !(to.eq_ignore_ascii_case("postmaster") || is_valid_mailbox(&to)) {
        return Err(Reply::new(501, "5.1.3", "bad recipient address syntax"));
    }
    if !params.is_empty() {
        return Err(Reply::new(555, "5.5.4", "unsupported RCPT parameter"));
    }
    Ok(Command::Rcpt(to))
}

/// `local@domain`, checked leniently: a dot-atom or quoted local part (UTF-8 allowed, RFC 6531),
/// a domain of letters, digits, '-' and '.' (or UTF-8), or an address literal `[...]`.
fn is_valid_mailbox(address: &str) -> bool {
    if address.chars().any(char::is_control) {
        return false;
    }
    let Some((local, domain)) = address.rsplit_once('@') else {
        return false;
    };
    let local_ok = if local.len() >= 2 && local.starts_with('"') && local.ends_with('"') {
        true
    } else {
        !local.is_empty()
            && local.chars().all(|c| {
                c.is_ascii_alphanumeric() || !c.is_ascii() || ".!#$%&'*+-/=?^_`{|}~".contains(c)
            })
    };
    let domain_ok = if domain.starts_with('[') && domain.ends_with(']') && domain.len() > 2 {
        !domain[1..domain.len() - 1].contains(['[', ']', '\\', ' '])
    } else {
        !domain.is_empty()
            && domain.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
            })
    };
    local_ok && domain_ok
}

// ---------------------------------------------------------------------------------------------
// The session
// ---------------------------------------------------------------------------------------------

/// What ends a session from outside while it waits for a command: the shutdown signal (the
/// value turning true, or the sender being dropped), or [`serve`] asking this idle session to
/// make room for a client from a less-served address.
struct Shutdown {
    stop: Option<watch::Receiver<bool>>,
    room: Option<Arc<Member>>,
}

/// Why a session is ended from outside.
enum Ended {
    Shutdown,
    MakeRoom,
}

impl Shutdown {
    fn never() -> Shutdown {
        Shutdown {
            stop: None,
            room: None,
        }
    }

    fn on(stop: watch::Receiver<bool>) -> Shutdown {
        Shutdown {
            stop: Some(stop),
            room: None,
        }
    }

    async fn wait(&mut self) {
        match &mut self.stop {
            Some(rx) => {
                // Err: the sender is gone, which also means shutdown.
                let _ = rx.wait_for(|stop| *stop).await;
            }
            None => std::future::pending().await,
        }
    }

    async fn wait_either(&mut self) -> Ended {
        let room = self.room.clone();
        let make_room = async {
            match room {
                Some(member) => member.make_room.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.wait() => Ended::Shutdown,
            _ = make_room => Ended::MakeRoom,
        }
    }

    /// Tells [`serve`] whether this session is inside a transaction (never cut to make room).
    fn set_busy(&self, busy: bool) {
        if let Some(member) = &self.room {
            member
                .busy
                .store(busy, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// What the command loop asks its driver to do.
enum Next {
    Close,
    StartTls,
}

/// What one command leads to.
enum Action {
    Reply(Reply),
    /// Send the reply, then close.
    Close(Reply),
    /// Send 354 and receive the message.
    Data,
    /// Send 220 and start the TLS handshake.
    StartTls,
}

/// How waiting for input ended.
enum Input {
    Some,
    Eof,
    Timeout,
    Shutdown,
    MakeRoom,
}

/// Which deadline passed; says so in the 421.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deadline {
    Command,
    Idle,
    Transaction,
    Data,
    /// Inside DATA, no byte for `command_timeout`.
    DataStalled,
}

impl Deadline {
    fn reply(self, host: &str) -> Reply {
        let what = match self {
            Deadline::Command => "timeout waiting for a complete command",
            Deadline::Idle => "idle too long without sending a message",
            Deadline::Transaction => "transaction took too long",
            Deadline::Data => "message data took too long",
            Deadline::DataStalled => "no message data received for too long",
        };
        Reply::new(421, "4.4.2", format!("{host} {what}, closing connection"))
    }
}

/// The earliest of the deadlines given.
fn earliest(deadlines: &[Option<(Instant, Deadline)>]) -> (Instant, Deadline) {
    deadlines
        .iter()
        .flatten()
        .copied()
        .min_by_key(|(at, _)| *at)
        .unwrap_or_else(|| (Instant::now(), Deadline::Command))
}

struct Transaction {
    mail_from: String,
    rcpt_to: Vec<String>,
    /// When MAIL was accepted: the transaction deadline counts from here.
    started: Instant,
}

/// One session's state between (and, after STARTTLS, anew) command loops.
struct Session<'a, H> {
    peer: SocketAddr,
    config: &'a SmtpConfig,
    handler: &'a H,
    tls_active: bool,
    helo: Option<String>,
    transaction: Option<Transaction>,
    errors: u32,
    /// When the idle clock started (the greeting, or the end of the last message's data). Kept
    /// across STARTTLS.
    idle_since: Instant,
}

/// Runs one SMTP session over `io` until QUIT, the client closing, a timeout or an I/O error.
/// Sends the greeting first; handles STARTTLS by wrapping `io` when `config.tls` is set.
pub async fn session<IO, H>(
    io: IO,
    peer: SocketAddr,
    config: &SmtpConfig,
    handler: &H,
) -> Result<(), SmtpError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
    H: SmtpHandler,
{
    run_session(io, peer, config, handler, Shutdown::never()).await
}

async fn run_session<IO, H>(
    mut io: IO,
    peer: SocketAddr,
    config: &SmtpConfig,
    handler: &H,
    mut shutdown: Shutdown,
) -> Result<(), SmtpError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send,
    H: SmtpHandler,
{
    debug!(%peer, "SMTP session opened");
    let mut out = Vec::new();
    Reply::new(220, "", format!("{} ESMTP Reach", config.hostname)).render(&mut out);
    write_out(&mut io, &mut out, config.command_timeout).await?;

    let plain = Session::new(peer, config, handler, false, Instant::now());
    let (next, idle_since) = plain.run(&mut io, &mut shutdown).await?;
    let (Next::StartTls, Some(tls)) = (next, config.tls.clone()) else {
        let _ = io.shutdown().await;
        debug!(%peer, "SMTP session closed");
        return Ok(());
    };
    let accept = TlsAcceptor::from(tls).accept(io);
    let mut io = match tokio::time::timeout(config.command_timeout, accept).await {
        Ok(Ok(io)) => io,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "TLS handshake failed");
            return Err(SmtpError::TlsHandshake(e));
        }
        Err(_) => {
            debug!(%peer, "TLS handshake timed out");
            return Err(SmtpError::TlsHandshake(io::ErrorKind::TimedOut.into()));
        }
    };
    debug!(%peer, "TLS established");
    // RFC 3207 4.2: the session starts over; nothing learnt before the handshake is kept.
    let secure = Session::new(peer, config, handler, true, idle_since);
    secure.run(&mut io, &mut shutdown).await?;
    let _ = io.shutdown().await;
    debug!(%peer, "SMTP session closed");
    Ok(())
}

/// Writes and flushes `out` within `limit`, then empties it.
async fn write_out<S: AsyncWrite + Unpin>(
    io: &mut S,
    out: &mut Vec<u8>,
    limit: Duration,
) -> Result<(), SmtpError> {
    if out.is_empty() {
        return Ok(());
    }
    let write = async {
        io.write_all(out).await?;
        io.flush().await
    };
    match tokio::time::timeout(limit, write).await {
        Ok(result) => result?,
        Err(_) => return Err(SmtpError::Io(io::ErrorKind::TimedOut.into())),
    }
    out.clear();
    Ok(())
}

impl<'a, H: SmtpHandler> Session<'a, H> {
    fn new(
        peer: SocketAddr,
        config: &'a SmtpConfig,
        handler: &'a H,
        tls_active: bool,
        idle_since: Instant,
    ) -> Self {
        Session {
            peer,
            config,
            handler,
            tls_active,
            helo: None,
            transaction: None,
            errors: 0,
            idle_since,
        }
    }

    /// The deadlines while waiting for a command whose wait began at `command_started`.
    fn command_deadline(&self, command_started: Instant) -> (Instant, Deadline) {
        let config = self.config;
        earliest(&[
            Some((command_started + config.command_timeout, Deadline::Command)),
            Some((self.idle_since + config.idle_timeout, Deadline::Idle)),
            self.transaction.as_ref().map(|t| {
                (
                    t.started + config.transaction_timeout,
                    Deadline::Transaction,
                )
            }),
        ])
    }

    /// The command loop. Replies are collected and written when more input is needed, so a
    /// pipelined batch is answered in order and in one write (RFC 2920). Returns what to do next
    /// and when the idle clock started (for the session after STARTTLS).
    async fn run<S>(
        mut self,
        io: &mut S,
        shutdown: &mut Shutdown,
    ) -> Result<(Next, Instant), SmtpError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let next = self.commands(io, shutdown).await?;
        Ok((next, self.idle_since))
    }

    async fn commands<S>(&mut self, io: &mut S, shutdown: &mut Shutdown) -> Result<Next, SmtpError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let peer = self.peer;
        let timeout = self.config.command_timeout;
        let mut inbuf: Vec<u8> = Vec::new();
        let mut out: Vec<u8> = Vec::new();
        let mut framer = LineFramer::default();
        // The wait for the next command line starts when the previous one has been handled.
        let mut command_started = Instant::now();
        loop {
            while let Some(line) = framer.next_line(&mut inbuf) {
                let action = match line {
                    Line::TooLong => {
                        self.errors += 1;
                        Action::Reply(Reply::new(500, "5.5.2", "line too long"))
                    }
                    Line::Command(line) => self.command(&line).await,
                };
                match action {
                    Action::Reply(reply) => reply.render(&mut out),
                    Action::Close(reply) => {
                        reply.render(&mut out);
                        write_out(io, &mut out, timeout).await?;
                        return Ok(Next::Close);
                    }
                    Action::StartTls => {
                        Reply::new(220, "2.0.0", "ready to start TLS").render(&mut out);
                        write_out(io, &mut out, timeout).await?;
                        // Whatever the client sent after STARTTLS in plain text is dropped, never
                        // run inside TLS (CVE-2011-0411).
                        return Ok(Next::StartTls);
                    }
                    Action::Data => {
                        shutdown.set_busy(true);
                        Reply::new(354, "", "end data with <CR><LF>.<CR><LF>").render(&mut out);
                        let mut receiver = DataReceiver::new(self.config.max_message_bytes);
                        // The whole data within its deadline and the transaction's; each read
                        // within the command timeout. The idle clock does not run meanwhile.
                        let data_deadline =
                            (Instant::now() + self.config.data_deadline(), Deadline::Data);
                        let transaction_deadline = self.transaction.as_ref().map(|t| {
                            (
                                t.started + self.config.transaction_timeout,
                                Deadline::Transaction,
                            )
                        });
                        loop {
                            let (used, done) = receiver.feed(&inbuf);
                            inbuf.drain(..used);
                            if done {
                                break;
                            }
                            write_out(io, &mut out, timeout).await?;
                            let (at, which) = earliest(&[
                                Some(data_deadline),
                                transaction_deadline,
                                Some((Instant::now() + timeout, Deadline::DataStalled)),
                            ]);
                            match read_more(io, &mut inbuf, at, None).await? {
                                Input::Some => {}
                                Input::Eof => {
                                    debug!(%peer, "connection closed during DATA");
                                    return Ok(Next::Close);
                                }
                                Input::Timeout | Input::Shutdown | Input::MakeRoom => {
                                    debug!(%peer, deadline = ?which, "timeout during DATA");
                                    which.reply(&self.config.hostname).render(&mut out);
                                    write_out(io, &mut out, timeout).await?;
                                    return Ok(Next::Close);
                                }
                            }
                        }
                        self.finish_data(receiver).await.render(&mut out);
                        self.idle_since = Instant::now();
                    }
                }
                command_started = Instant::now();
                if self.errors >= MAX_PROTOCOL_ERRORS {
                    debug!(%peer, "too many protocol errors");
                    let host = &self.config.hostname;
                    Reply::new(
                        421,
                        "4.7.0",
                        format!("{host} too many errors, closing connection"),
                    )
                    .render(&mut out);
                    write_out(io, &mut out, timeout).await?;
                    return Ok(Next::Close);
                }
            }
            write_out(io, &mut out, timeout).await?;
            let (at, which) = self.command_deadline(command_started);
            shutdown.set_busy(self.transaction.is_some());
            match read_more(io, &mut inbuf, at, Some(shutdown)).await? {
                Input::Some => {}
                Input::Eof => {
                    debug!(%peer, "client closed the connection");
                    return Ok(Next::Close);
                }
                Input::Timeout => {
                    debug!(%peer, deadline = ?which, "SMTP deadline passed");
                    which.reply(&self.config.hostname).render(&mut out);
                    write_out(io, &mut out, timeout).await?;
                    return Ok(Next::Close);
                }
                Input::Shutdown => {
                    debug!(%peer, "closing for shutdown");
                    let host = &self.config.hostname;
                    Reply::new(
                        421,
                        "4.3.2",
                        format!("{host} shutting down, try again later"),
                    )
                    .render(&mut out);
                    write_out(io, &mut out, timeout).await?;
                    return Ok(Next::Close);
                }
                // Only an idle session is cut to make room; one in a transaction goes on.
                Input::MakeRoom if self.transaction.is_some() => {}
                Input::MakeRoom => {
                    debug!(%peer, "closing an idle session to make room for another address");
                    let host = &self.config.hostname;
                    Reply::new(
                        421,
                        "4.7.0",
                        format!(
                            "{host} too many connections from your address, closing this idle one"
                        ),
                    )
                    .render(&mut out);
                    write_out(io, &mut out, timeout).await?;
                    return Ok(Next::Close);
                }
            }
        }
    }

    fn envelope(&self) -> Envelope {
        let (mail_from, rcpt_to) = match &self.transaction {
            Some(t) => (t.mail_from.clone(), t.rcpt_to.clone()),
            None => (String::new(), Vec::new()),
        };
        Envelope {
            peer: self.peer,
            helo: self.helo.clone().unwrap_or_default(),
            mail_from,
            rcpt_to,
        }
    }

    async fn command(&mut self, line: &[u8]) -> Action {
        let command = match parse_command(line) {
            Ok(command) => command,
            Err(reply) => {
                self.errors += 1;
                return Action::Reply(reply);
            }
        };
        let action = self.execute(command).await;
        if let Action::Reply(reply) = &action {
            // Sequence errors count; a handler refusing a recipient does not.
            if reply.code == 503 {
                self.errors += 1;
            }
        }
        action
    }

    async fn execute(&mut self, command: Command) -> Action {
        let host = &self.config.hostname;
        let peer = self.peer;
        let reply = match command {
            Command::Ehlo(name) => {
                self.helo = Some(name);
                self.transaction = None;
                let mut lines = vec![
                    format!("{host} greets {}", self.helo.as_deref().unwrap_or_default()),
                    "PIPELINING".to_string(),
                    format!("SIZE {}", self.config.max_message_bytes),
                    "8BITMIME".to_string(),
                    "ENHANCEDSTATUSCODES".to_string(),
                    "SMTPUTF8".to_string(),
                ];
                if self.config.tls.is_some() && !self.tls_active {
                    lines.push("STARTTLS".to_string());
                }
                Reply::new(250, "", lines.join("\n"))
            }
            Command::Helo(name) => {
                let reply = Reply::new(250, "", format!("{host} greets {name}"));
                self.helo = Some(name);
                self.transaction = None;
                reply
            }
            Command::Mail { from, size, .. } => {
                if self.helo.is_none() {
                    Reply::new(503, "5.5.1", "send HELO or EHLO first")
                } else if self.transaction.is_some() {
                    Reply::new(503, "5.5.1", "nested MAIL command")
                } else if size.is_some_and(|s| s > self.config.max_message_bytes as u64) {
                    Reply::new(
                        552,
                        "5.3.4",
                        "message size exceeds fixed maximum message size",
                    )
                } else {
                    debug!(%peer, null_sender = from.is_empty(), "MAIL FROM");
                    self.transaction = Some(Transaction {
                        mail_from: from,
                        rcpt_to: Vec::new(),
                        started: Instant::now(),
                    });
                    Reply::new(250, "2.1.0", "sender ok")
                }
            }
            Command::Rcpt(to) => match &self.transaction {
                None => Reply::new(503, "5.5.1", "need MAIL before RCPT"),
                Some(t) if t.rcpt_to.iter().any(|r| r.eq_ignore_ascii_case(&to)) => {
                    Reply::new(250, "2.1.5", "duplicate recipient")
                }
                Some(t) if t.rcpt_to.len() >= self.config.max_recipients => {
                    Reply::new(452, "4.5.3", "too many recipients")
                }
                Some(_) => {
                    let envelope = self.envelope();
                    let reply = self.handler.check_recipient(&envelope, &to).await;
                    debug!(%peer, code = reply.code, "RCPT TO checked");
                    if reply.is_positive() {
                        if let Some(t) = &mut self.transaction {
                            t.rcpt_to.push(to);
                        }
                    }
                    reply
                }
            },
            Command::Data => match &self.transaction {
                None => Reply::new(503, "5.5.1", "need MAIL and RCPT before DATA"),
                Some(t) if t.rcpt_to.is_empty() => Reply::new(554, "5.5.1", "no valid recipients"),
                Some(_) => return Action::Data,
            },
            Command::Rset => {
                self.transaction = None;
                Reply::ok("reset")
            }
            Command::Noop => Reply::ok("ok"),
            Command::Vrfy => Reply::new(
                252,
                "2.5.0",
                "cannot verify the user, but will accept the message and attempt delivery",
            ),
            Command::Help => {
                let tls = if self.config.tls.is_some() && !self.tls_active {
                    " STARTTLS"
                } else {
                    ""
                };
                Reply::new(
                    214,
                    "2.0.0",
                    format!("Reach SMTP: EHLO HELO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT{tls}"),
                )
            }
            Command::Quit => {
                return Action::Close(Reply::new(
                    221,
                    "2.0.0",
                    format!("{host} closing connection"),
                ))
            }
            Command::StartTls => {
                if self.config.tls.is_none() {
                    Reply::new(502, "5.5.1", "STARTTLS not available")
                } else if self.tls_active {
                    Reply::new(503, "5.5.1", "TLS already active")
                } else {
                    return Action::StartTls;
                }
            }
        };
        Action::Reply(reply)
    }

    /// After the terminating dot: 552 if too big, else the handler's reply. Either way the
    /// transaction is over.
    async fn finish_data(&mut self, receiver: DataReceiver) -> Reply {
        let envelope = self.envelope();
        self.transaction = None;
        if receiver.overflow {
            debug!(peer = %self.peer, size = receiver.size, "message too big");
            return Reply::new(
                552,
                "5.3.4",
                "message size exceeds fixed maximum message size",
            );
        }
        let rcpts = envelope.rcpt_to.len();
        let reply = self.handler.deliver(envelope, receiver.body).await;
        debug!(
            peer = %self.peer,
            size = receiver.size,
            rcpts,
            code = reply.code,
            "message received"
        );
        reply
    }
}

/// Reads what is available into `buf`, waiting until `deadline` at most (and, if given, until
/// shutdown).
async fn read_more<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut Vec<u8>,
    deadline: Instant,
    shutdown: Option<&mut Shutdown>,
) -> Result<Input, SmtpError> {
    let mut chunk = [0u8; READ_CHUNK];
    let read = tokio::time::timeout_at(deadline, io.read(&mut chunk));
    let result = match shutdown {
        Some(shutdown) => tokio::select! {
            result = read => result,
            ended = shutdown.wait_either() => return Ok(match ended {
                Ended::Shutdown => Input::Shutdown,
                Ended::MakeRoom => Input::MakeRoom,
            }),
        },
        None => read.await,
    };
    match result {
        Err(_) => Ok(Input::Timeout),
        Ok(Ok(0)) => Ok(Input::Eof),
        Ok(Ok(n)) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(Input::Some)
        }
        Ok(Err(e)) => Err(e.into()),
    }
}

// ---------------------------------------------------------------------------------------------
// The listener
// ---------------------------------------------------------------------------------------------

/// The client address a per-address connection count is kept for: an IPv4 address (also when
/// written as IPv4-mapped IPv6), or the /64 network of an IPv6 address (one site or one
/// customer's line usually has a whole /64, so counting single IPv6 addresses would cap nothing).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let network = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(network))
            }
        },
    }
}

/// One running session as [`serve`] sees it, to pick one that may make room.
struct Member {
    started: Instant,
    /// Inside a transaction (MAIL to the end of the data): never asked to make room.
    busy: std::sync::atomic::AtomicBool,
    /// Already asked to make room.
    asked: std::sync::atomic::AtomicBool,
    make_room: tokio::sync::Notify,
}

/// Running sessions per client address ([`client_key`]).
#[derive(Default)]
struct PerAddress(std::sync::Mutex<HashMap<IpAddr, Vec<Arc<Member>>>>);

/// One connection counted for an address; uncounted when dropped.
struct AddressSlot {
    counts: Arc<PerAddress>,
    key: IpAddr,
    member: Arc<Member>,
}

impl PerAddress {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Vec<Arc<Member>>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for `ip`, or None if that address has `cap` connections already.
    fn take(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<AddressSlot> {
        let key = client_key(ip);
        let mut members = self.lock();
        let list = members.entry(key).or_default();
        if list.len() >= cap.max(1) {
            return None;
        }
        let member = Arc::new(Member {
            started: Instant::now(),
            busy: false.into(),
            asked: false.into(),
            make_room: tokio::sync::Notify::new(),
        });
        list.push(member.clone());
        Some(AddressSlot {
            counts: self.clone(),
            key,
            member,
        })
    }

    /// When every place is taken: asks the oldest idle session of the address holding the most
    /// places to close, if that address holds more than the newcomer's (whose slot is already
    /// counted). Max-min fairness: an address can be pushed down to the newcomer's share, never
    /// below, so a few addresses can no longer hold every place. True if a session was asked.
    fn make_room_for(&self, newcomer: &AddressSlot) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let members = self.lock();
        let ours = members.get(&newcomer.key).map_or(0, Vec::len);
        let Some((_, most)) = members
            .iter()
            .filter(|(key, _)| **key != newcomer.key)
            .max_by_key(|(_, list)| list.iter().filter(|m| !m.asked.load(Relaxed)).count())
        else {
            return false;
        };
        let remaining = most.iter().filter(|m| !m.asked.load(Relaxed)).count();
        if remaining <= ours {
            return false;
        }
        let victim = most
            .iter()
            .filter(|m| !m.asked.load(Relaxed) && !m.busy.load(Relaxed))
            .min_by_key(|m| m.started);
        match victim {
            Some(victim) => {
                victim.asked.store(true, Relaxed);
                victim.make_room.notify_one();
                true
            }
            None => false,
        }
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut members = self.counts.lock();
        if let Some(list) = members.get_mut(&self.key) {
            list.retain(|m| !Arc::ptr_eq(m, &self.member));
            if list.is_empty() {
                members.remove(&self.key);
            }
        }
    }
}

/// Tells a connection that it is refused. A fresh socket has room in its send buffer, so this is
/// immediate; the bound only guards the accept loop against a pathological peer.
async fn refuse(mut stream: tokio::net::TcpStream, text: &str) {
    let write = stream.write_all(text.as_bytes());
    let _ = tokio::time::timeout(REFUSE_WRITE_TIMEOUT, write).await;
}

/// Accepts connections on `listener` and runs a [`session`] for each, at most
/// `config.max_connections` at once and `config.max_connections_per_ip` from one client address
/// (others get `421 4.7.0` and are closed). When every place is taken, a newcomer from an address
/// holding fewer places than the busiest one gets the place of that address's oldest session not
/// inside a transaction, which is told `421 4.7.0` and closed. When `shutdown` turns
/// true (or its sender is dropped) it stops accepting; idle sessions get `421 4.3.2` at their next
/// wait for a command, a message being received is finished; sessions still running after the
/// grace period (`command_timeout`, at most 30 s) are aborted. Returns when all are done.
pub async fn serve<H: SmtpHandler>(
    listener: TcpListener,
    config: SmtpConfig,
    handler: Arc<H>,
    shutdown: watch::Receiver<bool>,
) {
    let config = Arc::new(config);
    let cap = config.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let limit = Arc::new(Semaphore::new(cap));
    let too_many = format!(
        "421 4.7.0 {} too many connections, try again later\r\n",
        config.hostname
    );
    let too_many_from_you = format!(
        "421 4.7.0 {} too many connections from your address, try again later\r\n",
        config.hostname
    );
    let per_address = Arc::new(PerAddress::default());
    let mut sessions = JoinSet::new();
    let mut stop = Shutdown::on(shutdown.clone());
    info!(local = ?listener.local_addr().ok(), "SMTP listener accepting connections");
    loop {
        tokio::select! {
            _ = stop.wait() => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(slot) = per_address.take(peer.ip(), config.max_connections_per_ip)
                    else {
                        debug!(%peer, "too many connections from this address, refusing");
                        refuse(stream, &too_many_from_you).await;
                        continue;
                    };
                    let permit = match limit.clone().try_acquire_owned() {
                        Ok(permit) => Some(permit),
                        // The place an idle session of a busier address gives up.
                        Err(_) if per_address.make_room_for(&slot) => None,
                        Err(_) => {
                            debug!(%peer, "too many connections, refusing");
                            refuse(stream, &too_many).await;
                            continue;
                        }
                    };
                    let config = config.clone();
                    let handler = handler.clone();
                    let limit = limit.clone();
                    let too_many = too_many.clone();
                    let mut shutdown = Shutdown::on(shutdown.clone());
                    shutdown.room = Some(slot.member.clone());
                    sessions.spawn(async move {
                        let permit = match permit {
                            Some(permit) => permit,
                            None => match tokio::time::timeout(ROOM_WAIT, limit.acquire_owned()).await {
                                Ok(Ok(permit)) => permit,
                                _ => {
                                    debug!(%peer, "no place was freed in time, refusing");
                                    refuse(stream, &too_many).await;
                                    return;
                                }
                            },
                        };
                        let result = run_session(stream, peer, &config, &*handler, shutdown).await;
                        if let Err(e) = result {
                            debug!(%peer, error = %e, "SMTP session ended with an error");
                        }
                        drop(permit);
                        drop(slot);
                    });
                }
                Err(e) => {
                    // E.g. out of file descriptors: do not spin.
                    warn!(error = %e, "SMTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    info!(
        running = sessions.len(),
        "SMTP listener stopped accepting connections"
    );
    let grace = config.command_timeout.min(SHUTDOWN_GRACE_MAX);
    let drain = async { while sessions.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drain).await.is_err() {
        warn!(
            aborted = sessions.len(),
            "SMTP sessions still running after the shutdown grace period; aborting them"
        );
        sessions.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream};
    use tokio::task::JoinHandle;

    const WAIT: Duration = Duration::from_secs(3);

    fn peer() -> SocketAddr {
        "192.0.2.7:40000".parse().unwrap()
    }

    fn config() -> SmtpConfig {
        SmtpConfig {
            hostname: "reach.test".to_string(),
            max_message_bytes: 1000,
            max_connections: 4,
            max_connections_per_ip: 4,
            max_recipients: 3,
            command_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            transaction_timeout: Duration::from_secs(60),
            data_timeout: Duration::from_secs(5),
            data_min_bytes_per_second: 1000,
            tls: None,
        }
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tls")
            .join(name)
    }

    /// Accepts recipients starting with "r-", records what it is given.
    #[derive(Default)]
    struct Recorder {
        checked: Mutex<Vec<String>>,
        delivered: Mutex<Vec<(Envelope, Vec<u8>)>>,
    }

    impl Recorder {
        fn delivered(&self) -> Vec<(Envelope, Vec<u8>)> {
            self.delivered.lock().unwrap().clone()
        }
    }

    impl SmtpHandler for Recorder {
        async fn check_recipient(&self, _envelope: &Envelope, rcpt: &str) -> Reply {
            self.checked.lock().unwrap().push(rcpt.to_string());
            if rcpt.starts_with("r-") {
                Reply::new(250, "2.1.5", "recipient ok")
            } else {
                Reply::new(550, "5.1.1", "no such reply address")
            }
        }

        async fn deliver(&self, envelope: Envelope, message: Vec<u8>) -> Reply {
            self.delivered.lock().unwrap().push((envelope, message));
            Reply::ok("stored")
        }
    }

    /// The client side of a session: send lines, expect reply codes.
    struct TestSession<S = DuplexStream> {
        io: BufReader<S>,
        task: JoinHandle<Result<(), SmtpError>>,
        handler: Arc<Recorder>,
        /// How long a reply may take to come (longer in tests on a paused clock).
        wait: Duration,
    }

    impl TestSession {
        async fn start() -> TestSession {
            TestSession::start_with(config()).await
        }

        /// Runs [`session`] over a duplex pipe and reads the greeting.
        async fn start_with(config: SmtpConfig) -> TestSession {
            let handler = Arc::new(Recorder::default());
            let (client, server) = tokio::io::duplex(64 * 1024);
            let task_handler = handler.clone();
            let task =
                tokio::spawn(async move { session(server, peer(), &config, &*task_handler).await });
            let mut s = TestSession {
                io: BufReader::new(client),
                task,
                handler,
                wait: WAIT,
            };
            let greeting = s.expect(220).await;
            assert!(greeting.contains("reach.test"), "{greeting}");
            s
        }
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> TestSession<S> {
        async fn send(&mut self, line: &str) {
            self.send_raw(format!("{line}\r\n").as_bytes()).await;
        }

        async fn send_raw(&mut self, bytes: &[u8]) {
            self.io.get_mut().write_all(bytes).await.unwrap();
            self.io.get_mut().flush().await.unwrap();
        }

        /// Reads one (possibly multi-line) reply: its code and its lines' text.
        async fn reply(&mut self) -> Option<(u16, String)> {
            let mut code = None;
            let mut text = Vec::new();
            loop {
                let mut line = String::new();
                let n = tokio::time::timeout(self.wait, self.io.read_line(&mut line))
                    .await
                    .expect("no reply in time")
                    .unwrap();
                if n == 0 {
                    assert!(code.is_none(), "connection closed inside a reply");
                    return None;
                }
                assert!(line.ends_with("\r\n"), "reply line without CRLF: {line:?}");
                let line_code: u16 = line[..3].parse().expect("reply code");
                assert_eq!(*code.get_or_insert(line_code), line_code, "{line:?}");
                text.push(line[4.min(line.len() - 2)..line.len() - 2].to_string());
                match line.as_bytes()[3] {
                    b'-' => continue,
                    b' ' | b'\r' => return Some((line_code, text.join("\n"))),
                    _ => panic!("bad reply line {line:?}"),
                }
            }
        }

        /// Reads one reply and asserts its code; returns its text.
        async fn expect(&mut self, code: u16) -> String {
            match self.reply().await {
                Some((got, text)) => {
                    assert_eq!(got, code, "expected {code}, got {got} {text}");
                    text
                }
                None => panic!("expected {code}, the connection was closed"),
            }
        }

        async fn expect_closed(&mut self) {
            if let Some((code, text)) = self.reply().await {
                panic!("expected the connection to close, got {code} {text}");
            }
        }

        async fn ehlo(&mut self) -> String {
            self.send("EHLO client.test").await;
            self.expect(250).await
        }

        /// MAIL, RCPT, DATA, the message, and the final reply's code.
        async fn transaction(&mut self, from: &str, to: &str, message: &str) -> u16 {
            self.send(&format!("MAIL FROM:<{from}>")).await;
            self.expect(250).await;
            self.send(&format!("RCPT TO:<{to}>")).await;
            self.expect(250).await;
            self.send("DATA").await;
            self.expect(354).await;
            self.send_raw(message.as_bytes()).await;
            self.send_raw(b".\r\n").await;
            self.reply().await.expect("reply after DATA").0
        }
    }

    // ---- sans-IO -----------------------------------------------------------------------------

    fn render(reply: &Reply) -> String {
        let mut out = Vec::new();
        reply.render(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn replies_render_single_and_multi_line() {
        assert_eq!(render(&Reply::ok("stored")), "250 2.0.0 stored\r\n");
        assert_eq!(render(&Reply::new(220, "", "x ESMTP")), "220 x ESMTP\r\n");
        assert_eq!(
            render(&Reply::new(250, "", "a\nB C")),
            "250-a\r\n250 B C\r\n"
        );
        assert_eq!(render(&Reply::new(250, "", "")), "250\r\n");
        assert_eq!(render(&Reply::new(221, "2.0.0", "")), "221 2.0.0\r\n");
    }

    #[test]
    fn handler_replies_are_never_malformed() {
        // CR/LF injection: a bare CR and control characters become spaces; LF makes a new line.
        assert_eq!(
            render(&Reply::new(550, "5.1.1", "no\r\n550 fake\rx\0")),
            "550-5.1.1 no\r\n550 5.1.1 550 fake x \r\n"
        );
        assert_eq!(render(&Reply::new(0, "2.0.0", "x")), "451 4.3.0 x\r\n");
        assert_eq!(render(&Reply::new(999, "", "x")), "451 4.3.0 x\r\n");
        assert_eq!(render(&Reply::new(550, "2.0.0", "x")), "550 5.0.0 x\r\n");
        assert_eq!(render(&Reply::new(450, "4.x.1", "x")), "450 4.0.0 x\r\n");
        assert_eq!(render(&Reply::new(452, "4.5.3", "x")), "452 4.5.3 x\r\n");
        assert!(Reply::ok("").is_positive());
        assert!(!Reply::new(550, "5.1.1", "").is_positive());
        assert!(Reply::new(451, "4.3.0", "").is_transient());
        assert_eq!(
            Reply::new(550, "5.1.1", "nope").to_string(),
            "550 5.1.1 nope"
        );
    }

    fn mail(from: &str) -> Command {
        Command::Mail {
            from: from.to_string(),
            size: None,
            body: None,
            smtputf8: false,
        }
    }

    fn code(line: &str) -> (u16, String) {
        match parse_command(line.as_bytes()) {
            Ok(command) => panic!("{line:?} parsed as {command:?}"),
            Err(reply) => (reply.code, reply.enhanced),
        }
    }

    #[test]
    fn parses_commands() {
        let ok = |line: &str| parse_command(line.as_bytes()).unwrap();
        assert_eq!(ok("EHLO client.test"), Command::Ehlo("client.test".into()));
        assert_eq!(
            ok("ehlo [192.0.2.1] extra"),
            Command::Ehlo("[192.0.2.1]".into())
        );
        assert_eq!(ok("HELO x"), Command::Helo("x".into()));
        assert_eq!(ok("MAIL FROM:<a@b.example>"), mail("a@b.example"));
        assert_eq!(ok("mail from: <a@b.example>"), mail("a@b.example"));
        assert_eq!(ok("MAIL FROM:a@b.example"), mail("a@b.example"));
        assert_eq!(ok("MAIL FROM:<>"), mail(""));
        assert_eq!(
            ok("MAIL FROM:<@relay.example:a@b.example>"),
            mail("a@b.example")
        );
        assert_eq!(
            ok("MAIL FROM:<\"a >b\"@b.example>"),
            mail("\"a >b\"@b.example")
        );
        assert_eq!(ok("MAIL FROM:<ü@bücher.example>"), mail("ü@bücher.example"));
        assert_eq!(
            ok("MAIL FROM:<a@b.example> SIZE=42 body=8bitmime SMTPUTF8"),
            Command::Mail {
                from: "a@b.example".into(),
                size: Some(42),
                body: Some(Body::EightBitMime),
                smtputf8: true,
            }
        );
        assert_eq!(
            ok("MAIL FROM:<> SIZE=99999999999999999999999 BODY=7BIT"),
            Command::Mail {
                from: "".into(),
                size: Some(u64::MAX),
                body: Some(Body::SevenBit),
                smtputf8: false,
            }
        );
        assert_eq!(
            ok("RCPT TO:<r-abc@reply.example>"),
            Command::Rcpt("r-abc@reply.example".into())
        );
        assert_eq!(
            ok("RCPT TO:<Postmaster>"),
            Command::Rcpt("Postmaster".into())
        );
        assert_eq!(ok("data"), Command::Data);
        assert_eq!(ok("RSET  "), Command::Rset);
        assert_eq!(ok("NOOP anything"), Command::Noop);
        assert_eq!(ok("VRFY someone"), Command::Vrfy);
        assert_eq!(ok("HELP"), Command::Help);
        assert_eq!(ok("QUIT"), Command::Quit);
        assert_eq!(ok("StartTLS"), Command::StartTls);
    }

    #[test]
    fn rejects_bad_commands_with_the_right_reply() {
        let r = |c: u16, e: &str| (c, e.to_string());
        assert_eq!(code("FOO"), r(500, "5.5.1"));
        assert_eq!(code("GET / HTTP/1.1"), r(500, "5.5.1"));
        assert_eq!(code(""), r(500, "5.5.2"));
        assert_eq!(code("EXPN list"), r(502, "5.5.1"));
        assert_eq!(code("EHLO"), r(501, "5.5.4"));
        assert_eq!(code("DATA now"), r(501, "5.5.4"));
        assert_eq!(code("MAIL <a@b.example>"), r(501, "5.5.4"));
        assert_eq!(code("MAIL FROM:<a@b.example"), r(501, "5.5.4"));
        assert_eq!(code("MAIL FROM:<a@b.example>SIZE=1"), r(501, "5.5.4"));
        assert_eq!(code("MAIL FROM:<no-at-sign>"), r(501, "5.1.7"));
        assert_eq!(code("MAIL FROM:<a b@c.example>"), r(501, "5.1.7"));
        assert_eq!(code("MAIL FROM:<a@b..example>"), r(501, "5.1.7"));
        assert_eq!(code("MAIL FROM:<a@b.example> SIZE=x"), r(501, "5.5.4"));
        assert_eq!(code("MAIL FROM:<a@b.example> SIZE"), r(501, "5.5.4"));
        assert_eq!(
            code("MAIL FROM:<a@b.example> BODY=BINARYMIME"),
            r(555, "5.5.4")
        );
        assert_eq!(code("MAIL FROM:<a@b.example> RET=FULL"), r(555, "5.5.4"));
        assert_eq!(code("RCPT TO:<>"), r(501, "5.1.3"));
        assert_eq!(code("RCPT TO:<@>"), r(501, "5.5.4"));
        assert_eq!(code("RCPT TO:<@x>"), r(501, "5.5.4"));
        assert_eq!(code("RCPT TO:<x@>"), r(501, "5.1.3"));
        assert_eq!(
            code("RCPT TO:<r-x@reply.example> NOTIFY=NEVER"),
            r(555, "5.5.4")
        );
        assert_eq!(code("RCPT FROM:<r-x@reply.example>"), r(501, "5.5.4"));
        let long = format!("RCPT TO:<{}@x.example>", "a".repeat(300));
        assert_eq!(code(&long), r(501, "5.5.4"));
        assert_eq!(parse_command(b"NOOP \xff\xfe").unwrap_err().code, 500);
    }

    /// Frames `input` fed in the given pieces; returns the lines.
    fn frame(pieces: &[&[u8]]) -> Vec<Line> {
        let mut framer = LineFramer::default();
        let mut buf = Vec::new();
        let mut lines = Vec::new();
        for piece in pieces {
            buf.extend_from_slice(piece);
            while let Some(line) = framer.next_line(&mut buf) {
                lines.push(line);
            }
        }
        lines
    }

    #[test]
    fn command_lines_split_at_every_point() {
        let input = b"EHLO a\r\nNOOP\nMAIL FROM:<>\r\n\r\nRSET\r\nQU";
        let whole = frame(&[input]);
        assert_eq!(
            whole,
            vec![
                Line::Command(b"EHLO a".to_vec()),
                Line::Command(b"NOOP".to_vec()),
                Line::Command(b"MAIL FROM:<>".to_vec()),
                Line::Command(Vec::new()),
                Line::Command(b"RSET".to_vec()),
            ]
        );
        for i in 0..=input.len() {
            for j in i..=input.len() {
                let pieces = [&input[..i], &input[i..j], &input[j..]];
                assert_eq!(frame(&pieces), whole, "split at {i} and {j}");
            }
        }
    }

    #[test]
    fn overlong_command_lines_are_cut_and_reported_once() {
        let longest = format!("NOOP {}\r\n", "x".repeat(MAX_COMMAND_LINE - 7));
        assert_eq!(longest.len(), MAX_COMMAND_LINE);
        let too_long = format!("NOOP {}\r\n", "x".repeat(MAX_COMMAND_LINE - 6));
        let input = format!("{longest}{too_long}RSET\r\n");
        let expected = vec![
            Line::Command(longest.trim_end().as_bytes().to_vec()),
            Line::TooLong,
            Line::Command(b"RSET".to_vec()),
        ];
        assert_eq!(frame(&[input.as_bytes()]), expected);
        let bytes: Vec<&[u8]> = input.as_bytes().chunks(1).collect();
        assert_eq!(frame(&bytes), expected);
        // A huge line without LF is not kept in memory.
        let mut framer = LineFramer::default();
        let mut buf = vec![b'x'; 100_000];
        assert_eq!(framer.next_line(&mut buf), None);
        assert!(buf.is_empty());
        buf.extend_from_slice(b"yyy\r\nNOOP\r\n");
        assert_eq!(framer.next_line(&mut buf), Some(Line::TooLong));
        assert_eq!(
            framer.next_line(&mut buf),
            Some(Line::Command(b"NOOP".to_vec()))
        );
    }

    /// Feeds `pieces` to a receiver; returns (body, overflow, bytes consumed) once done.
    fn receive(pieces: &[&[u8]], max: usize) -> Option<(Vec<u8>, bool, usize)> {
        let mut receiver = DataReceiver::new(max);
        let mut consumed = 0;
        for piece in pieces {
            let (used, done) = receiver.feed(piece);
            consumed += used;
            if done {
                return Some((receiver.body, receiver.overflow, consumed));
            }
            assert_eq!(used, piece.len());
        }
        None
    }

    #[test]
    fn data_is_dot_unstuffed_and_ends_at_the_dot_line() {
        let input = b"Subject: x\r\n\r\n..one dot\r\n...\r\n..\r\nend.\r\n.\r\nQUIT\r\n";
        let (body, overflow, used) = receive(&[input], 1000).unwrap();
        assert_eq!(body, b"Subject: x\r\n\r\n.one dot\r\n..\r\n.\r\nend.\r\n");
        assert!(!overflow);
        assert_eq!(&input[used..], b"QUIT\r\n");
        // An empty message.
        assert_eq!(receive(&[b".\r\n"], 10), Some((Vec::new(), false, 3)));
        // Bare LF line ends are accepted and become CRLF; a bare CR stays.
        assert_eq!(
            receive(&[b"a\nb\r\nc\rd\n..e\n.\n"], 100).unwrap().0,
            b"a\r\nb\r\nc\rd\r\n.e\r\n"
        );
        // ".\r" not followed by LF is content.
        assert_eq!(receive(&[b".\rx\r\n.\r\n"], 100).unwrap().0, b"\rx\r\n");
        // No terminator yet.
        assert_eq!(receive(&[b"a\r\n.x\r\n"], 100), None);
    }

    #[test]
    fn data_terminator_split_at_every_point() {
        let input: &[u8] = b"a\r\n..b\r\n.c\r\n\r\n.\r\nNEXT";
        let (body, _, used) = receive(&[input], 1000).unwrap();
        assert_eq!(body, b"a\r\n.b\r\nc\r\n\r\n");
        for i in 0..=input.len() {
            for j in i..=input.len() {
                let pieces = [&input[..i], &input[i..j], &input[j..]];
                assert_eq!(
                    receive(&pieces, 1000),
                    Some((body.clone(), false, used)),
                    "split at {i} and {j}"
                );
            }
        }
    }

    #[test]
    fn data_beyond_the_limit_is_counted_and_dropped() {
        let big = format!("{}\r\n.\r\nNEXT", "x".repeat(5000));
        let (body, overflow, used) = receive(&[big.as_bytes()], 1000).unwrap();
        assert!(overflow);
        assert!(body.is_empty());
        assert_eq!(&big.as_bytes()[used..], b"NEXT");
        // Exactly at the limit is fine.
        let (body, overflow, _) = receive(&[b"12345678\r\n.\r\n"], 10).unwrap();
        assert!(!overflow);
        assert_eq!(body, b"12345678\r\n");
        assert!(receive(&[b"123456789\r\n.\r\n"], 10).unwrap().1);
    }

    /// A small deterministic generator for the garbage tests.
    fn garbage(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let b = (x >> 33) as u8;
                // Plenty of the bytes that matter to the parsers.
                match b % 8 {
                    0 => b"\r\n.<>:@= \"\\"[(b as usize / 8) % 11],
                    _ => b,
                }
            })
            .collect()
    }

    #[test]
    fn garbage_never_panics_the_parsers() {
        let prefixes: [&[u8]; 6] = [
            b"",
            b"MAIL FROM:",
            b"RCPT TO:<",
            b"MAIL FROM:<a@",
            b"EHLO ",
            b"MAIL FROM:<> ",
        ];
        for seed in 0..3000u64 {
            let junk = garbage(seed, (seed % 80) as usize);
            for prefix in prefixes {
                let mut line = prefix.to_vec();
                line.extend_from_slice(&junk);
                let _ = parse_command(&line);
            }
            let _ = frame(&[&junk]);
            let mut receiver = DataReceiver::new(16);
            let _ = receiver.feed(&junk);
        }
        // Multi-byte UTF-8 where the parsers cut strings.
        for line in [
            "MAIL FROMé:<a@b>",
            "MAIL FROM:<é",
            "MAIL FROM:<@é",
            "RCPT TO:é@",
            "Ｍ",
            "MAIL é",
        ] {
            let _ = parse_command(line.as_bytes());
        }
    }

    // ---- sessions over a duplex pipe ----------------------------------------------------------

    #[tokio::test]
    async fn a_whole_transaction() {
        let mut s = TestSession::start().await;
        let ehlo = s.ehlo().await;
        for ext in [
            "PIPELINING",
            "SIZE 1000",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
        ] {
            assert!(ehlo.lines().any(|l| l == ext), "{ext} missing in {ehlo}");
        }
        assert!(!ehlo.contains("STARTTLS"), "no TLS configured: {ehlo}");
        let message = "From: alice@example.net\r\nSubject: Re: IM\r\n\r\nhello Bob\r\n";
        assert_eq!(
            s.transaction("alice@example.net", "r-abc@reply.test", message)
                .await,
            250
        );
        s.send("QUIT").await;
        s.expect(221).await;
        s.expect_closed().await;
        assert!(s.task.await.unwrap().is_ok());
        let delivered = s.handler.delivered();
        assert_eq!(delivered.len(), 1);
        let (envelope, body) = &delivered[0];
        assert_eq!(envelope.peer, peer());
        assert_eq!(envelope.helo, "client.test");
        assert_eq!(envelope.mail_from, "alice@example.net");
        assert_eq!(envelope.rcpt_to, vec!["r-abc@reply.test".to_string()]);
        assert_eq!(body, message.as_bytes());
    }

    #[tokio::test]
    async fn null_sender_is_accepted_as_empty() {
        let mut s = TestSession::start().await;
        s.ehlo().await;
        assert_eq!(
            s.transaction("", "r-abc@reply.test", "bounce\r\n").await,
            250
        );
        assert_eq!(s.handler.delivered()[0].0.mail_from, "");
    }

    #[tokio::test]
    async fn pipelined_commands_are_answered_in_order() {
        let mut s = TestSession::start().await;
        s.send_raw(
            b"EHLO client.test\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<r-one@reply.test>\r\n\
              RCPT TO:<nobody@reply.test>\r\nRCPT TO:<r-two@reply.test>\r\nDATA\r\n",
        )
        .await;
        for code in [250, 250, 250, 550, 250, 354] {
            s.expect(code).await;
        }
        s.send_raw(b"hi\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<r-three@reply.test>\r\nRSET\r\nQUIT\r\n")
            .await;
        for code in [250, 250, 250, 250, 221] {
            s.expect(code).await;
        }
        s.expect_closed().await;
        let delivered = s.handler.delivered();
        assert_eq!(delivered.len(), 1);
        assert_eq!(
            delivered[0].0.rcpt_to,
            ["r-one@reply.test", "r-two@reply.test"]
        );
        assert_eq!(delivered[0].1, b"hi\r\n");
    }

    #[tokio::test]
    async fn a_refused_recipient_gets_the_handlers_reply() {
        let mut s = TestSession::start().await;
        s.ehlo().await;
        s.send("MAIL FROM:<a@example.net>").await;
        s.expect(250).await;
        s.send("RCPT TO:<unknown@reply.test>").await;
        assert_eq!(s.expect(550).await, "5.1.1 no such reply address");
        s.send("DATA").await;
        s.expect(554).await;
        assert_eq!(*s.handler.checked.lock().unwrap(), ["unknown@reply.test"]);
        assert!(s.handler.delivered().is_empty());
    }

    #[tokio::test]
    async fn commands_out_of_sequence_get_503() {
        let mut s = TestSession::start().await;
        s.send("MAIL FROM:<a@example.net>").await;
        s.expect(503).await; // no EHLO yet
        s.ehlo().await;
        s.send("RCPT TO:<r-abc@reply.test>").await;
        s.expect(503).await; // no MAIL
        s.send("DATA").await;
        s.expect(503).await; // no MAIL
        s.send("MAIL FROM:<a@example.net>").await;
        s.expect(250).await;
        s.send("MAIL FROM:<a@example.net>").await;
        s.expect(503).await; // nested
        s.send("DATA").await;
        s.expect(554).await; // no recipient
        s.send("RCPT TO:<r-abc@reply.test>").await;
        s.expect(250).await;
        s.send("RSET").await;
        s.expect(250).await;
        s.send("DATA").await;
        s.expect(503).await; // RSET ended the transaction
        s.send("STARTTLS").await;
        s.expect(502).await; // not configured
        s.send("VRFY someone").await;
        s.expect(252).await;
        s.send("HELP").await;
        s.expect(214).await;
        s.send("NOOP").await;
        s.expect(250).await;
        s.send("XYZZY").await;
        s.expect(500).await;
        s.send("HELO other.test").await;
        s.expect(250).await;
        assert_eq!(
            s.transaction("a@example.net", "r-abc@reply.test", "x\r\n")
                .await,
            250
        );
        assert_eq!(s.handler.delivered()[0].0.helo, "other.test");
    }

    #[tokio::test]
    async fn too_many_recipients_get_452() {
        let mut s = TestSession::start().await;
        s.ehlo().await;
        s.send("MAIL FROM:<a@example.net>").await;
        s.expect(250).await;
        for i in 0..3 {
            s.send(&format!("RCPT TO:<r-{i}@reply.test>")).await;
            s.expect(250).await;
        }
        s.send("RCPT TO:<r-0@reply.test>").await;
        s.expect(250).await; // a duplicate is not one more
        s.send("RCPT TO:<r-3@reply.test>").await;
        assert_eq!(s.expect(452).await, "4.5.3 too many recipients");
    }

    #[tokio::test]
    async fn oversize_announced_with_size_gets_552() {
        let mut s = TestSession::start().await;
        s.ehlo().await;
        s.send("MAIL FROM:<a@example.net> SIZE=1001").await;
        assert!(s.expect(552).await.starts_with("5.3.4 "));
        s.send("MAIL FROM:<a@example.net> SIZE=1000 BODY=8BITMIME")
            .await;
        s.expect(250).await;
    }

    #[tokio::test]
    async fn oversize_data_gets_552_and_the_next_message_works() {
        let mut s = TestSession::start().await;
        s.ehlo().await;
        let big = "0123456789012345678901234567890123456789\r\n".repeat(200);
        assert_eq!(
            s.transaction("a@example.net", "r-abc@reply.test", &big)
                .await,
            552
        );
        assert_eq!(
            s.transaction("a@example.net", "r-abc@reply.test", "small\r\n")
                .await,
            250
        );
        let delivered = s.handler.delivered();
        assert_eq!(delivered.len(), 1);
        assert_eq!(delivered[0].1, b"small\r\n");
    }

    #[tokio::test]
    async fn dot_stuffed_lines_are_unstuffed() {
        let mut s = TestSession::start().await;
        s.ehlo().await;
        let code = s
            .transaction(
                "a@example.net",
                "r-abc@reply.test",
                "..\r\n..leading\r\n...\r\n",
            )
            .await;
        assert_eq!(code, 250);
        assert_eq!(s.handler.delivered()[0].1, b".\r\n.leading\r\n..\r\n");
    }

    #[tokio::test]
    async fn bare_lf_line_ends_are_accepted() {
        let mut s = TestSession::start().await;
        s.send_raw(
            b"EHLO client.test\nMAIL FROM:<a@example.net>\nRCPT TO:<r-abc@reply.test>\nDATA\n",
        )
        .await;
        for code in [250, 250, 250, 354] {
            s.expect(code).await;
        }
        s.send_raw(b"one\ntwo\n.\nQUIT\n").await;
        s.expect(250).await;
        s.expect(221).await;
        assert_eq!(s.handler.delivered()[0].1, b"one\r\ntwo\r\n");
    }

    #[tokio::test]
    async fn a_transaction_fed_one_byte_per_write() {
        let mut s = TestSession::start().await;
        let script =
            b"EHLO client.test\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<r-abc@reply.test>\r\n\
                       DATA\r\nline\r\n..dot\r\n.\r\nQUIT\r\n";
        for byte in script {
            s.send_raw(&[*byte]).await;
            tokio::task::yield_now().await;
        }
        for code in [250, 250, 250, 354, 250, 221] {
            s.expect(code).await;
        }
        assert_eq!(s.handler.delivered()[0].1, b"line\r\n.dot\r\n");
    }

    #[tokio::test]
    async fn the_data_terminator_split_between_writes() {
        let terminator = b"\r\n.\r\n";
        let mut s = TestSession::start().await;
        s.ehlo().await;
        for split in 0..=terminator.len() {
            s.send("MAIL FROM:<a@example.net>").await;
            s.expect(250).await;
            s.send("RCPT TO:<r-abc@reply.test>").await;
            s.expect(250).await;
            s.send("DATA").await;
            s.expect(354).await;
            s.send_raw(b"body").await;
            s.send_raw(&terminator[..split]).await;
            tokio::time::sleep(Duration::from_millis(2)).await;
            s.send_raw(&terminator[split..]).await;
            s.expect(250).await;
        }
        let delivered = s.handler.delivered();
        assert_eq!(delivered.len(), terminator.len() + 1);
        assert!(delivered.iter().all(|(_, body)| body == b"body\r\n"));
    }

    #[tokio::test]
    async fn an_overlong_command_line_gets_500_and_the_session_goes_on() {
        let mut s = TestSession::start().await;
        s.send(&format!("NOOP {}", "x".repeat(5000))).await;
        assert!(s.expect(500).await.starts_with("5.5.2 "));
        s.send(&format!("NOOP {}", "x".repeat(MAX_COMMAND_LINE - 7)))
            .await;
        s.expect(250).await;
        s.ehlo().await;
    }

    #[tokio::test]
    async fn garbage_input_never_panics_the_session() {
        for seed in 0..20 {
            let mut s = TestSession::start().await;
            s.send_raw(&garbage(seed, 3000)).await;
            s.send_raw(b"\r\nNOOP\r\nQUIT\r\n").await;
            // Answers until QUIT or until it has had enough errors; never hangs, never panics.
            loop {
                match s.reply().await {
                    Some((221 | 421, _)) | None => break,
                    Some(_) => {}
                }
            }
            s.expect_closed().await;
            drop(s.io);
            assert!(s.task.await.is_ok(), "session task panicked");
        }
    }

    #[tokio::test]
    async fn too_many_errors_end_the_session() {
        let mut s = TestSession::start().await;
        for _ in 0..MAX_PROTOCOL_ERRORS - 1 {
            s.send("BOGUS").await;
            s.expect(500).await;
        }
        s.send("BOGUS").await;
        s.expect(500).await;
        assert!(s.expect(421).await.starts_with("4.7.0 "));
        s.expect_closed().await;
    }

    #[tokio::test]
    async fn an_idle_client_gets_421_after_the_command_timeout() {
        let mut config = config();
        config.command_timeout = Duration::from_millis(150);
        let mut s = TestSession::start_with(config).await;
        s.ehlo().await;
        assert!(s.expect(421).await.starts_with("4.4.2 "));
        s.expect_closed().await;
        assert!(s.task.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn a_client_stalling_in_data_gets_421() {
        let mut config = config();
        config.command_timeout = Duration::from_millis(150);
        let mut s = TestSession::start_with(config).await;
        s.ehlo().await;
        s.send("MAIL FROM:<a@example.net>").await;
        s.expect(250).await;
        s.send("RCPT TO:<r-abc@reply.test>").await;
        s.expect(250).await;
        s.send("DATA").await;
        s.expect(354).await;
        s.send_raw(b"partial").await;
        s.expect(421).await;
        s.expect_closed().await;
        assert!(s.handler.delivered().is_empty());
    }

    // ---- deadlines, on a paused clock -----------------------------------------------------------

    /// A session on a paused clock (time jumps ahead whenever every task waits) with short
    /// deadlines: command 10 s, idle 30 s, transaction 60 s, data 5 s + 1000 B at 1000 B/s.
    async fn paused_session(change: impl FnOnce(&mut SmtpConfig)) -> TestSession {
        let mut config = config();
        config.command_timeout = Duration::from_secs(10);
        config.idle_timeout = Duration::from_secs(30);
        config.transaction_timeout = Duration::from_secs(60);
        config.data_timeout = Duration::from_secs(5);
        config.data_min_bytes_per_second = 1000;
        change(&mut config);
        let mut s = TestSession::start_with(config).await;
        s.wait = Duration::from_secs(3600);
        s
    }

    impl TestSession {
        /// Writes, ignoring a closed connection (the server may have hung up already).
        async fn send_lossy(&mut self, bytes: &[u8]) {
            let _ = self.io.get_mut().write_all(bytes).await;
            let _ = self.io.get_mut().flush().await;
        }

        /// Sends `bytes` one per second until the server says something; returns the reply and
        /// how many bytes were sent.
        async fn trickle(&mut self, bytes: &[u8]) -> ((u16, String), usize) {
            for (i, byte) in bytes.iter().enumerate() {
                self.send_lossy(&[*byte]).await;
                // fill_buf is cancel-safe: a reply arriving at the end of the second stays buffered.
                if self.hears_within(Duration::from_secs(1)).await {
                    return (self.reply().await.expect("a reply"), i + 1);
                }
            }
            panic!(
                "the server never answered {} bytes sent one per second",
                bytes.len()
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_command_line_trickled_byte_by_byte_gets_421_at_the_command_deadline() {
        let mut s = paused_session(|_| {}).await;
        s.ehlo().await;
        let start = Instant::now();
        let line = format!("NOOP {}\r\n", "x".repeat(100));
        let ((code, text), sent) = s.trickle(line.as_bytes()).await;
        assert_eq!(code, 421, "{text}");
        assert_eq!(
            text,
            "4.4.2 reach.test timeout waiting for a complete command, closing connection"
        );
        // Every read brought a byte, yet the 10 s for the whole line ran out.
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
            "{waited:?}"
        );
        assert!(sent <= 11, "{sent}");
        s.expect_closed().await;
    }

    impl TestSession {
        /// Waits up to `limit` for the server to say something; true if it did.
        async fn hears_within(&mut self, limit: Duration) -> bool {
            let heard = tokio::time::timeout(limit, self.io.fill_buf()).await;
            matches!(heard, Ok(Ok(buf)) if !buf.is_empty())
        }

        /// Sends `commands` in turn, one every 7 s, each answered 2xx, until the server says
        /// something unasked or `until` (from `start`) is reached. Returns how many were answered
        /// and the unasked reply, if any.
        async fn keep_busy(
            &mut self,
            commands: &[&str],
            start: Instant,
            until: Duration,
        ) -> (usize, Option<(u16, String)>) {
            let mut answered = 0;
            while start.elapsed() < until {
                let command = commands[answered % commands.len()];
                self.send_lossy(format!("{command}\r\n").as_bytes()).await;
                match self.reply().await {
                    Some((421, text)) => return (answered, Some((421, text))),
                    Some((code, text)) => assert!((200..300).contains(&code), "{code} {text}"),
                    None => panic!("closed without 421"),
                }
                answered += 1;
                if self.hears_within(Duration::from_secs(7)).await {
                    return (answered, self.reply().await);
                }
            }
            (answered, None)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn noop_rset_help_vrfy_do_not_keep_an_idle_session_open() {
        let mut s = paused_session(|_| {}).await;
        let start = Instant::now();
        s.ehlo().await;
        let commands = ["NOOP", "RSET", "HELP", "VRFY x", "EHLO again.test"];
        let (answered, said) = s
            .keep_busy(&commands, start, Duration::from_secs(3600))
            .await;
        let (code, text) = said.expect("421 before the hour is up");
        assert_eq!(code, 421);
        assert_eq!(
            text,
            "4.4.2 reach.test idle too long without sending a message, closing connection"
        );
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(30) && waited < Duration::from_secs(31),
            "{waited:?}"
        );
        assert_eq!(answered, 5, "commands at 0, 7, 14, 21, 28 s were answered");
        s.expect_closed().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_restarts_the_idle_clock() {
        let mut s = paused_session(|_| {}).await;
        let start = Instant::now();
        s.ehlo().await;
        let (_, said) = s.keep_busy(&["NOOP"], start, Duration::from_secs(25)).await;
        assert!(said.is_none(), "{said:?}");
        assert_eq!(
            s.transaction("a@example.net", "r-abc@reply.test", "x\r\n")
                .await,
            250
        );
        let sent = start.elapsed();
        let (answered, said) = s
            .keep_busy(&["NOOP"], start, Duration::from_secs(3600))
            .await;
        assert!(said.expect("421").1.contains("idle"));
        // 30 s after the message, not after the greeting.
        let waited = start.elapsed() - sent;
        assert!(
            waited >= Duration::from_secs(30) && waited < Duration::from_secs(31),
            "{waited:?}"
        );
        assert_eq!(answered, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_transaction_dragged_out_gets_421_at_the_transaction_deadline() {
        let mut s = paused_session(|c| c.idle_timeout = Duration::from_secs(600)).await;
        s.ehlo().await;
        s.send("MAIL FROM:<a@example.net>").await;
        s.expect(250).await;
        let start = Instant::now();
        let (_, said) = s
            .keep_busy(
                &["RCPT TO:<r-abc@reply.test>", "NOOP"],
                start,
                Duration::from_secs(3600),
            )
            .await;
        assert_eq!(
            said.expect("421").1,
            "4.4.2 reach.test transaction took too long, closing connection"
        );
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(60) && waited < Duration::from_secs(61),
            "{waited:?}"
        );
        assert!(s.handler.delivered().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn message_data_slower_than_the_minimum_rate_gets_421_and_stores_nothing() {
        // 1000 bytes allowed at 1000 B/s after a 5 s floor: the data must be in within 6 s.
        let mut s = paused_session(|_| {}).await;
        s.ehlo().await;
        s.send("MAIL FROM:<a@example.net>").await;
        s.expect(250).await;
        s.send("RCPT TO:<r-abc@reply.test>").await;
        s.expect(250).await;
        s.send("DATA").await;
        s.expect(354).await;
        let start = Instant::now();
        let ((code, text), _) = s.trickle(&[b'x'; 100]).await;
        assert_eq!(
            (code, text.as_str()),
            (
                421,
                "4.4.2 reach.test message data took too long, closing connection"
            )
        );
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(6) && waited < Duration::from_secs(7),
            "{waited:?}"
        );
        s.expect_closed().await;
        assert!(s.handler.delivered().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_message_at_a_fair_rate_is_not_cut() {
        // Five 100-byte lines a second apart: inside the 6 s data deadline, and every pause is
        // shorter than the command timeout.
        let mut s = paused_session(|_| {}).await;
        s.ehlo().await;
        s.send("MAIL FROM:<a@example.net>").await;
        s.expect(250).await;
        s.send("RCPT TO:<r-abc@reply.test>").await;
        s.expect(250).await;
        s.send("DATA").await;
        s.expect(354).await;
        for _ in 0..5 {
            s.send_raw(&[b'y'; 98]).await;
            s.send_raw(b"\r\n").await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        s.send_raw(b".\r\n").await;
        s.expect(250).await;
        assert_eq!(s.handler.delivered()[0].1.len(), 500);
    }

    #[tokio::test]
    async fn a_client_closing_mid_data_delivers_nothing() {
        let mut s = TestSession::start().await;
        s.ehlo().await;
        s.send("MAIL FROM:<a@example.net>").await;
        s.expect(250).await;
        s.send("RCPT TO:<r-abc@reply.test>").await;
        s.expect(250).await;
        s.send("DATA").await;
        s.expect(354).await;
        s.send_raw(b"partial\r\n").await;
        drop(s.io);
        assert!(s.task.await.unwrap().is_ok());
        assert!(s.handler.delivered().is_empty());
    }

    // ---- TLS ------------------------------------------------------------------------------------

    fn tls_client() -> tokio_rustls::TlsConnector {
        let pem = std::fs::read(fixture("cert.pem")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut &pem[..]) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    #[test]
    fn load_tls_reads_the_fixture_and_names_bad_files() {
        load_tls(&fixture("cert.pem"), &fixture("key.pem")).unwrap();
        let missing = fixture("missing.pem");
        let err = load_tls(&missing, &fixture("key.pem")).unwrap_err();
        assert!(matches!(err, SmtpError::ReadCertificate { .. }), "{err}");
        assert!(err.to_string().contains("missing.pem"), "{err}");
        // A key file is not a certificate file, and the other way round.
        let err = load_tls(&fixture("key.pem"), &fixture("key.pem")).unwrap_err();
        assert!(matches!(err, SmtpError::NoCertificate { .. }), "{err}");
        assert!(err.to_string().contains("key.pem"), "{err}");
        let err = load_tls(&fixture("cert.pem"), &fixture("cert.pem")).unwrap_err();
        assert!(matches!(err, SmtpError::NoPrivateKey { .. }), "{err}");
    }

    #[tokio::test]
    async fn starttls_restarts_the_session_inside_tls() {
        let mut config = config();
        config.tls = Some(load_tls(&fixture("cert.pem"), &fixture("key.pem")).unwrap());
        let mut s = TestSession::start_with(config).await;
        assert!(s.ehlo().await.lines().any(|l| l == "STARTTLS"));
        // Commands pipelined after STARTTLS in plain text must not run inside TLS.
        s.send_raw(b"STARTTLS\r\nMAIL FROM:<injected@example.net>\r\n")
            .await;
        s.expect(220).await;
        assert!(s.io.buffer().is_empty());
        let name = rustls::pki_types::ServerName::try_from("reach.localhost").unwrap();
        let tls = tls_client().connect(name, s.io.into_inner()).await.unwrap();
        let mut t = TestSession {
            io: BufReader::new(tls),
            task: s.task,
            handler: s.handler,
            wait: WAIT,
        };
        // The session starts over: EHLO first, and STARTTLS is no longer offered.
        t.send("MAIL FROM:<a@example.net>").await;
        t.expect(503).await;
        let ehlo = t.ehlo().await;
        assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
        t.send("STARTTLS").await;
        t.expect(503).await;
        assert_eq!(
            t.transaction("a@example.net", "r-abc@reply.test", "secret\r\n")
                .await,
            250
        );
        t.send("QUIT").await;
        t.expect(221).await;
        t.expect_closed().await;
        assert!(t.task.await.unwrap().is_ok());
        let delivered = t.handler.delivered();
        assert_eq!(delivered.len(), 1);
        assert_eq!(delivered[0].0.mail_from, "a@example.net");
    }

    #[tokio::test]
    async fn a_failed_tls_handshake_ends_the_session() {
        let mut config = config();
        config.tls = Some(load_tls(&fixture("cert.pem"), &fixture("key.pem")).unwrap());
        let mut s = TestSession::start_with(config).await;
        s.ehlo().await;
        s.send("STARTTLS").await;
        s.expect(220).await;
        s.send("EHLO not-tls").await;
        let result = tokio::time::timeout(WAIT, s.task).await.unwrap().unwrap();
        assert!(
            matches!(result, Err(SmtpError::TlsHandshake(_))),
            "{result:?}"
        );
    }

    // ---- the listener ---------------------------------------------------------------------------

    async fn connect(addr: SocketAddr) -> TestSession<tokio::net::TcpStream> {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        TestSession {
            io: BufReader::new(stream),
            task: tokio::spawn(async { Ok(()) }),
            handler: Arc::new(Recorder::default()),
            wait: WAIT,
        }
    }

    #[test]
    fn connections_are_counted_per_ipv4_address_and_per_ipv6_64() {
        let key = |ip: &str| client_key(ip.parse().unwrap());
        assert_eq!(key("192.0.2.7"), key("192.0.2.7"));
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        let counts = Arc::new(PerAddress::default());
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let first = counts.take(ip, 2).unwrap();
        let _second = counts.take(ip, 2).unwrap();
        assert!(counts.take(ip, 2).is_none());
        assert!(counts.take("192.0.2.8".parse().unwrap(), 2).is_some());
        drop(first);
        assert!(counts.take(ip, 2).is_some());
    }

    async fn connect_from(source: &str, addr: SocketAddr) -> TestSession<tokio::net::TcpStream> {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        TestSession {
            io: BufReader::new(stream),
            task: tokio::spawn(async { Ok(()) }),
            handler: Arc::new(Recorder::default()),
            wait: WAIT,
        }
    }

    #[tokio::test]
    async fn one_address_over_its_cap_is_refused_while_others_get_in() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = config();
        config.max_connections = 4;
        config.max_connections_per_ip = 2;
        let handler = Arc::new(Recorder::default());
        let (stop, shutdown) = watch::channel(false);
        let server = tokio::spawn(serve(listener, config, handler.clone(), shutdown));

        let mut first = connect_from("127.0.0.1", addr).await;
        first.expect(220).await;
        let mut second = connect_from("127.0.0.1", addr).await;
        second.expect(220).await;
        let mut third = connect_from("127.0.0.1", addr).await;
        assert_eq!(
            third.expect(421).await,
            "4.7.0 reach.test too many connections from your address, try again later"
        );
        third.expect_closed().await;
        // Another address still gets in, and can deliver.
        let mut other = connect_from("127.0.0.2", addr).await;
        other.expect(220).await;
        other.ehlo().await;
        assert_eq!(
            other
                .transaction("a@example.net", "r-abc@reply.test", "x\r\n")
                .await,
            250
        );
        // A closed session frees its address's place (once the server has seen the close).
        first.send("QUIT").await;
        first.expect(221).await;
        first.expect_closed().await;
        let mut again = None;
        for _ in 0..100 {
            let mut c = connect_from("127.0.0.1", addr).await;
            match c.reply().await {
                Some((220, _)) => {
                    again = Some(c);
                    break;
                }
                Some((421, _)) => tokio::time::sleep(Duration::from_millis(10)).await,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(again.is_some(), "a place for 127.0.0.1 after QUIT");
        stop.send(true).unwrap();
        tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn when_full_an_idle_session_of_the_busiest_address_makes_room_for_another_address() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = config();
        config.max_connections = 3;
        config.max_connections_per_ip = 3;
        let handler = Arc::new(Recorder::default());
        let (stop, shutdown) = watch::channel(false);
        let server = tokio::spawn(serve(listener, config, handler.clone(), shutdown));

        // 127.0.0.1 takes every place.
        let mut ones = Vec::new();
        for _ in 0..3 {
            let mut c = connect_from("127.0.0.1", addr).await;
            c.expect(220).await;
            c.ehlo().await;
            ones.push(c);
        }
        // A client from 127.0.0.2 gets in: 127.0.0.1's oldest idle session is closed for it.
        let mut two = connect_from("127.0.0.2", addr).await;
        two.expect(220).await;
        assert_eq!(
            ones[0].expect(421).await,
            "4.7.0 reach.test too many connections from your address, closing this idle one"
        );
        ones[0].expect_closed().await;
        ones[1].send("NOOP").await;
        ones[1].expect(250).await;
        // 127.0.0.1 cannot push 127.0.0.2 out: it already holds more.
        let mut more = connect_from("127.0.0.1", addr).await;
        assert_eq!(
            more.expect(421).await,
            "4.7.0 reach.test too many connections, try again later"
        );
        // A third address pushes 127.0.0.1 down to one place, like the others.
        let mut three = connect_from("127.0.0.3", addr).await;
        three.expect(220).await;
        ones[1].expect(421).await;
        // Now every address has one place: nobody is pushed out for a fourth.
        let mut four = connect_from("127.0.0.4", addr).await;
        four.expect(421).await;
        for c in [&mut ones[2], &mut two, &mut three] {
            c.send("NOOP").await;
            c.expect(250).await;
        }
        stop.send(true).unwrap();
        tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_session_inside_a_transaction_is_never_cut_to_make_room() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = config();
        config.max_connections = 2;
        config.max_connections_per_ip = 2;
        let handler = Arc::new(Recorder::default());
        let (stop, shutdown) = watch::channel(false);
        let server = tokio::spawn(serve(listener, config, handler.clone(), shutdown));
        let mut ones = Vec::new();
        for _ in 0..2 {
            let mut c = connect_from("127.0.0.1", addr).await;
            c.expect(220).await;
            c.ehlo().await;
            c.send("MAIL FROM:<a@example.net>").await;
            c.expect(250).await;
            ones.push(c);
        }
        let mut two = connect_from("127.0.0.2", addr).await;
        assert!(two.expect(421).await.starts_with("4.7.0 "));
        for c in &mut ones {
            c.send("RCPT TO:<r-abc@reply.test>").await;
            c.expect(250).await;
            c.send("DATA").await;
            c.expect(354).await;
            c.send_raw(b"kept\r\n.\r\n").await;
            c.expect(250).await;
        }
        assert_eq!(handler.delivered().len(), 2);
        stop.send(true).unwrap();
        tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn serve_caps_connections_and_stops_on_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = config();
        config.max_connections = 2;
        let handler = Arc::new(Recorder::default());
        let (stop, shutdown) = watch::channel(false);
        let server = tokio::spawn(serve(listener, config, handler.clone(), shutdown));

        let mut first = connect(addr).await;
        first.expect(220).await;
        let mut second = connect(addr).await;
        second.expect(220).await;
        let mut third = connect(addr).await;
        assert!(third.expect(421).await.starts_with("4.7.0 "));
        third.expect_closed().await;

        // A closed session frees its place.
        first.send("QUIT").await;
        first.expect(221).await;
        first.expect_closed().await;
        // The place is freed when the server has seen the close: retry briefly.
        let mut fourth = None;
        for _ in 0..100 {
            let mut c = connect(addr).await;
            match c.reply().await {
                Some((220, _)) => {
                    fourth = Some(c);
                    break;
                }
                Some((421, _)) => tokio::time::sleep(Duration::from_millis(10)).await,
                other => panic!("unexpected {other:?}"),
            }
        }
        let mut fourth = fourth.expect("a place after QUIT");
        fourth.ehlo().await;
        assert_eq!(
            fourth
                .transaction("a@example.net", "r-abc@reply.test", "tcp\r\n")
                .await,
            250
        );
        assert_eq!(handler.delivered().len(), 1);

        // Shutdown: idle sessions are told, the listener returns.
        stop.send(true).unwrap();
        assert!(second.expect(421).await.starts_with("4.3.2 "));
        second.expect_closed().await;
        fourth.expect(421).await;
        tokio::time::timeout(WAIT, server).await.unwrap().unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
