//! The admin commands behind `reach stats`, `reach export`, `reach purge` and
//! `reach dead-letters`: counts of what the store holds, everything held about one user (for
//! privacy requests), deleting a user, and the inputs set aside because handling them failed.
//!
//! They open the store themselves, so they work while Reach is stopped. While Reach runs its
//! store is locked: `stats` then asks the running Reach's metrics endpoint (`GET /stats`) when
//! `[metrics] listen` is configured; `export` and `purge` refuse and say so. `purge` deletes
//! exactly what XEP-0077 `<remove/>` deletes (through the same core function) and puts the
//! stanzas `<remove/>` would send in the durable outbox, where the next start of Reach finds them.
//!
//! Nothing here prints message bodies, or writes anything but the command's own result to stdout.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::core::Core;
use crate::store::{Stats, Store, StoreError, Transaction, UserState};

/// Why an admin command could not do its job. The text says what to do.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Another process (a running Reach) holds the store.
    #[error(
        "Reach is running: its store {} is locked by the running process. {hint}",
        store.display()
    )]
    Running {
        /// The store folder.
        store: PathBuf,
        /// What the admin can do instead.
        hint: String,
    },
    /// The store cannot be opened or read.
    #[error("the store cannot be used: {0}")]
    Store(#[from] StoreError),
    /// The store folder does not exist (a wrong config file, or Reach never ran with it).
    #[error("there is no store at {} (has Reach run with this configuration?)", .0.display())]
    NoStore(PathBuf),
    /// `reach migrate --to` names no store Reach can use.
    #[error("cannot migrate there: {0}")]
    BadUrl(String),
    /// The argument is not a JID.
    #[error("'{0}' is not a valid JID (expected the user's bare JID, like alice@example.org)")]
    BadJid(String),
    /// `purge` of someone who is not registered.
    #[error("{0} is not registered with Reach; nothing was deleted")]
    NotRegistered(String),
    /// The running Reach's `/stats` could not be read.
    #[error("cannot read the statistics from the running Reach at http://{listen}/stats: {why}")]
    Fetch {
        /// `[metrics] listen`.
        listen: String,
        /// What went wrong.
        why: String,
    },
}

/// The counts `reach stats` shows (the store's [`Stats`], also as read back from `/stats`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub users: usize,
    pub sessions: usize,
    pub held: usize,
    pub outbox: usize,
    pub email_queue: usize,
    pub sms_queue: usize,
}

impl From<Stats> for Counts {
    fn from(s: Stats) -> Counts {
        Counts {
            users: s.users,
            sessions: s.sessions,
            held: s.held,
            outbox: s.outbox,
            email_queue: s.email_queue,
            sms_queue: s.sms_queue,
        }
    }
}

/// Where the counts came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CountsSource {
    /// The store itself (Reach is not running).
    Store,
    /// The running Reach's metrics endpoint (`[metrics] listen`).
    Running(String),
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "users        {}", self.users)?;
        writeln!(f, "sessions     {}", self.sessions)?;
        writeln!(f, "held         {}", self.held)?;
        writeln!(f, "outbox       {}", self.outbox)?;
        writeln!(f, "email queue  {}", self.email_queue)?;
        write!(f, "sms queue    {}", self.sms_queue)
    }
}

/// Opens the store of `config`, telling a locked embedded store (a running Reach) apart. A
/// PostgreSQL store is shared: the admin command works beside running instances, under an
/// instance name of its own (what it queues is sent by a running instance, which takes it over).
pub fn open_store(config: &Config, hint: &str) -> Result<Store, AdminError> {
    use crate::store::Location;
    let location = config.store.location();
    let path = match location {
        Location::Sled(path) => path,
        Location::Postgres { .. } => {
            let instance = format!("admin-{}", std::process::id());
            return Ok(Store::open_at(location, &instance)?);
        }
    };
    // Opening creates a store; an admin command must not create one where none was.
    if !path.is_dir() {
        return Err(AdminError::NoStore(path.clone()));
    }
    Store::open(path).map_err(|e| {
        if matches!(e, StoreError::InUse(_)) {
            AdminError::Running {
                store: path.clone(),
                hint: hint.to_owned(),
            }
        } else {
            AdminError::Store(e)
        }
    })
}

