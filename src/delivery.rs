//! Drains a durable job queue (email or SMS) through its courier, several sends at a time.
//!
//! Due jobs are claimed from the store ([`Store::claim_jobs`]): with several instances on one
//! store, each job is claimed by one of them, which alone sends it. A job leaves the queue only
//! once the courier's peer accepted it; what became of the jobs sent (removed, rescheduled) is
//! committed together, before the drainer goes idle and at most every 250 ms while a backlog
//! drains. Each send is its own task, and a new one starts as soon as a slot frees. A transient
//! refusal retries with exponential backoff until the job is too old; a permanent one parks the
//! job (committed at once) and is reported to the core (through the failure channel), which
//! tells the buddies, keeps their messages for the user's XMPP client and removes the job. A
//! crash after a send and before its commit sends that job again: at least once, never lost
//! (another instance takes it over at once if it sees this one gone, else when the claim runs
//! out).
//!
//! What differs between email and SMS (the queue, the peer, the retry policy, the metrics) is a
//! [`Courier`]; the draining, the concurrency, the optional pacing and the shutdown are here,
//! once. The store is only touched from blocking threads (its engine may be a database).

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;

use crate::metrics::SendFailure;
use crate::store::{Queue, QueuedJob, Store};

/// Jobs claimed from the queue per pass.
const PASS: usize = 64;
/// Longest time a drained job's removal waits for its commit while a backlog drains (what a
/// crash in that time would send again).
const COMMIT_EVERY: Duration = Duration::from_millis(250);

/// Why a send did not go through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Worth trying again later (peer down, 4xx, timeouts).
    Transient(String),
    /// Never going to work (5xx, a refused number).
    Permanent(String),
    /// The job itself could not be turned into something to send.
    Unbuildable(String),
}

/// Backoff between attempts and when to give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The delay after the first failure; doubles with each attempt.
    pub first_secs: u64,
    /// The longest delay between attempts.
    pub max_secs: u64,
    /// After this long in the queue a transient refusal counts as permanent.
    pub give_up_secs: u64,
}

impl RetryPolicy {
    /// The delay before attempt number `attempts + 1`.
    pub fn delay(&self, attempts: u32) -> u64 {
        self.first_secs
            .saturating_mul(1u64 << attempts.min(20))
            .min(self.max_secs)
    }
}

/// How many sends run at once, and how fast they may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    /// Sends in flight at most (at least 1).
    pub concurrency: usize,
    /// Sends started per second at most, for all users together; `None` for no limit.
    pub per_second: Option<u32>,
}

/// A job the courier's peer refused for good.
#[derive(Debug)]
pub struct Failure<J> {
    pub seq: u64,
    pub job: J,
    pub reason: String,
}

/// One kind of outbound delivery: its queue in the store, its peer, its policy, its metrics.
pub trait Courier: Send + Sync {
    type Job: QueuedJob + Clone + Send + Sync + 'static;
    /// "email" or "SMS", for the log.
    const KIND: &'static str;
    const RETRY: RetryPolicy;
    /// Its queue in the store.
    const QUEUE: Queue;

    /// What wakes the drainer when jobs are queued (by this instance or another).
    fn wake(&self, store: &Store) -> Arc<Notify>;

    /// Hands one job to the peer.
    fn deliver(&self, job: &Self::Job) -> impl Future<Output = Result<(), Refusal>> + Send;

    fn count_sent(&self, took: Duration);
    fn count_retry(&self, took: Duration);
    fn count_failure(&self, why: SendFailure);
}

fn now() -> u64 {
    crate::clock::now()
}

/// What became of one claimed job.
enum Settled<J> {
    /// The peer took it: it leaves the queue.
    Sent,
    /// To be tried again (as given: attempts and next attempt set).
    Again(J),
    /// Refused for good: parked (never tried again) until the core, told through the failure
    /// channel, has dealt with it.
    Failed(J, Failure<J>),
}

