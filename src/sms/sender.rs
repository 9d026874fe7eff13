//! The SMS side of the durable outbound queue ([`crate::delivery`]): hands each queued SMS to
//! the provider, at most `rate_per_second` SMS per second for all users together.
//!
//! A transient failure (provider down, 5xx) retries with exponential backoff (2 s doubling to
//! 2 min) for up to a day; a permanent one is reported to the core, which tells the buddy and
//! keeps the message for the user's XMPP client.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use super::{OutgoingSms, SmsProvider, SmsSendError};
use crate::delivery::{Courier, Refusal, RetryPolicy};
use crate::metrics::SendFailure;
use crate::store::{Queue, SmsJob, Store};

/// Delivers queued SMS through the provider.
#[derive(Debug, Clone)]
pub struct SmsCourier<P> {
    provider: P,
}

impl<P: SmsProvider> SmsCourier<P> {
    pub fn new(provider: P) -> SmsCourier<P> {
        SmsCourier { provider }
    }
}

impl<P: SmsProvider> Courier for SmsCourier<P> {
    type Job = SmsJob;
    const KIND: &'static str = "SMS";
    const RETRY: RetryPolicy = RetryPolicy {
        first_secs: 2,
        max_secs: 120,
        give_up_secs: 86_400,
    };

    const QUEUE: Queue = crate::store::SMS_QUEUE;

    fn wake(&self, store: &Store) -> Arc<Notify> {
        store.sms_wake()
    }

    fn deliver(&self, job: &SmsJob) -> impl Future<Output = Result<(), Refusal>> + Send {
        let sms = OutgoingSms {
            to: job.to.clone(),
            text: job.text.clone(),
            reference: job.reference.clone(),
        };
        async move {
            self.provider.send(&sms).await.map_err(|e| match e {
                SmsSendError::Transient(reason) => Refusal::Transient(reason),
                SmsSendError::Permanent(reason) => Refusal::Permanent(reason),
            })
        }
    }

    fn count_sent(&self, took: Duration) {
        crate::metrics::global().sms_sent(took);
    }

    fn count_retry(&self, took: Duration) {
        crate::metrics::global().sms_retry(took);
    }

    fn count_failure(&self, why: SendFailure) {
        crate::metrics::global().sms_failed(why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sms::kannel::Kannel;

    #[test]
    fn retries_back_off_to_a_ceiling() {
        let delays: Vec<u64> = (1..=8)
            .map(|a| <SmsCourier<Kannel> as Courier>::RETRY.delay(a))
            .collect();
        assert_eq!(delays, vec![4, 8, 16, 32, 64, 120, 120, 120]);
    }
}
