//! A site with several Reach instances (issue 12), as `tests/instances.rs` and
//! `tests/instances_soak.rs` build it: one ejabberd 23.01 (which spreads the stanzas for the
//! component domain over the instances' connections at random), one PostgreSQL database, two or
//! three `reach` processes under the instance names a, b and c, and on request the aiosmtpd
//! relay and a real Kannel with its fake SMSC (the test holds the handset).
//!
//! Each instance has its own state folder (config, log), SMTP listener port and webhook port;
//! all use the same component domain and secret. A site's load balancer "behind the same names"
//! is `support::balancer`: one SMTP port and one webhook URL (Kannel's get-url) in front of every
//! instance. On request some instances reach ejabberd, or the first one reaches the relay,
//! through a forwarder the test can cut.
//!
//! When a test fails (or with [`SiteOptions::keep_logs_always`]), every instance's log and
//! ejabberd's are kept in a folder under `$TMPDIR`, and their tails printed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::account::SERVICE_NUMBER;
use super::balancer::{Balancer, Mode};
use super::kannel::{Handset, Kannel};
use super::logs::{strip_ansi, tail_lines};
use super::mail::MailSink;
use super::postgres::PgCluster;
use super::{Client, Reach, Server, ServerKind, StoreAt};

/// The instance names, in the order the site starts them.
pub const INSTANCE_NAMES: [&str; 3] = ["a", "b", "c"];
/// The secret in Kannel's get-url, which every instance checks.
const WEBHOOK_SECRET: &str = "instancesecret7";

/// What a site is made of.
pub struct SiteOptions {
    /// How many instances start (at most 3).
    pub instances: usize,
    /// A mail relay, Reach's SMTP listeners and a balancer in front of them.
    pub email: bool,
    /// Kannel, the handset, Reach's webhooks and a balancer in front of them.
    pub sms: bool,
    /// How many instances (the first ones) reach ejabberd through a forwarder the test can cut.
    pub cuttable_links: usize,
    /// The first instance reaches the mail relay through a forwarder that can swallow.
    pub cuttable_relay: bool,
    /// `[email] digest_window_secs` (at least 1).
    pub digest_secs: u64,
    /// `[sms] daily_cap`.
    pub sms_daily_cap: u32,
    /// `[sms] rate_per_second`; none: Reach's default.
    pub sms_per_second: Option<u32>,
    /// How long each instance may take to bring its component link up at the start.
    pub link_up_within: Duration,
    /// Where logs are kept after a failure; none: `$TMPDIR/reach-instances-PID-TEST`.
    pub keep_logs_in: Option<PathBuf>,
    /// Keep the logs also when the test passes.
    pub keep_logs_always: bool,
}

impl Default for SiteOptions {
    fn default() -> SiteOptions {
        SiteOptions {
            instances: 0,
            email: false,
            sms: false,
            cuttable_links: 0,
            cuttable_relay: false,
            digest_secs: 0,
            sms_daily_cap: 1000,
            sms_per_second: None,
            link_up_within: Duration::from_secs(20),
            keep_logs_in: None,
            keep_logs_always: false,
        }
    }
}

/// A `reach` process under one instance name, with its own folder and ports; it can be killed
/// and started again under the same name.
pub struct Instance {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub config: String,
    pub reach: Reach,
    /// Its own SMTP listener (0 without email).
    pub smtp_port: u16,
    /// Length of the log when the running process started: what it wrote is after this.
    pub log_from: usize,
}

