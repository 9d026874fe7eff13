//! Drains the durable email queue through the relay.
//!
//! A job leaves the queue only once the relay accepted it. A transient failure (4xx, connection
//! trouble) retries with exponential backoff, for up to two days; a permanent one (5xx) is reported
//! to the core, which tells the buddies and keeps their messages for the user's XMPP client, and
//! removes the job in the same commit.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};

use super::outbound::{render, Relay, SendError};
use crate::store::{EmailJob, Store};

/// First retry delay; doubles each attempt.
const FIRST_RETRY_SECS: u64 = 2;
/// Longest delay between attempts.
const MAX_RETRY_SECS: u64 = 300;
/// After this long in the queue a transient failure counts as permanent.
const GIVE_UP_SECS: u64 = 2 * 86_400;
/// Jobs sent per pass before the queue is looked at again.
const PASS: usize = 64;

/// A job the relay refused for good.
#[derive(Debug)]
pub struct Failure {
    pub seq: u64,
    pub job: EmailJob,
    pub reason: String,
}

/// The delay before attempt number `attempts + 1`.
pub fn retry_delay(attempts: u32) -> u64 {
    FIRST_RETRY_SECS
        .saturating_mul(1u64 << attempts.min(20))
        .min(MAX_RETRY_SECS)
}

fn now() -> u64 {
    crate::runtime::now()
}

/// Runs until `shutdown` turns true or the failure receiver is gone.
pub async fn run_sender(
    store: Arc<Store>,
    relay: Relay,
    failures: mpsc::Sender<Failure>,
    mut shutdown: watch::Receiver<bool>,
) {
    let wake = store.email_wake();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        let due = match store.due_email_jobs(now(), PASS) {
            Ok(due) => due,
            Err(e) => {
                tracing::error!("cannot read the email queue: {e}");
                Vec::new()
            }
        };
        let busy = due.len() == PASS;
        for (seq, job) in due {
            // At shutdown the send in progress finishes; the rest waits for the next start.
            if *shutdown.borrow() {
                break;
            }
            if let Some(failure) = attempt(&store, &relay, seq, job).await {
                if failures.send(failure).await.is_err() {
                    return;
                }
            }
        }
        if let Err(e) = store.flush() {
            tracing::error!("cannot commit the email queue: {e}");
        }
        if busy {
            continue;
        }
        let wait = match store.next_email_attempt() {
            Ok(Some(at)) => Duration::from_secs(at.saturating_sub(now()).clamp(1, 60)),
            _ => Duration::from_secs(60),
        };
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// One delivery attempt; returns the failure to report if the job failed for good.
async fn attempt(store: &Store, relay: &Relay, seq: u64, mut job: EmailJob) -> Option<Failure> {
    let metrics = crate::metrics::global();
    let started = std::time::Instant::now();
    let (outcome, unbuildable) = match render(&job.email, SystemTime::now()) {
        Ok(bytes) => (
            relay.send(&job.envelope_from, &job.email.to, &bytes).await,
            false,
        ),
        Err(e) => (
            Err(SendError::Permanent(format!(
                "the email could not be built: {e}"
            ))),
            true,
        ),
    };
    match outcome {
        Ok(()) => {
            metrics.email_sent(started.elapsed());
            tracing::debug!(seq, "email handed to the relay");
            if let Err(e) = store.remove_email_job(seq) {
                tracing::error!("cannot remove a sent email from the queue: {e}");
            }
            None
        }
        Err(SendError::Transient(reason)) if now().saturating_sub(job.queued_at) < GIVE_UP_SECS => {
            metrics.email_retry(started.elapsed());
            job.attempts += 1;
            job.next_attempt_at = now() + retry_delay(job.attempts);
            // The relay's text may quote the recipient's address: only at debug.
            tracing::warn!(
                seq,
                attempts = job.attempts,
                "email relay failed for now, will retry"
            );
            tracing::debug!(seq, "relay said: {reason}");
            if let Err(e) = store.update_email_job(seq, &job) {
                tracing::error!("cannot reschedule an email: {e}");
            }
            None
        }
        Err(failed) => {
            use crate::metrics::SendFailure;
            let (why, reason) = match failed {
                SendError::Transient(reason) => (SendFailure::Expired, reason),
                SendError::Permanent(reason) if unbuildable => (SendFailure::Unbuildable, reason),
                SendError::Permanent(reason) => (SendFailure::Permanent, reason),
            };
            metrics.email_failed(why);
            // Leave the job queued until the core has kept its messages elsewhere; meanwhile do
            // not try it again.
            let mut parked = job.clone();
            parked.next_attempt_at = u64::MAX;
            let _ = store.update_email_job(seq, &parked);
            Some(Failure { seq, job, reason })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_a_ceiling() {
        let delays: Vec<u64> = (1..=10).map(retry_delay).collect();
        assert_eq!(delays, vec![4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(retry_delay(u32::MAX), 300);
    }
}
