//! Wires the adapters to the core: inputs from the component link, the SMTP listener and the
//! clock go through the core; its decisions go out through the durable queues.
//!
//! Inputs are handled in batches: every event of a batch goes through the core, its outbound
//! stanzas and emails are queued in the store, then one flush (group commit) makes the whole batch
//! durable before the link and the email sender are woken and before any SMTP client hears 250.
//! A store failure is logged and the next event goes on; nothing of a failed event is
//! acknowledged.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Config, EmailConfig, SmsConfig};
use crate::core::email::{EmailSettings, InboundMail, SmtpAnswer};
use crate::core::sms::{SmsSettings, WebhookAnswer};
use crate::core::{Action, Core, Event, Settings};
use crate::email::outbound::{Relay, RelayConfig};
use crate::email::smtp::{self, Envelope, Reply, SmtpConfig, SmtpHandler};
use crate::email::{auth, extract, sender};
use crate::sms::kannel::{Kannel, KannelConfig};
use crate::sms::sender as sms_sender;
use crate::sms::webhook::{self, WebhookConfig, WebhookHandler, WebhookRefusal};
use crate::sms::{DeliveryReport, IncomingSms};
use crate::store::Store;
use crate::xmpp::link::{run_link, LinkConfig, LinkEvent, OutboundQueue};

/// The most events handled under one flush.
const BATCH: usize = 512;

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

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

