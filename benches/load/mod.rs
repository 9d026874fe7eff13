//! Load generators and baselines for `benches/throughput.rs`: raw XMPP senders and counters, a
//! null component, SMTP clients and servers (smtp-sink, smtp-source, a private Postfix), a
//! keep-alive sendsms client and a counting SMS handset, seeding Reach's store through its
//! library API (sled or PostgreSQL), a private PostgreSQL with statement counts, and the CPU
//! time of each process taking part. Everything runs on 127.0.0.1, in temporary folders, and
//! stops by PID.

pub mod mail;
pub mod pg;
pub mod procs;
pub mod seed;
pub mod sms;
pub mod xmpp;

use std::time::{Duration, Instant};

/// One line of the results table.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: &'static str,
    pub reach: String,
    pub baseline: String,
    /// Reach / baseline (throughput), when both are rates.
    pub ratio: Option<f64>,
    pub target: &'static str,
    pub pass: Option<bool>,
    pub note: String,
}

/// Messages per second, formatted.
pub fn rate(n: u64, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64().max(1e-9)
}

pub fn fmt_rate(r: f64) -> String {
    if r >= 10_000.0 {
        format!("{:.1}k/s", r / 1000.0)
    } else {
        format!("{r:.0}/s")
    }
}

/// The `q`-quantile (0..=1) of sorted durations, in milliseconds.
pub fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

/// Polls `done` every 2 ms until it holds or `timeout` passes; returns when it held.
pub async fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return Some(Instant::now());
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Counts occurrences of a needle in a byte stream that arrives in chunks.
pub struct Matcher {
    needle: &'static [u8],
    carry: Vec<u8>,
}

impl Matcher {
    pub fn new(needle: &'static [u8]) -> Matcher {
        Matcher {
            needle,
            carry: Vec::new(),
        }
    }

    /// How many needles end in `chunk` (one may have started in the previous chunk).
    pub fn feed(&mut self, chunk: &[u8]) -> u64 {
        let n = self.needle.len();
        let mut data = std::mem::take(&mut self.carry);
        data.extend_from_slice(chunk);
        let mut count = 0;
        let mut i = 0;
        while i + n <= data.len() {
            if data[i] == self.needle[0] && &data[i..i + n] == self.needle {
                count += 1;
                i += n;
            } else {
                i += 1;
            }
        }
        let keep = data.len().min(n - 1).min(data.len() - i.min(data.len()));
        self.carry = data[data.len() - keep..].to_vec();
        count
    }
}

/// A free port (see `support::free_port`).
pub fn port() -> u16 {
    crate::support::free_port()
}