impl Instance {
    /// The log file every process of this instance appends to.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("reach.log")
    }

    /// The log file's length in bytes now.
    pub fn log_len(&self) -> usize {
        std::fs::metadata(self.log_path()).map_or(0, |m| m.len() as usize)
    }

    /// Everything every process of this instance wrote, colours removed.
    pub fn log_all(&self) -> String {
        strip_ansi(&self.reach.log())
    }

    /// What the running (or last) process wrote.
    pub fn log(&self) -> String {
        let all = self.reach.log();
        strip_ansi(all.get(self.log_from..).unwrap_or(""))
    }

    /// SIGKILL (a crash).
    pub fn kill(&mut self) {
        self.reach.kill();
    }

    /// Starts a new process under the same name, folder and config.
    pub async fn start_again(&mut self) {
        self.log_from = self.log_len();
        self.reach = Reach::start_config(self.dir.path(), &self.config).await;
    }

    /// Whether the running process writes `needle` within `timeout`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        super::within(timeout, || self.log().contains(needle)).await
    }

    /// Waits until the running process has its component link up; panics after `within`.
    pub async fn wait_link_up(&self, within: Duration) {
        assert!(
            self.wait_for_log("component link up", within).await,
            "instance {}: no component link within {within:?}\n{}",
            self.name,
            tail_lines(&self.log(), 40)
        );
    }
}

/// ejabberd, PostgreSQL, the instances and their doors (see the module comment).
pub struct Site {
    pub server: Server,
    pub pg: Arc<PgCluster>,
    pub url: String,
    pub instances: Vec<Instance>,
    pub sink: Option<MailSink>,
    pub kannel: Option<Kannel>,
    pub phone: Option<Handset>,
    /// One SMTP port in front of every instance's listener.
    pub smtp: Option<Balancer>,
    /// One webhook address (Kannel's get-url and dlr-url) in front of every instance's webhook.
    pub webhook: Option<Balancer>,
    /// Between each of the first instances and ejabberd (`cuttable_links`), by index.
    pub links: Vec<Balancer>,
    /// Between the first instance and the relay (with `cuttable_relay`).
    pub relay_cut: Option<Balancer>,
    keep_logs_in: PathBuf,
    keep_logs_always: bool,
}

impl Drop for Site {
    fn drop(&mut self) {
        if std::thread::panicking() || self.keep_logs_always {
            let keep = &self.keep_logs_in;
            let _ = std::fs::create_dir_all(keep);
            for i in &self.instances {
                eprintln!(
                    "--- instance {} (tail) ---\n{}",
                    i.name,
                    tail_lines(&i.log_all(), 60)
                );
                let _ = std::fs::write(keep.join(format!("reach-{}.log", i.name)), i.log_all());
            }
            let _ = std::fs::write(keep.join("ejabberd.log"), self.server.log());
            eprintln!("logs kept in {}", keep.display());
            if let Some(k) = &self.kannel {
                eprintln!("--- kannel ---\n{}", k.logs(20));
            }
            eprintln!("--- ejabberd ---\n{}", self.server.log_tail(20));
        }
    }
}

