//! The component link (XEP-0114) to the XMPP server.
//!
//! Knows nothing of users, email or SMS: it connects, authenticates, hands every good inbound
//! stanza to the runtime, bounces unparsable ones with `bad-request`, keeps the link alive with
//! pings, reconnects with jittered exponential backoff, and drains the durable outbound queue.
//!
//! It drives `tokio_xmpp::xmlstream` directly instead of `tokio_xmpp::Component`, because the
//! latter ends the stream on the first stanza xmpp-parsers rejects and on read timeouts (see
//! `recipes/README.md`, "tokio-xmpp 6.0 component connection: known traps").
//!
//! Delivery to the server is at-least-once: an outbound item is marked sent only after it was
//! written and the socket flushed, so a link drop may resend a batch but never loses one.
//! It never logs the component secret, and stanza contents only at `debug`.

use std::borrow::Cow;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::{SinkExt, StreamExt};
use minidom::Element;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::BufStream;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Notify};
use tokio_xmpp::parsers::component::Handshake;
use tokio_xmpp::parsers::iq::Iq;
use tokio_xmpp::parsers::ns;
use tokio_xmpp::parsers::ping::Ping;
use tokio_xmpp::parsers::stream_error::ReceivedStreamError;
use tokio_xmpp::xmlstream::{
    initiate_stream, FallibleStreamElement, RawStanzaHeader, ReadError, StreamElementError,
    StreamHeader, Timeouts, XmppStream, XmppStreamElement,
};
use tokio_xmpp::Stanza;

use super::depth_guard::DepthGuard;
use tracing::{debug, info, warn};

/// Where and how to connect.
#[derive(Clone)]
pub struct LinkConfig {
    /// `host:port` of the server's component listener.
    pub server: String,
    /// The component domain `D`.
    pub domain: String,
    /// The shared secret (never logged).
    pub secret: String,
    /// The JID pinged when the link is idle (normally the server's main host).
    pub ping_to: String,
    /// Silence after which Reach pings the server.
    pub idle_ping: Duration,
    /// Silence after a ping after which the link is considered dead.
    pub ping_timeout: Duration,
    /// Deepest element nesting a stanza may have (the stanza being depth 1); deeper elements
    /// never reach the parser (see [`super::depth_guard`]).
    pub max_stanza_depth: usize,
}

impl std::fmt::Debug for LinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkConfig")
            .field("server", &self.server)
            .field("domain", &self.domain)
            .field("secret", &"***")
            .field("ping_to", &self.ping_to)
            .field("idle_ping", &self.idle_ping)
            .field("ping_timeout", &self.ping_timeout)
            .field("max_stanza_depth", &self.max_stanza_depth)
            .finish()
    }
}

/// What the link reports to the runtime.
// Stanzas are moved, not copied, through the channel; boxing them would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum LinkEvent {
    /// The handshake succeeded; the outbound queue is being drained.
    Up,
    /// The link went down; it will reconnect by itself.
    Down,
    /// A stanza from the server (never the link's own ping results).
    Stanza(tokio_xmpp::Stanza),
}

/// The durable queue of outbound stanzas the link drains. Implemented by the store (whose
/// engine may be a database: hence futures, which the store runs off the async threads).
pub trait OutboundQueue: Send + Sync + 'static {
    /// Up to `limit` oldest pending stanzas, in order, with their queue keys.
    fn pending(&self, limit: usize) -> BoxFuture<'static, Vec<(u64, Element)>>;
    /// Forget stanzas that have been written to the socket.
    fn mark_sent(&self, keys: Vec<u64>) -> BoxFuture<'static, ()>;
    /// Notified whenever something is queued.
    fn notify(&self) -> Arc<Notify>;
}

/// Jittered exponential backoff between connection attempts: nominal delays 1 s, 2 s, 4 s ...
/// capped at 60 s; each actual delay is drawn uniformly from `[nominal / 2, nominal]`.
///
/// Pure: the random source is passed in, so tests can seed it.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_secs(1), Duration::from_secs(60))
    }
}

impl Backoff {
    /// A backoff starting at `base` and doubling up to `cap` (`cap` is raised to `base` if lower).
    pub fn new(base: Duration, cap: Duration) -> Self {
        let base = base.max(Duration::from_millis(1));
        let cap = cap.max(base);
        Self {
            base,
            cap,
            next: base,
        }
    }

    /// The nominal (un-jittered) delay the next call to [`Backoff::next_delay`] is based on.
    pub fn nominal(&self) -> Duration {
        self.next
    }

    /// The delay to wait before the next attempt; advances the sequence.
    pub fn next_delay<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Duration {
        let nominal = self.next;
        self.next = nominal.checked_mul(2).unwrap_or(self.cap).min(self.cap);
        jittered(nominal, rng.gen_range(0.0..=1.0))
    }

    /// Start over at the base delay (after a link was healthy for a while).
    pub fn reset(&mut self) {
        self.next = self.base;
    }
}

/// `nominal` scaled into `[nominal / 2, nominal]` by `unit` (clamped to `[0, 1]`).
fn jittered(nominal: Duration, unit: f64) -> Duration {
    let unit = if unit.is_finite() {
        unit.clamp(0.0, 1.0)
    } else {
        1.0
    };
    let half = nominal / 2;
    half + (nominal - half).mul_f64(unit)
}

/// Timing knobs; the defaults are for production, tests shrink them.
#[derive(Debug, Clone)]
struct Tuning {
    backoff: Backoff,
    /// A link up this long resets the backoff when it drops.
    healthy_after: Duration,
    /// Bound on TCP connect + stream header + handshake.
    setup_timeout: Duration,
    /// Bound on politely closing the stream at shutdown.
    close_timeout: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            backoff: Backoff::default(),
            healthy_after: Duration::from_secs(30),
            setup_timeout: Duration::from_secs(15),
            close_timeout: Duration::from_secs(1),
        }
    }
}

