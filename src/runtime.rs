//! Wires the adapters to the core: inputs from the component link, the SMTP listener and the
//! clock go through the core; its decisions go out through the durable queues.
//!
//! Inputs are handled in batches: every event of a batch goes through the core, its outbound
//! stanzas and emails are queued in the store, then one flush (group commit) makes the whole batch
//! durable before the link and the email sender are woken and before any SMTP client hears 250.
//! A store failure is logged and the next event goes on; nothing of a failed event is
//! acknowledged. Where the core's actions are carried out, the messages routed are counted for
//! the metrics (`crate::metrics`).
//!
//! Shutdown (the `shutdown` watch turning true) goes in three steps: the SMTP listener, the SMS
//! webhook, the clock and the metrics endpoint stop taking new work and the email and SMS senders
//! finish the send in progress; meanwhile batches go on being handled and committed, so every
//! reply or text already taken gets its answer after its commit. Once they have all finished (or
//! after [`SHUTDOWN_GRACE`]), the last batch is committed and only then is the component link
//! told to write what is queued and close its stream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Config, EmailConfig, SmsConfig};
use crate::core::email::{answer_for_recipients, EmailSettings, InboundMail, SmtpAnswer};
use crate::core::sms::{SmsSettings, WebhookAnswer};
use crate::core::{Action, Core, Event, Settings};
use crate::delivery::{self, Courier, Failure, Pace};
use crate::email::outbound::{Relay, RelayConfig};
use crate::email::sender::EmailCourier;
use crate::email::smtp::{self, Envelope, Reply, SmtpConfig, SmtpHandler};
use crate::email::{auth, extract};
use crate::metrics::{Inbound, RoutedTo};
use crate::sms::kannel::{Kannel, KannelConfig};
use crate::sms::sender::SmsCourier;
use crate::sms::webhook::{self, WebhookConfig, WebhookHandler, WebhookRefusal};
use crate::sms::{DeliveryReport, IncomingSms};
use crate::store::{Store, Transaction, Tx};
use crate::xmpp::link::{run_link, LinkConfig, LinkEvent, OutboundQueue};

/// The most events handled under one flush.
const BATCH: usize = 512;

/// How long shutdown waits for the listeners and senders to finish the work in progress.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long shutdown waits for the component link to write what is queued and close.
const LINK_CLOSE_GRACE: Duration = Duration::from_secs(5);

pub use crate::clock::now;

/// One thing for the core to handle, with where to send the SMTP answer if it is a reply.
struct Input {
    event: Event,
    answer: Option<Responder>,
}

/// Who waits for the outcome of an input: an SMTP client or the SMS provider's webhook call.
enum Responder {
    Mail(oneshot::Sender<SmtpAnswer>),
    Webhook(oneshot::Sender<WebhookAnswer>),
}

/// The core's settings from the configuration file.
pub fn core_settings(config: &Config) -> Settings {
    Settings {
        domain: config.component.domain.clone(),
        allowed_domains: config.users.allowed_domains.clone(),
        grace_delay_secs: config.routing.grace_delay_secs,
        email: config.email.as_ref().map(|e| EmailSettings {
            from_address: e.from_address.clone(),
            from_name: e.from_name.clone(),
            reply_domain: e.reply_domain.clone(),
            digest_window_secs: e.digest_window_secs,
            alias_idle_secs: e.alias_idle_days * 86_400,
        }),
        sms: config.sms.as_ref().map(|s| SmsSettings {
            max_segments: s.max_segments,
            daily_cap: s.daily_cap,
            allowed_prefixes: s.allowed_prefixes.clone(),
        }),
        limits: config.limits.to_limits(),
        integrated_hosts: config
            .integrated
            .as_ref()
            .map(|i| i.hosts.clone())
            .unwrap_or_default(),
    }
}