impl Site {
    /// Starts everything `o` asks for and waits until every instance's link is up.
    pub async fn new(o: SiteOptions) -> Site {
        let pg = PgCluster::shared();
        let url = pg.create_database();
        let server = Server::start(ServerKind::Ejabberd).await;
        for user in ["alice", "bob"] {
            server.register(user, &format!("{user}pw")).await;
        }
        let n = o.instances;
        let smtp_ports: Vec<u16> = (0..n).map(|_| super::free_port()).collect();
        let webhook_ports: Vec<u16> = (0..n).map(|_| super::free_port()).collect();
        let sink = if o.email {
            Some(MailSink::start().await)
        } else {
            None
        };
        let smtp = if o.email {
            Some(Balancer::on_ports(&smtp_ports).await)
        } else {
            None
        };
        let webhook = if o.sms {
            Some(Balancer::on_ports(&webhook_ports).await)
        } else {
            None
        };
        let (kannel, phone) = match &webhook {
            Some(w) => {
                let kannel = Kannel::start(&format!(
                    "http://127.0.0.1:{}/sms/mo?secret={WEBHOOK_SECRET}",
                    w.port()
                ))
                .await;
                let phone = Handset::connect(&kannel).await;
                (Some(kannel), Some(phone))
            }
            None => (None, None),
        };
        let mut links = Vec::new();
        for _ in 0..o.cuttable_links.min(n) {
            links.push(Balancer::on_ports(&[server.component_port()]).await);
        }
        let relay_cut = match (&sink, o.cuttable_relay) {
            (Some(sink), true) => Some(Balancer::on_ports(&[sink.port]).await),
            _ => None,
        };
        let domain = server.component_domain().to_owned();
        let mut instances = Vec::new();
        for (i, name) in INSTANCE_NAMES.iter().enumerate().take(n) {
            let dir = tempfile::Builder::new()
                .prefix(&format!("reach-instance-{name}-"))
                .tempdir()
                .unwrap();
            let store = StoreAt::Postgres {
                url: url.clone(),
                instance: (*name).to_owned(),
            };
            let mut config = Reach::config_at(&server, dir.path(), &store);
            if let Some(link) = links.get(i) {
                config = config.replace(&server.component_addr(), &link.addr());
            }
            config.push_str(
                "\n[routing]\ngrace_delay_secs = 3\n\n[limits]\nemails_per_user_per_hour = 100000\n",
            );
            if let Some(sink) = &sink {
                let relay_port = match (i, &relay_cut) {
                    (0, Some(cut)) => cut.port(),
                    _ => sink.port,
                };
                config.push_str(&format!(
                    "\n[email]\nrelay = \"smtp://127.0.0.1:{relay_port}\"\nfrom_address = \"reach@{domain}\"\n\
                     reply_domain = \"{domain}\"\nlisten = \"127.0.0.1:{}\"\ndigest_window_secs = {}\n",
                    smtp_ports[i],
                    o.digest_secs.max(1)
                ));
            }
            if let (Some(kannel), Some(webhook)) = (&kannel, &webhook) {
                config.push_str(&format!(
                    "\n[sms]\nsendsms_url = \"{}\"\nusername = \"{}\"\npassword = \"{}\"\nfrom = \"{SERVICE_NUMBER}\"\n\
                     webhook_listen = \"127.0.0.1:{}\"\nwebhook_url = \"http://127.0.0.1:{}\"\n\
                     webhook_secret = \"{WEBHOOK_SECRET}\"\ndaily_cap = {}\n{}allowed_prefixes = [\"+1\"]\n",
                    kannel.sendsms_url(),
                    kannel.username(),
                    kannel.password(),
                    webhook_ports[i],
                    webhook.port(),
                    o.sms_daily_cap,
                    o.sms_per_second
                        .map_or(String::new(), |r| format!("rate_per_second = {r}\n")),
                ));
            }
            let reach = Reach::start_config(dir.path(), &config).await;
            instances.push(Instance {
                name: (*name).to_owned(),
                dir,
                config,
                reach,
                smtp_port: smtp_ports[i],
                log_from: 0,
            });
        }
        let keep_logs_in = o.keep_logs_in.unwrap_or_else(|| {
            std::env::temp_dir().join(format!(
                "reach-instances-{}-{}",
                std::process::id(),
                std::thread::current().name().unwrap_or("test")
            ))
        });
        let site = Site {
            server,
            pg,
            url,
            instances,
            sink,
            kannel,
            phone,
            smtp,
            webhook,
            links,
            relay_cut,
            keep_logs_in,
            keep_logs_always: o.keep_logs_always,
        };
        for i in &site.instances {
            i.wait_link_up(o.link_up_within).await;
        }
        site
    }

    /// Adds an instance (the next name) without email or SMS, and waits up to `within` for its
    /// link.
    pub async fn add_instance(&mut self, within: Duration) -> &Instance {
        let name = INSTANCE_NAMES[self.instances.len()];
        let dir = tempfile::Builder::new()
            .prefix(&format!("reach-instance-{name}-"))
            .tempdir()
            .unwrap();
        let store = StoreAt::Postgres {
            url: self.url.clone(),
            instance: name.to_owned(),
        };
        let config = Reach::config_at(&self.server, dir.path(), &store);
        let reach = Reach::start_config(dir.path(), &config).await;
        self.instances.push(Instance {
            name: name.to_owned(),
            dir,
            config,
            reach,
            smtp_port: 0,
            log_from: 0,
        });
        let added = self.instances.last().unwrap();
        added.wait_link_up(within).await;
        added
    }