/// How many queued items are written per flush.
const BATCH: usize = 64;
/// Bound on writing what is queued when shutdown is asked for.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(3);
/// Longest reason text put into a `bad-request` bounce.
const MAX_REASON_CHARS: usize = 200;

type Stream = XmppStream<BufStream<DepthGuard<TcpStream>>>;

/// Why a connection attempt failed or a live link ended.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("cannot connect: {0}")]
    Connect(io::Error),
    #[error("timed out while connecting or authenticating")]
    SetupTimeout,
    #[error("the server's stream header carries no id")]
    NoStreamId,
    #[error("handshake refused: {0}")]
    Refused(String),
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("timed out writing to the server")]
    WriteTimeout,
    #[error("the server closed the stream")]
    Closed,
    #[error("{0}")]
    StreamError(ReceivedStreamError),
}

/// How a live link ended.
enum Ended {
    Shutdown,
    Lost(LinkError),
}

/// Run the component link until `shutdown` becomes true (or its sender is dropped), then close
/// the stream politely and return.
///
/// Sends [`LinkEvent::Up`] after each successful handshake, [`LinkEvent::Down`] when a link that
/// was up is lost, and [`LinkEvent::Stanza`] for every good inbound stanza. If `events` is
/// closed, the link stops as if shut down.
pub async fn run_link(
    config: LinkConfig,
    queue: Arc<dyn OutboundQueue>,
    events: mpsc::Sender<LinkEvent>,
    shutdown: watch::Receiver<bool>,
) {
    run_link_tuned(config, queue, events, shutdown, Tuning::default()).await
}

async fn run_link_tuned(
    config: LinkConfig,
    queue: Arc<dyn OutboundQueue>,
    events: mpsc::Sender<LinkEvent>,
    mut shutdown: watch::Receiver<bool>,
    tuning: Tuning,
) {
    let mut backoff = tuning.backoff.clone();
    let mut rng = StdRng::from_entropy();
    let ping_from = parse_jid(&config.domain, "domain");
    let ping_to = parse_jid(&config.ping_to, "ping_to");
    loop {
        if *shutdown.borrow() {
            return;
        }
        let attempt = tokio::select! {
            r = tokio::time::timeout(tuning.setup_timeout, connect(&config)) => {
                r.unwrap_or(Err(LinkError::SetupTimeout))
            }
            _ = shutdown_requested(&mut shutdown) => return,
        };
        match attempt {
            Ok(mut stream) => {
                info!(server = %config.server, domain = %config.domain, "component link up");
                let up_at = Instant::now();
                let mut session = Session {
                    config: &config,
                    queue: &queue,
                    events: &events,
                    ping_from: ping_from.clone(),
                    ping_to: ping_to.clone(),
                    last_ping: None,
                    rng: &mut rng,
                    close_timeout: tuning.close_timeout,
                };
                let ended = session.run(&mut stream, &mut shutdown).await;
                drop(stream);
                match ended {
                    Ended::Shutdown => {
                        info!(server = %config.server, domain = %config.domain, "component link closed");
                        return;
                    }
                    Ended::Lost(e) => {
                        info!(server = %config.server, domain = %config.domain, error = %e,
                            "component link down");
                        if up_at.elapsed() >= tuning.healthy_after {
                            backoff.reset();
                        }
                        if !emit(&events, LinkEvent::Down, &mut shutdown).await {
                            return;
                        }
                    }
                }
            }
            Err(LinkError::Refused(reason)) => {
                warn!(server = %config.server, domain = %config.domain, %reason,
                    "XMPP server refused the component (wrong secret, unknown component domain, \
                     or another instance already connected)");
            }
            Err(e) => {
                warn!(server = %config.server, domain = %config.domain, error = %e,
                    "cannot establish the component link");
            }
        }
        let delay = backoff.next_delay(&mut rng);
        info!(
            delay_ms = delay.as_millis() as u64,
            "reconnecting the component link after a delay"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown_requested(&mut shutdown) => return,
        }
    }
}

fn parse_jid(s: &str, what: &str) -> Option<jid::Jid> {
    match jid::Jid::new(s) {
        Ok(j) => Some(j),
        Err(e) => {
            warn!(value = %s, error = %e, "link config: {what} is not a valid JID; pings omit it");
            None
        }
    }
}

/// Resolves once shutdown is requested or the shutdown sender is gone.
async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Hand an event to the runtime; false if the link must stop (shutdown, or nobody listens).
async fn emit(
    events: &mpsc::Sender<LinkEvent>,
    event: LinkEvent,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        r = events.send(event) => match r {
            Ok(()) => true,
            Err(_) => {
                warn!("the runtime no longer takes link events; stopping the component link");
                false
            }
        },
        _ = shutdown_requested(shutdown) => false,
    }
}