/// Runs until `shutdown` turns true or the failure receiver is gone. At shutdown no new send
/// starts; those in flight finish (each bounded by the courier's own timeout) and are committed.
///
/// Sends start as soon as a slot is free, not pass by pass: one slow answer (a peer's delayed
/// ACK, a retry) holds up its own slot only. Due jobs are claimed a batch at a time.
pub async fn run<C: Courier + 'static>(
    store: Arc<Store>,
    courier: C,
    pace: Pace,
    failures: mpsc::Sender<Failure<C::Job>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let wake = courier.wake(&store);
    let courier = Arc::new(courier);
    let mut pacer = pace.per_second.map(Pacer::new);
    let concurrency = pace.concurrency.max(1);
    let mut last_commit = Instant::now();
    let mut waiting: VecDeque<(u64, C::Job)> = VecDeque::new();
    let mut in_flight: JoinSet<(u64, Settled<C::Job>)> = JoinSet::new();
    let mut settled: Vec<(u64, Option<C::Job>)> = Vec::new();
    let mut sender_gone = false;
    let mut committing: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let stopping = sender_gone || *shutdown.borrow();
        if stopping && in_flight.is_empty() {
            if let Some(running) = committing.take() {
                let _ = running.await;
            }
            settle::<C>(&store, std::mem::take(&mut settled)).await;
            return;
        }
        let notified = wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        if !stopping && waiting.is_empty() && in_flight.len() < concurrency {
            let claimer = store.clone();
            let claimed = tokio::task::spawn_blocking(move || {
                claimer.claim_jobs::<C::Job>(C::QUEUE, now(), PASS)
            })
            .await;
            match claimed {
                Ok(Ok(due)) => waiting.extend(due),
                Ok(Err(e)) => tracing::error!("cannot read the {} queue: {e}", C::KIND),
                Err(e) => tracing::error!("cannot read the {} queue: {e}", C::KIND),
            }
        }
        while !stopping && in_flight.len() < concurrency {
            let Some((seq, job)) = waiting.pop_front() else {
                break;
            };
            if let Some(pacer) = pacer.as_mut() {
                wait_until(pacer.book()).await;
            }
            let courier = courier.clone();
            in_flight.spawn(async move { (seq, guarded_attempt(courier, seq, job).await) });
        }

        // Committing removals only makes a crash resend less; sending never waits for it.
        // While a backlog drains, commit at most every COMMIT_EVERY, and always before going
        // idle. The commit runs on a blocking thread: an fsync must not hold up the sends (nor
        // the other tasks of this worker thread). One at a time.
        let idle = in_flight.is_empty() && waiting.is_empty();
        if idle {
            // Going idle: whatever was settled must be in a commit that starts now.
            if let Some(running) = committing.take() {
                let _ = running.await;
            }
        }
        if idle && !settled.is_empty() {
            // Before going idle, what became of the jobs is in the store (the next attempt
            // read below depends on it).
            settle::<C>(&store, std::mem::take(&mut settled)).await;
            last_commit = Instant::now();
        }
        let previous_done = committing.as_ref().is_none_or(|c| c.is_finished());
        if previous_done && !settled.is_empty() && last_commit.elapsed() >= COMMIT_EVERY {
            let (store, batch) = (store.clone(), std::mem::take(&mut settled));
            committing = Some(tokio::spawn(
                async move { settle::<C>(&store, batch).await },
            ));
            last_commit = Instant::now();
        }

        if !in_flight.is_empty() {
            tokio::select! {
                done = in_flight.join_next() => {
                    // A send never panics out of `guarded_attempt`; a task is only cancelled
                    // when this drainer is dropped.
                    if let Some(Ok((seq, outcome))) = done {
                        match outcome {
                            Settled::Sent => settled.push((seq, None)),
                            Settled::Again(job) => settled.push((seq, Some(job))),
                            Settled::Failed(parked, failure) => {
                                // Parked before the core hears of it: the core's removal of
                                // the job comes after, never before.
                                settle::<C>(&store, vec![(seq, Some(parked))]).await;
                                if failures.send(failure).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }
                changed = shutdown.changed(), if !stopping => {
                    sender_gone |= changed.is_err();
                }
            }
            continue;
        }
        if !waiting.is_empty() || stopping {
            continue;
        }
        let reader = store.clone();
        let next = tokio::task::spawn_blocking(move || reader.next_attempt(C::QUEUE)).await;
        let wait = match next {
            Ok(Ok(Some(at))) => Duration::from_secs(at.saturating_sub(now()).clamp(1, 60)),
            Ok(Ok(None)) => Duration::from_secs(60),
            // The store is out of reach: look again soon.
            _ => Duration::from_secs(2),
        };
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(wait) => {}
            changed = shutdown.changed() => {
                sender_gone |= changed.is_err();
            }
        }
    }
}