/// Runs Reach until `shutdown` turns true, then stops gracefully (see the module comment).
pub async fn run(config: Config, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let location = config.store.location().clone();
    let instance = config.store.instance().to_owned();
    let store =
        Arc::new(tokio::task::spawn_blocking(move || Store::open_at(&location, &instance)).await??);
    blocking(&store, |s| s.register_instance(now())).await?;
    tracing::info!(
        engine = store.engine_name(),
        instance = store.instance(),
        "store open"
    );
    let core = Arc::new(Core::new(core_settings(&config)));
    let (inputs_tx, mut inputs) = mpsc::channel::<Input>(4096);
    // Everything that takes new work or sends; all of it stops when `shutdown` turns true.
    let mut tasks = Vec::new();

    if let Some(metrics) = &config.metrics {
        let listener = tokio::net::TcpListener::bind(&metrics.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {}: {e}", metrics.listen))?;
        tracing::info!(listen = %metrics.listen, "metrics endpoint ready");
        tasks.push(tokio::spawn(crate::metrics::serve(
            listener,
            store.clone(),
            shutdown.clone(),
        )));
    }

    // The component link, and its events turned into core inputs.
    let link_config = LinkConfig {
        server: config.component.server.clone(),
        domain: config.component.domain.clone(),
        secret: config.secret().expose().to_owned(),
        ping_to: config.component.ping_to().to_owned(),
        idle_ping: config.component.idle_ping(),
        ping_timeout: config.component.ping_timeout(),
        max_stanza_depth: config.limits.to_limits().max_depth,
    };
    // The link has its own stop signal: it closes only after the last batch is committed.
    let (link_stop, link_shutdown) = watch::channel(false);
    let (link_tx, mut link_events) = mpsc::channel::<LinkEvent>(4096);
    let link_task = tokio::spawn(run_link(
        link_config,
        store.clone() as Arc<dyn OutboundQueue>,
        link_tx,
        link_shutdown,
    ));
    let forward = inputs_tx.clone();
    let link_store = store.clone();
    // Whether the link is up, for the instance watch to keep the record right.
    let link_is_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let link_state = link_is_up.clone();
    let link_forwarder = tokio::spawn(async move {
        let metrics = crate::metrics::global();
        while let Some(event) = link_events.recv().await {
            let event = match event {
                LinkEvent::Up => {
                    metrics.link_established();
                    link_state.store(true, std::sync::atomic::Ordering::SeqCst);
                    // With another instance's link up all along, the presence it received is
                    // current: nothing to learn again.
                    let elsewhere = blocking(&link_store, |s| {
                        s.set_link_up(true)?;
                        s.links_up_elsewhere()
                    })
                    .await;
                    match elsewhere {
                        Ok(true) => {
                            tracing::info!(
                                "another instance's link is up: the users' presence is current"
                            );
                            continue;
                        }
                        Ok(false) => Event::LinkUp,
                        Err(e) => {
                            tracing::error!("cannot record the link's state: {e}");
                            Event::LinkUp
                        }
                    }
                }
                LinkEvent::Down => {
                    metrics.link_lost();
                    link_state.store(false, std::sync::atomic::Ordering::SeqCst);
                    if let Err(e) = blocking(&link_store, |s| s.set_link_up(false)).await {
                        tracing::error!("cannot record the link's state: {e}");
                    }
                    continue;
                }
                LinkEvent::Stanza(stanza) => Event::Stanza(stanza.into()),
            };
            if forward
                .send(Input {
                    event,
                    answer: None,
                })
                .await
                .is_err()
            {
                break;
            }
        }
        metrics.link_lost();
    });

    if let Some(email) = &config.email {
        start_email(email, &core, &store, &inputs_tx, &shutdown, &mut tasks).await?;
    }
    if let Some(sms) = &config.sms {
        if sms.allowed_prefixes.is_empty() {
            tracing::warn!("{}", crate::config::ALL_COUNTRIES_WARNING.trim_start());
        }
        start_sms(sms, &store, &inputs_tx, &shutdown, &mut tasks).await?;
    }
    // Always: besides forwards, the clock delivers held messages a page at a time and walks
    // the users after a reconnect, which XMPP-only installations need too.
    start_clock(&inputs_tx, &shutdown, &mut tasks);
    drop(inputs_tx);
    tracing::info!(domain = %config.component.domain, email = config.email.is_some(), "Reach started");

    start_instance_watch(&store, link_is_up, &shutdown, &mut tasks);

    // Dead letters the admin asked to re-drive (`reach dead-letters redrive`) go first.
    let redriven: Vec<Input> = blocking(&store, |s| s.take_redrives())
        .await?
        .iter()
        .filter_map(|letter| {
            let event = crate::core::dead_letter::revive(letter);
            if event.is_none() {
                tracing::warn!(
                    kind = letter.kind.as_str(),
                    "a dead letter cannot be read; dropped"
                );
            }
            event
        })
        .map(|event| Input {
            event,
            answer: None,
        })
        .collect();
    if !redriven.is_empty() {
        tracing::info!(
            count = redriven.len(),
            "handling dead letters again, as asked"
        );
        commit_batch(&core, &store, &shutdown, redriven).await?;
    }

    let mut stop = shutdown.clone();
    loop {
        let mut batch = Vec::new();
        tokio::select! {
            received = inputs.recv_many(&mut batch, BATCH) => {
                if received == 0 {
                    break;
                }
            }
            _ = stop_requested(&mut stop) => break,
        }
        commit_batch(&core, &store, &shutdown, batch).await?;
    }

    // Shutdown, step 1: the listeners and senders finish what they are doing; what they hand
    // over meanwhile is still handled and committed (and only then acknowledged).
    tracing::info!("shutting down: finishing the work in progress");
    let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
    let finished = futures::future::join_all(tasks);
    tokio::pin!(finished);
    let deadline = tokio::time::sleep(SHUTDOWN_GRACE);
    tokio::pin!(deadline);
    loop {
        let mut batch = Vec::new();
        let mut last = false;
        tokio::select! {
            received = inputs.recv_many(&mut batch, BATCH) => {
                if received == 0 {
                    break;
                }
            }
            _ = &mut finished => {
                // Nothing more comes from them: take what they handed over, then stop.
                while let Ok(input) = inputs.try_recv() {
                    batch.push(input);
                }
                last = true;
            }
            _ = &mut deadline => {
                tracing::warn!(
                    grace_secs = SHUTDOWN_GRACE.as_secs(),
                    "work still in progress after the shutdown grace period; abandoning it \
                     (it was not acknowledged, and queued sends stay queued)"
                );
                for abort in &aborts {
                    abort.abort();
                }
                break;
            }
        }
        if !batch.is_empty() {
            commit_batch(&core, &store, &shutdown, batch).await?;
        }
        if last {
            break;
        }
    }

    // Step 2: the link writes what is queued and closes its stream.
    let _ = link_stop.send(true);
    let mut link_task = link_task;
    if tokio::time::timeout(LINK_CLOSE_GRACE, &mut link_task)
        .await
        .is_err()
    {
        tracing::warn!("the component link did not close in time");
        link_task.abort();
    }
    // Step 3: stanzas the link read before closing are handled too (their answers wait in the
    // outbox for the next start); the forwarder ends once the link is gone.
    let _ = tokio::time::timeout(Duration::from_secs(1), link_forwarder).await;
    let mut last = Vec::new();
    while let Ok(input) = inputs.try_recv() {
        last.push(input);
    }
    if !last.is_empty() {
        commit_batch(&core, &store, &shutdown, last).await?;
    }
    drop(inputs);
    if let Err(e) = blocking(&store, |s| s.set_link_up(false)).await {
        tracing::warn!("cannot record the link's state: {e}");
    }
    tracing::info!("Reach stopped");
    Ok(())
}

/// Resolves once shutdown is asked for (the value is true, or the sender is gone).
async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// Handles one batch off the async threads and commits it.
async fn commit_batch(
    core: &Arc<Core>,
    store: &Arc<Store>,
    shutdown: &watch::Receiver<bool>,
    batch: Vec<Input>,
) -> anyhow::Result<()> {
    let (core, store, stop) = (core.clone(), store.clone(), shutdown.clone());
    tokio::task::spawn_blocking(move || handle_batch(&core, &store, &stop, batch)).await?;
    Ok(())
}

/// Runs `f` with the store on a blocking thread (the store's engine may be a database).
async fn blocking<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(&Store) -> crate::store::Result<T> + Send + 'static,
) -> crate::store::Result<T> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .unwrap_or_else(|e| Err(crate::store::StoreError::Engine(e.to_string())))
}

