//! Operational metrics: a small registry of atomic counters, gauges and histograms, rendered in
//! the Prometheus text exposition format, and the optional HTTP endpoint (`[metrics] listen`)
//! that serves them on `GET /metrics` and the store's counts as JSON on `GET /stats`.
//!
//! Every metric has a fixed set of label values (enums below), so the registry needs no locks
//! and no allocation on the hot path, and a label never carries user data: no addresses, numbers,
//! handles or texts ever reach a metric. Adapters record through [`global`]; queue depths and
//! user counts are read from the store when the endpoint is scraped.
//!
//! The registry is per process (as Prometheus expects: one scrape target per instance); it holds
//! no state another instance could contradict.
//!
//! Metric names (all prefixed `reach_`):
//!
//! | name | type | labels |
//! |---|---|---|
//! | `reach_messages_routed_total` | counter | `terminal` = `xmpp`, `email`, `sms`, `held` |
//! | `reach_queue_depth` | gauge | `queue` = `outbox`, `email`, `sms` |
//! | `reach_users`, `reach_sessions`, `reach_held_messages` | gauge | |
//! | `reach_email_sent_total`, `reach_sms_sent_total` | counter | |
//! | `reach_email_retries_total`, `reach_sms_retries_total` | counter | `reason` = `transient` |
//! | `reach_email_failures_total`, `reach_sms_failures_total` | counter | `reason` = `permanent`, `expired`, `unbuildable` |
//! | `reach_smtp_send_seconds`, `reach_sms_send_seconds` | histogram | |
//! | `reach_inbound_email_total`, `reach_inbound_sms_total` | counter | `outcome` = `accepted`, `refused`, `deferred` |
//! | `reach_xmpp_link_up` | gauge | |
//! | `reach_xmpp_link_reconnects_total` | counter | |

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::store::{Stats, Store};

/// Where a message went when the runtime carried out the core's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutedTo {
    /// Relayed over the component link (to the user's clients or to a buddy).
    Xmpp,
    /// Queued for the email terminal (each message a forwarding email carries).
    Email,
    /// Queued for the SMS terminal (each message an SMS carries).
    Sms,
    /// Kept for the user's XMPP client: no terminal could take it.
    Held,
}

impl RoutedTo {
    const ALL: [RoutedTo; 4] = [
        RoutedTo::Xmpp,
        RoutedTo::Email,
        RoutedTo::Sms,
        RoutedTo::Held,
    ];

    fn label(self) -> &'static str {
        match self {
            RoutedTo::Xmpp => "xmpp",
            RoutedTo::Email => "email",
            RoutedTo::Sms => "sms",
            RoutedTo::Held => "held",
        }
    }
}

/// Why an outbound email or SMS was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendFailure {
    /// The relay or provider refused it for good (5xx, invalid recipient).
    Permanent,
    /// Transient failures went on past the retry window.
    Expired,
    /// It could not even be built (an email that does not render).
    Unbuildable,
}

impl SendFailure {
    const ALL: [SendFailure; 3] = [
        SendFailure::Permanent,
        SendFailure::Expired,
        SendFailure::Unbuildable,
    ];

    fn label(self) -> &'static str {
        match self {
            SendFailure::Permanent => "permanent",
            SendFailure::Expired => "expired",
            SendFailure::Unbuildable => "unbuildable",
        }
    }
}

/// What became of an inbound email reply or SMS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    /// Taken and committed (SMTP 250, webhook 200).
    Accepted,
    /// Refused for good (SMTP 5xx, webhook 4xx).
    Refused,
    /// Refused for now; the sender retries (SMTP 4xx, webhook 503).
    Deferred,
}

impl Inbound {
    const ALL: [Inbound; 3] = [Inbound::Accepted, Inbound::Refused, Inbound::Deferred];