/// Commits what became of sent jobs (on a blocking thread).
async fn settle<C: Courier>(store: &Arc<Store>, outcomes: Vec<(u64, Option<C::Job>)>) {
    if outcomes.is_empty() {
        return;
    }
    let store = store.clone();
    let done =
        tokio::task::spawn_blocking(move || store.settle_jobs::<C::Job>(C::QUEUE, &outcomes)).await;
    match done {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!("cannot commit the {} queue: {e}", C::KIND),
        Err(e) => tracing::error!("cannot commit the {} queue: {e}", C::KIND),
    }
}

/// Returns at `at`, at once when it is past (no trip through the timer).
async fn wait_until(at: Instant) {
    if at > Instant::now() {
        tokio::time::sleep_until(at.into()).await;
    }
}

/// Spaces the starts of sends `1/rate` seconds apart on average. Unlike a timer tick per send
/// (whose 1 ms resolution would cap a high rate near 1,000/s), it only sleeps when the sends are
/// ahead of the schedule, and a slow moment is not made up with a burst.
struct Pacer {
    spacing: Duration,
    next: Instant,
}

impl Pacer {
    fn new(per_second: u32) -> Pacer {
        Pacer {
            spacing: Duration::from_secs(1) / per_second.max(1),
            next: Instant::now(),
        }
    }

    /// When the next send may start; books that slot (the caller starts a send then).
    fn book(&mut self) -> Instant {
        let now = Instant::now();
        let at = self.next.max(now);
        self.next = at + self.spacing;
        at
    }
}

/// [`attempt`], with a panic (a bug) costing one try of one job: it is logged and the job is
/// retried later like a transient failure, never dropped.
async fn guarded_attempt<C: Courier>(courier: Arc<C>, seq: u64, job: C::Job) -> Settled<C::Job> {
    use futures::FutureExt;
    let mut retry = job.clone();
    let outcome = std::panic::AssertUnwindSafe(attempt(courier, seq, job))
        .catch_unwind()
        .await;
    outcome.unwrap_or_else(|_| {
        tracing::error!(
            seq,
            "sending a queued {} panicked; it will be tried again",
            C::KIND
        );
        let attempts = retry.attempts() + 1;
        retry.reschedule(attempts, now() + C::RETRY.delay(attempts));
        Settled::Again(retry)
    })
}