/// Counts the messages an action carries out (see `crate::metrics::RoutedTo`).
fn count_routed(domain: &str, action: &Action) {
    let metrics = crate::metrics::global();
    match action {
        // Messages with a text relayed between users and buddies (not the service's own chat).
        Action::SendStanza(stanza)
            if stanza.name() == "message"
                && stanza.attr("type") != Some("error")
                && stanza.attr("from") != Some(domain)
                && stanza.children().any(|c| c.name() == "body") =>
        {
            metrics.routed(RoutedTo::Xmpp, 1);
        }
        // Forwards (verification mails and texts carry no conversation).
        Action::SendEmail(job) if job.peer.is_some() => {
            metrics.routed(RoutedTo::Email, job.items.len() as u64);
        }
        Action::SendSms(job) if job.peer.is_some() => {
            metrics.routed(RoutedTo::Sms, job.items.len() as u64);
        }
        Action::Held => metrics.routed(RoutedTo::Held, 1),
        _ => {}
    }
}

/// How many times a batch is run again when another instance changed the same data at the
/// same time (each time it meets the other's data, so it rarely takes a second).
const CONFLICT_RETRIES: u32 = 5;
/// How often a batch waiting for a store that cannot be reached says so in the log.
const OUTAGE_REMINDER: Duration = Duration::from_secs(30);

/// Handles a batch of inputs in as few transactions as possible (one, unless another instance
/// holds a user this batch needs: then the batch so far is committed and the rest goes on in a
/// new transaction), and answers each input after the commit that holds it.
fn handle_batch(core: &Core, store: &Store, stop: &watch::Receiver<bool>, batch: Vec<Input>) {
    let now = now();
    let mut queue = std::collections::VecDeque::from(batch);
    for input in queue.iter_mut() {
        crate::core::clean_event(&mut input.event);
    }
    // A forward that fell due at once ([`Action::TickSoon`]) goes out with this batch: one clock
    // tick is added at its end (what that tick makes due waits for the clock).
    let mut tick_added = false;
    let mut conflicts = 0;
    let mut outage = Outage::new(stop);
    while !queue.is_empty() {
        let mut tx = match store.begin() {
            Ok(tx) => tx,
            Err(crate::store::StoreError::Unavailable(why)) if outage.wait(&why) => continue,
            Err(e) => {
                tracing::error!("cannot begin a transaction; the batch is not acknowledged: {e}");
                answer(queue.into_iter().map(|i| (i, Said::Temporary)), false);
                return;
            }
        };
        let mut handled: Vec<(Input, Said)> = Vec::new();
        let mut start_over = None;
        while let Some(input) = queue.pop_front() {
            tx.savepoint();
            let said = match guarded(core, &mut tx, now, &input.event) {
                Handled::Done(carried) => {
                    if carried.tick_soon && !tick_added {
                        tick_added = true;
                        queue.push_back(Input {
                            event: Event::Tick,
                            answer: None,
                        });
                    }
                    Said::Answer(carried.mail, carried.webhook)
                }
                Handled::Busy if !handled.is_empty() => {
                    // Another instance holds a user it needs: commit what is done, then take
                    // it first in a new transaction (where it may wait for that user).
                    tx.rollback_to_savepoint();
                    queue.push_front(input);
                    break;
                }
                Handled::Conflict => {
                    queue.push_front(input);
                    start_over = Some(crate::store::StoreError::Conflict);
                    break;
                }
                Handled::Unavailable => {
                    queue.push_front(input);
                    start_over = Some(crate::store::StoreError::Unavailable(
                        "while handling an event".to_owned(),
                    ));
                    break;
                }
                Handled::Busy | Handled::Failed => {
                    tx.rollback_to_savepoint();
                    Said::Temporary
                }
                Handled::Bug(reason) => {
                    tx.rollback_to_savepoint();
                    set_aside(&mut tx, now, &input.event, &reason)
                }
            };
            handled.push((input, said));
        }
        let committed = match start_over {
            Some(e) => {
                drop(tx);
                Err(e)
            }
            None => tx.commit(),
        };
        let unavailable = match &committed {
            Err(crate::store::StoreError::Unavailable(why)) => Some(why.clone()),
            _ => None,
        };
        match committed {
            Ok(()) => {
                outage.over();
                answer(handled.into_iter(), true)
            }
            Err(_) if unavailable.as_deref().is_some_and(|why| outage.wait(why)) => {
                // Nothing of it was acknowledged: all of it again once the store is back.
                for (input, _) in handled.into_iter().rev() {
                    queue.push_front(input);
                }
            }
            Err(e) if e.is_retryable() && conflicts < CONFLICT_RETRIES => {
                // Another instance committed the same data first: run these again (they see
                // it now). Nothing of them was acknowledged.
                conflicts += 1;
                tracing::debug!(
                    conflicts,
                    "a batch met another instance's writes; running it again"
                );
                for (input, _) in handled.into_iter().rev() {
                    queue.push_front(input);
                }
            }
            Err(e) => {
                tracing::error!(
                    "store commit failed; nothing of this batch is sent or acknowledged: {e}"
                );
                answer(handled.into_iter(), false);
            }
        }
    }
}