    fn label(self) -> &'static str {
        match self {
            Inbound::Accepted => "accepted",
            Inbound::Refused => "refused",
            Inbound::Deferred => "deferred",
        }
    }

    /// The outcome an SMTP reply code stands for.
    pub fn of_smtp_code(code: u16) -> Inbound {
        match code {
            200..=399 => Inbound::Accepted,
            400..=499 => Inbound::Deferred,
            _ => Inbound::Refused,
        }
    }

    /// The outcome an HTTP status stands for.
    pub fn of_http_status(status: u16) -> Inbound {
        match status {
            200..=399 => Inbound::Accepted,
            500..=599 | 429 => Inbound::Deferred,
            _ => Inbound::Refused,
        }
    }
}

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    const fn new() -> Counter {
        Counter(AtomicU64::new(0))
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The count so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    const fn new() -> Gauge {
        Gauge(AtomicI64::new(0))
    }

    /// Sets the value.
    pub fn set(&self, value: i64) {
        self.0.store(value, Ordering::Relaxed);
    }

    /// The value now.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds (seconds) of the latency histograms' buckets: from a local relay's few
/// milliseconds to a slow relay's or provider's timeout.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A distribution of durations over [`LATENCY_BUCKETS`].
#[derive(Debug)]
pub struct Histogram {
    /// Observations per bucket (not cumulative; the last one is `+Inf`).
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

impl Histogram {
    const fn new() -> Histogram {
        #[allow(clippy::declare_interior_mutable_const)]
        const ZERO: AtomicU64 = AtomicU64::new(0);
        Histogram {
            buckets: [ZERO; LATENCY_BUCKETS.len() + 1],
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records one duration.
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let index = LATENCY_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// How many durations were recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Every metric Reach keeps. Use [`global`] in the running program; tests build their own.
#[derive(Debug)]
pub struct Metrics {
    routed: [Counter; 4],
    email_sent: Counter,
    email_retries: Counter,
    email_failures: [Counter; 3],
    sms_sent: Counter,
    sms_retries: Counter,
    sms_failures: [Counter; 3],
    smtp_send_seconds: Histogram,
    sms_send_seconds: Histogram,
    inbound_email: [Counter; 3],
    inbound_sms: [Counter; 3],
    link_up: Gauge,
    link_connects: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

static GLOBAL: Metrics = Metrics::new();

/// The process's metrics, which the adapters record into and `/metrics` renders.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

impl Metrics {
    /// All zero.
    pub const fn new() -> Metrics {
        Metrics {
            routed: [
                Counter::new(),
                Counter::new(),
                Counter::new(),
                Counter::new(),
            ],
            email_sent: Counter::new(),
            email_retries: Counter::new(),
            email_failures: [Counter::new(), Counter::new(), Counter::new()],
            sms_sent: Counter::new(),
            sms_retries: Counter::new(),
            sms_failures: [Counter::new(), Counter::new(), Counter::new()],
            smtp_send_seconds: Histogram::new(),
            sms_send_seconds: Histogram::new(),
            inbound_email: [Counter::new(), Counter::new(), Counter::new()],
            inbound_sms: [Counter::new(), Counter::new(), Counter::new()],
            link_up: Gauge::new(),
            link_connects: Counter::new(),
        }
    }

    /// `count` messages went to `to`.
    pub fn routed(&self, to: RoutedTo, count: u64) {
        self.routed[to as usize].add(count);
    }

    /// How many messages went to `to` so far.
    pub fn routed_count(&self, to: RoutedTo) -> u64 {
        self.routed[to as usize].get()
    }

    /// The relay took an email after `elapsed`.
    pub fn email_sent(&self, elapsed: Duration) {
        self.email_sent.add(1);
        self.smtp_send_seconds.observe(elapsed);
    }

    /// An email attempt failed for now after `elapsed`; it will be retried.
    pub fn email_retry(&self, elapsed: Duration) {
        self.email_retries.add(1);
        self.smtp_send_seconds.observe(elapsed);
    }

    /// An email was given up.
    pub fn email_failed(&self, why: SendFailure) {
        self.email_failures[why as usize].add(1);
    }

    /// The provider took an SMS after `elapsed`.
    pub fn sms_sent(&self, elapsed: Duration) {
        self.sms_sent.add(1);
        self.sms_send_seconds.observe(elapsed);
    }

    /// An SMS attempt failed for now after `elapsed`; it will be retried.
    pub fn sms_retry(&self, elapsed: Duration) {
        self.sms_retries.add(1);
        self.sms_send_seconds.observe(elapsed);
    }

    /// An SMS was given up.
    pub fn sms_failed(&self, why: SendFailure) {
        self.sms_failures[why as usize].add(1);
    }

    /// An inbound email reply (one recipient of one message) was answered.
    pub fn inbound_email(&self, outcome: Inbound) {
        self.inbound_email[outcome as usize].add(1);
    }

    /// An incoming SMS (webhook call) was answered.
    pub fn inbound_sms(&self, outcome: Inbound) {
        self.inbound_sms[outcome as usize].add(1);
    }

    /// The component link completed its handshake.
    pub fn link_established(&self) {
        self.link_connects.add(1);
        self.link_up.set(1);
    }

    /// The component link was lost or closed.
    pub fn link_lost(&self) {
        self.link_up.set(0);
    }

    /// The metrics in the Prometheus text exposition format (version 0.0.4), with the store's
    /// counts when given.
    pub fn render(&self, stats: Option<&Stats>) -> String {
        let mut out = String::with_capacity(4096);
        family(
            &mut out,
            "reach_messages_routed_total",
            "counter",
            "Messages routed, by the terminal kind they went to (held: kept for XMPP).",
        );
        for to in RoutedTo::ALL {
            sample(
                &mut out,
                "reach_messages_routed_total",
                &[("terminal", to.label())],
                self.routed_count(to),
            );
        }
        if let Some(stats) = stats {
            family(
                &mut out,
                "reach_queue_depth",
                "gauge",
                "Items waiting in the durable outbound queues.",
            );
            for (queue, depth) in [
                ("outbox", stats.outbox),
                ("email", stats.email_queue),
                ("sms", stats.sms_queue),
            ] {
                sample(&mut out, "reach_queue_depth", &[("queue", queue)], depth);
            }
            for (name, help, value) in [
                ("reach_users", "Registered users.", stats.users),
                (
                    "reach_sessions",
                    "Conversations (user, peer) known.",
                    stats.sessions,
                ),
                (
                    "reach_held_messages",
                    "Messages held for users' XMPP clients.",
                    stats.held,
                ),
            ] {
                family(&mut out, name, "gauge", help);
                sample(&mut out, name, &[], value);
            }
        }
        for (prefix, what, sent, retries, failures) in [
            (
                "reach_email",
                "emails",
                &self.email_sent,
                &self.email_retries,
                &self.email_failures,
            ),
            (
                "reach_sms",
                "SMS",
                &self.sms_sent,
                &self.sms_retries,
                &self.sms_failures,
            ),
        ] {
            let name = format!("{prefix}_sent_total");
            family(
                &mut out,
                &name,
                "counter",
                &format!("Outbound {what} handed over."),
            );
            sample(&mut out, &name, &[], sent.get());
            let name = format!("{prefix}_retries_total");
            family(
                &mut out,
                &name,
                "counter",
                &format!("Outbound {what} attempts that failed for now and are retried."),
            );
            sample(&mut out, &name, &[("reason", "transient")], retries.get());
            let name = format!("{prefix}_failures_total");
            family(
                &mut out,
                &name,
                "counter",
                &format!("Outbound {what} given up, by reason."),
            );
            for why in SendFailure::ALL {
                sample(
                    &mut out,
                    &name,
                    &[("reason", why.label())],
                    failures[why as usize].get(),
                );
            }
        }
        histogram(
            &mut out,
            "reach_smtp_send_seconds",
            "Time to hand one email to the relay (every attempt).",
            &self.smtp_send_seconds,
        );
        histogram(
            &mut out,
            "reach_sms_send_seconds",
            "Time to hand one SMS to the provider (every attempt).",
            &self.sms_send_seconds,
        );
        for (name, help, counters) in [
            (
                "reach_inbound_email_total",
                "Inbound email replies (per recipient), by outcome.",
                &self.inbound_email,
            ),
            (
                "reach_inbound_sms_total",
                "Incoming SMS, by outcome.",
                &self.inbound_sms,
            ),
        ] {
            family(&mut out, name, "counter", help);
            for outcome in Inbound::ALL {
                sample(
                    &mut out,
                    name,
                    &[("outcome", outcome.label())],
                    counters[outcome as usize].get(),
                );
            }
        }
        family(
            &mut out,
            "reach_xmpp_link_up",
            "gauge",
            "1 while the component link to the XMPP server is up, else 0.",
        );
        sample(&mut out, "reach_xmpp_link_up", &[], self.link_up.get());
        family(
            &mut out,
            "reach_xmpp_link_reconnects_total",
            "counter",
            "Times the component link was established again after the first time.",
        );
        sample(
            &mut out,
            "reach_xmpp_link_reconnects_total",
            &[],
            self.link_connects.get().saturating_sub(1),
        );
        out
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (label, value)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{label}=\"{}\"", escape_label(value));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    family(out, name, "histogram", help);
    let bucket = format!("{name}_bucket");
    let mut cumulative = 0;
    for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
        cumulative += h.buckets[i].load(Ordering::Relaxed);
        sample(out, &bucket, &[("le", &bound.to_string())], cumulative);
    }
    cumulative += h.buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
    sample(out, &bucket, &[("le", "+Inf")], cumulative);
    let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
    sample(out, &format!("{name}_sum"), &[], sum);
    // The count equals the +Inf bucket (both read here, so a concurrent observation cannot make
    // them disagree).
    sample(out, &format!("{name}_count"), &[], cumulative);
}

/// HELP text escaping: backslash and line feed.
fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Label value escaping: backslash, double quote and line feed.
fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Path of the Prometheus endpoint.
pub const METRICS_PATH: &str = "/metrics";
/// Path of the JSON counts (`reach stats` reads it while Reach runs).
pub const STATS_PATH: &str = "/stats";

/// Connections served at once.
const MAX_CONNECTIONS: usize = 32;
/// Longest wait for a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` and `GET /stats` on `listener` until `shutdown` turns true.
pub async fn serve(listener: TcpListener, store: Arc<Store>, mut shutdown: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = crate::http::shutdown_requested(&mut shutdown) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if connections.len() >= MAX_CONNECTIONS {
            tracing::debug!(%peer, "metrics endpoint: too many connections, closing one");
            continue;
        }
        let store = store.clone();
        connections.spawn(crate::http::serve_connection(
            stream,
            peer,
            HEADER_TIMEOUT,
            shutdown.clone(),
            "metrics",
            move |request| {
                let store = store.clone();
                async move { respond(&request, store).await }
            },
        ));
    }
    drop(listener);
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(2), drain)
        .await
        .is_err()
    {
        connections.shutdown().await;
    }
}

/// Resolves once shutdown is asked for (the value is true, or the sender is gone).
async fn respond(request: &Request<Incoming>, store: Arc<Store>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if path != METRICS_PATH && path != STATS_PATH {
        return plain(StatusCode::NOT_FOUND, "not found: try /metrics or /stats\n");
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    // Counting walks the store's trees: off the async threads.
    let stats = match tokio::task::spawn_blocking(move || store.stats()).await {
        Ok(Ok(stats)) => Some(stats),
        Ok(Err(e)) => {
            tracing::error!("metrics endpoint: cannot count the store: {e}");
            None
        }
        Err(_) => None,
    };
    if path == STATS_PATH {
        return match stats.and_then(|s| serde_json::to_string(&s).ok()) {
            Some(json) => with_type(StatusCode::OK, "application/json", json + "\n"),
            None => plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "the store cannot be read\n",
            ),
        };
    }
    with_type(
        StatusCode::OK,
        "text/plain; version=0.0.4; charset=utf-8",
        global().render(stats.as_ref()),
    )
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    with_type(status, "text/plain; charset=utf-8", text.to_owned())
}

fn with_type(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sample lines of a rendering, without comments.
    fn samples(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn a_fresh_registry_renders_every_family_at_zero() {
        let metrics = Metrics::new();
        let text = metrics.render(None);
        assert!(text.contains("# TYPE reach_messages_routed_total counter\n"));
        for terminal in ["xmpp", "email", "sms", "held"] {
            assert!(
                text.contains(&format!(
                    "reach_messages_routed_total{{terminal=\"{terminal}\"}} 0\n"
                )),
                "{text}"
            );
        }
        assert!(text.contains("reach_xmpp_link_up 0\n"));
        assert!(text.contains("reach_xmpp_link_reconnects_total 0\n"));
        assert!(
            !text.contains("reach_queue_depth"),
            "no store, no queue depths"
        );
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn every_line_is_a_comment_or_a_well_formed_sample() {
        let metrics = Metrics::new();
        metrics.email_sent(Duration::from_millis(30));
        let text = metrics.render(Some(&Stats::default()));
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert!(matches!(kind, "counter" | "gauge" | "histogram"), "{line}");
                assert!(declared.insert(name.to_owned()), "declared twice: {name}");
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("name value");
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("bad value: {line}"));
            let name = series.split('{').next().unwrap();
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "{line}"
            );
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| declared.contains(*f)))
                .unwrap_or(name);
            assert!(declared.contains(family), "sample before its TYPE: {line}");
            if let Some(labels) = series.strip_prefix(name) {
                if !labels.is_empty() {
                    assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                }
            }
        }
    }

    #[test]
    fn counters_carry_their_labels() {
        let metrics = Metrics::new();
        metrics.routed(RoutedTo::Email, 2);
        metrics.routed(RoutedTo::Held, 1);
        metrics.routed(RoutedTo::Held, 1);
        metrics.email_failed(SendFailure::Expired);
        metrics.sms_failed(SendFailure::Permanent);
        metrics.sms_retry(Duration::from_millis(1));
        metrics.inbound_email(Inbound::Accepted);
        metrics.inbound_sms(Inbound::Refused);
        let text = metrics.render(None);
        let lines = samples(&text);
        for expected in [
            "reach_messages_routed_total{terminal=\"email\"} 2",
            "reach_messages_routed_total{terminal=\"held\"} 2",
            "reach_messages_routed_total{terminal=\"xmpp\"} 0",
            "reach_email_failures_total{reason=\"expired\"} 1",
            "reach_email_failures_total{reason=\"permanent\"} 0",
            "reach_sms_failures_total{reason=\"permanent\"} 1",
            "reach_sms_retries_total{reason=\"transient\"} 1",
            "reach_inbound_email_total{outcome=\"accepted\"} 1",
            "reach_inbound_sms_total{outcome=\"refused\"} 1",
            "reach_inbound_sms_total{outcome=\"accepted\"} 0",
        ] {
            assert!(lines.contains(&expected), "{expected} missing in:\n{text}");
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_with_inf() {
        let metrics = Metrics::new();
        metrics.email_sent(Duration::from_millis(3));
        metrics.email_sent(Duration::from_millis(200));
        metrics.email_retry(Duration::from_secs(60));
        let text = metrics.render(None);
        let lines = samples(&text);
        for expected in [
            "reach_smtp_send_seconds_bucket{le=\"0.005\"} 1",
            "reach_smtp_send_seconds_bucket{le=\"0.1\"} 1",
            "reach_smtp_send_seconds_bucket{le=\"0.25\"} 2",
            "reach_smtp_send_seconds_bucket{le=\"30\"} 2",
            "reach_smtp_send_seconds_bucket{le=\"+Inf\"} 3",
            "reach_smtp_send_seconds_count 3",
            "reach_smtp_send_seconds_sum 60.203",
            "reach_email_sent_total 2",
            "reach_email_retries_total{reason=\"transient\"} 1",
            "reach_sms_send_seconds_count 0",
        ] {
            assert!(lines.contains(&expected), "{expected} missing in:\n{text}");
        }
        let buckets: Vec<u64> = lines
            .iter()
            .filter(|l| l.starts_with("reach_smtp_send_seconds_bucket"))
            .map(|l| l.rsplit_once(' ').unwrap().1.parse().unwrap())
            .collect();
        assert_eq!(buckets.len(), LATENCY_BUCKETS.len() + 1);
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    }

    #[test]
    fn store_counts_become_gauges() {
        let stats = Stats {
            users: 3,
            sessions: 5,
            held: 7,
            outbox: 11,
            email_queue: 13,
            sms_queue: 17,
        };
        let text = Metrics::new().render(Some(&stats));
        let lines = samples(&text);
        for expected in [
            "reach_queue_depth{queue=\"outbox\"} 11",
            "reach_queue_depth{queue=\"email\"} 13",
            "reach_queue_depth{queue=\"sms\"} 17",
            "reach_users 3",
            "reach_sessions 5",
            "reach_held_messages 7",
        ] {
            assert!(lines.contains(&expected), "{expected} missing in:\n{text}");
        }
    }

    #[test]
    fn link_state_and_reconnects() {
        let metrics = Metrics::new();
        metrics.link_established();
        assert!(metrics.render(None).contains("reach_xmpp_link_up 1\n"));
        metrics.link_lost();
        metrics.link_established();
        metrics.link_lost();
        let text = metrics.render(None);
        assert!(text.contains("reach_xmpp_link_up 0\n"), "{text}");
        assert!(
            text.contains("reach_xmpp_link_reconnects_total 1\n"),
            "{text}"
        );
    }

    #[test]
    fn escaping_follows_the_exposition_format() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(escape_help("x\\y\nz"), "x\\\\y\\nz");
        let mut out = String::new();
        sample(&mut out, "m", &[("a", "1"), ("b", "q\"")], 2);
        assert_eq!(out, "m{a=\"1\",b=\"q\\\"\"} 2\n");
    }

    #[test]
    fn outcomes_of_reply_codes() {
        assert_eq!(Inbound::of_smtp_code(250), Inbound::Accepted);
        assert_eq!(Inbound::of_smtp_code(451), Inbound::Deferred);
        assert_eq!(Inbound::of_smtp_code(550), Inbound::Refused);
        assert_eq!(Inbound::of_http_status(200), Inbound::Accepted);
        assert_eq!(Inbound::of_http_status(503), Inbound::Deferred);
        assert_eq!(Inbound::of_http_status(403), Inbound::Refused);
    }

    #[tokio::test]
    async fn the_endpoint_serves_metrics_and_stats() {
        let store = Arc::new(Store::temporary().unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, shutdown) = watch::channel(false);
        let server = tokio::spawn(serve(listener, store, shutdown));
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).await.unwrap();
            text
        };
        let metrics = get("/metrics").await;
        assert!(metrics.starts_with("HTTP/1.0 200"), "{metrics}");
        assert!(metrics.contains("reach_queue_depth{queue=\"outbox\"} 0"));
        let stats = get("/stats").await;
        assert!(stats.starts_with("HTTP/1.0 200"), "{stats}");
        assert!(stats.contains("application/json"), "{stats}");
        let body = stats.split("\r\n\r\n").nth(1).unwrap();
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["users"], 0);
        assert!(get("/nope").await.starts_with("HTTP/1.0 404"));
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
    }
}
