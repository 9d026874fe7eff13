//! Outbound email: sends rendered emails (`super::message`) through the configured SMTP relay.
//!
//! It never decides whether to retry later: [`Relay::send`] classifies a failure as
//! [`SendError::Transient`] (retry later) or [`SendError::Permanent`] (give up and report), and
//! the durable outbound queue acts on that. The one resend it does itself is when a kept-open
//! relay connection turns out to have been closed before the relay saw anything of the email.
//!
//! [`Relay`] opens its own TCP connections to the relay (with `TCP_NODELAY`) and speaks SMTP over
//! them with lettre's connection type; it keeps up to `connections` of them open between emails.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Once, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
use lettre::transport::smtp::client::{
    AsyncSmtpConnection, AsyncTokioStream, Certificate, TlsParameters,
};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use lettre::Address;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

pub use super::message::{render, OutboundError, OutgoingEmail};

/// A temporary or permanent failure to hand a message to the relay.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SendError {
    /// Try again later: 4xx replies, connection refused/reset, timeouts, TLS trouble, relay
    /// authentication problems (a configuration problem the admin can fix).
    #[error("temporary failure: {0}")]
    Transient(String),
    /// Do not retry: a 5xx reply (including a refused recipient) or an address the relay can
    /// never accept.
    #[error("permanent failure: {0}")]
    Permanent(String),
}

/// How the connection to the relay is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelaySecurity {
    /// No TLS at all (`smtp://`, default port 25). Only for a relay on loopback or a trusted LAN.
    Plain,
    /// Plain connect, then STARTTLS, which is required (`smtp+starttls://`, default port 587).
    StartTls,
    /// TLS from the first byte (`smtps://`, default port 465).
    Tls,
}

impl RelaySecurity {
    /// The usual port for this kind of connection.
    pub fn default_port(self) -> u16 {
        match self {
            RelaySecurity::Plain => 25,
            RelaySecurity::StartTls => 587,
            RelaySecurity::Tls => 465,
        }
    }
}

/// Where and how to reach the SMTP relay.
#[derive(Clone)]
pub struct RelayConfig {
    /// Host name (checked against the TLS certificate) or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Plain, STARTTLS or implicit TLS.
    pub security: RelaySecurity,
    /// SMTP AUTH user name, if the relay wants one.
    pub username: Option<String>,
    /// SMTP AUTH password (never shown in `Debug`).
    pub password: Option<String>,
    /// The name Reach gives in EHLO; empty means the machine's host name.
    pub hello_name: String,
    /// Limit for connecting and for each SMTP command.
    pub timeout: Duration,
    /// Relay connections kept open at most (one per email in flight).
    pub connections: usize,
}

impl fmt::Debug for RelayConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("security", &self.security)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("hello_name", &self.hello_name)
            .field("timeout", &self.timeout)
            .field("connections", &self.connections)
            .finish()
    }
}

impl RelayConfig {
    /// Reads a relay URL: `smtp://host[:port]` (plain), `smtp+starttls://host[:port]` or
    /// `smtps://host[:port]`; default ports 25 / 587 / 465. IPv6 literals go in brackets
    /// (`smtp://[::1]:2525`). Credentials belong in `username`/`password`, not in the URL.
    pub fn from_url(url: &str) -> Result<(String, u16, RelaySecurity), OutboundError> {
        let bad = |reason: &str| OutboundError::InvalidRelayUrl {
            url: url.to_owned(),
            reason: reason.to_owned(),
        };
        let (scheme, rest) = url.trim().split_once("://").ok_or_else(|| {
            bad("expected smtp://, smtp+starttls:// or smtps:// followed by a host")
        })?;
        let security = match scheme.to_ascii_lowercase().as_str() {
            "smtp" => RelaySecurity::Plain,
            "smtp+starttls" => RelaySecurity::StartTls,
            "smtps" => RelaySecurity::Tls,
            _ => {
                return Err(bad(&format!(
                    "unknown scheme {scheme:?}; use smtp, smtp+starttls or smtps"
                )))
            }
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('@') {
            return Err(bad(
                "user name or password in the URL; set them as separate options",
            ));
        }
        if authority.contains(['/', '?', '#']) {
            return Err(bad("a relay URL has no path, query or fragment"));
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| bad("IPv6 address without closing ']'"))?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(bad("invalid IPv6 address in brackets"));
            }
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(port) => (host, Some(port)),
                    None => return Err(bad("unexpected text after ']'")),
                },
            }
        } else {
            match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if !host.contains(':')
            && !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        {
            return Err(bad("host contains characters not allowed in a host name"));
        }
        let port = match port {
            None => security.default_port(),
            Some(port) => match port.parse::<u16>() {
                Ok(port) if port != 0 => port,
                _ => return Err(bad(&format!("invalid port {port:?}; expected 1-65535"))),
            },
        };
        Ok((host.to_ascii_lowercase(), port, security))
    }
}

/// Idle relay connections are closed after this long, never reused.
const IDLE_LIMIT: Duration = Duration::from_secs(60);

/// How a new relay connection is secured once its TCP socket is open.
#[derive(Clone)]
enum Security {
    /// Nothing: SMTP in the clear.
    Plain,
    /// STARTTLS after the first EHLO, required; lettre does the handshake and the second EHLO.
    StartTls(TlsParameters),
    /// TLS from the first byte, handshake done here (lettre cannot wrap a socket it did not open).
    Tls {
        connector: TlsConnector,
        name: ServerName<'static>,
    },
}

/// An implicit-TLS stream handed to lettre as its transport.
#[derive(Debug)]
struct TlsSocket(tokio_rustls::client::TlsStream<TcpStream>);