/// TCP connect, stream header, handshake.
async fn connect(config: &LinkConfig) -> Result<Stream, LinkError> {
    let tcp = TcpStream::connect(&config.server)
        .await
        .map_err(LinkError::Connect)?;
    // Only a latency tweak; failing to set it is harmless.
    let _ = tcp.set_nodelay(true);
    let timeouts = Timeouts {
        read_timeout: config.idle_ping,
        response_timeout: config.ping_timeout,
    };
    let mut pending = initiate_stream(
        // The stream element is one level above the stanzas.
        BufStream::new(DepthGuard::new(tcp, config.max_stanza_depth + 1)),
        ns::COMPONENT,
        StreamHeader {
            to: Some(Cow::Borrowed(config.domain.as_str())),
            from: None,
            id: None,
        },
        timeouts,
    )
    .await?;
    let header = pending.take_header();
    let stream_id = header.id.ok_or(LinkError::NoStreamId)?.into_owned();
    let mut stream: Stream = pending.skip_features();
    let handshake = Handshake::from_stream_id_and_password(stream_id, &config.secret);
    stream
        .send(&XmppStreamElement::ComponentHandshake(handshake))
        .await?;
    loop {
        match stream.next().await {
            Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::ComponentHandshake(_)))) => {
                return Ok(stream)
            }
            Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::StreamError(e)))) => {
                return Err(LinkError::Refused(e.to_string()))
            }
            Some(Ok(FallibleStreamElement::Ok(other))) => {
                debug!(element = ?other, "unexpected element instead of the handshake reply");
                return Err(LinkError::Refused(
                    "unexpected element instead of the handshake reply".into(),
                ));
            }
            Some(Ok(FallibleStreamElement::Err(e))) => {
                return Err(LinkError::Refused(format!(
                    "invalid element instead of the handshake reply: {e}"
                )))
            }
            Some(Err(ReadError::SoftTimeout)) => continue,
            Some(Err(ReadError::HardError(e))) => return Err(LinkError::Io(e)),
            Some(Err(ReadError::ParseError(e))) => {
                return Err(LinkError::Io(io::Error::new(io::ErrorKind::InvalidData, e)))
            }
            Some(Err(ReadError::StreamFooterReceived)) | None => {
                return Err(LinkError::Refused(
                    "the server closed the stream before answering the handshake".into(),
                ))
            }
        }
    }
}

/// One live, authenticated link.
struct Session<'a> {
    config: &'a LinkConfig,
    queue: &'a Arc<dyn OutboundQueue>,
    events: &'a mpsc::Sender<LinkEvent>,
    ping_from: Option<jid::Jid>,
    ping_to: Option<jid::Jid>,
    /// Id of the last keepalive ping, whose result/error is swallowed.
    last_ping: Option<String>,
    rng: &'a mut StdRng,
    close_timeout: Duration,
}

/// What woke the session loop.
// A transient value on the stack; boxing the inbound item would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Wake {
    Shutdown,
    Inbound(Option<Result<FallibleStreamElement, ReadError>>),
    Queued,
    MoreQueued,
}

