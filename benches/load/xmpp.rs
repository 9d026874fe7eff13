//! XMPP load: logged-in c2s sessions used as raw pipes (pre-formatted stanzas out, a count of
//! `</message>` in), and a null component that only counts what it receives.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;

use super::Matcher;
use crate::support::{Client, RawComponent, Server};

pub const D: &str = "reach.localhost";

/// Starts a task counting `</message>` on `stream` into `counter` until the stream ends.
/// Returns the write half, for the few stanzas a receiver still has to send.
pub fn count_messages(stream: TcpStream, pending: &str, counter: Arc<AtomicU64>) -> OwnedWriteHalf {
    let (mut read, write) = stream.into_split();
    let mut matcher = Matcher::new(b"</message>");
    counter.fetch_add(matcher.feed(pending.as_bytes()), Ordering::Relaxed);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let found = matcher.feed(&buf[..n]);
                    if found > 0 {
                        counter.fetch_add(found, Ordering::Relaxed);
                    }
                }
            }
        }
    });
    write
}

/// A null component: authenticates for [`D`] and counts the messages it gets, nothing more.
pub async fn null_component(server: &Server, counter: Arc<AtomicU64>) -> OwnedWriteHalf {
    let component = RawComponent::connect(server, D, server.secret())
        .await
        .expect("null component connects");
    count_messages(component.into_stream(), "", counter)
}

/// Logs `user` in (password `{user}pw`) and returns the session's raw connection.
pub async fn login(server: &Server, user: &str) -> Client {
    Client::connect(server, user, &format!("{user}pw"), "load").await
}

/// Creates accounts `{prefix}{i}` with password `{prefix}{i}pw`, several at a time.
pub async fn register_accounts(server: &Server, prefix: &str, count: usize) {
    let server: &Server = server;
    let mut jobs = Vec::new();
    for i in 0..count {
        let user = format!("{prefix}{i}");
        jobs.push(async move { server.register(&user, &format!("{user}pw")).await });
    }
    futures::future::join_all(jobs).await;
}

/// Shared state of a closed-loop load: senders keep at most `window` messages in flight
/// (sent and not yet counted at the receivers).
pub struct Gate {
    pub sent: AtomicU64,
    pub delivered: Arc<AtomicU64>,
    pub window: u64,
    pub stop: AtomicBool,
}

impl Gate {
    pub fn new(window: u64, delivered: Arc<AtomicU64>) -> Arc<Gate> {
        Arc::new(Gate {
            sent: AtomicU64::new(0),
            delivered,
            window,
            stop: AtomicBool::new(false),
        })
    }
}

/// Sends `stanza(n)` in bursts of 32 while the gate's window allows, until the gate stops.
pub fn closed_loop_sender(
    mut write: OwnedWriteHalf,
    gate: Arc<Gate>,
    stanza: impl Fn(u64) -> String + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    const BURST: u64 = 32;
    tokio::spawn(async move {
        let mut n = 0u64;
        let mut buf = Vec::with_capacity(8192);
        while !gate.stop.load(Ordering::Relaxed) {
            let in_flight = gate
                .sent
                .load(Ordering::Relaxed)
                .saturating_sub(gate.delivered.load(Ordering::Relaxed));
            if in_flight + BURST > gate.window {
                tokio::time::sleep(Duration::from_micros(500)).await;
                continue;
            }
            buf.clear();
            for _ in 0..BURST {
                buf.extend_from_slice(stanza(n).as_bytes());
                n += 1;
            }
            gate.sent.fetch_add(BURST, Ordering::Relaxed);
            if write.write_all(&buf).await.is_err() {
                break;
            }
        }
    })
}

/// Runs a closed-loop load for `warmup + measure` and returns the delivered rate during
/// `measure`, then stops the senders and waits (up to 20 s) for what is in flight.
/// Returns (rate, sent, delivered after the drain).
pub async fn measure_closed_loop(
    gate: &Arc<Gate>,
    senders: Vec<tokio::task::JoinHandle<()>>,
    warmup: Duration,
    measure: Duration,
) -> (f64, u64, u64) {
    let (rate, sent, delivered, _) =
        measure_closed_loop_probed(gate, senders, warmup, measure, &mut ()).await;
    (rate, sent, delivered)
}

/// Something looked at when the measured window opens and when it closes (CPU times, the
/// database's statement counts).
#[allow(async_fn_in_trait)]
pub trait Probe {
    /// Just before the window's first count.
    async fn open(&mut self);
    /// Just after the window's last count; `messages` were delivered in the window.
    async fn close(&mut self, messages: u64);
}

impl Probe for () {
    async fn open(&mut self) {}
    async fn close(&mut self, _messages: u64) {}
}

/// [`measure_closed_loop`] with `probe` opened and closed around the measured window. Also
/// returns the messages delivered in the window.
pub async fn measure_closed_loop_probed(
    gate: &Arc<Gate>,
    senders: Vec<tokio::task::JoinHandle<()>>,
    warmup: Duration,
    measure: Duration,
    probe: &mut impl Probe,
) -> (f64, u64, u64, u64) {
    tokio::time::sleep(warmup).await;
    probe.open().await;
    let (c0, t0) = (gate.delivered.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(measure).await;
    let (c1, t1) = (gate.delivered.load(Ordering::Relaxed), Instant::now());
    probe.close(c1 - c0).await;
    gate.stop.store(true, Ordering::Relaxed);
    for s in senders {
        let _ = s.await;
    }
    let sent = gate.sent.load(Ordering::Relaxed);
    super::wait_until(Duration::from_secs(20), || {
        gate.delivered.load(Ordering::Relaxed) >= sent
    })
    .await;
    (
        super::rate(c1 - c0, t1 - t0),
        sent,
        gate.delivered.load(Ordering::Relaxed),
        c1 - c0,
    )
}

/// A chat message from a buddy to a reach address (or the null component's domain).
pub fn chat(to: &str, id: &str, text: &str) -> String {
    format!("<message type='chat' to='{to}' id='{id}'><body>{text}</body></message>")
}

/// Writes `stanzas` at their planned offsets from `start` (an open-loop, paced load). Returns
/// when each stanza was actually written.
pub async fn paced_sender(
    mut write: OwnedWriteHalf,
    start: tokio::time::Instant,
    plan: Vec<(Duration, String)>,
) -> (OwnedWriteHalf, Vec<Instant>) {
    let mut sent_at = Vec::with_capacity(plan.len());
    for (offset, stanza) in plan {
        tokio::time::sleep_until(start + offset).await;
        write
            .write_all(stanza.as_bytes())
            .await
            .expect("paced send");
        sent_at.push(Instant::now());
    }
    (write, sent_at)
}