/// A store that cannot be reached (a database restarting or failing over), waited for with
/// backoff for as long as it takes, unless Reach is asked to stop: nothing of the batch was
/// acknowledged, and meanwhile new inputs wait in the runtime's queue (the SMTP clients and the
/// SMS gateway time out and try again later, as they would with Reach down).
struct Outage<'a> {
    stop: &'a watch::Receiver<bool>,
    since: Option<std::time::Instant>,
    reminded: Option<std::time::Instant>,
    pause: Duration,
}

impl<'a> Outage<'a> {
    fn new(stop: &'a watch::Receiver<bool>) -> Outage<'a> {
        Outage {
            stop,
            since: None,
            reminded: None,
            pause: Duration::ZERO,
        }
    }

    /// Waits a moment; false if Reach is stopping (the batch then gives up).
    fn wait(&mut self, why: &str) -> bool {
        let now = std::time::Instant::now();
        let since = *self.since.get_or_insert_with(|| {
            tracing::warn!("the store cannot be reached; the batch waits for it: {why}");
            now
        });
        if *self.stop.borrow() {
            tracing::error!(
                waited_ms = since.elapsed().as_millis() as u64,
                "stopping while the store cannot be reached: the batch is answered with a \
                 temporary failure (its stanzas are lost, as if they had been in flight)"
            );
            return false;
        }
        if self
            .reminded
            .is_none_or(|at| at.elapsed() >= OUTAGE_REMINDER)
        {
            if self.reminded.is_some() {
                tracing::warn!(
                    waited_secs = since.elapsed().as_secs(),
                    "the store still cannot be reached; the batch keeps waiting: {why}"
                );
            }
            self.reminded = Some(now);
        }
        self.pause = (self.pause * 2).clamp(Duration::from_millis(50), Duration::from_secs(2));
        std::thread::sleep(self.pause);
        true
    }

    fn over(&mut self) {
        if let Some(since) = self.since.take() {
            tracing::info!(
                waited_ms = since.elapsed().as_millis() as u64,
                "the store is back; the batch went through"
            );
        }
        self.reminded = None;
        self.pause = Duration::ZERO;
    }
}

/// Tells each waiting SMTP client or webhook call what became of its input (after the commit;
/// `committed` false: everything is a temporary failure).
fn answer(handled: impl Iterator<Item = (Input, Said)>, committed: bool) {
    for (input, said) in handled {
        let Some(responder) = input.answer else {
            continue;
        };
        let (mail_said, webhook_said) = match said {
            Said::Answer(mail, webhook) if committed => (mail, webhook),
            Said::Answer(..) | Said::Temporary => (None, None),
        };
        match responder {
            Responder::Mail(tx) => {
                let _ = tx.send(mail_said.unwrap_or_else(temporary_failure));
            }
            Responder::Webhook(tx) => {
                let _ =
                    tx.send(webhook_said.unwrap_or_else(|| {
                        WebhookAnswer::Temporary("temporary failure".to_owned())
                    }));
            }
        }
    }
}

/// What one event came to in [`handle_batch`].
enum Handled {
    /// Its actions are queued.
    Done(Carried),
    /// The store failed: nothing of it is acknowledged, and the sender may retry.
    Failed,
    /// Another instance holds a user it needs while this transaction holds others.
    Busy,
    /// Another instance changed the same data: the whole transaction runs again.
    Conflict,
    /// The store cannot be reached: the whole transaction runs again once it is back.
    Unavailable,
    /// A bug (a panic, or a stanza that cannot be written): it is set aside, never retried.
    Bug(String),
}

/// What the actions of one handled event asked of the rest of the batch.
#[derive(Default)]
struct Carried {
    mail: Option<SmtpAnswer>,
    webhook: Option<WebhookAnswer>,
    tick_soon: bool,
}

/// What the waiting SMTP client or webhook call hears once the batch is committed.
enum Said {
    Answer(Option<SmtpAnswer>, Option<WebhookAnswer>),
    Temporary,
}

/// Handles one event and queues its actions in `tx`, with every step guarded: a panic anywhere
/// in the core or in queueing, and a stanza that cannot be written as XML, cost this event
/// only (the caller rolls its writes back). The stanzas are checked before anything is queued.
fn guarded(core: &Core, tx: &mut Tx<'_>, now: u64, event: &Event) -> Handled {
    use crate::store::StoreError;
    let failed = |e: StoreError| match e {
        StoreError::Busy => Handled::Busy,
        StoreError::Conflict => Handled::Conflict,
        StoreError::Unavailable(_) => Handled::Unavailable,
        e => {
            tracing::error!("store failure while handling an event: {e}");
            Handled::Failed
        }
    };
    if let Some(fingerprint) = crate::core::dead_letter::resend_fingerprint(event) {
        match tx.dead_letter_by_fingerprint(&fingerprint) {
            Ok(Some(id)) => {
                tracing::debug!(id, "a resend of a dead letter; refused again");
                return Handled::Bug(String::new());
            }
            Ok(None) => {}
            Err(e) => return failed(e),
        }
    }
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let actions = match core.handle_cleaned(tx, now, event) {
            Ok(actions) => actions,
            Err(StoreError::Unwritable(e)) => {
                return Handled::Bug(format!("a stanza to keep cannot be written as XML: {e}"));
            }
            Err(e @ StoreError::KeyTooLong { .. }) => {
                return Handled::Bug(format!("a record cannot be stored: {e}"));
            }
            Err(e) => return failed(e),
        };
        for action in &actions {
            if let Action::SendStanza(stanza) = action {
                if let Err(e) = crate::xmpp::xml_text::check(stanza) {
                    return Handled::Bug(format!("an answer cannot be written as XML: {e}"));
                }
            }
        }
        let mut carried = Carried::default();
        for action in actions {
            count_routed(&core.settings().domain, &action);
            let queued = match action {
                Action::SendStanza(stanza) => tx.enqueue_stanza(&stanza),
                Action::SendEmail(job) => tx.enqueue_email(&job).map(|_| ()),
                Action::SendSms(job) => tx.enqueue_sms(&job).map(|_| ()),
                Action::AnswerMail(answer) => {
                    carried.mail = Some(answer);
                    Ok(())
                }
                Action::AnswerWebhook(answer) => {
                    carried.webhook = Some(answer);
                    Ok(())
                }
                Action::TickSoon => {
                    carried.tick_soon = true;
                    Ok(())
                }
                Action::Held => Ok(()),
            };
            if let Err(e) = queued {
                tracing::error!("could not queue an outbound item: {e}");
                return Handled::Failed;
            }
        }
        Handled::Done(carried)
    }));
    outcome.unwrap_or_else(|panic| Handled::Bug(format!("{PANICKED}: {}", panic_message(&*panic))))
}

