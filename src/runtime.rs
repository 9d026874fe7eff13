//! Wires the adapters to the core: link events in, core decisions through the durable outbox out.
//!
//! Events are handled in batches: every event of a batch goes through the core, its outbound
//! stanzas are queued in the store, then one flush (group commit) makes the whole batch durable
//! before the link is woken to send anything. A store failure is logged and the next event goes
//! on; nothing of a failed event is acknowledged.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::core::{Action, Core, Event, Settings};
use crate::store::Store;
use crate::xmpp::link::{run_link, LinkConfig, LinkEvent, OutboundQueue};

/// The most events handled under one flush.
const BATCH: usize = 512;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Runs Reach until `shutdown` turns true.
pub async fn run(config: Config, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let store = Arc::new(Store::open(&config.store.path)?);
    let core = Arc::new(Core::new(Settings {
        domain: config.component.domain.clone(),
        allowed_domains: config.users.allowed_domains.clone(),
    }));
    let link_config = LinkConfig {
        server: config.component.server.clone(),
        domain: config.component.domain.clone(),
        secret: config.secret().expose().to_owned(),
        ping_to: config.component.ping_to().to_owned(),
        idle_ping: config.component.idle_ping(),
        ping_timeout: config.component.ping_timeout(),
    };
    let (events_tx, mut events) = mpsc::channel::<LinkEvent>(4096);
    let link = tokio::spawn(run_link(
        link_config,
        store.clone() as Arc<dyn OutboundQueue>,
        events_tx,
        shutdown.clone(),
    ));
    tracing::info!(domain = %config.component.domain, "Reach started");

    loop {
        let mut batch = Vec::new();
        tokio::select! {
            received = events.recv_many(&mut batch, BATCH) => {
                if received == 0 {
                    break;
                }
            }
            _ = shutdown.changed() => break,
        }
        let (core, store) = (core.clone(), store.clone());
        tokio::task::spawn_blocking(move || handle_batch(&core, &store, batch)).await?;
    }
    tracing::info!("shutting down");
    let _ = link.await;
    store.flush()?;
    Ok(())
}

fn handle_batch(core: &Core, store: &Store, batch: Vec<LinkEvent>) {
    let now = now();
    for event in batch {
        let event = match event {
            LinkEvent::Up => Event::LinkUp,
            LinkEvent::Down => continue,
            LinkEvent::Stanza(stanza) => Event::Stanza(stanza.into()),
        };
        match core.handle(store, now, event) {
            Ok(actions) => {
                for Action::SendStanza(stanza) in actions {
                    if let Err(e) = store.enqueue_stanza(&stanza) {
                        tracing::error!("could not queue an outbound stanza: {e}");
                    }
                }
            }
            Err(e) => tracing::error!("store failure while handling an event: {e}"),
        }
    }
    match store.flush() {
        Ok(()) => store.wake_outbox(),
        Err(e) => tracing::error!("store flush failed; nothing of this batch is sent: {e}"),
    }
}
