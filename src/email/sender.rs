//! The email side of the durable outbound queue ([`crate::delivery`]): renders each queued email
//! and hands it to the relay.
//!
//! A transient failure (4xx, connection trouble) retries with exponential backoff (2 s doubling
//! to 5 min) for up to two days; a permanent one (5xx) is reported to the core, which tells the
//! buddies and keeps their messages for the user's XMPP client. Several emails go out at once
//! (`[email] connections`), each on its own pooled relay connection.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

use super::outbound::{render, Relay, SendError};
use crate::delivery::{Courier, Refusal, RetryPolicy};
use crate::metrics::SendFailure;
use crate::store::{EmailJob, Queue, Store};

/// Delivers queued emails through the relay.
#[derive(Debug, Clone)]
pub struct EmailCourier {
    relay: Relay,
}

impl EmailCourier {
    pub fn new(relay: Relay) -> EmailCourier {
        EmailCourier { relay }
    }
}

impl Courier for EmailCourier {
    type Job = EmailJob;
    const KIND: &'static str = "email";
    const RETRY: RetryPolicy = RetryPolicy {
        first_secs: 2,
        max_secs: 300,
        give_up_secs: 2 * 86_400,
    };

    const QUEUE: Queue = crate::store::EMAIL_QUEUE;

    fn wake(&self, store: &Store) -> Arc<Notify> {
        store.email_wake()
    }

    async fn deliver(&self, job: &EmailJob) -> Result<(), Refusal> {
        let bytes = render(&job.email, SystemTime::now())
            .map_err(|e| Refusal::Unbuildable(format!("the email could not be built: {e}")))?;
        self.relay
            .send(&job.envelope_from, &job.email.to, &bytes)
            .await
            .map_err(|e| match e {
                SendError::Transient(reason) => Refusal::Transient(reason),
                SendError::Permanent(reason) => Refusal::Permanent(reason),
            })
    }

    fn count_sent(&self, took: Duration) {
        crate::metrics::global().email_sent(took);
    }

    fn count_retry(&self, took: Duration) {
        crate::metrics::global().email_retry(took);
    }

    fn count_failure(&self, why: SendFailure) {
        crate::metrics::global().email_failed(why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_a_ceiling() {
        let delays: Vec<u64> = (1..=10).map(|a| EmailCourier::RETRY.delay(a)).collect();
        assert_eq!(delays, vec![4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(EmailCourier::RETRY.delay(u32::MAX), 300);
    }
}