impl Session<'_> {
    async fn run(&mut self, stream: &mut Stream, shutdown: &mut watch::Receiver<bool>) -> Ended {
        if !emit(self.events, LinkEvent::Up, shutdown).await {
            self.close(stream).await;
            return Ended::Shutdown;
        }
        let notify = self.queue.notify();
        let notified = notify.notified();
        tokio::pin!(notified);
        // Register for wake-ups before looking at the queue, so nothing queued in between is
        // missed.
        notified.as_mut().enable();
        let mut more = match self.drain_batch(stream).await {
            Ok(more) => more,
            Err(e) => return Ended::Lost(e),
        };
        loop {
            let wake = tokio::select! {
                _ = shutdown_requested(shutdown) => Wake::Shutdown,
                item = stream.next() => Wake::Inbound(item),
                _ = notified.as_mut() => Wake::Queued,
                _ = std::future::ready(()), if more => Wake::MoreQueued,
            };
            match wake {
                Wake::Shutdown => {
                    // What the runtime committed last goes out before the stream closes (the
                    // rest stays queued for the next start).
                    let last = async { while let Ok(true) = self.drain_batch(stream).await {} };
                    let _ = tokio::time::timeout(SHUTDOWN_DRAIN, last).await;
                    self.close(stream).await;
                    return Ended::Shutdown;
                }
                Wake::Queued | Wake::MoreQueued => {
                    if matches!(wake, Wake::Queued) {
                        notified.set(notify.notified());
                        notified.as_mut().enable();
                    }
                    more = match self.drain_batch(stream).await {
                        Ok(more) => more,
                        Err(e) => return Ended::Lost(e),
                    };
                }
                Wake::Inbound(item) => {
                    if let Some(ended) = self.inbound(stream, item, shutdown).await {
                        return ended;
                    }
                }
            }
        }
    }

    /// Write one batch of queued items; true if there may be more.
    async fn drain_batch(&mut self, stream: &mut Stream) -> Result<bool, LinkError> {
        let batch = self.queue.pending(BATCH).await;
        if batch.is_empty() {
            return Ok(false);
        }
        let maybe_more = batch.len() >= BATCH;
        let mut keys = Vec::with_capacity(batch.len());
        let mut stanzas = Vec::with_capacity(batch.len());
        for (key, element) in batch {
            let name = element.name().to_owned();
            let namespace = element.ns();
            match Stanza::try_from(element) {
                Ok(stanza) => stanzas.push(XmppStreamElement::Stanza(stanza)),
                Err(e) => warn!(key, %name, %namespace, error = %e,
                    "dropping a queued item that is not a valid stanza (expected a message, \
                     presence or iq in {})", ns::DEFAULT_NS),
            }
            keys.push(key);
        }
        let write = async {
            for stanza in &stanzas {
                stream.feed(stanza).await?;
            }
            SinkExt::<&XmppStreamElement>::flush(stream).await
        };
        tokio::time::timeout(self.write_timeout(), write)
            .await
            .map_err(|_| LinkError::WriteTimeout)??;
        debug!(
            written = stanzas.len(),
            marked = keys.len(),
            "outbound batch written"
        );
        self.queue.mark_sent(keys).await;
        Ok(maybe_more)
    }

    fn write_timeout(&self) -> Duration {
        self.config.idle_ping + self.config.ping_timeout
    }

    async fn write_one(&self, stream: &mut Stream, stanza: Stanza) -> Result<(), LinkError> {
        let element = XmppStreamElement::Stanza(stanza);
        tokio::time::timeout(self.write_timeout(), stream.send(&element))
            .await
            .map_err(|_| LinkError::WriteTimeout)??;
        Ok(())
    }

    /// Handle one inbound item; `Some` ends the session.
    async fn inbound(
        &mut self,
        stream: &mut Stream,
        item: Option<Result<FallibleStreamElement, ReadError>>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Ended> {
        match item {
            None => Some(Ended::Lost(LinkError::Closed)),
            Some(Err(ReadError::SoftTimeout)) => {
                let id = format!("reach-ping-{:016x}", self.rng.gen::<u64>());
                let ping = Iq::Get {
                    from: self.ping_from.clone(),
                    to: self.ping_to.clone(),
                    id: id.clone(),
                    payload: Ping.into(),
                };
                debug!(%id, "link idle; pinging the server");
                self.last_ping = Some(id);
                self.write_one(stream, ping.into())
                    .await
                    .err()
                    .map(Ended::Lost)
            }
            Some(Err(ReadError::HardError(e))) => Some(Ended::Lost(LinkError::Io(e))),
            Some(Err(ReadError::ParseError(e))) => {
                warn!(error = %e, "unparsable data from the server; ignored");
                None
            }
            Some(Err(ReadError::StreamFooterReceived)) => {
                self.close(stream).await;
                Some(Ended::Lost(LinkError::Closed))
            }
            Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::Stanza(stanza)))) => {
                if self.is_own_ping_reply(&stanza) {
                    debug!("keepalive ping answered");
                    self.last_ping = None;
                    return None;
                }
                log_inbound(&stanza);
                if emit(self.events, LinkEvent::Stanza(stanza), shutdown).await {
                    None
                } else {
                    self.close(stream).await;
                    Some(Ended::Shutdown)
                }
            }
            Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::StreamError(e)))) => {
                Some(Ended::Lost(LinkError::StreamError(e)))
            }
            Some(Ok(FallibleStreamElement::Ok(other))) => {
                debug!(element = ?other, "ignoring an unexpected nonza from the server");
                None
            }
            Some(Ok(FallibleStreamElement::Err(StreamElementError::InvalidStanza {
                name,
                header,
                error,
                ..
            }))) => {
                let kind = name.to_string();
                debug!(%kind, from = ?header.from, to = ?header.to, id = ?header.id,
                    type_ = ?header.type_, %error, "invalid inbound stanza");
                let reason = truncate_chars(
                    &format!("Reach could not parse this {kind}: {error}"),
                    MAX_REASON_CHARS,
                );
                match bounce_for(&kind, &header, &reason, &self.config.domain) {
                    Some(bounce) => {
                        debug!(%kind, id = ?header.id, "bouncing the invalid stanza with bad-request");
                        self.write_one(stream, bounce).await.err().map(Ended::Lost)
                    }
                    None => {
                        debug!(%kind, "invalid stanza not bounced (an error or without a sender)");
                        None
                    }
                }
            }
            Some(Ok(FallibleStreamElement::Err(e @ StreamElementError::InvalidNonza { .. }))) => {
                warn!(error = %e, "invalid nonza from the server; ignored");
                None
            }
        }
    }

    fn is_own_ping_reply(&self, stanza: &Stanza) -> bool {
        let Some(ping_id) = self.last_ping.as_deref() else {
            return false;
        };
        matches!(stanza,
            Stanza::Iq(Iq::Result { id, .. } | Iq::Error { id, .. }) if id == ping_id)
    }

    /// Send our stream footer and wait briefly for the server's; never blocks for long.
    async fn close(&self, stream: &mut Stream) {
        let polite = async {
            if stream.shutdown().await.is_err() {
                return;
            }
            while let Some(item) = stream.next().await {
                if matches!(
                    item,
                    Err(ReadError::StreamFooterReceived) | Err(ReadError::HardError(_))
                ) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(self.close_timeout, polite).await;
    }
}

fn log_inbound(stanza: &Stanza) {
    match stanza {
        Stanza::Message(m) => debug!(kind = "message", from = ?m.from, to = ?m.to,
            id = ?m.id, type_ = ?m.type_, "inbound stanza"),
        Stanza::Presence(p) => debug!(kind = "presence", from = ?p.from, to = ?p.to,
            id = ?p.id, type_ = ?p.type_, "inbound stanza"),
        Stanza::Iq(iq) => debug!(kind = "iq", from = ?iq.from(), to = ?iq.to(), id = iq.id(),
            "inbound stanza"),
    }
}

fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_owned(),
    }
}