/// The start of a dead letter's reason when the core panicked; what follows is the panic's
/// message, which may quote the input, so the log shows only this part above `debug`.
const PANICKED: &str = "the core panicked";

/// A panic's message, from its payload (what `panic!` was given), or "unknown panic".
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

/// What of a reason may be logged above `debug`: a panic's message may quote the input.
fn loggable(reason: &str) -> &str {
    if reason.starts_with(PANICKED) {
        PANICKED
    } else {
        reason
    }
}

/// Sets a failed event aside as a dead letter (see [`crate::core::dead_letter`]), queues the
/// refusal a stanza's sender gets, and says what a waiting SMTP client or webhook call hears.
/// An empty `reason` is a resend of a dead letter: only refused again.
fn set_aside(tx: &mut Tx<'_>, now: u64, event: &Event, reason: &str) -> Said {
    use crate::core::dead_letter;
    if !reason.is_empty() {
        match dead_letter::set_aside(event, now, reason) {
            Some(letter) => match tx.put_dead_letter(&letter) {
                Ok(id) => {
                    tracing::error!(
                        id,
                        kind = letter.kind.as_str(),
                        reason = loggable(reason),
                        "an input could not be handled; it is set aside as a dead letter \
                         (`reach dead-letters` lists it)"
                    );
                    tracing::debug!(id, reason, "why it was set aside");
                }
                Err(e) => {
                    tracing::error!("could not set a failed input aside: {e}");
                    return Said::Temporary;
                }
            },
            None => {
                log_internal_failure(reason);
                return Said::Temporary;
            }
        }
        if let Some(refusal) = dead_letter::stanza_refusal(event) {
            if let Err(e) = tx.enqueue_stanza(&refusal) {
                tracing::error!("could not queue the refusal of a dead letter: {e}");
            }
        }
    }
    Said::Answer(
        Some(dead_letter::mail_refusal()),
        Some(dead_letter::webhook_refusal()),
    )
}

/// Logs a failure on an internal event (a tick, a sender's report) once per distinct reason, so
/// that a bug met on every tick does not flood the log.
fn log_internal_failure(reason: &str) {
    static LAST: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    if *last != reason {
        tracing::error!(
            reason = loggable(reason),
            "an internal event could not be handled; the next one goes on"
        );
        tracing::debug!(reason, "why");
        reason.clone_into(&mut last);
    }
}

fn temporary_failure() -> SmtpAnswer {
    SmtpAnswer {
        code: 451,
        enhanced: "4.3.0",
        text: "temporary failure, try again later".to_owned(),
    }
}