impl AsyncRead for TlsSocket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsSocket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl AsyncTokioStream for TlsSocket {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().0.peer_addr()
    }
}

/// Why one exchange with the relay failed, before it is classified as a [`SendError`].
#[derive(Debug)]
enum Failure {
    /// lettre's error: a negative reply, an unreadable reply, the connection breaking, STARTTLS.
    Smtp(lettre::transport::smtp::Error),
    /// No answer to this step within the timeout.
    TimedOut(&'static str),
    /// The TCP connection could not be opened or set up.
    Connect(io::Error),
    /// The implicit TLS handshake failed (certificate refused, protocol error...).
    Tls(io::Error),
    /// The relay lacks an extension this message needs.
    Unsupported(&'static str),
}

impl Failure {
    /// The queue's view: only a 5xx reply (other than about our credentials) is permanent.
    fn outcome(&self, timeout: Duration) -> SendError {
        match self {
            Failure::Smtp(err) => classify(err),
            Failure::TimedOut(what) => SendError::Transient(format!(
                "timed out talking to the relay: no answer to {what} within {} s",
                timeout.as_secs_f32()
            )),
            Failure::Connect(err) => {
                SendError::Transient(format!("cannot talk to the relay: {err}"))
            }
            Failure::Tls(err) => SendError::Transient(format!("TLS with the relay failed: {err}")),
            Failure::Unsupported(why) => {
                SendError::Transient(format!("cannot talk to the relay: {why}"))
            }
        }
    }

    /// The connection broke (closed, reset, unreadable) rather than the relay answering.
    fn connection_lost(&self) -> bool {
        match self {
            Failure::Smtp(err) => err.status().is_none() && !err.is_client(),
            _ => false,
        }
    }

    /// The relay answered with a reply code: the connection still works and deserves a QUIT.
    fn relay_replied(&self) -> bool {
        matches!(self, Failure::Smtp(err) if err.status().is_some())
    }
}

/// A failed mail transaction, and whether it failed at its first command (so the relay cannot
/// have received the message yet).
struct Failed {
    at_first_command: bool,
    failure: Failure,
}

/// Runs one lettre step with the relay timeout.
async fn step<T>(
    timeout: Duration,
    what: &'static str,
    exchange: impl Future<Output = Result<T, lettre::transport::smtp::Error>>,
) -> Result<T, Failure> {
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result.map_err(Failure::Smtp),
        Err(_) => Err(Failure::TimedOut(what)),
    }
}

/// A connection waiting for the next email, and since when.
struct IdleConnection {
    connection: AsyncSmtpConnection,
    since: Instant,
}

/// What every clone of a [`Relay`] shares.
struct Shared {
    host: String,
    port: u16,
    security: Security,
    hello_name: ClientId,
    credentials: Option<Credentials>,
    timeout: Duration,
    /// Connections open at most, in use or idle.
    connections: usize,
    /// One permit per connection: at most `connections` sends (and so connections) at once.
    slots: Semaphore,
    /// Idle connections, oldest first.
    idle: Mutex<Vec<IdleConnection>>,
    /// How long a connection may stay idle ([`IDLE_LIMIT`] but in tests).
    idle_limit: Duration,
    /// Starts the task closing idle connections, at the first parked one.
    reaper: Once,
}

/// The SMTP relay: opens its own TCP connections with `TCP_NODELAY` (lettre writes the final
/// `.` of DATA as a separate small segment, which Nagle's algorithm would hold back for the
/// relay's delayed ACK, ~40 ms) and runs SMTP over them with lettre's connection. Keeps up to
/// `connections` of them open between emails, closing those idle for 60 s. Cheap to clone (clones
/// share the connections).
#[derive(Clone)]
pub struct Relay {
    shared: Arc<Shared>,
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay")
            .field("host", &self.shared.host)
            .field("port", &self.shared.port)
            .finish_non_exhaustive()
    }
}

/// SMTP reply codes that mean the relay refused *our credentials* (or wants some): a
/// configuration problem, so retried rather than bounced.
const AUTH_CODES: [&str; 4] = ["530", "534", "535", "538"];

/// lettre's split, kept: 5xx is permanent, 4xx transient; everything without a reply code
/// (refused/reset connections, timeouts, TLS handshakes, unreadable replies) is transient, as is a
/// 5xx about relay authentication.
fn classify(err: &lettre::transport::smtp::Error) -> SendError {
    let text = err.to_string();
    if err.is_permanent() {
        let code = err.status().map(|c| c.to_string()).unwrap_or_default();
        if AUTH_CODES.contains(&code.as_str()) {
            return SendError::Transient(format!(
                "the relay refused Reach's credentials ({text}); check the relay user name and password"
            ));
        }
        return SendError::Permanent(text);
    }
    if err.is_transient() {
        return SendError::Transient(text);
    }
    let what = if err.is_timeout() {
        "timed out talking to the relay"
    } else if err.is_tls() {
        "TLS with the relay failed"
    } else {
        "cannot talk to the relay"
    };
    SendError::Transient(format!("{what}: {text}"))
}

impl Relay {
    /// Sets up the relay; connects lazily on the first send. Certificates are checked against
    /// the Mozilla roots (webpki-roots) and the relay's host name, as lettre does.
    pub fn new(config: &RelayConfig) -> Result<Relay, OutboundError> {
        Relay::build(config, &[], IDLE_LIMIT)
    }