/// `reach stats`: the counts from the store, or from the running Reach's `/stats`.
pub async fn stats(config: &Config) -> Result<(Counts, CountsSource), AdminError> {
    let hint = match &config.metrics {
        Some(_) => String::new(),
        None => "Without [metrics] listen in the config file, a running Reach cannot be asked for \
                 its statistics: add it (and restart Reach), or stop Reach and run reach stats \
                 again."
            .to_owned(),
    };
    // On a blocking thread: the store's engine may be a database client of its own.
    let from_store = {
        let (config, hint) = (config.clone(), hint.clone());
        tokio::task::spawn_blocking(move || -> Result<Counts, AdminError> {
            Ok(open_store(&config, &hint)?.stats()?.into())
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    };
    match from_store {
        Ok(counts) => Ok((counts, CountsSource::Store)),
        Err(AdminError::Running { store, hint }) => match &config.metrics {
            Some(metrics) => {
                let counts = fetch_counts(&metrics.listen).await?;
                Ok((counts, CountsSource::Running(metrics.listen.clone())))
            }
            None => Err(AdminError::Running { store, hint }),
        },
        Err(e) => Err(e),
    }
}

/// `GET /stats` from a running Reach's metrics endpoint.
pub async fn fetch_counts(listen: &str) -> Result<Counts, AdminError> {
    let failed = |why: String| AdminError::Fetch {
        listen: listen.to_owned(),
        why,
    };
    let body = tokio::time::timeout(Duration::from_secs(10), http_get(listen, "/stats"))
        .await
        .map_err(|_| failed("no answer within 10 s".to_owned()))?
        .map_err(failed)?;
    serde_json::from_slice(&body).map_err(|e| failed(format!("unexpected answer: {e}")))
}

/// A plain HTTP/1.1 GET on loopback or the LAN; the body of a 200 answer.
async fn http_get(listen: &str, path: &str) -> Result<Vec<u8>, String> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioIo;

    let stream = tokio::net::TcpStream::connect(listen)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, listen)
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    Ok(body.to_vec())
}

/// The bare JID `arg` names, as the store keys users.
pub fn user_jid(arg: &str) -> Result<String, AdminError> {
    let jid = jid::Jid::new(arg.trim()).map_err(|_| AdminError::BadJid(arg.to_owned()))?;
    if jid.node().is_none() {
        return Err(AdminError::BadJid(arg.to_owned()));
    }
    Ok(jid.to_bare().to_string())
}

/// What `reach export` prints.
#[derive(Debug, Serialize)]
pub struct Export {
    /// The user's bare JID.
    pub jid: String,
    /// Whether Reach has a registration for it.
    pub registered: bool,
    /// Seconds since the Unix epoch of the export.
    pub exported_at: u64,
    /// Everything the store holds about the user.
    pub data: UserState,
}

/// `reach export`: everything held about `jid` (nothing if unknown: `registered` is false).
pub fn export(store: &Store, jid: &str) -> Result<Export, AdminError> {
    let data = store.read(|tx| tx.user_state(jid))?;
    Ok(Export {
        jid: jid.to_owned(),
        registered: data.user.is_some(),
        exported_at: crate::clock::now(),
        data,
    })
}

/// What `reach purge` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purged {
    /// The deleted user's bare JID.
    pub jid: String,
    /// Stanzas queued for the next start (unavailable, unsubscribed, unsubscribe to each buddy
    /// and to the user).
    pub queued_stanzas: usize,
}

/// `reach purge`: deletes `jid` as `<remove/>` does and queues the stanzas it would send;
/// durable when this returns.
pub fn purge(config: &Config, store: &Store, jid: &str) -> Result<Purged, AdminError> {
    let core = Core::new(crate::runtime::core_settings(config));
    let goodbyes = store.write(|tx| {
        let Some(goodbyes) = core.purge_user(tx, jid)? else {
            return Ok(None);
        };
        for stanza in &goodbyes {
            tx.enqueue_stanza(stanza)?;
        }
        Ok(Some(goodbyes))
    })?;
    let Some(goodbyes) = goodbyes else {
        return Err(AdminError::NotRegistered(jid.to_owned()));
    };
    Ok(Purged {
        jid: jid.to_owned(),
        queued_stanzas: goodbyes.len(),
    })
}