async fn start_email(
    email: &EmailConfig,
    core: &Arc<Core>,
    store: &Arc<Store>,
    inputs: &mpsc::Sender<Input>,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<()> {
    // Outbound: the relay and the sender draining the durable email queue.
    let (host, port, security) = RelayConfig::from_url(&email.relay)?;
    let relay = Relay::new(&RelayConfig {
        host,
        port,
        security,
        username: email.relay_username.clone(),
        password: email.relay_password().map(|p| p.expose().to_owned()),
        hello_name: email.hostname().to_owned(),
        timeout: Duration::from_secs(30),
        connections: email.connections,
    })?;
    let pace = Pace {
        concurrency: email.connections,
        per_second: None,
    };
    start_delivery(
        store,
        EmailCourier::new(relay),
        pace,
        inputs,
        shutdown,
        tasks,
        |failure| Event::EmailFailed {
            seq: failure.seq,
            job: Box::new(failure.job),
            reason: failure.reason,
        },
    );

    // Inbound: Reach's own SMTP listener.
    let tls = match (&email.tls_cert, &email.tls_key) {
        (Some(cert), Some(key)) => Some(smtp::load_tls(cert, key)?),
        _ => None,
    };
    let listener = tokio::net::TcpListener::bind(&email.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for SMTP on {}: {e}", email.listen))?;
    tracing::info!(listen = %email.listen, "SMTP listener ready");
    let smtp_config = SmtpConfig {
        hostname: email.hostname().to_owned(),
        max_message_bytes: email.max_message_bytes,
        max_connections: email.max_connections,
        max_connections_per_ip: email.max_connections_per_ip,
        max_recipients: 10,
        command_timeout: Duration::from_secs(email.command_timeout_secs),
        idle_timeout: Duration::from_secs(email.idle_timeout_secs),
        transaction_timeout: Duration::from_secs(email.transaction_timeout_secs),
        data_timeout: Duration::from_secs(email.data_timeout_secs),
        data_min_bytes_per_second: email.data_min_bytes_per_sec,
        tls,
    };
    let authenticator = if email.require_dmarc {
        Some(auth::Authenticator::system()?)
    } else {
        None
    };
    let handler = Arc::new(ReplyHandler {
        core: core.clone(),
        store: store.clone(),
        inputs: inputs.clone(),
        authenticator,
    });
    tasks.push(tokio::spawn(smtp::serve(
        listener,
        smtp_config,
        handler,
        shutdown.clone(),
    )));
    Ok(())
}

/// A durable queue's courier, and the jobs it gives up on turned into core events (the core
/// tells the buddies and keeps their messages for XMPP).
fn start_delivery<C: Courier + 'static>(
    store: &Arc<Store>,
    courier: C,
    pace: Pace,
    inputs: &mpsc::Sender<Input>,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
    to_event: fn(Failure<C::Job>) -> Event,
) where
    C::Job: 'static,
{
    let (failed_tx, mut failed) = mpsc::channel(256);
    tasks.push(tokio::spawn(delivery::run(
        store.clone(),
        courier,
        pace,
        failed_tx,
        shutdown.clone(),
    )));
    let forward = inputs.clone();
    tasks.push(tokio::spawn(async move {
        while let Some(failure) = failed.recv().await {
            let input = Input {
                event: to_event(failure),
                answer: None,
            };
            if forward.send(input).await.is_err() {
                break;
            }
        }
    }));
}

/// How often an instance looks for instances that are gone, to take over their outbox and
/// their claims.
const INSTANCE_WATCH: Duration = Duration::from_secs(5);

/// Keeps this instance's record right (its link's state: a second process that was refused the
/// same name wrote over it) and takes over what stopped instances, or instances cut off from the
/// server, left (at once, then every [`INSTANCE_WATCH`]).
fn start_instance_watch(
    store: &Arc<Store>,
    link_is_up: Arc<std::sync::atomic::AtomicBool>,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) {
    let store = store.clone();
    let mut stop = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        let mut interval = tokio::time::interval(INSTANCE_WATCH);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = stop_requested(&mut stop) => break,
            }
            let up = link_is_up.load(std::sync::atomic::Ordering::SeqCst);
            if let Err(e) = blocking(&store, move |s| s.set_link_up(up)).await {
                tracing::error!("cannot record the link's state: {e}");
            }
            match blocking(&store, |s| s.adopt_gone_instances(now())).await {
                Ok(adopted) if !adopted.is_empty() => store.wake_outbox(),
                Ok(_) => {}
                Err(e) => tracing::error!("cannot look for stopped instances: {e}"),
            }
        }
    }));
}

/// The clock: forwards whose digest window or grace delay is over fall due every second.
fn start_clock(
    inputs: &mpsc::Sender<Input>,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) {
    let ticks = inputs.clone();
    let mut stop = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = stop_requested(&mut stop) => break,
            }
            if ticks
                .send(Input {
                    event: Event::Tick,
                    answer: None,
                })
                .await
                .is_err()
            {
                break;
            }
        }
    }));
}