    /// [`Relay::new`], also trusting `extra_roots` and closing connections idle for
    /// `idle_limit` (tests use a private certificate and do not wait a minute).
    fn build(
        config: &RelayConfig,
        extra_roots: &[CertificateDer<'static>],
        idle_limit: Duration,
    ) -> Result<Relay, OutboundError> {
        let tls_error = |reason: String| OutboundError::Tls {
            host: config.host.clone(),
            reason,
        };
        let security = match config.security {
            RelaySecurity::Plain => Security::Plain,
            RelaySecurity::StartTls => {
                let mut builder = TlsParameters::builder(config.host.clone());
                for root in extra_roots {
                    builder = builder.add_root_certificate(
                        Certificate::from_der(root.to_vec())
                            .map_err(|err| tls_error(err.to_string()))?,
                    );
                }
                Security::StartTls(builder.build().map_err(|err| tls_error(err.to_string()))?)
            }
            RelaySecurity::Tls => {
                let mut roots = RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                };
                for root in extra_roots {
                    roots
                        .add(root.clone())
                        .map_err(|err| tls_error(err.to_string()))?;
                }
                // An explicit provider, like the listener's (src/email/smtp.rs `load_tls`).
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let tls = ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|err| tls_error(err.to_string()))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                let name = ServerName::try_from(config.host.clone())
                    .map_err(|err| tls_error(err.to_string()))?;
                Security::Tls {
                    connector: TlsConnector::from(Arc::new(tls)),
                    name,
                }
            }
        };
        let hello_name = if config.hello_name.trim().is_empty() {
            ClientId::default()
        } else {
            ClientId::Domain(config.hello_name.trim().to_owned())
        };
        let credentials = config.username.as_ref().map(|username| {
            Credentials::new(
                username.clone(),
                config.password.clone().unwrap_or_default(),
            )
        });
        Ok(Relay {
            shared: Arc::new(Shared {
                host: config.host.clone(),
                port: config.port,
                security,
                hello_name,
                credentials,
                timeout: config.timeout,
                connections: config.connections.max(1),
                slots: Semaphore::new(config.connections.max(1)),
                idle: Mutex::new(Vec::new()),
                idle_limit,
                reaper: Once::new(),
            }),
        })
    }

    /// Sends the rendered bytes with this envelope. `envelope_from` may be empty for the null
    /// reverse path. Transient = 4xx, connection refused/reset, timeouts, TLS handshake trouble;
    /// Permanent = 5xx (and a refused recipient, or an address no relay could accept).
    ///
    /// Uses an idle connection when there is one; if that connection turns out to be closed
    /// before the relay saw anything of this email, sends once more on a new connection.
    pub async fn send(
        &self,
        envelope_from: &str,
        to: &str,
        message: &[u8],
    ) -> Result<(), SendError> {
        let sender = if envelope_from.is_empty() {
            None
        } else {
            Some(envelope_from.parse::<Address>().map_err(|err| {
                SendError::Permanent(format!("invalid envelope sender {envelope_from:?}: {err}"))
            })?)
        };
        let recipient = to
            .parse::<Address>()
            .map_err(|err| SendError::Permanent(format!("invalid recipient {to:?}: {err}")))?;
        let envelope = Envelope::new(sender, vec![recipient])
            .map_err(|err| SendError::Permanent(format!("invalid envelope: {err}")))?;
        let shared = &self.shared;
        let _slot =
            shared.slots.acquire().await.map_err(|_| {
                SendError::Transient("the relay client is shutting down".to_owned())
            })?;
        match shared.deliver(&envelope, message).await {
            Ok(response) => {
                tracing::debug!(relay = %shared.host, port = shared.port, code = %response.code(), "relay accepted the message");
                Ok(())
            }
            Err(failure) => {
                let outcome = failure.outcome(shared.timeout);
                tracing::warn!(relay = %shared.host, port = shared.port, permanent = matches!(outcome, SendError::Permanent(_)), "relay did not take the message");
                tracing::debug!(relay = %shared.host, error = %outcome, "relay's answer");
                Err(outcome)
            }
        }
    }
}

impl Shared {
    /// One email on an idle connection if there is one, else (or if that one had been closed
    /// under us) on a new connection.
    async fn deliver(
        self: &Arc<Self>,
        envelope: &Envelope,
        message: &[u8],
    ) -> Result<Response, Failure> {
        if let Some(mut connection) = self.take_idle() {
            match self.transaction(&mut connection, envelope, message).await {
                Ok(response) => {
                    self.park(connection);
                    return Ok(response);
                }
                Err(Failed {
                    at_first_command: true,
                    failure,
                }) if failure.connection_lost() => {
                    tracing::debug!(relay = %self.host, port = self.port, "idle relay connection was closed; opening a new one");
                }
                Err(Failed { failure, .. }) => {
                    self.discard(connection, &failure);
                    return Err(failure);
                }
            }
        }
        let mut connection = self.connect().await?;
        match self.transaction(&mut connection, envelope, message).await {
            Ok(response) => {
                self.park(connection);
                Ok(response)
            }
            Err(Failed { failure, .. }) => {
                self.discard(connection, &failure);
                Err(failure)
            }
        }
    }