/// Runs Reach until `shutdown` turns true.
pub async fn run(config: Config, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let store = Arc::new(Store::open(&config.store.path)?);
    let core = Arc::new(Core::new(Settings {
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
    }));
    let (inputs_tx, mut inputs) = mpsc::channel::<Input>(4096);
    let mut tasks = Vec::new();

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
    let (link_tx, mut link_events) = mpsc::channel::<LinkEvent>(4096);
    tasks.push(tokio::spawn(run_link(
        link_config,
        store.clone() as Arc<dyn OutboundQueue>,
        link_tx,
        shutdown.clone(),
    )));
    let forward = inputs_tx.clone();
    tasks.push(tokio::spawn(async move {
        while let Some(event) = link_events.recv().await {
            let event = match event {
                LinkEvent::Up => Event::LinkUp,
                LinkEvent::Down => continue,
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
    }));

    if let Some(email) = &config.email {
        start_email(email, &core, &store, &inputs_tx, &shutdown, &mut tasks).await?;
    }
    if let Some(sms) = &config.sms {
        start_sms(sms, &store, &inputs_tx, &shutdown, &mut tasks).await?;
    }
    if config.email.is_some() || config.sms.is_some() {
        start_clock(&inputs_tx, &shutdown, &mut tasks);
    }
    drop(inputs_tx);
    tracing::info!(domain = %config.component.domain, email = config.email.is_some(), "Reach started");

    let mut stop = shutdown.clone();
    loop {
        let mut batch = Vec::new();
        tokio::select! {
            received = inputs.recv_many(&mut batch, BATCH) => {
                if received == 0 {
                    break;
                }
            }
            _ = stop.changed() => break,
        }
        let (core, store) = (core.clone(), store.clone());
        tokio::task::spawn_blocking(move || handle_batch(&core, &store, batch)).await?;
    }
    tracing::info!("shutting down");
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    store.flush()?;
    Ok(())
}

fn handle_batch(core: &Core, store: &Store, batch: Vec<Input>) {
    let now = now();
    let mut answers = Vec::new();
    let (mut emails, mut texts) = (false, false);
    for Input { event, answer } in batch {
        let (mut mail_said, mut webhook_said, mut failed) = (None, None, false);
        // A bug must cost one event, not the whole gateway: a panic is logged and the event is
        // answered as a temporary failure, and the batch goes on.
        let handled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            core.handle(store, now, event)
        }))
        .unwrap_or_else(|_| {
            tracing::error!(
                "the core panicked on an event; it is dropped and the next one goes on"
            );
            Err(crate::store::StoreError::Corrupt(
                "internal error while handling an event".to_owned(),
            ))
        });
        match handled {
            Ok(actions) => {
                for action in actions {
                    let queued = match action {
                        Action::SendStanza(stanza) => store.enqueue_stanza(&stanza).map(|_| ()),
                        Action::SendEmail(job) => {
                            emails = true;
                            store.enqueue_email(&job).map(|_| ())
                        }
                        Action::SendSms(job) => {
                            texts = true;
                            store.enqueue_sms(&job).map(|_| ())
                        }
                        Action::AnswerMail(answer) => {
                            mail_said = Some(answer);
                            Ok(())
                        }
                        Action::AnswerWebhook(answer) => {
                            webhook_said = Some(answer);
                            Ok(())
                        }
                    };
                    if let Err(e) = queued {
                        tracing::error!("could not queue an outbound item: {e}");
                        failed = true;
                    }
                }
            }
            Err(e) => {
                tracing::error!("store failure while handling an event: {e}");
                failed = true;
            }
        }
        if let Some(responder) = answer {
            answers.push((
                responder,
                if failed {
                    (None, None)
                } else {
                    (mail_said, webhook_said)
                },
            ));
        }
    }
    let flushed = store.flush();
    if let Err(e) = &flushed {
        tracing::error!("store flush failed; nothing of this batch is sent or acknowledged: {e}");
    }
    for (responder, (mail_said, webhook_said)) in answers {
        match responder {
            Responder::Mail(tx) => {
                let _ = tx.send(
                    mail_said
                        .filter(|_| flushed.is_ok())
                        .unwrap_or_else(temporary_failure),
                );
            }
            Responder::Webhook(tx) => {
                let _ =
                    tx.send(webhook_said.filter(|_| flushed.is_ok()).unwrap_or_else(|| {
                        WebhookAnswer::Temporary("temporary failure".to_owned())
                    }));
            }
        }
    }
    if flushed.is_ok() {
        store.wake_outbox();
        if emails {
            store.wake_email();
        }
        if texts {
            store.wake_sms();
        }
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
    })?;
    let (failed_tx, mut failed) = mpsc::channel(256);
    tasks.push(tokio::spawn(sender::run_sender(
        store.clone(),
        relay,
        failed_tx,
        shutdown.clone(),
    )));
    let forward = inputs.clone();
    tasks.push(tokio::spawn(async move {
        while let Some(failure) = failed.recv().await {
            let sender::Failure { seq, job, reason } = failure;
            let event = Event::EmailFailed {
                seq,
                job: Box::new(job),
                reason,
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
    }));

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
        max_recipients: 10,
        command_timeout: Duration::from_secs(300),
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
                _ = stop.changed() => break,
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
    let (failed_tx, mut failed) = mpsc::channel(256);
    tasks.push(tokio::spawn(sms_sender::run_sender(
        store.clone(),
        provider,
        sms.rate_per_second,
        failed_tx,
        shutdown.clone(),
    )));
    let forward = inputs.clone();
    tasks.push(tokio::spawn(async move {
        while let Some(sms_sender::Failure { seq, job, reason }) = failed.recv().await {
            let event = Event::SmsFailed {
                seq,
                job: Box::new(job),
                reason,
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
    }));
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
        match self
            .core
            .check_mail_recipient(&self.store, now(), &envelope.mail_from, rcpt)
        {
            Ok(answer) => reply_of(answer),
            Err(e) => {
                tracing::error!("store failure while checking a recipient: {e}");
                reply_of(temporary_failure())
            }
        }
    }

    async fn deliver(&self, envelope: Envelope, message: Vec<u8>) -> Reply {
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
        let mut last = reply_of(temporary_failure());
        for rcpt in &envelope.rcpt_to {
            let (tx, rx) = oneshot::channel();
            let mail = InboundMail {
                envelope_from: envelope.mail_from.clone(),
                rcpt: rcpt.clone(),
                reply: reply.clone(),
            };
            if self
                .inputs
                .send(Input {
                    event: Event::EmailReply(mail),
                    answer: Some(Responder::Mail(tx)),
                })
                .await
                .is_err()
            {
                return reply_of(temporary_failure());
            }
            let answer = rx.await.unwrap_or_else(|_| temporary_failure());
            if !answer.is_positive() {
                return reply_of(answer);
            }
            last = reply_of(answer);
        }
        last
    }
}

fn peer_ip(peer: SocketAddr) -> std::net::IpAddr {
    peer.ip()
}