/// SMS: the provider draining the durable SMS queue, and the webhook the provider calls.
async fn start_sms(
    sms: &SmsConfig,
    store: &Arc<Store>,
    inputs: &mpsc::Sender<Input>,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> anyhow::Result<()> {
    let secret = sms.webhook_secret().expose().to_owned();
    let dlr_url = sms.delivery_reports.then(|| {
        format!(
            "{}/sms/dlr?secret={}",
            sms.webhook_url.trim_end_matches('/'),
            percent_encoding::utf8_percent_encode(&secret, percent_encoding::NON_ALPHANUMERIC)
        )
    });
    let provider = Kannel::new(KannelConfig {
        sendsms_url: sms.sendsms_url.clone(),
        username: sms.username.clone(),
        password: sms.password().expose().to_owned(),
        from: sms.from.clone(),
        dlr_url,
        timeout: Duration::from_secs(20),
    })?;
    let pace = Pace {
        concurrency: sms.concurrency,
        per_second: Some(sms.rate_per_second),
    };
    start_delivery(
        store,
        SmsCourier::new(provider),
        pace,
        inputs,
        shutdown,
        tasks,
        |failure| Event::SmsFailed {
            seq: failure.seq,
            job: Box::new(failure.job),
            reason: failure.reason,
        },
    );
    let listener = tokio::net::TcpListener::bind(&sms.webhook_listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen for the SMS webhook on {}: {e}",
                sms.webhook_listen
            )
        })?;
    tracing::info!(listen = %sms.webhook_listen, "SMS webhook ready");
    let handler = Arc::new(WebhookInputs {
        inputs: inputs.clone(),
    });
    let config = WebhookConfig {
        secret,
        max_body_bytes: 64 * 1024,
    };
    tasks.push(tokio::spawn(webhook::serve(
        listener,
        config,
        handler,
        shutdown.clone(),
    )));
    Ok(())
}

/// The webhook's view of Reach: every call becomes a core input, answered after its commit.
struct WebhookInputs {
    inputs: mpsc::Sender<Input>,
}

impl WebhookInputs {
    async fn submit(&self, event: Event) -> Result<(), WebhookRefusal> {
        let (tx, rx) = oneshot::channel();
        let input = Input {
            event,
            answer: Some(Responder::Webhook(tx)),
        };
        if self.inputs.send(input).await.is_err() {
            return Err(WebhookRefusal::Temporary("shutting down".to_owned()));
        }
        match rx.await {
            Ok(WebhookAnswer::Accepted) => Ok(()),
            Ok(WebhookAnswer::Temporary(why)) => Err(WebhookRefusal::Temporary(why)),
            Ok(WebhookAnswer::Rejected(why)) => Err(WebhookRefusal::Rejected(why)),
            Err(_) => Err(WebhookRefusal::Temporary("shutting down".to_owned())),
        }
    }
}

impl WebhookHandler for WebhookInputs {
    async fn incoming(&self, sms: IncomingSms) -> Result<(), WebhookRefusal> {
        self.submit(Event::SmsReceived(sms)).await
    }

    async fn delivery_report(&self, report: DeliveryReport) -> Result<(), WebhookRefusal> {
        self.submit(Event::SmsDelivery(report)).await
    }
}

/// The SMTP listener's view of Reach: aliases are checked by the core, accepted replies go
/// through the core and are answered only after the batch holding them is committed.
struct ReplyHandler {
    core: Arc<Core>,
    store: Arc<Store>,
    inputs: mpsc::Sender<Input>,
    authenticator: Option<auth::Authenticator>,
}

fn reply_of(answer: SmtpAnswer) -> Reply {
    Reply::new(answer.code, answer.enhanced, answer.text)
}

impl SmtpHandler for ReplyHandler {
    async fn check_recipient(&self, envelope: &Envelope, rcpt: &str) -> Reply {
        let core = self.core.clone();
        let (mail_from, rcpt) = (envelope.mail_from.clone(), rcpt.to_owned());
        let checked = blocking(&self.store, move |store| {
            store.read(|tx| core.check_mail_recipient(tx, now(), &mail_from, &rcpt))
        })
        .await;
        let reply = match checked {
            Ok(answer) => reply_of(answer),
            Err(e) => {
                tracing::error!("store failure while checking a recipient: {e}");
                reply_of(temporary_failure())
            }
        };
        if !reply.is_positive() {
            crate::metrics::global().inbound_email(Inbound::of_smtp_code(reply.code));
        }
        reply
    }

    async fn deliver(&self, envelope: Envelope, message: Vec<u8>) -> Reply {
        let reply = self.deliver_reply(envelope, message).await;
        crate::metrics::global().inbound_email(Inbound::of_smtp_code(reply.code));
        reply
    }
}

impl ReplyHandler {
    async fn deliver_reply(&self, envelope: Envelope, message: Vec<u8>) -> Reply {
        let reply = match extract::parse_reply(&message) {
            Ok(reply) => reply,
            Err(e) => return Reply::new(550, "5.6.0", e.to_string()),
        };
        if let Some(authenticator) = &self.authenticator {
            if !envelope.mail_from.is_empty() {
                match authenticator
                    .dmarc_passes(
                        &message,
                        peer_ip(envelope.peer),
                        &envelope.helo,
                        &envelope.mail_from,
                    )
                    .await
                {
                    auth::DmarcOutcome::Pass => {}
                    auth::DmarcOutcome::TempError(why) => {
                        return Reply::new(
                            451,
                            "4.7.0",
                            format!("DMARC check could not complete: {why}"),
                        )
                    }
                    auth::DmarcOutcome::Fail(why) => {
                        return Reply::new(550, "5.7.1", format!("DMARC check failed: {why}"))
                    }
                    auth::DmarcOutcome::NoPolicy => {
                        return Reply::new(
                            550,
                            "5.7.1",
                            "the sender's domain publishes no DMARC policy",
                        )
                    }
                }
            }
        }
        // Every recipient's copy goes through the core as its own event (its own conversation),
        // all submitted at once so that they usually share one commit; the one reply to DATA is
        // decided from all their answers (see `answer_for_recipients`).
        let mut waiting = Vec::with_capacity(envelope.rcpt_to.len());
        for rcpt in &envelope.rcpt_to {
            let (tx, rx) = oneshot::channel();
            let mail = InboundMail {
                envelope_from: envelope.mail_from.clone(),
                rcpt: rcpt.clone(),
                reply: reply.clone(),
            };
            let input = Input {
                event: Event::EmailReply(mail),
                answer: Some(Responder::Mail(tx)),
            };
            if self.inputs.send(input).await.is_err() {
                // Shutting down: what was submitted may still be taken; a resend is de-duplicated.
                return reply_of(temporary_failure());
            }
            waiting.push((rcpt.clone(), rx));
        }
        let mut answers = Vec::with_capacity(waiting.len());
        for (rcpt, rx) in waiting {
            answers.push((rcpt, rx.await.unwrap_or_else(|_| temporary_failure())));
        }
        reply_of(answer_for_recipients(&answers))
    }
}