/// What `reach migrate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// Where the data went (without a password).
    pub to: String,
    pub copied: crate::store::migrate::Copied,
}

/// `reach migrate --to URL`: copies everything the configured store holds into the store at
/// `to` (a new, empty one), checking every tree's count after. Reach must be stopped: the
/// copy is of one moment, and what a running Reach wrote after it would be missing.
pub fn migrate(
    config: &Config,
    to: &str,
    to_password: Option<String>,
    mut progress: impl FnMut(&str, u64),
) -> Result<Migrated, AdminError> {
    use crate::store::Location;
    let destination = match (
        Location::parse(to).map_err(AdminError::BadUrl)?,
        to_password,
    ) {
        (Location::Postgres { url, .. }, Some(password)) => Location::Postgres {
            url,
            password: Some(password),
        },
        (Location::Sled(_), Some(_)) => {
            return Err(AdminError::BadUrl(
                "a password file is for a postgres:// destination".to_owned(),
            ))
        }
        (destination, None) => destination,
    };
    if &destination == config.store.location() {
        return Err(AdminError::BadUrl(
            "the destination is the configured store itself".to_owned(),
        ));
    }
    let from = open_store(
        config,
        "Stop Reach first: the copy must see everything it will ever write.",
    )?;
    if let Location::Sled(path) = &destination {
        if path.exists() && std::fs::read_dir(path).map_or(true, |mut d| d.next().is_some()) {
            return Err(AdminError::BadUrl(format!(
                "{} exists and is not empty; copy into a new folder",
                path.display()
            )));
        }
    }
    let to_store = Store::open_at(&destination, &format!("migrate-{}", std::process::id()))?;
    let copied = crate::store::migrate::copy(&from, &to_store, |tree, n| progress(tree, n))?;
    Ok(Migrated {
        to: destination.to_string(),
        copied,
    })
}

/// One line of `reach dead-letters`: what was set aside, when and why, without its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterLine {
    pub id: u64,
    pub at: u64,
    pub kind: String,
    pub reason: String,
    pub redrive: bool,
    /// The size of the input kept, in bytes.
    pub bytes: usize,
}

impl fmt::Display for DeadLetterLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\t{}\t{}\t{} bytes\t{}{}",
            self.id,
            self.at,
            self.kind,
            self.bytes,
            self.reason,
            if self.redrive {
                " (re-drive at next start)"
            } else {
                ""
            }
        )
    }
}

/// What `reach dead-letters` was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterCommand {
    /// List them.
    List,
    /// Print one input, as kept (it may hold message text and addresses).
    Show(u64),
    /// Handle it again at the next start.
    Redrive(u64),
    /// Delete it.
    Drop(u64),
}

/// Why a dead-letter command found nothing to do.
#[derive(Debug, thiserror::Error)]
#[error("there is no dead letter {0} (`reach dead-letters` lists them)")]
pub struct NoDeadLetter(pub u64);