/// The `bad-request` error answering an invalid inbound stanza of kind `kind`
/// (`message`/`presence`/`iq`), or `None` when it must not be answered: it was itself an error,
/// or it has no (valid) sender.
fn bounce_for(kind: &str, header: &RawStanzaHeader, reason: &str, domain: &str) -> Option<Stanza> {
    if !matches!(kind, "message" | "presence" | "iq") {
        return None;
    }
    if header.type_.as_deref() == Some("error") {
        return None;
    }
    let sender = jid::Jid::new(header.from.as_deref()?).ok()?;
    let own = header
        .to
        .as_deref()
        .and_then(|to| jid::Jid::new(to).ok())
        .map(|j| j.to_string())
        .unwrap_or_else(|| domain.to_owned());
    let error = Element::builder("error", ns::DEFAULT_NS)
        .attr(minidom::rxml::xml_ncname!("type").into(), "modify")
        .append(Element::bare("bad-request", ns::XMPP_STANZAS))
        .append(
            Element::builder("text", ns::XMPP_STANZAS)
                .append(reason)
                .build(),
        )
        .build();
    let mut bounce = Element::builder(kind, ns::DEFAULT_NS)
        .attr(minidom::rxml::xml_ncname!("type").into(), "error")
        .attr(minidom::rxml::xml_ncname!("from").into(), own)
        .attr(minidom::rxml::xml_ncname!("to").into(), sender.to_string());
    if let Some(id) = header.id.as_deref() {
        bounce = bounce.attr(minidom::rxml::xml_ncname!("id").into(), id);
    } else if kind == "iq" {
        bounce = bounce.attr(minidom::rxml::xml_ncname!("id").into(), "");
    }
    match Stanza::try_from(bounce.append(error).build()) {
        Ok(stanza) => Some(stanza),
        Err(e) => {
            debug!(error = %e, "cannot build a bad-request bounce");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    const DOMAIN: &str = "reach.localhost";
    const SECRET: &str = "s3cr3t";
    /// `printf 'abcs3cr3t' | sha1sum`: the handshake for stream id `abc` and [`SECRET`].
    const HANDSHAKE_ABC: &str = "7f347c9fd30e300a6acb0aa3bea46f2a0278536b";
    const STEP: Duration = Duration::from_secs(2);

    // ---- backoff -------------------------------------------------------------------------

    #[test]
    fn backoff_nominal_sequence_doubles_to_the_cap() {
        let mut b = Backoff::default();
        let mut rng = StdRng::seed_from_u64(7);
        let mut nominal = Vec::new();
        for _ in 0..9 {
            nominal.push(b.nominal().as_secs());
            b.next_delay(&mut rng);
        }
        assert_eq!(nominal, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn backoff_delays_stay_within_half_to_full_nominal() {
        let mut b = Backoff::default();
        let mut rng = StdRng::seed_from_u64(42);
        for _ in 0..200 {
            let nominal = b.nominal();
            let d = b.next_delay(&mut rng);
            assert!(
                d >= nominal / 2 && d <= nominal,
                "{d:?} not in [{nominal:?}/2, {nominal:?}]"
            );
        }
    }

    #[test]
    fn backoff_is_jittered_and_deterministic_for_a_seed() {
        let delays = |seed| {
            let mut b = Backoff::new(Duration::from_secs(60), Duration::from_secs(60));
            let mut rng = StdRng::seed_from_u64(seed);
            (0..10).map(|_| b.next_delay(&mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(delays(1), delays(1));
        let d = delays(1);
        assert!(d.iter().any(|x| *x != d[0]), "no jitter: {d:?}");
    }

    #[test]
    fn backoff_reset_starts_over() {
        let mut b = Backoff::default();
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..5 {
            b.next_delay(&mut rng);
        }
        assert_eq!(b.nominal(), Duration::from_secs(32));
        b.reset();
        assert_eq!(b.nominal(), Duration::from_secs(1));
        assert!(b.next_delay(&mut rng) <= Duration::from_secs(1));
    }

    #[test]
    fn backoff_degenerate_inputs() {
        let b = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(b.nominal(), Duration::from_millis(1));
        let mut b = Backoff::new(Duration::MAX, Duration::MAX);
        let mut rng = StdRng::seed_from_u64(0);
        b.next_delay(&mut rng);
        assert_eq!(b.nominal(), Duration::MAX);
    }

    #[test]
    fn jitter_edges() {
        let d = Duration::from_secs(10);
        assert_eq!(jittered(d, 0.0), Duration::from_secs(5));
        assert_eq!(jittered(d, 1.0), d);
        assert_eq!(jittered(d, 0.5), Duration::from_millis(7500));
        assert_eq!(jittered(d, -3.0), Duration::from_secs(5));
        assert_eq!(jittered(d, f64::NAN), d);
    }

    // ---- bounces -------------------------------------------------------------------------

    fn header(
        from: Option<&str>,
        to: Option<&str>,
        type_: Option<&str>,
        id: Option<&str>,
    ) -> RawStanzaHeader {
        RawStanzaHeader {
            from: from.map(Into::into),
            to: to.map(Into::into),
            type_: type_.map(Into::into),
            id: id.map(Into::into),
        }
    }

    #[test]
    fn bounce_swaps_addresses_and_keeps_the_id() {
        let h = header(
            Some("a@b/r"),
            Some("x@reach.localhost"),
            Some("bogus"),
            Some("m1"),
        );
        let Some(Stanza::Message(m)) = bounce_for("message", &h, "why", DOMAIN) else {
            panic!("no message bounce");
        };
        assert_eq!(
            m.from.map(|j| j.to_string()).as_deref(),
            Some("x@reach.localhost")
        );
        assert_eq!(m.to.map(|j| j.to_string()).as_deref(), Some("a@b/r"));
        assert_eq!(m.id.map(|i| i.0).as_deref(), Some("m1"));
        assert_eq!(m.type_, tokio_xmpp::parsers::message::MessageType::Error);
        let error = m.payloads.first().expect("error payload");
        assert!(error.is("error", ns::DEFAULT_NS));
        assert_eq!(error.attr("type"), Some("modify"));
        assert!(error.has_child("bad-request", ns::XMPP_STANZAS));
        let text = error.get_child("text", ns::XMPP_STANZAS).expect("text");
        assert_eq!(text.text(), "why");
    }

    #[test]
    fn bounce_for_each_stanza_kind() {
        let h = header(
            Some("a@b"),
            Some("reach.localhost"),
            Some("weird"),
            Some("i1"),
        );
        assert!(matches!(
            bounce_for("presence", &h, "r", DOMAIN),
            Some(Stanza::Presence(_))
        ));
        match bounce_for("iq", &h, "r", DOMAIN) {
            Some(Stanza::Iq(Iq::Error { id, from, .. })) => {
                assert_eq!(id, "i1");
                assert_eq!(from.map(|j| j.to_string()).as_deref(), Some(DOMAIN));
            }
            other => panic!("unexpected {other:?}"),
        }
        let no_id = header(Some("a@b"), None, None, None);
        match bounce_for("iq", &no_id, "r", DOMAIN) {
            Some(Stanza::Iq(Iq::Error { from, .. })) => {
                assert_eq!(from.map(|j| j.to_string()).as_deref(), Some(DOMAIN));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn no_bounce_for_errors_or_without_a_valid_sender() {
        let error = header(
            Some("a@b"),
            Some("x@reach.localhost"),
            Some("error"),
            Some("e"),
        );
        assert!(bounce_for("message", &error, "r", DOMAIN).is_none());
        let anonymous = header(None, Some("x@reach.localhost"), Some("bogus"), Some("e"));
        assert!(bounce_for("message", &anonymous, "r", DOMAIN).is_none());
        let garbage = header(
            Some("@@"),
            Some("x@reach.localhost"),
            Some("bogus"),
            Some("e"),
        );
        assert!(bounce_for("message", &garbage, "r", DOMAIN).is_none());
    }

    #[test]
    fn reasons_are_truncated_on_char_boundaries() {
        assert_eq!(truncate_chars("héllo", 10), "héllo");
        assert_eq!(truncate_chars("héllo", 2), "hé…");
    }

    // ---- fake XEP-0114 server ------------------------------------------------------------

    /// In-memory [`OutboundQueue`].
    #[derive(Default)]
    struct MemQueue {
        items: Mutex<BTreeMap<u64, Element>>,
        sent: Mutex<Vec<u64>>,
        next: Mutex<u64>,
        notify: Arc<Notify>,
    }

    impl MemQueue {
        fn push(&self, xml: &str) -> u64 {
            let element: Element = xml.parse().expect("test element");
            let key = {
                let mut next = self.next.lock().unwrap();
                *next += 1;
                *next
            };
            self.items.lock().unwrap().insert(key, element);
            self.notify.notify_one();
            key
        }

        fn push_message(&self, id: &str) -> u64 {
            self.push(&format!(
                "<message xmlns='jabber:component:accept' from='alice@reach.localhost' \
                 to='bob@example.net' id='{id}' type='chat'><body>hello {id}</body></message>"
            ))
        }

        fn sent(&self) -> Vec<u64> {
            self.sent.lock().unwrap().clone()
        }

        async fn wait_sent(&self, keys: &[u64]) {
            let deadline = Instant::now() + STEP;
            while !keys.iter().all(|k| self.sent().contains(k)) {
                assert!(
                    Instant::now() < deadline,
                    "not marked sent: {keys:?} (sent {:?})",
                    self.sent()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    impl OutboundQueue for MemQueue {
        fn pending(&self, limit: usize) -> BoxFuture<'static, Vec<(u64, Element)>> {
            let items = self.items.lock().unwrap();
            let found: Vec<(u64, Element)> = items
                .iter()
                .take(limit)
                .map(|(k, e)| (*k, e.clone()))
                .collect();
            Box::pin(async move { found })
        }

        fn mark_sent(&self, keys: Vec<u64>) -> BoxFuture<'static, ()> {
            let mut items = self.items.lock().unwrap();
            for k in &keys {
                items.remove(k);
            }
            self.sent.lock().unwrap().extend_from_slice(&keys);
            Box::pin(async {})
        }

        fn notify(&self) -> Arc<Notify> {
            self.notify.clone()
        }
    }

    /// One accepted component connection, read as text (quotes normalised to `'`).
    struct Peer {
        sock: tokio::net::TcpStream,
        buf: String,
    }

    impl Peer {
        async fn accept(listener: &TcpListener) -> Peer {
            let (sock, _) = tokio::time::timeout(STEP, listener.accept())
                .await
                .expect("no connection attempt in time")
                .expect("accept");
            Peer {
                sock,
                buf: String::new(),
            }
        }

        /// Read until `needle` appears; return everything up to and including it.
        async fn read_until(&mut self, needle: &str) -> String {
            let deadline = tokio::time::Instant::now() + STEP;
            loop {
                if let Some(pos) = self.buf.find(needle) {
                    let rest = self.buf.split_off(pos + needle.len());
                    return std::mem::replace(&mut self.buf, rest);
                }
                let mut chunk = [0u8; 4096];
                let n = tokio::time::timeout_at(deadline, self.sock.read(&mut chunk))
                    .await
                    .unwrap_or_else(|_| {
                        panic!("timed out waiting for {needle:?}; got {:?}", self.buf)
                    })
                    .expect("read");
                assert!(
                    n > 0,
                    "EOF while waiting for {needle:?}; got {:?}",
                    self.buf
                );
                self.buf
                    .push_str(&String::from_utf8_lossy(&chunk[..n]).replace('"', "'"));
            }
        }

        async fn write(&mut self, xml: &str) {
            self.sock.write_all(xml.as_bytes()).await.expect("write");
        }

        /// Play the server side of the XEP-0114 handshake with stream id `abc`; returns whether the
        /// component's handshake matched [`SECRET`]. Answers `<handshake/>` only if `accept`.
        async fn handshake(&mut self, accept: bool) -> bool {
            let header = self.read_until(">").await;
            let header = if header.contains("<stream:stream") {
                header
            } else {
                // The XML declaration came first.
                self.read_until(">").await
            };
            assert!(header.contains("<stream:stream"), "{header}");
            assert!(header.contains("to='reach.localhost'"), "{header}");
            self.write(
                "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' \
                 xmlns:stream='http://etherx.jabber.org/streams' id='abc' from='reach.localhost'>",
            )
            .await;
            let sent = self.read_until("</handshake>").await;
            let start = sent.find("<handshake").expect("handshake element");
            let open_end = start + sent[start..].find('>').expect("handshake start tag end") + 1;
            let digest = &sent[open_end..sent.len() - "</handshake>".len()];
            let ok = digest == HANDSHAKE_ABC;
            if accept && ok {
                self.write("<handshake/>").await;
            } else {
                self.write(
                    "<stream:error><not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
                     </stream:error></stream:stream>",
                )
                .await;
            }
            ok
        }
    }

    struct Harness {
        listener: TcpListener,
        queue: Arc<MemQueue>,
        events: mpsc::Receiver<LinkEvent>,
        shutdown: watch::Sender<bool>,
        task: JoinHandle<()>,
    }

    fn quick_tuning() -> Tuning {
        Tuning {
            backoff: Backoff::new(Duration::from_millis(50), Duration::from_millis(200)),
            healthy_after: Duration::from_secs(30),
            setup_timeout: STEP,
            close_timeout: Duration::from_millis(500),
        }
    }

    async fn start(
        secret: &str,
        idle_ping: Duration,
        ping_timeout: Duration,
        tuning: Option<Tuning>,
    ) -> Harness {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let config = LinkConfig {
            server: listener.local_addr().expect("addr").to_string(),
            domain: DOMAIN.into(),
            secret: secret.into(),
            ping_to: "localhost".into(),
            idle_ping,
            ping_timeout,
            max_stanza_depth: 32,
        };
        let queue = Arc::new(MemQueue::default());
        let (tx, events) = mpsc::channel(16);
        let (shutdown, rx) = watch::channel(false);
        let q: Arc<dyn OutboundQueue> = queue.clone();
        let task = match tuning {
            Some(t) => tokio::spawn(run_link_tuned(config, q, tx, rx, t)),
            None => tokio::spawn(run_link(config, q, tx, rx)),
        };
        Harness {
            listener,
            queue,
            events,
            shutdown,
            task,
        }
    }

    impl Harness {
        async fn event(&mut self) -> LinkEvent {
            tokio::time::timeout(STEP, self.events.recv())
                .await
                .expect("no link event in time")
                .expect("link task ended")
        }

        async fn expect_up(&mut self) {
            let ev = self.event().await;
            assert!(matches!(ev, LinkEvent::Up), "expected Up, got {ev:?}");
        }

        async fn stop(self) {
            self.shutdown.send(true).expect("link still listening");
            tokio::time::timeout(STEP, self.task)
                .await
                .expect("shutdown took too long")
                .expect("link task panicked");
        }
    }

    const LONG: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn handshake_then_up_then_shutdown_closes_the_stream() {
        let mut h = start(SECRET, LONG, LONG, None).await;
        let mut peer = Peer::accept(&h.listener).await;
        assert!(peer.handshake(true).await, "wrong handshake digest");
        h.expect_up().await;
        let started = Instant::now();
        h.shutdown.send(true).expect("send shutdown");
        peer.read_until("</stream:stream>").await;
        peer.write("</stream:stream>").await;
        tokio::time::timeout(STEP, h.task)
            .await
            .expect("shutdown not prompt")
            .expect("panic");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn queued_items_are_written_after_up_and_marked_sent() {
        let mut h = start(SECRET, LONG, LONG, Some(quick_tuning())).await;
        let first = h.queue.push_message("q1");
        let junk = h.queue.push("<junk xmlns='urn:example:not-a-stanza'/>");
        let second = h.queue.push_message("q2");
        let mut peer = Peer::accept(&h.listener).await;
        assert!(peer.handshake(true).await);
        h.expect_up().await;
        let got = peer.read_until("id='q2'").await;
        assert!(got.contains("id='q1'") && got.contains("hello q1"), "{got}");
        assert!(!got.contains("junk"), "{got}");
        h.queue.wait_sent(&[first, junk, second]).await;
        // Something queued while the link is up goes out at once.
        let third = h.queue.push_message("q3");
        peer.read_until("id='q3'").await;
        h.queue.wait_sent(&[third]).await;
        h.stop().await;
    }

    #[tokio::test]
    async fn large_queue_is_drained_in_batches() {
        let mut h = start(SECRET, LONG, LONG, Some(quick_tuning())).await;
        let keys: Vec<u64> = (0..150)
            .map(|i| h.queue.push_message(&format!("b{i}")))
            .collect();
        let mut peer = Peer::accept(&h.listener).await;
        assert!(peer.handshake(true).await);
        h.expect_up().await;
        peer.read_until("id='b149'").await;
        h.queue.wait_sent(&keys).await;
        h.stop().await;
    }

    #[tokio::test]
    async fn invalid_stanza_is_bounced_and_the_link_stays_up() {
        let mut h = start(SECRET, LONG, LONG, Some(quick_tuning())).await;
        let mut peer = Peer::accept(&h.listener).await;
        assert!(peer.handshake(true).await);
        h.expect_up().await;
        peer.write(
            "<message type='bogus' from='a@b' to='x@reach.localhost' id='m1'><body>x</body></message>",
        )
        .await;
        let bounce = peer.read_until("</message>").await;
        for part in [
            "type='error'",
            "id='m1'",
            "to='a@b'",
            "from='x@reach.localhost'",
            "type='modify'",
            "<bad-request xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'",
            "<text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'",
        ] {
            assert!(bounce.contains(part), "missing {part} in {bounce}");
        }
        // An invalid error is never answered; then a good message still arrives.
        peer.write("<message type='error' from='a@b' to='@bad@' id='e1'><body>z</body></message>")
            .await;
        peer.write("<message from='a@b' to='x@reach.localhost' id='m2' type='chat'><body>y</body></message>")
            .await;
        match h.event().await {
            LinkEvent::Stanza(Stanza::Message(m)) => {
                assert_eq!(m.id.map(|i| i.0).as_deref(), Some("m2"));
            }
            other => panic!("expected the good message, got {other:?}"),
        }
        h.stop().await;
        // Nothing was answered to the invalid error.
        assert!(!peer.buf.contains("id='e1'"), "{}", peer.buf);
    }

    #[tokio::test]
    async fn a_stanza_nested_too_deep_is_cut_before_parsing_and_the_link_stays_up() {
        let mut h = start(SECRET, LONG, LONG, Some(quick_tuning())).await;
        let mut peer = Peer::accept(&h.listener).await;
        assert!(peer.handshake(true).await);
        h.expect_up().await;
        // 200,000 levels (1.4 MB): the parser never sees more than the limit of 32.
        let levels = 200_000;
        peer.write(&format!(
            "<message from='a@b' to='x@reach.localhost' id='deep' type='chat'><body>d</body>{}{}</message>",
            "<x xmlns='urn:example:deep'>".repeat(levels),
            "</x>".repeat(levels)
        ))
        .await;
        peer.write("<message from='a@b' to='x@reach.localhost' id='m2' type='chat'><body>y</body></message>")
            .await;
        fn deepest(el: &Element) -> (usize, bool) {
            let marker = el.is("too-deep", "urn:x-reach:limits");
            el.children()
                .map(deepest)
                .fold((1, marker), |(d, m), (cd, cm)| (d.max(cd + 1), m || cm))
        }
        match h.event().await {
            LinkEvent::Stanza(stanza @ Stanza::Message(_)) => {
                let el = Element::from(stanza);
                assert_eq!(el.attr("id"), Some("deep"));
                // The stanza is 1, its elements open down to 32, the marker sits at 33.
                assert_eq!(deepest(&el), (33, true));
            }
            other => panic!("expected the deep message, got {other:?}"),
        }
        match h.event().await {
            LinkEvent::Stanza(Stanza::Message(m)) => {
                assert_eq!(m.id.map(|i| i.0).as_deref(), Some("m2"));
            }
            other => panic!("expected the good message, got {other:?}"),
        }
        h.stop().await;
    }

    #[tokio::test]
    async fn reconnects_after_a_drop_and_sends_what_was_queued_meanwhile() {
        let mut h = start(SECRET, LONG, LONG, Some(quick_tuning())).await;
        let mut peer = Peer::accept(&h.listener).await;
        assert!(peer.handshake(true).await);
        h.expect_up().await;
        drop(peer);
        let ev = h.event().await;
        assert!(matches!(ev, LinkEvent::Down), "expected Down, got {ev:?}");
        let key = h.queue.push_message("while-down");
        let mut peer = Peer::accept(&h.listener).await;
        assert!(peer.handshake(true).await);
        h.expect_up().await;
        peer.read_until("id='while-down'").await;
        h.queue.wait_sent(&[key]).await;
        h.stop().await;
    }

    #[tokio::test]
    async fn refused_handshake_gives_no_up_and_is_retried() {
        // Real backoff: the first retry comes after 0.5 to 1 s.
        let mut h = start("wrong", LONG, LONG, None).await;
        let key = h.queue.push_message("held");
        let mut peer = Peer::accept(&h.listener).await;
        assert!(
            !peer.handshake(true).await,
            "digest must not match the wrong secret"
        );
        let started = Instant::now();
        let mut peer2 = Peer::accept(&h.listener).await;
        assert!(
            started.elapsed() >= Duration::from_millis(400),
            "retried without backoff"
        );
        assert!(!peer2.handshake(true).await);
        assert!(
            h.events.try_recv().is_err(),
            "no event expected after a refusal"
        );
        assert!(h.queue.sent().is_empty() && key > 0);
        drop(peer);
        h.stop().await;
    }

    #[tokio::test]
    async fn idle_link_pings_and_swallows_the_pong() {
        let idle = Duration::from_millis(200);
        let mut h = start(SECRET, idle, Duration::from_secs(2), Some(quick_tuning())).await;
        let mut peer = Peer::accept(&h.listener).await;
        assert!(peer.handshake(true).await);
        h.expect_up().await;
        let started = Instant::now();
        let ping = peer.read_until("</iq>").await;
        assert!(
            started.elapsed() >= Duration::from_millis(150),
            "pinged too early"
        );
        assert!(ping.contains("<ping xmlns='urn:xmpp:ping'"), "{ping}");
        assert!(
            ping.contains("type='get'") && ping.contains("to='localhost'"),
            "{ping}"
        );
        assert!(ping.contains("from='reach.localhost'"), "{ping}");
        let id_start = ping.find("id='").expect("ping id") + 4;
        let id = &ping[id_start..id_start + ping[id_start..].find('\'').expect("id end")];
        peer.write(&format!(
            "<iq type='result' id='{id}' from='localhost' to='reach.localhost'/>"
        ))
        .await;
        // A different iq result with an unknown id is delivered.
        peer.write("<iq type='result' id='other' from='localhost' to='reach.localhost'/>")
            .await;
        match h.event().await {
            LinkEvent::Stanza(Stanza::Iq(iq)) => assert_eq!(iq.id(), "other"),
            other => panic!("expected the other iq, got {other:?}"),
        }
        h.stop().await;
    }

    #[tokio::test]
    async fn unanswered_ping_takes_the_link_down() {
        let mut h = start(
            SECRET,
            Duration::from_millis(150),
            Duration::from_millis(300),
            Some(quick_tuning()),
        )
        .await;
        let mut peer = Peer::accept(&h.listener).await;
        assert!(peer.handshake(true).await);
        h.expect_up().await;
        peer.read_until("urn:xmpp:ping").await;
        let ev = h.event().await;
        assert!(matches!(ev, LinkEvent::Down), "expected Down, got {ev:?}");
        // And it comes back.
        let mut peer2 = Peer::accept(&h.listener).await;
        assert!(peer2.handshake(true).await);
        h.expect_up().await;
        h.stop().await;
    }

    #[tokio::test]
    async fn shutdown_while_waiting_to_reconnect_returns_promptly() {
        let h = start(SECRET, LONG, LONG, None).await;
        // Refuse: the link then sleeps in its backoff.
        let mut peer = Peer::accept(&h.listener).await;
        peer.write("<stream:error/>").await;
        drop(peer);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        h.stop().await;
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    #[tokio::test]
    async fn stream_error_while_up_takes_the_link_down() {
        let mut h = start(SECRET, LONG, LONG, Some(quick_tuning())).await;
        let mut peer = Peer::accept(&h.listener).await;
        assert!(peer.handshake(true).await);
        h.expect_up().await;
        peer.write(
            "<stream:error><system-shutdown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error></stream:stream>",
        )
        .await;
        let ev = h.event().await;
        assert!(matches!(ev, LinkEvent::Down), "expected Down, got {ev:?}");
        h.stop().await;
    }
}