fn peer_ip(peer: SocketAddr) -> std::net::IpAddr {
    peer.ip()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testing::{register_form, Harness, D};
    #[allow(unused_imports)]
    use crate::core::Transaction;
    use crate::store::Terminal;

    const ALICE: &str = "alice@example.org";
    const PHONE: &str = "+15551234567";

    /// Alice with a verified phone, in conversation with Bob.
    fn alice_texting_bob() -> Harness {
        let t = Harness::new();
        t.run(&register_form(ALICE, "alice", "", PHONE));
        let mut user = t.store.tx().user(ALICE).unwrap().unwrap();
        user.phone = Some(Terminal {
            verified: true,
            ..Terminal::unverified(user.phone.unwrap().address)
        });
        t.store.tx().put_user(&user).unwrap();
        t.run(&format!(
            "<message type='chat' id='m1' from='bob@example.net/pc' to='alice@{D}'>\
             <body>hi</body></message>"
        ));
        t.advance(60);
        t.actions(Event::Tick);
        t
    }

    fn sms(text: &str, id: &str) -> Event {
        Event::SmsReceived(IncomingSms {
            from: PHONE.into(),
            to: "+15550000000".into(),
            text: text.into(),
            provider_id: Some(id.into()),
        })
    }

    fn outbox_len(store: &Store) -> usize {
        store.stats().unwrap().outbox
    }

    #[test]
    fn an_answer_that_cannot_be_written_is_set_aside_and_its_resend_refused_unhandled() {
        let t = alice_texting_bob();
        let before = outbox_len(&t.store);
        // Uncleaned (as if a door forgot the cleaning): the relayed stanza cannot be written.
        let event = sms("yes\u{1} I am", "k1");
        let Handled::Bug(reason) = guarded(&t.core, &mut t.store.tx(), t.now.get(), &event) else {
            panic!("expected the event to be set aside");
        };
        assert!(reason.contains("U+0001"), "{reason}");
        assert_eq!(outbox_len(&t.store), before, "nothing of it is queued");
        let Said::Answer(_, Some(webhook)) =
            set_aside(&mut t.store.tx(), t.now.get(), &event, &reason)
        else {
            panic!("a webhook answer");
        };
        assert!(matches!(webhook, WebhookAnswer::Rejected(_)));
        let letters = t.store.dead_letters().unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].1.kind, "sms");
        assert!(
            !letters[0].1.reason.contains("yes"),
            "no message text in the reason"
        );
        // Kannel retries: the same SMS is refused at once, without being handled again.
        assert!(matches!(
            guarded(&t.core, &mut t.store.tx(), t.now.get(), &event),
            Handled::Bug(r) if r.is_empty()
        ));
        assert_eq!(t.store.dead_letters().unwrap().len(), 1);
        // Re-driven, it comes back as the same event.
        assert!(t.store.mark_for_redrive(letters[0].0).unwrap());
        let again = t.store.take_redrives().unwrap();
        assert_eq!(
            format!("{:?}", crate::core::dead_letter::revive(&again[0]).unwrap()),
            format!("{event:?}")
        );
        assert!(t.store.dead_letters().unwrap().is_empty());
    }

    #[test]
    fn the_batch_cleans_the_text_and_accepts_it_after_the_commit() {
        let t = alice_texting_bob();
        let before = outbox_len(&t.store);
        let (tx, mut rx) = oneshot::channel();
        let (_stop, stop) = watch::channel(false);
        handle_batch(
            &t.core,
            &t.store,
            &stop,
            vec![Input {
                event: sms("page one\u{C}page two", "k2"),
                answer: Some(Responder::Webhook(tx)),
            }],
        );
        assert_eq!(rx.try_recv().unwrap(), WebhookAnswer::Accepted);
        assert_eq!(outbox_len(&t.store), before + 1);
        assert!(t.store.dead_letters().unwrap().is_empty());
    }

    #[test]
    fn a_stanza_set_aside_is_answered_with_an_error_to_its_sender() {
        let t = Harness::new();
        let stanza: minidom::Element = format!(
            "<message xmlns='jabber:component:accept' from='bob@example.net/pc' \
             to='alice@{D}' id='x'><body>hi</body></message>"
        )
        .parse()
        .unwrap();
        let event = Event::Stanza(stanza);
        assert!(matches!(
            set_aside(&mut t.store.tx(), 1, &event, "the core panicked: test"),
            Said::Answer(..)
        ));
        assert_eq!(outbox_len(&t.store), 1);
        assert_eq!(t.store.dead_letters().unwrap()[0].1.kind, "stanza");
    }
}