    /// Where the logs are kept after a failure.
    pub fn keep_logs_in(&self) -> &Path {
        &self.keep_logs_in
    }

    /// A client of `user` (password `USERpw`) once Reach answers it.
    pub async fn client(&self, user: &str, resource: &str) -> Client {
        let mut c = Client::connect(&self.server, user, &format!("{user}pw"), resource).await;
        super::wait_for_component(&mut c, self.server.component_domain()).await;
        c
    }

    pub fn sink(&self) -> &MailSink {
        self.sink.as_ref().expect("a site with email")
    }

    pub fn phone(&mut self) -> &mut Handset {
        self.phone.as_mut().expect("a site with SMS")
    }

    /// The balancer in front of the instances' SMTP listeners.
    pub fn smtp(&self) -> &Balancer {
        self.smtp.as_ref().expect("a site with email")
    }

    /// The balancer in front of the instances' webhooks.
    pub fn webhook(&self) -> &Balancer {
        self.webhook.as_ref().expect("a site with SMS")
    }

    /// The forwarder between the first instance and the relay.
    pub fn relay_cut(&self) -> &Balancer {
        self.relay_cut
            .as_ref()
            .expect("a site with a cuttable relay")
    }

    /// Cuts instance `i` off from ejabberd: its link goes down and cannot come back.
    pub fn cut_link(&self, i: usize) {
        self.links[i].set_mode(Mode::Refuse);
        self.links[i].cut();
    }

    /// Lets instance `i` reach ejabberd again.
    pub fn mend_link(&self, i: usize) {
        self.links[i].set_mode(Mode::Forward);
    }

    /// How many lines of each instance's running process's log contain `what`.
    pub fn count_in_logs(&self, what: &str) -> Vec<usize> {
        self.instances
            .iter()
            .map(|i| super::logs::count_lines(&i.log(), what))
            .collect()
    }

    /// Email and SMS counts of every instance's logs: (emails handed over, SMS webhook calls).
    pub fn door_counts(&self) -> Vec<(usize, usize)> {
        self.instances
            .iter()
            .map(|i| {
                let log = i.log_all();
                (
                    super::logs::count_lines(&log, "email handed over"),
                    super::logs::count_lines(&log, "SMS webhook: incoming SMS"),
                )
            })
            .collect()
    }

    /// A number the database answers to `sql` (`usize::MAX` if it answers something else).
    fn count(&self, sql: &str) -> usize {
        let db = self.url.rsplit('/').next().unwrap().to_owned();
        self.pg.psql(&db, sql).trim().parse().unwrap_or(usize::MAX)
    }

    /// How many stanzas wait in instance `name`'s outbox (read in the database).
    pub fn outbox_len(&self, name: &str) -> usize {
        let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
        self.count(&format!(
            "SELECT count(*) FROM reach_records WHERE tree = 'stanza_outbox' \
             AND substring(key from 1 for {}) = '\\x{hex}00'::bytea",
            name.len() + 1,
        ))
    }

    /// How many XMPP resources of users Reach records as online (read in the database).
    pub fn resources_of_users(&self) -> usize {
        self.count("SELECT count(*) FROM reach_records WHERE tree = 'resources'")
    }

    /// How many email jobs instance `name` holds claimed (read in the database).
    pub fn email_claims(&self, name: &str) -> usize {
        self.count(&format!(
            "SELECT count(*) FROM reach_records WHERE tree = 'email_jobs' \
             AND convert_from(value, 'UTF8')::json->>'claimed_by' = '{name}'"
        ))
    }
}