    /// Opens a connection ready for MAIL FROM: TCP with `TCP_NODELAY`, implicit TLS or the
    /// greeting, EHLO, STARTTLS and EHLO again when configured, AUTH when configured.
    async fn connect(&self) -> Result<AsyncSmtpConnection, Failure> {
        let timeout = self.timeout;
        let addresses = match tokio::time::timeout(
            timeout,
            tokio::net::lookup_host((self.host.as_str(), self.port)),
        )
        .await
        {
            Ok(addresses) => addresses.map_err(Failure::Connect)?,
            Err(_) => return Err(Failure::TimedOut("the relay's name lookup")),
        };
        let mut tcp = None;
        let mut last = Failure::Connect(io::Error::new(
            io::ErrorKind::NotFound,
            "the relay's name has no address",
        ));
        for address in addresses {
            match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
                Ok(Ok(stream)) => {
                    tcp = Some(stream);
                    break;
                }
                Ok(Err(err)) => last = Failure::Connect(err),
                Err(_) => last = Failure::TimedOut("connecting"),
            }
        }
        let tcp = tcp.ok_or(last)?;
        tcp.set_nodelay(true).map_err(Failure::Connect)?;
        let transport: Box<dyn AsyncTokioStream> = match &self.security {
            Security::Tls { connector, name } => {
                match tokio::time::timeout(timeout, connector.connect(name.clone(), tcp)).await {
                    Ok(tls) => Box::new(TlsSocket(tls.map_err(Failure::Tls)?)),
                    Err(_) => return Err(Failure::TimedOut("the TLS handshake")),
                }
            }
            Security::Plain | Security::StartTls(_) => Box::new(tcp),
        };
        let mut connection = step(
            timeout,
            "the greeting and EHLO",
            AsyncSmtpConnection::connect_with_transport(transport, &self.hello_name),
        )
        .await?;
        if let Security::StartTls(parameters) = &self.security {
            step(
                timeout,
                "STARTTLS",
                connection.starttls(parameters.clone(), &self.hello_name),
            )
            .await?;
        }
        if let Some(credentials) = &self.credentials {
            step(
                timeout,
                "AUTH",
                connection.auth(DEFAULT_MECHANISMS, credentials),
            )
            .await?;
        }
        tracing::debug!(relay = %self.host, port = self.port, "relay connection open");
        Ok(connection)
    }

    /// MAIL FROM, RCPT TO, DATA and the message, each with the timeout.
    async fn transaction(
        &self,
        connection: &mut AsyncSmtpConnection,
        envelope: &Envelope,
        message: &[u8],
    ) -> Result<Response, Failed> {
        let timeout = self.timeout;
        let first = |failure| Failed {
            at_first_command: true,
            failure,
        };
        let later = |failure| Failed {
            at_first_command: false,
            failure,
        };
        let server = connection.server_info();
        let mut parameters = Vec::new();
        let ascii_envelope = envelope
            .from()
            .into_iter()
            .chain(envelope.to())
            .all(|address| AsRef::<str>::as_ref(address).is_ascii());
        if !ascii_envelope {
            if !server.supports_feature(Extension::SmtpUtfEight) {
                return Err(first(Failure::Unsupported(
                    "the relay does not offer SMTPUTF8, needed for a non-ASCII address",
                )));
            }
            parameters.push(MailParameter::SmtpUtfEight);
        }
        if !message.is_ascii() {
            if !server.supports_feature(Extension::EightBitMime) {
                return Err(first(Failure::Unsupported(
                    "the relay does not offer 8BITMIME, needed for a non-ASCII message",
                )));
            }
            parameters.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        let mail = Mail::new(envelope.from().cloned(), parameters);
        step(timeout, "MAIL FROM", connection.command(mail))
            .await
            .map_err(first)?;
        for recipient in envelope.to() {
            let rcpt = Rcpt::new(recipient.clone(), Vec::new());
            step(timeout, "RCPT TO", connection.command(rcpt))
                .await
                .map_err(later)?;
        }
        step(timeout, "DATA", connection.command(Data))
            .await
            .map_err(later)?;
        step(timeout, "the message", connection.message(message))
            .await
            .map_err(later)
    }

    fn idle(&self) -> MutexGuard<'_, Vec<IdleConnection>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used idle connection, if it has not been idle too long. Older ones are
    /// closed on the way.
    fn take_idle(&self) -> Option<AsyncSmtpConnection> {
        let now = Instant::now();
        let (expired, fresh) = {
            let mut idle = self.idle();
            let expired = self.split_expired(&mut idle, now);
            (expired, idle.pop())
        };
        self.close(expired);
        fresh.map(|idle| idle.connection)
    }

    /// Removes and returns the connections idle for the idle limit or longer (the oldest).
    fn split_expired(
        &self,
        idle: &mut Vec<IdleConnection>,
        now: Instant,
    ) -> Vec<AsyncSmtpConnection> {
        let count = idle.partition_point(|c| now.duration_since(c.since) >= self.idle_limit);
        idle.drain(..count).map(|c| c.connection).collect()
    }

    /// Keeps a connection that just delivered an email for the next one.
    fn park(self: &Arc<Self>, connection: AsyncSmtpConnection) {
        if connection.has_broken() {
            return;
        }
        {
            let mut idle = self.idle();
            if idle.len() >= self.connections {
                drop(idle);
                self.close(vec![connection]);
                return;
            }
            idle.push(IdleConnection {
                connection,
                since: Instant::now(),
            });
        }
        self.reaper.call_once(|| {
            tokio::spawn(reap(Arc::downgrade(self)));
        });
    }

    /// Drops a connection after a failure: politely (QUIT) if the relay is still answering.
    fn discard(&self, connection: AsyncSmtpConnection, failure: &Failure) {
        if failure.relay_replied() {
            self.close(vec![connection]);
        }
    }

    /// Says QUIT on each connection and closes it, in the background.
    fn close(&self, connections: Vec<AsyncSmtpConnection>) {
        if connections.is_empty() {
            return;
        }
        let timeout = self.timeout;
        tokio::spawn(async move {
            for mut connection in connections {
                let _ = tokio::time::timeout(timeout, connection.abort()).await;
            }
        });
    }
}