/// One delivery attempt.
async fn attempt<C: Courier>(courier: Arc<C>, seq: u64, mut job: C::Job) -> Settled<C::Job> {
    let started = Instant::now();
    let outcome = courier.deliver(&job).await;
    let took = started.elapsed();
    match outcome {
        Ok(()) => {
            courier.count_sent(took);
            tracing::debug!(seq, "{} handed over", C::KIND);
            Settled::Sent
        }
        Err(Refusal::Transient(reason))
            if now().saturating_sub(job.queued_at()) < C::RETRY.give_up_secs =>
        {
            courier.count_retry(took);
            let attempts = job.attempts() + 1;
            job.reschedule(attempts, now() + C::RETRY.delay(attempts));
            // The peer's text may quote the recipient's address or number: only at debug.
            tracing::warn!(seq, attempts, "{} failed for now, will retry", C::KIND);
            tracing::debug!(seq, "the peer said: {reason}");
            Settled::Again(job)
        }
        Err(refusal) => {
            let (why, reason) = match refusal {
                Refusal::Transient(reason) => (SendFailure::Expired, reason),
                Refusal::Permanent(reason) => (SendFailure::Permanent, reason),
                Refusal::Unbuildable(reason) => (SendFailure::Unbuildable, reason),
            };
            courier.count_failure(why);
            // Queued until the core has kept its messages elsewhere; meanwhile never tried again.
            let mut parked = job.clone();
            parked.reschedule(job.attempts(), u64::MAX);
            Settled::Failed(parked, Failure { seq, job, reason })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;
    use crate::core::Transaction;
    use crate::sms::sender::SmsCourier;
    use crate::sms::{OutgoingSms, SmsProvider, SmsSendError};
    use crate::store::SmsJob;

    /// An SMS provider answering from a script, counting how many sends run at once.
    struct Scripted {
        answers: Mutex<Vec<Result<(), SmsSendError>>>,
        running: AtomicUsize,
        most_at_once: AtomicUsize,
        delivered: Mutex<Vec<String>>,
    }

    impl Scripted {
        fn new(answers: Vec<Result<(), SmsSendError>>) -> Scripted {
            Scripted {
                answers: Mutex::new(answers),
                running: AtomicUsize::new(0),
                most_at_once: AtomicUsize::new(0),
                delivered: Mutex::new(Vec::new()),
            }
        }
    }

    impl SmsProvider for Arc<Scripted> {
        fn send(&self, sms: &OutgoingSms) -> impl Future<Output = Result<(), SmsSendError>> + Send {
            let this = self.clone();
            let text = sms.text.clone();
            async move {
                let now_running = this.running.fetch_add(1, Ordering::SeqCst) + 1;
                this.most_at_once.fetch_max(now_running, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                this.running.fetch_sub(1, Ordering::SeqCst);
                let answer = {
                    let mut answers = this.answers.lock().unwrap();
                    if answers.is_empty() {
                        Ok(())
                    } else {
                        answers.remove(0)
                    }
                };
                if answer.is_ok() {
                    this.delivered.lock().unwrap().push(text);
                }
                answer
            }
        }
    }

    fn job(text: &str) -> SmsJob {
        SmsJob {
            queued_at: now(),
            ..crate::store::conformance::sms_job(text, 0)
        }
    }

    async fn drain(
        store: &Arc<Store>,
        courier: &Arc<Scripted>,
        pace: Pace,
        until: impl Fn() -> bool,
    ) -> Vec<Failure<SmsJob>> {
        let (failures_tx, mut failures_rx) = mpsc::channel(16);
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(
            store.clone(),
            SmsCourier::new(courier.clone()),
            pace,
            failures_tx,
            stop_rx,
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !until() {
            assert!(Instant::now() < deadline, "the queue did not drain");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        let mut failures = Vec::new();
        while let Ok(f) = failures_rx.try_recv() {
            failures.push(f);
        }
        failures
    }

    #[tokio::test]
    async fn sends_run_several_at_a_time_and_leave_the_queue_once_accepted() {
        let store = Arc::new(Store::temporary().unwrap());
        for i in 0..20 {
            store.tx().enqueue_sms(&job(&format!("j{i}"))).unwrap();
        }
        let courier = Arc::new(Scripted::new(Vec::new()));
        let c = courier.clone();
        let pace = Pace {
            concurrency: 4,
            per_second: None,
        };
        let failures = drain(&store, &courier, pace, || {
            c.delivered.lock().unwrap().len() == 20
        })
        .await;
        assert!(failures.is_empty());
        assert_eq!(courier.most_at_once.load(Ordering::SeqCst), 4);
        assert_eq!(store.stats().unwrap().sms_queue, 0);
    }

    #[tokio::test]
    async fn a_transient_refusal_retries_later_and_a_permanent_one_is_reported_and_parked() {
        let store = Arc::new(Store::temporary().unwrap());
        store.tx().enqueue_sms(&job("later")).unwrap();
        store.tx().enqueue_sms(&job("never")).unwrap();
        let courier = Arc::new(Scripted::new(vec![
            Err(SmsSendError::Transient("busy".into())),
            Err(SmsSendError::Permanent("no such number".into())),
        ]));
        let pace = Pace {
            concurrency: 1,
            per_second: None,
        };
        let s = store.clone();
        let failures = drain(&store, &courier, pace, || {
            s.tx()
                .due_sms_jobs(u64::MAX - 1, 10)
                .unwrap()
                .iter()
                .all(|(_, j)| j.attempts == 1)
        })
        .await;
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].job.text, "never");
        assert_eq!(failures[0].reason, "no such number");
        let queued = store.tx().due_sms_jobs(u64::MAX - 1, 10).unwrap();
        assert_eq!(queued.len(), 1, "the parked job is never due");
        assert_eq!(queued[0].1.text, "later");
        assert!(queued[0].1.next_attempt_at >= now() + 3);
        assert!(courier.delivered.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_pace_limits_how_fast_sends_start() {
        let store = Arc::new(Store::temporary().unwrap());
        for i in 0..6 {
            store.tx().enqueue_sms(&job(&format!("j{i}"))).unwrap();
        }
        let courier = Arc::new(Scripted::new(Vec::new()));
        let c = courier.clone();
        let started = Instant::now();
        let pace = Pace {
            concurrency: 4,
            per_second: Some(20),
        };
        drain(&store, &courier, pace, || {
            c.delivered.lock().unwrap().len() == 6
        })
        .await;
        // Six starts 50 ms apart (the first at once): at least 250 ms.
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn retries_back_off_to_a_ceiling() {
        let policy = RetryPolicy {
            first_secs: 2,
            max_secs: 300,
            give_up_secs: 0,
        };
        let delays: Vec<u64> = (1..=10).map(|a| policy.delay(a)).collect();
        assert_eq!(delays, vec![4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(policy.delay(u32::MAX), 300);
    }
}
