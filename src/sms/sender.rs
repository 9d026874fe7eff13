//! Drains the durable SMS queue through the provider, at most `rate_per_second` SMS per second
//! for all users together.
//!
//! A job leaves the queue only once the provider accepted it. A transient failure (provider
//! down, 5xx) retries with exponential backoff for up to a day; a permanent one is reported to the
//! core, which tells the buddy and keeps the message for the user's XMPP client, and removes the
//! job in the same commit.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::{OutgoingSms, SmsProvider, SmsSendError};
use crate::store::{SmsJob, Store};

const FIRST_RETRY_SECS: u64 = 2;
const MAX_RETRY_SECS: u64 = 120;
const GIVE_UP_SECS: u64 = 86_400;
const PASS: usize = 64;

/// A job the provider refused for good.
#[derive(Debug)]
pub struct Failure {
    pub seq: u64,
    pub job: SmsJob,
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
pub async fn run_sender<P: SmsProvider>(
    store: Arc<Store>,
    provider: P,
    rate_per_second: u32,
    failures: mpsc::Sender<Failure>,
    mut shutdown: watch::Receiver<bool>,
) {
    let wake = store.sms_wake();
    let spacing = Duration::from_secs(1) / rate_per_second.max(1);
    let mut pace = tokio::time::interval(spacing);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        let due = match store.due_sms_jobs(now(), PASS) {
            Ok(due) => due,
            Err(e) => {
                tracing::error!("cannot read the SMS queue: {e}");
                Vec::new()
            }
        };
        let busy = due.len() == PASS;
        for (seq, job) in due {
            tokio::select! {
                _ = pace.tick() => {}
                _ = shutdown.changed() => return,
            }
            if let Some(failure) = attempt(&store, &provider, seq, job).await {
                if failures.send(failure).await.is_err() {
                    return;
                }
            }
        }
        if let Err(e) = store.flush() {
            tracing::error!("cannot commit the SMS queue: {e}");
        }
        if busy {
            continue;
        }
        let wait = match store.next_sms_attempt() {
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

async fn attempt<P: SmsProvider>(
    store: &Store,
    provider: &P,
    seq: u64,
    mut job: SmsJob,
) -> Option<Failure> {
    let sms = OutgoingSms {
        to: job.to.clone(),
        text: job.text.clone(),
        reference: job.reference.clone(),
    };
    let metrics = crate::metrics::global();
    let started = std::time::Instant::now();
    match provider.send(&sms).await {
        Ok(()) => {
            metrics.sms_sent(started.elapsed());
            tracing::debug!(seq, "SMS handed to the provider");
            if let Err(e) = store.remove_sms_job(seq) {
                tracing::error!("cannot remove a sent SMS from the queue: {e}");
            }
            None
        }
        Err(SmsSendError::Transient(reason))
            if now().saturating_sub(job.queued_at) < GIVE_UP_SECS =>
        {
            metrics.sms_retry(started.elapsed());
            job.attempts += 1;
            job.next_attempt_at = now() + retry_delay(job.attempts);
            tracing::warn!(
                seq,
                attempts = job.attempts,
                "SMS provider failed for now, will retry: {reason}"
            );
            if let Err(e) = store.update_sms_job(seq, &job) {
                tracing::error!("cannot reschedule an SMS: {e}");
            }
            None
        }
        Err(failed) => {
            let (why, reason) = match failed {
                SmsSendError::Transient(reason) => (crate::metrics::SendFailure::Expired, reason),
                SmsSendError::Permanent(reason) => (crate::metrics::SendFailure::Permanent, reason),
            };
            metrics.sms_failed(why);
            let mut parked = job.clone();
            parked.next_attempt_at = u64::MAX;
            let _ = store.update_sms_job(seq, &parked);
            Some(Failure { seq, job, reason })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_a_ceiling() {
        let delays: Vec<u64> = (1..=8).map(retry_delay).collect();
        assert_eq!(delays, vec![4, 8, 16, 32, 64, 120, 120, 120]);
    }
}