/// Closes connections idle for the idle limit; ends once every clone of the relay is gone.
async fn reap(shared: Weak<Shared>) {
    loop {
        let wake = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let now = Instant::now();
            let (expired, oldest) = {
                let mut idle = shared.idle();
                let expired = shared.split_expired(&mut idle, now);
                (expired, idle.first().map(|c| c.since))
            };
            shared.close(expired);
            oldest.unwrap_or(now) + shared.idle_limit
        };
        tokio::time::sleep_until(wake).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::email::message::tests::{at, raw_header, sample};
    use mail_parser::MessageParser;
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Instant;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    #[test]
    fn relay_urls() {
        use RelaySecurity::*;
        let ok = |url: &str| RelayConfig::from_url(url).unwrap();
        assert_eq!(
            ok("smtp://relay.example.com"),
            ("relay.example.com".into(), 25, Plain)
        );
        assert_eq!(
            ok("smtp+starttls://Relay.Example.com"),
            ("relay.example.com".into(), 587, StartTls)
        );
        assert_eq!(
            ok("smtps://relay.example.com"),
            ("relay.example.com".into(), 465, Tls)
        );
        assert_eq!(
            ok("smtp://127.0.0.1:2525/"),
            ("127.0.0.1".into(), 2525, Plain)
        );
        assert_eq!(ok("SMTPS://[::1]:4650"), ("::1".into(), 4650, Tls));
        assert_eq!(ok("smtp://[::1]"), ("::1".into(), 25, Plain));

        let err = |url: &str| match RelayConfig::from_url(url) {
            Err(OutboundError::InvalidRelayUrl { reason, .. }) => reason,
            other => panic!("{url}: {other:?}"),
        };
        assert!(err("relay.example.com").contains("smtp://"));
        assert!(err("http://relay").contains("unknown scheme"));
        assert!(err("smtp://").contains("no host"));
        assert!(err("smtp://:25").contains("no host"));
        assert!(err("smtp://relay:0").contains("invalid port"));
        assert!(err("smtp://relay:70000").contains("invalid port"));
        assert!(err("smtp://relay:abc").contains("invalid port"));
        assert!(err("smtp://user:pw@relay").contains("separate options"));
        assert!(err("smtp://relay/path").contains("no path"));
        assert!(err("smtp://[::1").contains("']'"));
        assert!(err("smtp://re lay").contains("not allowed"));
    }

    #[test]
    fn relay_config_debug_hides_password() {
        let config = RelayConfig {
            host: "relay".into(),
            port: 25,
            security: RelaySecurity::Plain,
            username: Some("reach".into()),
            password: Some("hunter2".into()),
            hello_name: "reach.example.com".into(),
            timeout: Duration::from_secs(5),
            connections: 4,
        };
        let text = format!("{config:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("<redacted>"));
    }

    // ---- against real SMTP servers ----

    fn relay_to(port: u16) -> Relay {
        Relay::new(&test_config(port)).unwrap()
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// aiosmtpd's Mailbox handler on a free port, killed (by PID) when dropped.
    struct Sink {
        child: Child,
        port: u16,
        dir: tempfile::TempDir,
    }

    impl Sink {
        fn start() -> Sink {
            let dir = tempfile::tempdir().unwrap();
            for sub in ["tmp", "new", "cur"] {
                std::fs::create_dir_all(dir.path().join("mail").join(sub)).unwrap();
            }
            let port = free_port();
            let child = Command::new("python3")
                .args(["-m", "aiosmtpd", "-n", "-l"])
                .arg(format!("127.0.0.1:{port}"))
                .args(["-c", "aiosmtpd.handlers.Mailbox"])
                .arg(dir.path().join("mail"))
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("python3 -m aiosmtpd (PyPI aiosmtpd) must be installed");
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut probe = loop {
                if let Ok(stream) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                    break stream;
                }
                assert!(
                    Instant::now() < deadline,
                    "aiosmtpd did not start on {port}"
                );
                std::thread::sleep(Duration::from_millis(25));
            };
            // Wait for its first greeting too: the relay's timeout is short, and aiosmtpd's
            // first session (host name lookup, lazy imports) can be slow on a loaded machine.
            probe
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut banner = [0u8; 3];
            std::io::Read::read_exact(&mut probe, &mut banner).expect("aiosmtpd greets");
            assert_eq!(&banner, b"220");
            Sink { child, port, dir }
        }

        fn stored(&self) -> Vec<String> {
            let new = self.dir.path().join("mail").join("new");
            let mut files: Vec<_> = std::fs::read_dir(&new)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            files.iter().map(|p: &std::path::PathBuf| read(p)).collect()
        }
    }

    fn read(path: &Path) -> String {
        String::from_utf8(std::fs::read(path).unwrap()).unwrap()
    }

    impl Drop for Sink {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[tokio::test]
    async fn sends_through_a_real_smtp_server() {
        let sink = Sink::start();
        let relay = relay_to(sink.port);
        let mut email = sample();
        let raw = render(&email, at()).unwrap();
        relay
            .send("bounces@reply.example.com", "alice@example.org", &raw)
            .await
            .unwrap();
        email.message_id = "m2.xyz@reply.example.com".into();
        email.paragraphs = vec!["10:05 Bob: ça va? 🦀".into()];
        let raw2 = render(&email, at()).unwrap();
        relay.send("", "alice@example.org", &raw2).await.unwrap();

        let stored = sink.stored();
        assert_eq!(stored.len(), 2, "{stored:?}");
        let find = |id: &str| {
            stored
                .iter()
                .find(|m| m.contains(id))
                .unwrap_or_else(|| panic!("{id} not stored: {stored:?}"))
                .clone()
        };
        let first = find("<m1.xyz@reply.example.com>");
        let parsed = MessageParser::default().parse(first.as_bytes()).unwrap();
        assert_eq!(
            raw_header(&parsed, "X-MailFrom"),
            Some("bounces@reply.example.com")
        );
        assert_eq!(raw_header(&parsed, "X-RcptTo"), Some("alice@example.org"));
        assert_eq!(parsed.subject(), Some("IM from Bob (bob@example.net)"));
        assert!(parsed
            .body_text(0)
            .unwrap()
            .starts_with("10:02 Bob: hi there"));
        let second = find("<m2.xyz@reply.example.com>");
        let parsed = MessageParser::default().parse(second.as_bytes()).unwrap();
        assert_eq!(
            raw_header(&parsed, "X-MailFrom"),
            Some("<>"),
            "null reverse path"
        );
        assert!(parsed
            .body_text(0)
            .unwrap()
            .starts_with("10:05 Bob: ça va? 🦀"));
    }

    #[tokio::test]
    async fn nothing_listening_is_transient() {
        let relay = relay_to(free_port());
        let raw = render(&sample(), at()).unwrap();
        match relay
            .send("b@reply.example.com", "alice@example.org", &raw)
            .await
        {
            Err(SendError::Transient(why)) => assert!(!why.is_empty()),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn invalid_recipient_is_permanent_without_connecting() {
        let relay = relay_to(free_port());
        let raw = render(&sample(), at()).unwrap();
        assert!(matches!(
            relay.send("b@reply.example.com", "no at sign", &raw).await,
            Err(SendError::Permanent(_))
        ));
    }

    /// How a test relay secures its connections.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum TestTls {
        None,
        /// Offers STARTTLS (with the `relay-cert.pem` fixture).
        StartTls,
        /// TLS from the first byte (same certificate).
        Implicit,
    }

    /// What a test relay answers.
    #[derive(Clone, Copy)]
    struct Script {
        rcpt_reply: &'static str,
        data_reply: &'static str,
        /// Waits this long before answering the end of DATA.
        data_delay: Duration,
        /// Closes the connection right after answering each message.
        close_after_message: bool,
        tls: TestTls,
        /// Offers AUTH PLAIN LOGIN and wants this `AUTH PLAIN` argument before MAIL.
        auth_plain: Option<&'static str>,
    }

    impl Script {
        fn accepting() -> Script {
            Script {
                rcpt_reply: "250 ok\r\n",
                data_reply: "250 2.0.0 queued\r\n",
                data_delay: Duration::ZERO,
                close_after_message: false,
                tls: TestTls::None,
                auth_plain: None,
            }
        }
    }

    /// What a test relay saw.
    #[derive(Default)]
    struct Seen {
        /// Connections accepted.
        connections: AtomicUsize,
        /// Connections open now, and the most open at once.
        open: AtomicUsize,
        max_open: AtomicUsize,
        /// Messages answered after DATA, and those of them that came over TLS.
        messages: AtomicUsize,
        messages_over_tls: AtomicUsize,
        /// MAIL commands seen (refused or not).
        mail_commands: AtomicUsize,
        /// QUIT commands seen.
        quits: AtomicUsize,
    }

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tls")
            .join(name)
    }

    fn relay_certificate() -> CertificateDer<'static> {
        let pem = std::fs::read(fixture("relay-cert.pem")).unwrap();
        let first = rustls_pemfile::certs(&mut &pem[..]).next();
        first.unwrap().unwrap()
    }

    /// A tiny SMTP server on loopback that follows `script`; says what it saw.
    async fn test_relay(script: Script) -> (u16, Arc<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Seen::default());
        let acceptor = tokio_rustls::TlsAcceptor::from(
            crate::email::smtp::load_tls(&fixture("relay-cert.pem"), &fixture("relay-key.pem"))
                .unwrap(),
        );
        let counters = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counters.connections.fetch_add(1, Ordering::SeqCst);
                let open = counters.open.fetch_add(1, Ordering::SeqCst) + 1;
                counters.max_open.fetch_max(open, Ordering::SeqCst);
                let (seen, acceptor) = (counters.clone(), acceptor.clone());
                tokio::spawn(async move {
                    serve_connection(stream, script, acceptor, &seen).await;
                    seen.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        (port, seen)
    }

    async fn serve_connection(
        stream: tokio::net::TcpStream,
        script: Script,
        acceptor: tokio_rustls::TlsAcceptor,
        seen: &Seen,
    ) {
        if script.tls == TestTls::Implicit {
            if let Ok(tls) = acceptor.accept(stream).await {
                serve_session(&mut BufReader::new(tls), script, true, true, seen).await;
            }
            return;
        }
        let mut io = BufReader::new(stream);
        if serve_session(&mut io, script, true, false, seen).await == Ended::StartTls {
            if let Ok(tls) = acceptor.accept(io.into_inner()).await {
                serve_session(&mut BufReader::new(tls), script, false, true, seen).await;
            }
        }
    }

    #[derive(PartialEq, Eq)]
    enum Ended {
        Closed,
        StartTls,
    }

    async fn serve_session<S: AsyncRead + AsyncWrite + Unpin>(
        io: &mut BufReader<S>,
        script: Script,
        greet: bool,
        over_tls: bool,
        seen: &Seen,
    ) -> Ended {
        if greet && io.write_all(b"220 test ESMTP\r\n").await.is_err() {
            return Ended::Closed;
        }
        let (mut in_data, mut authenticated) = (false, false);
        let mut line = String::new();
        loop {
            line.clear();
            match io.read_line(&mut line).await {
                Ok(0) | Err(_) => return Ended::Closed,
                Ok(_) => {}
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if in_data {
                if line == "." {
                    in_data = false;
                    tokio::time::sleep(script.data_delay).await;
                    seen.messages.fetch_add(1, Ordering::SeqCst);
                    if over_tls {
                        seen.messages_over_tls.fetch_add(1, Ordering::SeqCst);
                    }
                    if io.write_all(script.data_reply.as_bytes()).await.is_err()
                        || script.close_after_message
                    {
                        return Ended::Closed;
                    }
                }
                continue;
            }
            let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
            let reply: String = match verb.as_str() {
                "EHLO" | "HELO" => {
                    let mut reply = String::from("250-test\r\n");
                    if script.tls == TestTls::StartTls && !over_tls {
                        reply.push_str("250-STARTTLS\r\n");
                    }
                    if script.auth_plain.is_some() {
                        reply.push_str("250-AUTH PLAIN LOGIN\r\n");
                    }
                    reply + "250 8BITMIME\r\n"
                }
                "STAR" if script.tls == TestTls::StartTls && !over_tls => {
                    if io.write_all(b"220 2.0.0 go ahead\r\n").await.is_err() {
                        return Ended::Closed;
                    }
                    return Ended::StartTls;
                }
                "AUTH" => match (script.auth_plain, line.split(' ').nth(2)) {
                    (Some(wanted), Some(given)) if given == wanted => {
                        authenticated = true;
                        "235 2.7.0 ok\r\n".into()
                    }
                    _ => "535 5.7.8 bad credentials\r\n".into(),
                },
                "MAIL" => {
                    seen.mail_commands.fetch_add(1, Ordering::SeqCst);
                    if script.auth_plain.is_some() && !authenticated {
                        "530 5.7.0 Authentication required\r\n".into()
                    } else {
                        "250 2.0.0 ok\r\n".into()
                    }
                }
                "RSET" | "NOOP" => "250 2.0.0 ok\r\n".into(),
                "RCPT" => script.rcpt_reply.into(),
                "DATA" => {
                    in_data = true;
                    "354 go ahead\r\n".into()
                }
                "QUIT" => {
                    seen.quits.fetch_add(1, Ordering::SeqCst);
                    let _ = io.write_all(b"221 bye\r\n").await;
                    return Ended::Closed;
                }
                _ => "502 5.5.1 what?\r\n".into(),
            };
            if io.write_all(reply.as_bytes()).await.is_err() {
                return Ended::Closed;
            }
        }
    }

    fn test_config(port: u16) -> RelayConfig {
        RelayConfig {
            host: "127.0.0.1".into(),
            port,
            security: RelaySecurity::Plain,
            username: None,
            password: None,
            hello_name: "reach.test".into(),
            timeout: Duration::from_secs(5),
            connections: 4,
        }
    }

    /// A relay trusting the test certificate.
    fn test_relay_client(config: &RelayConfig, idle_limit: Duration) -> Relay {
        Relay::build(config, &[relay_certificate()], idle_limit).unwrap()
    }

    async fn send_sample(relay: &Relay) -> Result<(), SendError> {
        let raw = render(&sample(), at()).unwrap();
        tokio::time::timeout(
            Duration::from_secs(10),
            relay.send("b@reply.example.com", "alice@example.org", &raw),
        )
        .await
        .expect("send finished")
    }

    async fn send_to_scripted(
        rcpt_reply: &'static str,
        data_reply: &'static str,
    ) -> Result<(), SendError> {
        let (port, _) = test_relay(Script {
            rcpt_reply,
            data_reply,
            ..Script::accepting()
        })
        .await;
        send_sample(&relay_to(port)).await
    }

    #[tokio::test]
    async fn consecutive_sends_reuse_one_connection() {
        let (port, seen) = test_relay(Script::accepting()).await;
        let relay = relay_to(port);
        for _ in 0..50 {
            send_sample(&relay).await.unwrap();
        }
        assert_eq!(seen.messages.load(Ordering::SeqCst), 50);
        assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn concurrent_sends_use_connections_up_to_the_limit() {
        let (port, seen) = test_relay(Script {
            data_delay: Duration::from_millis(100),
            ..Script::accepting()
        })
        .await;
        let relay = Relay::new(&RelayConfig {
            connections: 3,
            ..test_config(port)
        })
        .unwrap();
        for _round in 0..2 {
            let sends = (0..12).map(|_| send_sample(&relay));
            for result in futures::future::join_all(sends).await {
                result.unwrap();
            }
        }
        assert_eq!(seen.messages.load(Ordering::SeqCst), 24);
        assert_eq!(seen.max_open.load(Ordering::SeqCst), 3);
        assert_eq!(
            seen.connections.load(Ordering::SeqCst),
            3,
            "the second round reuses the first round's connections"
        );
    }

    #[tokio::test]
    async fn a_relay_closing_an_idle_connection_does_not_fail_the_next_send() {
        let (port, seen) = test_relay(Script {
            close_after_message: true,
            ..Script::accepting()
        })
        .await;
        let relay = relay_to(port);
        for sent in 1..=3 {
            send_sample(&relay).await.unwrap();
            // Let the relay's close reach us, as it would between two emails.
            while seen.open.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(seen.messages.load(Ordering::SeqCst), sent);
        }
        assert_eq!(seen.connections.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_limit() {
        let (port, seen) = test_relay(Script::accepting()).await;
        let relay = test_relay_client(&test_config(port), Duration::from_millis(200));
        send_sample(&relay).await.unwrap();
        assert_eq!(seen.open.load(Ordering::SeqCst), 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.open.load(Ordering::SeqCst) > 0 {
            assert!(Instant::now() < deadline, "the idle connection stayed open");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(seen.quits.load(Ordering::SeqCst), 1, "closed with QUIT");
        send_sample(&relay).await.unwrap();
        assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_email_does_not_reuse_its_connection() {
        let (port, seen) = test_relay(Script {
            rcpt_reply: "451 4.3.0 try later\r\n",
            ..Script::accepting()
        })
        .await;
        let relay = relay_to(port);
        for _ in 0..2 {
            assert!(matches!(
                send_sample(&relay).await,
                Err(SendError::Transient(_))
            ));
        }
        assert_eq!(seen.connections.load(Ordering::SeqCst), 2);
        assert_eq!(seen.mail_commands.load(Ordering::SeqCst), 2, "no retry");
    }

    #[tokio::test]
    async fn implicit_tls_sends_over_tls() {
        let (port, seen) = test_relay(Script {
            tls: TestTls::Implicit,
            ..Script::accepting()
        })
        .await;
        let config = RelayConfig {
            security: RelaySecurity::Tls,
            ..test_config(port)
        };
        let relay = test_relay_client(&config, IDLE_LIMIT);
        send_sample(&relay).await.unwrap();
        send_sample(&relay).await.unwrap();
        assert_eq!(seen.messages_over_tls.load(Ordering::SeqCst), 2);
        assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn implicit_tls_refuses_an_unknown_certificate() {
        let (port, seen) = test_relay(Script {
            tls: TestTls::Implicit,
            ..Script::accepting()
        })
        .await;
        let relay = Relay::new(&RelayConfig {
            security: RelaySecurity::Tls,
            ..test_config(port)
        })
        .unwrap();
        match send_sample(&relay).await {
            Err(SendError::Transient(why)) => assert!(why.contains("TLS"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(seen.messages.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn starttls_sends_over_tls() {
        let (port, seen) = test_relay(Script {
            tls: TestTls::StartTls,
            ..Script::accepting()
        })
        .await;
        let config = RelayConfig {
            security: RelaySecurity::StartTls,
            ..test_config(port)
        };
        let relay = test_relay_client(&config, IDLE_LIMIT);
        send_sample(&relay).await.unwrap();
        send_sample(&relay).await.unwrap();
        assert_eq!(seen.messages_over_tls.load(Ordering::SeqCst), 2);
        assert_eq!(seen.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn starttls_is_required_when_configured() {
        let (port, seen) = test_relay(Script::accepting()).await;
        let config = RelayConfig {
            security: RelaySecurity::StartTls,
            ..test_config(port)
        };
        let relay = test_relay_client(&config, IDLE_LIMIT);
        assert!(matches!(
            send_sample(&relay).await,
            Err(SendError::Transient(_))
        ));
        assert_eq!(seen.mail_commands.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn starttls_refuses_an_unknown_certificate() {
        let (port, seen) = test_relay(Script {
            tls: TestTls::StartTls,
            ..Script::accepting()
        })
        .await;
        let relay = Relay::new(&RelayConfig {
            security: RelaySecurity::StartTls,
            ..test_config(port)
        })
        .unwrap();
        assert!(matches!(
            send_sample(&relay).await,
            Err(SendError::Transient(_))
        ));
        assert_eq!(seen.mail_commands.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn authenticates_when_configured() {
        // base64("\0reach\0hunter2")
        let (port, seen) = test_relay(Script {
            tls: TestTls::StartTls,
            auth_plain: Some("AHJlYWNoAGh1bnRlcjI="),
            ..Script::accepting()
        })
        .await;
        let config = RelayConfig {
            security: RelaySecurity::StartTls,
            username: Some("reach".into()),
            password: Some("hunter2".into()),
            ..test_config(port)
        };
        send_sample(&test_relay_client(&config, IDLE_LIMIT))
            .await
            .unwrap();
        assert_eq!(seen.messages_over_tls.load(Ordering::SeqCst), 1);

        let wrong = RelayConfig {
            password: Some("hunter3".into()),
            ..config
        };
        assert!(matches!(
            send_sample(&test_relay_client(&wrong, IDLE_LIMIT)).await,
            Err(SendError::Transient(why)) if why.contains("credentials")
        ));
    }

    #[tokio::test]
    async fn a_silent_relay_times_out_as_transient() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // Accepts, then never says a word.
        let _hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let relay = Relay::new(&RelayConfig {
            timeout: Duration::from_millis(300),
            ..test_config(port)
        })
        .unwrap();
        match send_sample(&relay).await {
            Err(SendError::Transient(why)) => assert!(why.contains("timed out"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn refused_recipient_is_permanent() {
        match send_to_scripted("550 5.1.1 no such user\r\n", "250 ok\r\n").await {
            Err(SendError::Permanent(why)) => assert!(why.contains("no such user"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn try_later_is_transient() {
        match send_to_scripted("451 4.3.0 try later\r\n", "250 ok\r\n").await {
            Err(SendError::Transient(why)) => assert!(why.contains("try later"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn replies_after_data_are_classified_too() {
        assert_eq!(
            send_to_scripted("250 ok\r\n", "250 2.0.0 queued\r\n").await,
            Ok(())
        );
        assert!(matches!(
            send_to_scripted("250 ok\r\n", "554 5.7.1 rejected as spam\r\n").await,
            Err(SendError::Permanent(_))
        ));
        assert!(matches!(
            send_to_scripted("250 ok\r\n", "452 4.3.1 out of memory\r\n").await,
            Err(SendError::Transient(_))
        ));
    }

    #[tokio::test]
    async fn relay_authentication_refusal_is_transient() {
        assert!(matches!(
            send_to_scripted("530 5.7.0 Authentication required\r\n", "250 ok\r\n").await,
            Err(SendError::Transient(why)) if why.contains("credentials")
        ));
    }
}