/// `reach dead-letters`: lists, shows, marks for re-drive or deletes; durable when this returns.
/// Returns the lines to print.
pub fn dead_letters(store: &Store, command: DeadLetterCommand) -> anyhow::Result<Vec<String>> {
    let letters = store.dead_letters()?;
    let find = |id: u64| {
        letters
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, l)| l)
            .ok_or(NoDeadLetter(id))
    };
    let lines = match command {
        DeadLetterCommand::List => letters
            .iter()
            .map(|(id, l)| {
                DeadLetterLine {
                    id: *id,
                    at: l.at,
                    kind: l.kind.clone(),
                    reason: l.reason.clone(),
                    redrive: l.redrive,
                    bytes: l.payload.len(),
                }
                .to_string()
            })
            .collect(),
        DeadLetterCommand::Show(id) => vec![find(id)?.payload.clone()],
        DeadLetterCommand::Redrive(id) => {
            find(id)?;
            store.mark_for_redrive(id)?;
            vec![format!(
                "dead letter {id} will be handled again when Reach next starts"
            )]
        }
        DeadLetterCommand::Drop(id) => {
            find(id)?;
            store.remove_dead_letter(id)?;
            vec![format!("dead letter {id} deleted")]
        }
    };
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(store: &std::path::Path, metrics: Option<&str>) -> Config {
        let mut text = format!(
            "[component]\ndomain = \"reach.example.org\"\nserver = \"127.0.0.1:5347\"\n\
             secret = \"s\"\n[users]\nallowed_domains = [\"example.org\"]\n\
             [store]\npath = {:?}\n",
            store.display().to_string()
        );
        if let Some(listen) = metrics {
            text.push_str(&format!("[metrics]\nlisten = {listen:?}\n"));
        }
        Config::from_toml(&text, std::path::Path::new("/etc/reach/config.toml")).unwrap()
    }

    use crate::store::conformance::alice;

    #[test]
    fn user_jids_are_bare_and_checked() {
        assert_eq!(
            user_jid("Alice@Example.org/phone").unwrap(),
            "alice@example.org"
        );
        assert_eq!(user_jid(" bob@example.net ").unwrap(), "bob@example.net");
        assert!(matches!(
            user_jid("example.org"),
            Err(AdminError::BadJid(_))
        ));
        assert!(matches!(user_jid("a@b@c"), Err(AdminError::BadJid(_))));
    }

    #[test]
    fn export_then_purge_then_export_again() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(&dir.path().join("store"), None);
        let Err(e) = open_store(&config, "") else {
            panic!("no store yet");
        };
        assert!(e.to_string().contains("there is no store at"), "{e}");
        std::fs::create_dir_all(config.store.sled_path().unwrap()).unwrap();
        let store = open_store(&config, "").unwrap();
        store.write(|tx| tx.put_user(&alice())).unwrap();

        let exported = export(&store, "alice@example.org").unwrap();
        assert!(exported.registered);
        let json = serde_json::to_value(&exported).unwrap();
        assert_eq!(json["data"]["user"]["handle"], "alice");

        let purged = purge(&config, &store, "alice@example.org").unwrap();
        assert_eq!(
            purged.queued_stanzas, 3,
            "unavailable, unsubscribed, unsubscribe"
        );
        assert_eq!(store.stats().unwrap().outbox, 3);
        assert!(!export(&store, "alice@example.org").unwrap().registered);
        assert!(matches!(
            purge(&config, &store, "alice@example.org"),
            Err(AdminError::NotRegistered(_))
        ));
    }

    #[tokio::test]
    async fn a_locked_store_means_reach_is_running() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let config = config(&path, None);
        let running = Store::open(&path).unwrap();
        assert!(path.is_dir());
        let Err(e) = open_store(&config, "stop it first") else {
            panic!("a second open of a locked store must fail");
        };
        assert!(matches!(e, AdminError::Running { .. }), "{e}");
        assert!(e.to_string().contains("Reach is running"), "{e}");
        assert!(e.to_string().contains("stop it first"), "{e}");
        let e = stats(&config).await.unwrap_err().to_string();
        assert!(e.contains("[metrics] listen"), "{e}");
        drop(running);
        // sled's flusher thread lets go of the lock a moment after the drop.
        let mut attempts = 0;
        let (counts, source) = loop {
            match stats(&config).await {
                Err(AdminError::Running { .. }) if attempts < 50 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => break other.unwrap(),
            }
        };
        assert_eq!(counts, Counts::default());
        assert_eq!(source, CountsSource::Store);
    }

    #[tokio::test]
    async fn stats_of_a_running_reach_come_from_its_endpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let running = std::sync::Arc::new(Store::open(&path).unwrap());
        running.write(|tx| tx.put_user(&alice())).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = listener.local_addr().unwrap().to_string();
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        tokio::spawn(crate::metrics::serve(listener, running.clone(), shutdown));
        let config = config(&path, Some(&listen));
        let (counts, source) = stats(&config).await.unwrap();
        assert_eq!(counts.users, 1);
        assert_eq!(source, CountsSource::Running(listen));
    }
}
