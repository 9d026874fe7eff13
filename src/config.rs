//! The TOML configuration file: what each option means, its default, and the checks run before
//! Reach starts (`reach check-config FILE` runs the same checks and prints a summary).
//!
//! Every option is documented at its definition below; `config.toml.example` shows them all and a
//! test keeps it valid. Unknown keys are refused (a misspelt option must not silently fall back to
//! its default). Relative paths in the file are relative to the folder holding the file.
//!
//! To add a section (`[email]`, `[sms]`, `[metrics]`): write a `#[serde(deny_unknown_fields)]`
//! struct with its own `validate`, add it as a field of [`Config`] (`Option<...>` with
//! `#[serde(default)]` when the section is optional), call its `validate` from
//! `Config::validate`, and add a sentence for it to [`Config::summary`] and the example file.
//!
//! This module reads the config file and, for `component.secret_file`, the secret; nothing else.
//! The secret never appears in `Debug` output, in errors or in the summary.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::address::domain_problem;

/// Why the configuration cannot be used. The text names the file and, for a bad value, the
/// option as `[section] key` (`[component] domain: ...`).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The config file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, lacks a required key or has a value of the
    /// wrong type. `message` names the line and the `[section] key` where they are known
    /// (`[email] relay: missing from the section at line 65`), else it is toml's own text.
    #[error("config file {}: {message}", path.display())]
    Syntax {
        /// The config file.
        path: PathBuf,
        /// toml's description (several lines).
        message: String,
    },
    /// A value is well-typed but not acceptable. Shown as `[section] key: message`.
    #[error("config file {}: {}: {message}", path.display(), section_key(key))]
    Invalid {
        /// The config file.
        path: PathBuf,
        /// The option, as `section.key`.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

/// A secret string (the component secret). Its `Debug` prints `***`; it has no `Display`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Secret {
        Secret(secret.into())
    }

    /// The secret itself, for the XEP-0114 handshake only. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The whole configuration file. Obtain one with [`load`] or [`Config::from_toml`], which
/// validate it and resolve the secret.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[component]`: how Reach connects to the XMPP server.
    pub component: ComponentConfig,
    /// `[users]`: who may register.
    pub users: UsersConfig,
    /// `[store]`: where Reach keeps its data.
    pub store: StoreConfig,
    /// `[log]`: what Reach logs. Optional.
    #[serde(default)]
    pub log: LogConfig,
    /// `[routing]`: when messages go to terminals other than the user's XMPP clients. Optional.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// `[email]`: the email terminal. Optional; without it Reach forwards nothing by email.
    pub email: Option<EmailConfig>,
    /// `[sms]`: the SMS terminal. Optional; without it Reach sends no SMS.
    pub sms: Option<SmsConfig>,
    /// `[limits]`: Reach's own bounds on input and abuse limits. Optional; every key has a
    /// default (see `docs/limits.md`).
    #[serde(default)]
    pub limits: LimitsConfig,
    /// `[metrics]`: the Prometheus endpoint. Optional; without it Reach serves no HTTP for
    /// metrics, and `reach stats` cannot ask a running Reach.
    pub metrics: Option<MetricsConfig>,
    /// `[integrated]`: integrated mode on Prosody (users' own JIDs reach their phone and
    /// mailbox). Optional; without it every user has a reach address only.
    pub integrated: Option<IntegratedConfig>,
}

/// `[integrated]`: integrated mode (docs/integrated-mode.md). The XMPP server grants Reach
/// XEP-0356 privileges and copies its users' messages to Reach (Prosody's mod_privilege and
/// mod_firewall); users of these hosts may then choose (`address own`) to be reached at their
/// own JID instead of their reach address.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntegratedConfig {
    /// `hosts` (required, not empty): the server's hosts (virtual hosts, e.g. `["example.org"]`)
    /// that copy their users' messages to Reach and grant it the XEP-0356 message permission.
    /// Copies are taken from these hosts only; each must also be in `users.allowed_domains`.
    pub hosts: Vec<String>,
}

/// `[metrics]`: an HTTP endpoint with `GET /metrics` (Prometheus text format) and `GET /stats`
/// (the store's counts as JSON, which `reach stats` reads while Reach runs).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `listen` (required in the section): `host:port` of the endpoint, e.g. `127.0.0.1:9464`.
    /// It has no authentication: keep it on loopback or a private network.
    pub listen: String,
}

impl MetricsConfig {
    fn validate(&mut self, origin: &Origin<'_>) -> Result<(), ConfigError> {
        if let Some(message) = host_port_problem(&self.listen) {
            return Err(origin.invalid("metrics.listen", message));
        }
        Ok(())
    }
}

/// `[limits]`: bounds on the stanzas Reach takes and abuse limits. Every key is optional; the
/// defaults are those of [`crate::core::Limits::default`]. `docs/limits.md` explains each one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// `max_stanza_bytes` (default 262144): a stanza whose names, attributes and text add up to
    /// more is refused with `policy-violation`.
    pub max_stanza_bytes: usize,
    /// `max_depth` (default 32): a stanza nested deeper (the stanza itself is depth 1) is
    /// refused with `policy-violation`.
    pub max_depth: usize,
    /// `max_attributes` (default 64): an element with more attributes makes its stanza refused
    /// with `policy-violation`.
    pub max_attributes: usize,
    /// `max_body_chars` (default 10000): a message with a longer body is refused with
    /// `not-acceptable`; nothing of it is relayed or held.
    pub max_body_chars: usize,
    /// `registrations_per_jid_per_hour` (default 10): registrations and registration updates one
    /// JID may make per hour; past it, `resource-constraint`.
    pub registrations_per_jid_per_hour: u32,
    /// `new_registrations_per_domain_per_hour` (default 100): new users one domain may register
    /// per hour; past it, `policy-violation`.
    pub new_registrations_per_domain_per_hour: u32,
    /// `codes_per_terminal_per_day` (default 5): verification codes Reach sends to one email
    /// address or phone number per day (UTC).
    pub codes_per_terminal_per_day: u32,
    /// `emails_per_user_per_hour` (default 30): forwarding emails per user per hour; past it,
    /// messages wait in their pending forward for the next hour (or for XMPP).
    pub emails_per_user_per_hour: u32,
    // ---- verification codes (issue 10) ----
    /// `codes_per_user_per_day` (default 10): verification codes Reach sends for one user per
    /// day (UTC), to all their terminals together, whichever door asked; past it no code is
    /// sent and the user is told to ask again tomorrow.
    pub codes_per_user_per_day: u32,
    /// `new_terminals_per_user_per_day` (default 3): different email mailboxes and phone
    /// numbers one user may ask codes for per day (UTC); past it, `add` of another one is
    /// refused and nothing changes.
    pub new_terminals_per_user_per_day: u32,
    /// `verification_sms_per_hour` (default 100): verification SMS Reach sends per hour for all
    /// users together, the bound on what SMS pumping can cost; past it no code SMS is sent until
    /// the next hour.
    pub verification_sms_per_hour: u32,
    /// `wrong_codes_per_user_per_day` (default 10): wrong verification codes one user may enter
    /// per day (UTC), through every door together; past it no code is checked until the next
    /// day, not even the right one.
    pub wrong_codes_per_user_per_day: u32,

    // ---- storage per user ----
    /// `waiting_per_user` (default 1000): messages waiting for one user, held for their XMPP
    /// clients or pending a forward, from all senders together; past it, a buddy's message that
    /// would wait is refused with `resource-constraint` (wait) and nothing is stored.
    pub waiting_per_user: u32,
    /// `held_per_sender` (default 100): messages held for one user's XMPP clients from one
    /// sender; past it, that sender's next message to be held is refused the same way (other
    /// buddies still get through).
    pub held_per_sender: u32,
    /// `pending_per_conversation` (default 200): messages waiting for their forward (email or
    /// SMS) in one conversation; past it, the buddy's message is refused with
    /// `resource-constraint` (wait).
    pub pending_per_conversation: u32,
    /// `buddies_per_user` (default 1000): buddies one reach address may have; past it, a new
    /// subscription request is answered `unsubscribed` and Reach does not subscribe back.
    pub buddies_per_user: u32,
    /// `digest_max_items` (default 50): messages in one forwarding email; the rest go in the next
    /// email of the same thread.
    pub digest_max_items: u32,
    /// `digest_max_chars` (default 100000): characters of message text in one forwarding email
    /// (a longer single message still goes, alone); the rest go in the next email of the thread.
    pub digest_max_chars: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig::from(crate::core::Limits::default())
    }
}

impl From<crate::core::Limits> for LimitsConfig {
    fn from(l: crate::core::Limits) -> Self {
        LimitsConfig {
            max_stanza_bytes: l.max_stanza_bytes,
            max_depth: l.max_depth,
            max_attributes: l.max_attributes,
            max_body_chars: l.max_body_chars,
            registrations_per_jid_per_hour: l.registrations_per_jid_per_hour,
            new_registrations_per_domain_per_hour: l.new_registrations_per_domain_per_hour,
            codes_per_terminal_per_day: l.codes_per_terminal_per_day,
            emails_per_user_per_hour: l.emails_per_user_per_hour,
            codes_per_user_per_day: l.codes_per_user_per_day,
            new_terminals_per_user_per_day: l.new_terminals_per_user_per_day,
            verification_sms_per_hour: l.verification_sms_per_hour,
            wrong_codes_per_user_per_day: l.wrong_codes_per_user_per_day,
            waiting_per_user: l.waiting_per_user,
            held_per_sender: l.held_per_sender,
            pending_per_conversation: l.pending_per_conversation,
            buddies_per_user: l.buddies_per_user,
            digest_max_items: l.digest_max_items,
            digest_max_chars: l.digest_max_chars,
        }
    }
}

impl LimitsConfig {
    /// The limits as the core uses them.
    pub fn to_limits(&self) -> crate::core::Limits {
        crate::core::Limits {
            max_stanza_bytes: self.max_stanza_bytes,
            max_depth: self.max_depth,
            max_attributes: self.max_attributes,
            max_body_chars: self.max_body_chars,
            registrations_per_jid_per_hour: self.registrations_per_jid_per_hour,
            new_registrations_per_domain_per_hour: self.new_registrations_per_domain_per_hour,
            codes_per_terminal_per_day: self.codes_per_terminal_per_day,
            emails_per_user_per_hour: self.emails_per_user_per_hour,
            codes_per_user_per_day: self.codes_per_user_per_day,
            new_terminals_per_user_per_day: self.new_terminals_per_user_per_day,
            verification_sms_per_hour: self.verification_sms_per_hour,
            wrong_codes_per_user_per_day: self.wrong_codes_per_user_per_day,
            waiting_per_user: self.waiting_per_user,
            held_per_sender: self.held_per_sender,
            pending_per_conversation: self.pending_per_conversation,
            buddies_per_user: self.buddies_per_user,
            digest_max_items: self.digest_max_items,
            digest_max_chars: self.digest_max_chars,
        }
    }

    fn validate(&mut self, origin: &Origin<'_>) -> Result<(), ConfigError> {
        if self.max_stanza_bytes < 4096 {
            return Err(origin.invalid("limits.max_stanza_bytes", "must be at least 4096"));
        }
        if self.max_depth < 8 {
            // Data forms, commands and errors nest 5 or 6 deep.
            return Err(origin.invalid("limits.max_depth", "must be at least 8"));
        }
        if self.max_attributes < 8 {
            return Err(origin.invalid("limits.max_attributes", "must be at least 8"));
        }
        if self.max_body_chars == 0 {
            return Err(origin.invalid("limits.max_body_chars", "must be at least 1"));
        }
        if self.max_body_chars >= self.max_stanza_bytes {
            return Err(origin.invalid(
                "limits.max_body_chars",
                "must be less than limits.max_stanza_bytes",
            ));
        }
        for (key, value) in [
            (
                "limits.registrations_per_jid_per_hour",
                self.registrations_per_jid_per_hour,
            ),
            (
                "limits.new_registrations_per_domain_per_hour",
                self.new_registrations_per_domain_per_hour,
            ),
            (
                "limits.codes_per_terminal_per_day",
                self.codes_per_terminal_per_day,
            ),
            (
                "limits.emails_per_user_per_hour",
                self.emails_per_user_per_hour,
            ),
            ("limits.codes_per_user_per_day", self.codes_per_user_per_day),
            (
                "limits.new_terminals_per_user_per_day",
                self.new_terminals_per_user_per_day,
            ),
            (
                "limits.verification_sms_per_hour",
                self.verification_sms_per_hour,
            ),
            (
                "limits.wrong_codes_per_user_per_day",
                self.wrong_codes_per_user_per_day,
            ),
            ("limits.waiting_per_user", self.waiting_per_user),
            ("limits.held_per_sender", self.held_per_sender),
            (
                "limits.pending_per_conversation",
                self.pending_per_conversation,
            ),
            ("limits.buddies_per_user", self.buddies_per_user),
            ("limits.digest_max_items", self.digest_max_items),
            ("limits.digest_max_chars", self.digest_max_chars),
        ] {
            if value == 0 {
                return Err(origin.invalid(key, "must be at least 1"));
            }
        }
        Ok(())
    }
}

/// `[sms]`: SMS through Kannel, and the webhook Kannel calls with incoming SMS and delivery
/// reports.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmsConfig {
    /// `sendsms_url` (required): Kannel smsbox's sendsms address, e.g.
    /// `http://127.0.0.1:13013/cgi-bin/sendsms`.
    pub sendsms_url: String,
    /// `username` (required): the sendsms-user's name.
    pub username: String,
    /// `password` / `password_file` (exactly one): the sendsms-user's password. Never logged.
    password: Option<Secret>,
    password_file: Option<PathBuf>,
    /// `from` (required): the sender number or short code SMS are sent from (users text it).
    pub from: String,
    /// `webhook_listen` (required): `host:port` where Reach takes Kannel's calls.
    pub webhook_listen: String,
    /// `webhook_url` (required): the base URL at which Kannel reaches that listener, e.g.
    /// `http://127.0.0.1:8088`; Reach adds `/sms/dlr?...` for delivery reports.
    pub webhook_url: String,
    /// `webhook_secret` / `webhook_secret_file` (exactly one): the shared secret Kannel's
    /// get-url and dlr-url carry (`secret=` parameter). Requests without it get 403.
    webhook_secret: Option<Secret>,
    webhook_secret_file: Option<PathBuf>,
    /// `delivery_reports` (optional, default true): ask Kannel for delivery reports; a delivered
    /// report becomes the XEP-0184 receipt the buddy asked for.
    #[serde(default = "default_true")]
    pub delivery_reports: bool,
    /// `max_segments` (optional, default 3): longest SMS in segments; longer texts are shortened.
    #[serde(default = "default_max_segments")]
    pub max_segments: usize,
    /// `daily_cap` (optional, default 50): SMS per user per day (UTC); past it, messages wait
    /// for the user's XMPP client.
    #[serde(default = "default_daily_cap")]
    pub daily_cap: u32,
    /// `rate_per_second` (optional, default 10): SMS per second towards the provider, all users.
    #[serde(default = "default_rate_per_second")]
    pub rate_per_second: u32,
    /// `concurrency` (optional, default 4, 1 to 64): SMS requests to the provider in flight at
    /// once (within `rate_per_second`).
    #[serde(default = "default_sms_concurrency")]
    pub concurrency: usize,
    /// `allowed_prefixes` (optional, default all): E.164 prefixes Reach may text, e.g.
    /// `["+1", "+44"]`; registration refuses other numbers.
    #[serde(default)]
    pub allowed_prefixes: Vec<String>,
    #[serde(skip)]
    resolved_password: Secret,
    #[serde(skip)]
    resolved_webhook_secret: Secret,
}

fn default_true() -> bool {
    true
}
fn default_max_segments() -> usize {
    3
}
fn default_daily_cap() -> u32 {
    50
}
fn default_rate_per_second() -> u32 {
    10
}
fn default_sms_concurrency() -> usize {
    4
}

/// Exactly one of an inline secret and a secret file, resolved.
fn one_secret(
    origin: &Origin<'_>,
    key: &'static str,
    inline: Option<Secret>,
    file: &Option<PathBuf>,
) -> Result<Secret, ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => {
            Err(origin.invalid(key, "give the value inline or in a file, not both"))
        }
        (Some(s), None) if !s.expose().is_empty() => Ok(s),
        (None, Some(file)) => {
            let file = origin.resolve(file);
            let text = std::fs::read_to_string(&file)
                .map_err(|e| origin.invalid(key, format!("cannot read {}: {e}", file.display())))?;
            let value = text.trim_end_matches(['\r', '\n']);
            if value.is_empty() {
                return Err(origin.invalid(key, format!("{} is empty", file.display())));
            }
            Ok(Secret::new(value))
        }
        _ => Err(origin.invalid(
            key,
            "is required (inline, or in a file with the _file variant)",
        )),
    }
}

impl SmsConfig {
    fn validate(&mut self, origin: &Origin<'_>) -> Result<(), ConfigError> {
        // Kannel's sendsms runs on loopback or the LAN and speaks plain HTTP to Reach.
        if !self.sendsms_url.starts_with("http://") || self.sendsms_url.len() < 10 {
            return Err(origin.invalid(
                "sms.sendsms_url",
                format!("'{}' is not an http:// URL", self.sendsms_url),
            ));
        }
        let url = &self.webhook_url;
        if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 10 {
            return Err(origin.invalid(
                "sms.webhook_url",
                format!("'{url}' is not an http(s):// URL"),
            ));
        }
        if let Some(message) = host_port_problem(&self.webhook_listen) {
            return Err(origin.invalid("sms.webhook_listen", message));
        }
        if self.username.is_empty() {
            return Err(origin.invalid("sms.username", "is empty"));
        }
        if self.from.is_empty() {
            return Err(origin.invalid("sms.from", "is empty"));
        }
        if self.max_segments == 0 || self.max_segments > 10 {
            return Err(origin.invalid("sms.max_segments", "must be from 1 to 10"));
        }
        if self.rate_per_second == 0 {
            return Err(origin.invalid("sms.rate_per_second", "must be at least 1"));
        }
        if !(1..=64).contains(&self.concurrency) {
            return Err(origin.invalid("sms.concurrency", "must be from 1 to 64"));
        }
        for prefix in &self.allowed_prefixes {
            let digits = prefix.strip_prefix('+').unwrap_or("");
            if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
                return Err(origin.invalid(
                    "sms.allowed_prefixes",
                    format!("'{prefix}' is not a prefix like \"+44\""),
                ));
            }
        }
        self.resolved_password = one_secret(
            origin,
            "sms.password",
            self.password.take(),
            &self.password_file,
        )?;
        self.resolved_webhook_secret = one_secret(
            origin,
            "sms.webhook_secret",
            self.webhook_secret.take(),
            &self.webhook_secret_file,
        )?;
        Ok(())
    }

    /// The sendsms password. Never log it.
    pub fn password(&self) -> &Secret {
        &self.resolved_password
    }

    /// The webhook's shared secret. Never log it.
    pub fn webhook_secret(&self) -> &Secret {
        &self.resolved_webhook_secret
    }
}

/// `[routing]`: the default routing timings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// `grace_delay_secs` (optional, default 120): while the user's XMPP clients are all away,
    /// xa or dnd, a message goes to email or SMS only if it is still unread after this delay. The
    /// delay is cancelled when the user reads it (XEP-0333 displayed), replies or becomes
    /// available.
    #[serde(default = "default_grace_delay_secs")]
    pub grace_delay_secs: u64,
}

fn default_grace_delay_secs() -> u64 {
    120
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            grace_delay_secs: default_grace_delay_secs(),
        }
    }
}

/// `[email]`: outbound mail through a relay, and Reach's own SMTP listener for replies.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// `relay` (required): the SMTP relay for outbound mail, as a URL: `smtp://host:port`
    /// (plain), `smtp+starttls://host:port` (STARTTLS) or `smtps://host:port` (TLS from the
    /// start). Default ports: 25, 587 and 465.
    pub relay: String,
    /// `relay_username` (optional): log in to the relay with this name (needs a password).
    pub relay_username: Option<String>,
    /// `relay_password` / `relay_password_file` (optional, at most one): the relay password,
    /// inline or in a file (trailing line breaks ignored). Never logged.
    relay_password: Option<Secret>,
    relay_password_file: Option<PathBuf>,
    /// `from_address` (optional, default `reach@` followed by `reply_domain`): the envelope
    /// sender of every mail Reach sends, and the From of verification mails; keep it an address
    /// at `reply_domain` so that bounces come back to Reach's listener.
    #[serde(default, rename = "from_address")]
    from_address_set: Option<String>,
    /// The envelope sender in force: `from_address` as written, or its default (set by
    /// validation).
    #[serde(skip)]
    pub from_address: String,
    /// `from_name` (optional, default "Reach"): mails show `"Bob via Reach"`.
    #[serde(default = "default_from_name")]
    pub from_name: String,
    /// `reply_domain` (required): the domain of the per-session reply aliases
    /// `r-TOKEN@reply_domain`; its MX (or the site MTA's transport) must lead to `listen`.
    pub reply_domain: String,
    /// `listen` (required): `host:port` where Reach's SMTP listener accepts replies, e.g.
    /// `127.0.0.1:2525` behind the site MTA, or `0.0.0.0:25`.
    pub listen: String,
    /// `hostname` (optional, default `reply_domain`): the name in the listener's greeting and
    /// in EHLO towards the relay.
    pub hostname: Option<String>,
    /// `max_message_bytes` (optional, default 10485760): bigger replies are refused with 552.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// `max_connections` (optional, default 100): simultaneous SMTP connections to the listener.
    /// When all are taken, a client from an address holding fewer than the busiest address still
    /// gets in: that address's oldest idle session is closed with `421 4.7.0`.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// `connections` (optional, default 4, 1 to 64): emails handed to the relay at once, each on
    /// its own relay connection (reused from one email to the next).
    #[serde(default = "default_relay_connections")]
    pub connections: usize,
    /// `tls_cert` and `tls_key` (optional, both or neither): PEM files; with them the listener
    /// offers STARTTLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// `digest_window_secs` (optional, default 30): messages from one buddy arriving within this
    /// window share one email.
    #[serde(default = "default_digest_window_secs")]
    pub digest_window_secs: u64,
    /// `alias_idle_days` (optional, default 30): a reply alias unused for this long expires.
    #[serde(default = "default_alias_idle_days")]
    pub alias_idle_days: u64,
    /// `require_dmarc` (optional, default false): accept a reply only if it passes DMARC (DKIM
    /// or SPF aligned with its From domain), checked with the system resolver.
    #[serde(default)]
    pub require_dmarc: bool,

    // ---- the SMTP listener under abuse (docs/limits.md, "SMTP listener") ----
    /// `max_connections_per_ip` (optional, default 20, Postfix's default concurrency towards one
    /// destination, so a site MTA in front is not slowed): simultaneous SMTP connections from one
    /// client address (an IPv4 address, or an IPv6 /64 network); more get `421 4.7.0` and are
    /// closed, while other addresses still get in. Above `max_connections` it changes nothing.
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// `command_timeout_secs` (optional, default 300, RFC 5321 4.5.3.2.7): time to send one
    /// whole command line, counted from the reply to the previous one; also the longest pause
    /// inside the message data. Past it: `421 4.4.2` and the connection is closed.
    #[serde(default = "default_command_timeout_secs")]
    pub command_timeout_secs: u64,
    /// `idle_timeout_secs` (optional, default 600): time a connection may stay open without
    /// handing over a message (from the greeting, then from the end of the last message);
    /// NOOP, RSET, HELP, VRFY, EHLO and envelope commands do not restart it. Past it: `421 4.4.2`.
    #[serde(default = "default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// `transaction_timeout_secs` (optional, default 1800): time from MAIL to the end of the
    /// message data. Past it: `421 4.4.2`. At least the data deadline (see the next two keys).
    #[serde(default = "default_transaction_timeout_secs")]
    pub transaction_timeout_secs: u64,
    /// `data_timeout_secs` (optional, default 600, RFC 5321 4.5.3.2.6) and
    /// `data_min_bytes_per_sec` (optional, default 16384): the message data must arrive within
    /// `data_timeout_secs + max_message_bytes / data_min_bytes_per_sec` seconds after 354
    /// (1240 s with the defaults). Past it: `421 4.4.2`, nothing is stored.
    #[serde(default = "default_data_timeout_secs")]
    pub data_timeout_secs: u64,
    #[serde(default = "default_data_min_bytes_per_sec")]
    pub data_min_bytes_per_sec: u64,

    /// The resolved relay password, filled in by validation.
    #[serde(skip)]
    resolved_relay_password: Option<Secret>,
}

fn default_from_name() -> String {
    "Reach".to_owned()
}
fn default_max_message_bytes() -> usize {
    10 * 1024 * 1024
}
fn default_max_connections() -> usize {
    100
}
fn default_relay_connections() -> usize {
    4
}
fn default_digest_window_secs() -> u64 {
    30
}
fn default_alias_idle_days() -> u64 {
    30
}
fn default_max_connections_per_ip() -> usize {
    20
}
fn default_command_timeout_secs() -> u64 {
    300
}
fn default_idle_timeout_secs() -> u64 {
    600
}
fn default_transaction_timeout_secs() -> u64 {
    1800
}
fn default_data_timeout_secs() -> u64 {
    600
}
fn default_data_min_bytes_per_sec() -> u64 {
    16384
}

impl EmailConfig {
    /// The SMTP listener's connection caps and deadlines.
    fn validate_listener_limits(&self, origin: &Origin<'_>) -> Result<(), ConfigError> {
        if self.max_connections_per_ip == 0 {
            return Err(origin.invalid("email.max_connections_per_ip", "must be at least 1"));
        }
        const DAY: u64 = 86_400;
        for (key, secs) in [
            ("email.command_timeout_secs", self.command_timeout_secs),
            ("email.idle_timeout_secs", self.idle_timeout_secs),
            (
                "email.transaction_timeout_secs",
                self.transaction_timeout_secs,
            ),
            ("email.data_timeout_secs", self.data_timeout_secs),
        ] {
            if !(1..=DAY).contains(&secs) {
                return Err(origin.invalid(key, "must be from 1 to 86400 seconds"));
            }
        }
        if self.data_min_bytes_per_sec == 0 {
            return Err(origin.invalid("email.data_min_bytes_per_sec", "must be at least 1"));
        }
        let data = self.smtp_data_deadline_secs();
        if self.transaction_timeout_secs < data {
            return Err(origin.invalid(
                "email.transaction_timeout_secs",
                format!(
                    "must be at least the data deadline, data_timeout_secs + max_message_bytes / data_min_bytes_per_sec = {data} s, or a message of the maximum size sent at the minimum rate would be cut"
                ),
            ));
        }
        Ok(())
    }

    /// Seconds the message data may take after 354 (see `data_timeout_secs`).
    pub fn smtp_data_deadline_secs(&self) -> u64 {
        self.data_timeout_secs
            .saturating_add(self.max_message_bytes as u64 / self.data_min_bytes_per_sec.max(1))
    }

    fn validate(&mut self, origin: &Origin<'_>) -> Result<(), ConfigError> {
        let relay_ok = ["smtp://", "smtp+starttls://", "smtps://"]
            .iter()
            .any(|scheme| {
                self.relay
                    .strip_prefix(scheme)
                    .is_some_and(|rest| !rest.is_empty())
            });
        if !relay_ok {
            return Err(origin.invalid(
                "email.relay",
                format!(
                    "'{}' is not a relay URL; write smtp://host:port, smtp+starttls://host:port or smtps://host:port",
                    self.relay
                ),
            ));
        }
        self.from_address = self
            .from_address_set
            .clone()
            .unwrap_or_else(|| format!("reach@{}", self.reply_domain));
        // A default built from a bad reply_domain is reported as the reply_domain's fault below.
        if self.from_address_set.is_some()
            && crate::address::Email::parse(&self.from_address).is_err()
        {
            return Err(origin.invalid(
                "email.from_address",
                format!("'{}' is not an email address", self.from_address),
            ));
        }
        if let Some(message) = lowercase_domain_problem(&self.reply_domain) {
            return Err(origin.invalid("email.reply_domain", message));
        }
        if let Some(message) = host_port_problem(&self.listen) {
            return Err(origin.invalid("email.listen", message));
        }
        if self.from_name.chars().any(char::is_control) {
            return Err(origin.invalid(
                "email.from_name",
                "must not contain line breaks or control characters",
            ));
        }
        if self.max_message_bytes < 1024 {
            return Err(origin.invalid("email.max_message_bytes", "must be at least 1024"));
        }
        if !(1..=64).contains(&self.connections) {
            return Err(origin.invalid("email.connections", "must be from 1 to 64"));
        }
        if self.max_connections == 0 {
            return Err(origin.invalid("email.max_connections", "must be at least 1"));
        }
        if self.alias_idle_days == 0 {
            return Err(origin.invalid("email.alias_idle_days", "must be at least 1"));
        }
        self.validate_listener_limits(origin)?;
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                self.tls_cert = Some(origin.resolve(cert));
                self.tls_key = Some(origin.resolve(key));
            }
            (None, None) => {}
            _ => {
                return Err(origin.invalid(
                    "email.tls_cert",
                    "give both tls_cert and tls_key, or neither",
                ))
            }
        }
        self.resolved_relay_password = match (self.relay_password.take(), &self.relay_password_file)
        {
            (Some(_), Some(_)) => {
                return Err(origin.invalid(
                    "email.relay_password",
                    "give either relay_password or relay_password_file, not both",
                ))
            }
            (Some(p), None) => Some(p),
            (None, Some(file)) => {
                let file = origin.resolve(file);
                let text = std::fs::read_to_string(&file).map_err(|e| {
                    origin.invalid(
                        "email.relay_password_file",
                        format!("cannot read {}: {e}", file.display()),
                    )
                })?;
                Some(Secret::new(text.trim_end_matches(['\r', '\n'])))
            }
            (None, None) => None,
        };
        if self.resolved_relay_password.is_some() != self.relay_username.is_some() {
            return Err(origin.invalid(
                "email.relay_username",
                "give relay_username and a password together",
            ));
        }
        Ok(())
    }

    /// The relay password, if any. Never log it.
    pub fn relay_password(&self) -> Option<&Secret> {
        self.resolved_relay_password.as_ref()
    }

    /// The listener's and EHLO's host name.
    pub fn hostname(&self) -> &str {
        self.hostname.as_deref().unwrap_or(&self.reply_domain)
    }
}

/// `[component]`: the XEP-0114 component link to the XMPP server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComponentConfig {
    /// `domain` (required): the component domain D, e.g. `reach.example.org`. Reach addresses
    /// are `HANDLE@D`. It must match the component declared in the XMPP server's config, and be
    /// a lowercase domain name.
    pub domain: String,
    /// `server` (required): `host:port` of the XMPP server's component listener, e.g.
    /// `127.0.0.1:5347`. An IPv6 host is written in brackets: `[::1]:5347`.
    pub server: String,
    /// `secret`: the shared secret of the component, as in the XMPP server's config. Exactly one
    /// of `secret` and `secret_file` must be given.
    secret: Option<Secret>,
    /// `secret_file`: a file holding the shared secret (trailing line breaks are ignored), so the
    /// config file itself can be world-readable. Exactly one of `secret` and `secret_file`.
    secret_file: Option<PathBuf>,
    /// `ping_to` (optional): the JID Reach pings when the link has been idle, normally the
    /// server's main host. Default: D without its first label (`reach.example.org` →
    /// `example.org`), or D itself if it has a single label.
    ping_to: Option<String>,
    /// `idle_ping_secs` (optional, default 60): seconds of silence on the link after which Reach
    /// pings the server.
    #[serde(default = "default_idle_ping_secs")]
    pub idle_ping_secs: u64,
    /// `ping_timeout_secs` (optional, default 20): seconds without an answer to that ping after
    /// which the link is considered dead and Reach reconnects.
    #[serde(default = "default_ping_timeout_secs")]
    pub ping_timeout_secs: u64,
    /// The resolved secret (from `secret` or `secret_file`), filled in by validation.
    #[serde(skip)]
    resolved_secret: Secret,
}

fn default_idle_ping_secs() -> u64 {
    60
}

fn default_ping_timeout_secs() -> u64 {
    20
}

/// `[users]`: who may use Reach.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsersConfig {
    /// `allowed_domains` (required, not empty): the domains whose users may register, e.g.
    /// `["example.org"]`. Users from other domains get `<not-allowed/>`. Lowercase domain names.
    pub allowed_domains: Vec<String>,
}

impl UsersConfig {
    /// Whether users of `domain` (a JID domain, already lowercase) may use Reach.
    pub fn allows(&self, domain: &str) -> bool {
        self.allowed_domains.iter().any(|d| d == domain)
    }
}

/// `[store]`: Reach's durable data.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `url` (this or `path`): where the store is. `sled:///var/lib/reach` is the embedded
    /// store in that folder (created if missing; one Reach process); `postgres://USER@HOST/DB`
    /// (also `postgresql://`) a PostgreSQL database that several Reach instances may share
    /// (its tables are created and migrated at start; the connection is not encrypted: use a
    /// Unix socket, `postgres://reach@%2Frun%2Fpostgresql/reach`, or a private network). Back it
    /// up; losing it loses all registrations, sessions and queued messages.
    url: Option<String>,
    /// `path` (this or `url`): the folder of an embedded store, as `url = "sled://PATH"`.
    path: Option<PathBuf>,
    /// `password_file` (optional, PostgreSQL only): a file holding the database password, so
    /// that the URL in this file carries none. Never logged.
    password_file: Option<PathBuf>,
    /// `instance` (optional): this instance's name among the Reach instances sharing one
    /// PostgreSQL store; each needs its own (a second start under a name in use is refused).
    /// Default: the machine's host name. The environment variable `REACH_INSTANCE` overrides it
    /// (for a systemd template unit). The embedded store has one instance and ignores it.
    instance: Option<String>,
    #[serde(skip)]
    resolved: Option<crate::store::Location>,
    #[serde(skip)]
    resolved_instance: String,
}

/// `[log]`: logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `level` (optional, default `"info"`): a tracing `EnvFilter` directive such as `"info"`
    /// or `"info,reach::xmpp=debug"` (per-module levels). The `RUST_LOG` environment variable
    /// overrides it. Message bodies, phone numbers and email addresses are only logged at
    /// `debug` and below.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// `format` (optional, default `"text"`): `"text"` for people, `"json"` for one JSON object
    /// per line (log collectors). The command-line flag `--log-format` overrides it.
    #[serde(default)]
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields` (with `message`).
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<LogFormat, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format '{other}': use \"text\" or \"json\""
            )),
        }
    }
}

fn default_log_level() -> String {
    "info".to_owned()
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_log_level(),
            format: LogFormat::default(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Config errors that name `[section] key` (issue 11)
// ---------------------------------------------------------------------------------------------

/// `email.from_address` → `[email] from_address`; a key without a section stays as it is.
fn section_key(key: &str) -> String {
    match key.rsplit_once('.') {
        Some((section, rest)) => format!("[{section}] {rest}"),
        None => key.to_string(),
    }
}

/// Turns toml's error into one line naming the line and the `[section] key`:
/// `[email] relay: missing from the section at line 65`, `line 5: [component] idle_ping: unknown key (...)`,
/// `[users]: missing section`. A pure syntax error keeps toml's own text, which shows the line.
fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim();
    let start = error
        .span()
        .map(|span| span.start.min(text.len()))
        .filter(|&start| text.is_char_boundary(start));
    let line = start.map(|start| text[..start].matches('\n').count() + 1);
    let at = |what: String| match line {
        Some(line) => format!("line {line}: {what}"),
        None => what,
    };
    let section = start.and_then(|start| section_at(text, start));
    let quoted = |prefix: &str| {
        message
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('`').next())
            .map(str::to_string)
    };
    if let Some(key) = quoted("missing field `") {
        // A missing top-level key is a missing section: toml points at the document, or at the
        // section it was looking in, so tell the two apart by the name.
        return match section.filter(|_| !ROOT_SECTIONS.contains(&key.as_str())) {
            Some(section) => match line {
                Some(line) => format!("[{section}] {key}: missing from the section at line {line}"),
                None => format!("[{section}] {key}: missing"),
            },
            None if ROOT_SECTIONS.contains(&key.as_str()) => format!("[{key}]: missing section"),
            None => format!("{key}: missing"),
        };
    }
    if let Some(key) = quoted("unknown field `") {
        let known = message
            .split_once(", expected ")
            .map(|(_, known)| format!(" (known: {known})"))
            .unwrap_or_default();
        return match section.filter(|section| *section != key) {
            Some(section) => at(format!("[{section}] {key}: unknown key{known}")),
            None => at(format!("[{key}]: unknown section{known}")),
        };
    }
    let value_error = [
        "invalid type",
        "invalid value",
        "unknown variant",
        "invalid length",
    ]
    .iter()
    .any(|p| message.starts_with(p));
    match start.and_then(|start| key_on_line(text, start)) {
        Some(key) if value_error => match section {
            Some(section) => at(format!("[{section}] {key}: {message}")),
            None => at(format!("{key}: {message}")),
        },
        _ => error.to_string().trim_end().to_owned(),
    }
}

/// The top-level keys of the file: each is a section.
const ROOT_SECTIONS: &[&str] = &[
    "component",
    "users",
    "store",
    "log",
    "email",
    "sms",
    "metrics",
    "routing",
    "limits",
    "integrated",
];

/// The name of the `[section]` whose header is on or above the line holding byte `pos`.
fn section_at(text: &str, pos: usize) -> Option<String> {
    let mut section = None;
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if offset > pos {
            break;
        }
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            let name = trimmed.trim_start_matches('[');
            if let Some(end) = name.find(']') {
                section = Some(name[..end].trim().to_string());
            }
        }
        offset += line.len();
    }
    section
}

/// The key of the `key = value` line holding byte `pos`.
fn key_on_line(text: &str, pos: usize) -> Option<String> {
    let line_start = text[..pos].rfind('\n').map_or(0, |p| p + 1);
    let line = text[line_start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim().trim_matches('"');
    (!key.is_empty() && !key.starts_with('[')).then(|| key.to_string())
}

/// Reads, parses and validates the config file at `path`, and resolves the secret.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    Config::from_toml(&text, path)
}

/// `reach check-config FILE`: loads the file like [`load`] and returns a one-paragraph summary
/// of what Reach would do with it (never the secret).
pub fn check(path: &Path) -> Result<String, ConfigError> {
    load(path).map(|config| config.summary())
}

/// Validation context: the file (for messages) and the folder relative paths start from.
struct Origin<'a> {
    path: &'a Path,
}

impl Origin<'_> {
    fn invalid(&self, key: &'static str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            key,
            message: message.into(),
        }
    }

    /// `p` if absolute, else `p` under the config file's folder.
    fn resolve(&self, p: &Path) -> PathBuf {
        match self.path.parent() {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.to_owned(),
        }
    }
}

impl Config {
    /// Parses and validates config text; `path` is the file it came from, used in error messages
    /// and as the base of relative paths (`secret_file`, `store.path`).
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: describe_toml_error(text, &e),
        })?;
        config.validate(&Origin { path })?;
        Ok(config)
    }

    fn validate(&mut self, origin: &Origin<'_>) -> Result<(), ConfigError> {
        self.component.validate(origin)?;
        self.users.validate(origin)?;
        self.store.validate(origin)?;
        self.log.validate(origin)?;
        if let Some(email) = &mut self.email {
            email.validate(origin)?;
        }
        if let Some(sms) = &mut self.sms {
            sms.validate(origin)?;
        }
        self.limits.validate(origin)?;
        if let Some(metrics) = &mut self.metrics {
            metrics.validate(origin)?;
        }
        if let Some(integrated) = &self.integrated {
            integrated.validate(origin, &self.users)?;
        }
        Ok(())
    }

    /// The component secret, from `secret` or `secret_file`. `expose()` it for the XEP-0114
    /// handshake only; never log it.
    pub fn secret(&self) -> &Secret {
        &self.component.resolved_secret
    }

    /// A one-paragraph, human-readable account of what Reach would run with this configuration,
    /// for `reach check-config`. Does not include the secret.
    pub fn summary(&self) -> String {
        let c = &self.component;
        let secret_from = match &c.secret_file {
            Some(file) => format!("the secret in {}", file.display()),
            None => "the secret given in the file".to_owned(),
        };
        format!(
            "Reach would connect to the XMPP server's component listener at {server} as the \
             component {domain}, authenticating with {secret_from}; reach addresses would be \
             HANDLE@{domain}. When the link is idle for {idle} s it would ping {ping_to}, and \
             reconnect if no answer comes within {timeout} s. Users from {allowed} could register. \
             The store would be {store}. Logging would use the filter \"{level}\" \
             (RUST_LOG overrides it) and the {format} format. {metrics}{prefixes}",
            server = c.server,
            domain = c.domain,
            idle = c.idle_ping_secs,
            ping_to = c.ping_to(),
            timeout = c.ping_timeout_secs,
            allowed = list_in_words(&self.users.allowed_domains),
            store = match self.store.location() {
                crate::store::Location::Sled(path) =>
                    format!("kept in {} (the embedded engine)", path.display()),
                location @ crate::store::Location::Postgres { .. } => format!(
                    "the PostgreSQL database {location}, shared by instances by name; this one \
                     is \"{}\"",
                    self.store.instance()
                ),
            },
            level = self.log.level,
            format = match self.log.format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            },
            metrics = match &self.metrics {
                Some(m) => format!(
                    "Metrics would be served at http://{}/metrics and counts at /stats.",
                    m.listen
                ),
                None => "No metrics endpoint would be served.".to_owned(),
            },
            prefixes = match &self.sms {
                Some(sms) if sms.allowed_prefixes.is_empty() => ALL_COUNTRIES_WARNING,
                _ => "",
            },
        )
    }
}

/// What `check-config` adds (and Reach logs at start) when SMS may go to every country.
pub const ALL_COUNTRIES_WARNING: &str =
    " Warning: [sms] allowed_prefixes is empty, so Reach would \
     text every country; list the country codes your users have (e.g. [\"+1\", \"+44\"]) so that \
     verification codes cannot be pumped to premium-rate numbers abroad.";

/// `a`, `a and b`, `a, b and c`.
fn list_in_words(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// Why `s` is not a lowercase domain name, as a message for `key`.
fn lowercase_domain_problem(s: &str) -> Option<String> {
    if let Some(problem) = domain_problem(s, false) {
        return Some(format!("'{s}' is not a valid domain: it {problem}"));
    }
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        return Some(format!(
            "'{s}' is not a valid domain: write it in lowercase ('{}')",
            s.to_ascii_lowercase()
        ));
    }
    None
}

/// Why `s` is not `host:port`, or `None`.
fn host_port_problem(s: &str) -> Option<String> {
    let bad = |why: &str| Some(format!("'{s}' is not host:port ({why})"));
    let Some((host, port)) = s.rsplit_once(':') else {
        return bad("the port is missing, e.g. 127.0.0.1:5347");
    };
    match port.parse::<u16>() {
        Ok(0) | Err(_) => return bad("the port must be a number from 1 to 65535"),
        Ok(_) => {}
    }
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        if inner.parse::<std::net::Ipv6Addr>().is_err() {
            return bad("the part in brackets is not an IPv6 address");
        }
        return None;
    }
    if host.is_empty() {
        return bad("the host is missing");
    }
    if host.contains(':') {
        return bad("write an IPv6 address in brackets, e.g. [::1]:5347");
    }
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    {
        return bad("the host may contain only letters, digits, '.', '-' and '_'");
    }
    None
}

impl ComponentConfig {
    fn validate(&mut self, origin: &Origin<'_>) -> Result<(), ConfigError> {
        if let Some(message) = lowercase_domain_problem(&self.domain) {
            return Err(origin.invalid("component.domain", message));
        }
        if let Some(message) = host_port_problem(&self.server) {
            return Err(origin.invalid("component.server", message));
        }
        self.resolved_secret = match (&self.secret, &self.secret_file) {
            (Some(_), Some(_)) => {
                return Err(origin.invalid(
                    "component",
                    "both secret and secret_file are set; keep only one",
                ))
            }
            (None, None) => {
                return Err(origin.invalid(
                    "component",
                    "neither secret nor secret_file is set; set one of them",
                ))
            }
            (Some(secret), None) => {
                if secret.expose().is_empty() {
                    return Err(origin.invalid("component.secret", "must not be empty"));
                }
                secret.clone()
            }
            (None, Some(file)) => {
                let file = origin.resolve(file);
                let text = std::fs::read_to_string(&file).map_err(|e| {
                    origin.invalid(
                        "component.secret_file",
                        format!("cannot read {}: {e}", file.display()),
                    )
                })?;
                let secret = text.trim_end_matches(['\r', '\n']);
                if secret.is_empty() {
                    return Err(origin.invalid(
                        "component.secret_file",
                        format!("{} is empty", file.display()),
                    ));
                }
                self.secret_file = Some(file);
                Secret::new(secret)
            }
        };
        match &self.ping_to {
            Some(ping_to) => {
                if jid::Jid::new(ping_to).is_err() {
                    return Err(origin.invalid(
                        "component.ping_to",
                        format!("'{ping_to}' is not a valid JID"),
                    ));
                }
            }
            None => self.ping_to = Some(default_ping_to(&self.domain).to_owned()),
        }
        if self.idle_ping_secs == 0 {
            return Err(origin.invalid("component.idle_ping_secs", "must be at least 1"));
        }
        if self.ping_timeout_secs == 0 {
            return Err(origin.invalid("component.ping_timeout_secs", "must be at least 1"));
        }
        Ok(())
    }

    /// The JID pinged when the link is idle (`ping_to`, or its default).
    pub fn ping_to(&self) -> &str {
        self.ping_to
            .as_deref()
            .unwrap_or_else(|| default_ping_to(&self.domain))
    }

    /// `idle_ping_secs` as a duration.
    pub fn idle_ping(&self) -> Duration {
        Duration::from_secs(self.idle_ping_secs)
    }

    /// `ping_timeout_secs` as a duration.
    pub fn ping_timeout(&self) -> Duration {
        Duration::from_secs(self.ping_timeout_secs)
    }

    /// The secret file, resolved against the config file's folder, if the secret came from one.
    pub fn secret_file(&self) -> Option<&Path> {
        self.secret_file.as_deref()
    }
}

/// D without its first label, or D itself if it has a single label.
fn default_ping_to(domain: &str) -> &str {
    match domain.split_once('.') {
        Some((_, rest)) if !rest.is_empty() => rest,
        _ => domain,
    }
}

impl UsersConfig {
    fn validate(&mut self, origin: &Origin<'_>) -> Result<(), ConfigError> {
        if self.allowed_domains.is_empty() {
            return Err(origin.invalid(
                "users.allowed_domains",
                "is empty; list the domains whose users may register, e.g. [\"example.org\"]",
            ));
        }
        for domain in &self.allowed_domains {
            if let Some(message) = lowercase_domain_problem(domain) {
                return Err(origin.invalid("users.allowed_domains", message));
            }
        }
        Ok(())
    }
}

impl IntegratedConfig {
    fn validate(&self, origin: &Origin<'_>, users: &UsersConfig) -> Result<(), ConfigError> {
        if self.hosts.is_empty() {
            return Err(origin.invalid(
                "integrated.hosts",
                "is empty; list the hosts that copy their users' messages to Reach, e.g. \
                 [\"example.org\"] (or leave out the [integrated] section)",
            ));
        }
        for host in &self.hosts {
            if let Some(message) = lowercase_domain_problem(host) {
                return Err(origin.invalid("integrated.hosts", message));
            }
            if !users.allows(host) {
                return Err(origin.invalid(
                    "integrated.hosts",
                    format!("{host} is not in users.allowed_domains: its users could not register"),
                ));
            }
        }
        Ok(())
    }
}

impl StoreConfig {
    /// Where the store is (set by validation).
    pub fn location(&self) -> &crate::store::Location {
        static NONE: std::sync::OnceLock<crate::store::Location> = std::sync::OnceLock::new();
        self.resolved.as_ref().unwrap_or_else(|| {
            NONE.get_or_init(|| crate::store::Location::Sled(PathBuf::from("data")))
        })
    }

    /// The embedded store's folder, if the store is embedded.
    pub fn sled_path(&self) -> Option<&Path> {
        match self.location() {
            crate::store::Location::Sled(path) => Some(path),
            crate::store::Location::Postgres { .. } => None,
        }
    }

    /// This instance's name (see `instance`).
    pub fn instance(&self) -> &str {
        &self.resolved_instance
    }

    fn validate(&mut self, origin: &Origin<'_>) -> Result<(), ConfigError> {
        use crate::store::Location;
        let location = match (self.url.take(), self.path.take()) {
            (Some(_), Some(_)) => {
                return Err(origin.invalid("store.url", "give either url or path, not both"))
            }
            (None, None) => {
                return Err(origin.invalid(
                    "store.url",
                    "is required: url = \"sled:///var/lib/reach\" (or path = ...) for the \
                     embedded store, or a postgres:// URL",
                ))
            }
            (None, Some(path)) => {
                if path.as_os_str().is_empty() {
                    return Err(origin.invalid("store.path", "must not be empty"));
                }
                Location::Sled(path)
            }
            (Some(url), None) => {
                Location::parse(&url).map_err(|why| origin.invalid("store.url", why))?
            }
        };
        let location = match location {
            Location::Sled(path) => {
                if self.password_file.is_some() {
                    return Err(
                        origin.invalid("store.password_file", "is for a PostgreSQL store only")
                    );
                }
                let path = origin.resolve(&path);
                if path.exists() && !path.is_dir() {
                    return Err(origin.invalid(
                        "store.path",
                        format!("{} exists and is not a folder", path.display()),
                    ));
                }
                Location::Sled(path)
            }
            Location::Postgres { url, .. } => {
                let password = match &self.password_file {
                    Some(file) => {
                        let file = origin.resolve(file);
                        let text = std::fs::read_to_string(&file).map_err(|e| {
                            origin.invalid(
                                "store.password_file",
                                format!("cannot read {}: {e}", file.display()),
                            )
                        })?;
                        Some(text.trim_end_matches(['\r', '\n']).to_owned())
                    }
                    None => None,
                };
                Location::Postgres { url, password }
            }
        };
        self.resolved = Some(location);
        let instance = std::env::var("REACH_INSTANCE")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .or_else(|| self.instance.clone())
            .unwrap_or_else(host_name);
        if instance.is_empty()
            || !instance
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c))
        {
            return Err(origin.invalid(
                "store.instance",
                "must be letters, digits, '.', '_', '-' or '@'",
            ));
        }
        self.resolved_instance = instance;
        Ok(())
    }
}

/// The machine's host name (the default instance name), or "reach".
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "reach".to_owned())
}

impl LogConfig {
    fn validate(&mut self, origin: &Origin<'_>) -> Result<(), ConfigError> {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.level) {
            return Err(origin.invalid(
                "log.level",
                format!("'{}' is not a valid log filter: {e}", self.level),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../config.toml.example");

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("/etc/reach/config.toml"))
    }

    fn minimal(component_extra: &str) -> String {
        format!(
            "[component]\n\
             domain = \"reach.example.org\"\n\
             server = \"127.0.0.1:5347\"\n\
             {component_extra}\n\
             [users]\n\
             allowed_domains = [\"example.org\"]\n\
             [store]\n\
             path = \"/var/lib/reach\"\n"
        )
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    /// A file in the temp folder, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, content: &str) -> TempFile {
            let path = std::env::temp_dir().join(format!(
                "reach-config-test-{}-{name}-{}",
                std::process::id(),
                rand::random::<u64>()
            ));
            std::fs::write(&path, content).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn example_file_parses() {
        let config = parse(EXAMPLE).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.component.domain, "reach.example.org");
        assert_eq!(config.component.ping_to(), "example.org");
        assert_eq!(config.component.idle_ping(), Duration::from_secs(60));
        assert_eq!(config.component.ping_timeout(), Duration::from_secs(20));
        assert_eq!(config.users.allowed_domains, ["example.org"]);
        assert_eq!(config.store.sled_path(), Some(Path::new("/var/lib/reach")));
        assert_eq!(config.log.level, "info");
        assert_eq!(config.log.format, LogFormat::Text);
        assert_eq!(config.metrics.unwrap().listen, "127.0.0.1:9464");
    }

    #[test]
    fn log_format_and_metrics_are_checked() {
        let config = parse(&minimal("secret = \"s\"")).unwrap();
        assert_eq!(config.log.format, LogFormat::Text);
        assert!(config.metrics.is_none());
        assert!(config.summary().contains("No metrics endpoint"));
        let text = format!(
            "{}[log]\nformat = \"json\"\n[metrics]\nlisten = \"127.0.0.1:9464\"\n",
            minimal("secret = \"s\"")
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.log.format, LogFormat::Json);
        assert!(config.summary().contains("http://127.0.0.1:9464/metrics"));
        let text = format!("{}[log]\nformat = \"xml\"\n", minimal("secret = \"s\""));
        let e = err(&text);
        assert!(e.contains("format") && e.contains("xml"), "{e}");
        let text = format!(
            "{}[metrics]\nlisten = \"9464\"\n",
            minimal("secret = \"s\"")
        );
        assert!(err(&text).contains("[metrics] listen: '9464' is not host:port"));
        let text = format!("{}[metrics]\nport = 9464\n", minimal("secret = \"s\""));
        assert!(err(&text).contains("[metrics] port: unknown key"));
        let text = format!("{}[metrics]\n", minimal("secret = \"s\""));
        assert!(err(&text).contains("[metrics] listen: missing from the section at line"));
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert!("JSON".parse::<LogFormat>().is_err());
    }

    #[test]
    fn example_file_documents_every_option() {
        for key in [
            "[component]",
            "domain",
            "server",
            "secret",
            "secret_file",
            "ping_to",
            "idle_ping_secs",
            "ping_timeout_secs",
            "[users]",
            "allowed_domains",
            "[store]",
            "path",
            "[log]",
            "level",
            "format",
            "[metrics]",
            "listen",
            "[integrated]",
            "hosts",
        ] {
            assert!(EXAMPLE.contains(key), "config.toml.example lacks {key}");
        }
        // Uncommenting the alternatives still gives a valid file (secret_file replaces secret).
        let secret = TempFile::new("example", "s3cret\n");
        let uncommented: String = EXAMPLE
            .lines()
            .map(|line| {
                if line.starts_with("secret = ") {
                    String::new()
                } else if line.starts_with("# secret_file = ") {
                    format!("secret_file = {:?}", secret.0.display().to_string())
                } else if let Some(rest) = line.strip_prefix("# ping_to = ") {
                    format!("ping_to = {rest}")
                } else if line == "# [integrated]" {
                    "[integrated]".to_owned()
                } else if let Some(rest) = line.strip_prefix("# hosts = ") {
                    format!("hosts = {rest}")
                } else {
                    line.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let config = parse(&uncommented).unwrap_or_else(|e| panic!("{e}\n{uncommented}"));
        assert_eq!(config.secret().expose(), "s3cret");
        assert_eq!(config.component.ping_to(), "example.org");
        assert_eq!(config.integrated.unwrap().hosts, ["example.org"]);
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let config = parse(&minimal("secret = \"s3cret\"")).unwrap();
        assert_eq!(config.secret().expose(), "s3cret");
        assert_eq!(config.component.idle_ping_secs, 60);
        assert_eq!(config.component.ping_timeout_secs, 20);
        assert_eq!(config.log.level, "info");
        assert_eq!(config.component.secret_file(), None);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err(&minimal("secret = \"s\"\nidle_ping = 5"));
        assert!(e.contains("[component] idle_ping: unknown key"), "{e}");
        assert!(e.contains("/etc/reach/config.toml"), "{e}");
        assert!(e.contains("line 5"), "{e}");

        let e = err(&format!(
            "{}[logging]\nlevel = \"debug\"\n",
            minimal("secret = \"s\"")
        ));
        assert!(e.contains("[logging]: unknown section"), "{e}");

        let e = err(&format!(
            "{}[log]\nlevle = \"debug\"\n",
            minimal("secret = \"s\"")
        ));
        assert!(e.contains("[log] levle: unknown key"), "{e}");
    }

    #[test]
    fn missing_required_key_is_named() {
        let text = minimal("secret = \"s\"").replace("server = \"127.0.0.1:5347\"\n", "");
        let e = err(&text);
        assert!(
            e.contains("[component] server: missing from the section at line 1"),
            "{e}"
        );

        let text =
            minimal("secret = \"s\"").replace("[users]\nallowed_domains = [\"example.org\"]\n", "");
        let e = err(&text);
        assert!(e.contains("[users]: missing section"), "{e}");
    }

    #[test]
    fn wrong_type_is_reported() {
        let e = err(&minimal("secret = \"s\"\nidle_ping_secs = \"60\""));
        assert!(e.contains("invalid type"), "{e}");
        assert!(e.contains("line 5: [component] idle_ping_secs: "), "{e}");
    }

    #[test]
    fn from_address_defaults_to_reach_at_the_reply_domain() {
        let email = "[email]\nrelay = \"smtp://127.0.0.1:25\"\n\
                     reply_domain = \"reply.example.org\"\nlisten = \"127.0.0.1:2525\"\n";
        let text = format!("{}{email}", minimal("secret = \"s\""));
        let config = parse(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            config.email.unwrap().from_address,
            "reach@reply.example.org"
        );
        let text = format!(
            "{}{email}from_address = \"bounces@reply.example.org\"\n",
            minimal("secret = \"s\"")
        );
        assert_eq!(
            parse(&text).unwrap().email.unwrap().from_address,
            "bounces@reply.example.org"
        );
        let text = format!(
            "{}{email}from_address = \"nope\"\n",
            minimal("secret = \"s\"")
        );
        assert!(err(&text).contains("[email] from_address: 'nope' is not an email address"));
        // A missing required key of the section is named with its section and line.
        let text = format!(
            "{}{}",
            minimal("secret = \"s\""),
            email.replace("relay = \"smtp://127.0.0.1:25\"\n", "")
        );
        let e = err(&text);
        assert!(
            e.contains("[email] relay: missing from the section at line 9"),
            "{e}"
        );
        assert!(e.starts_with("config file /etc/reach/config.toml: "), "{e}");
    }

    #[test]
    fn a_syntax_error_keeps_tomls_text_with_the_line() {
        let e = err(&minimal("secret = \"s\"\nidle_ping_secs = = 5"));
        assert!(e.contains("line 5"), "{e}");
    }

    #[test]
    fn exactly_one_secret() {
        let e = err(&minimal(
            "secret = \"s\"\nsecret_file = \"/etc/reach/secret\"",
        ));
        assert_eq!(
            e,
            "config file /etc/reach/config.toml: component: both secret and secret_file are set; keep only one"
        );
        let e = err(&minimal(""));
        assert!(e.contains("neither secret nor secret_file"), "{e}");
        let e = err(&minimal("secret = \"\""));
        assert!(e.contains("[component] secret: must not be empty"), "{e}");
    }

    #[test]
    fn secret_file_is_read_and_trimmed() {
        let file = TempFile::new("secret", "top secret \r\n\n");
        let text = minimal(&format!("secret_file = {:?}", file.0.display().to_string()));
        let config = parse(&text).unwrap();
        assert_eq!(config.secret().expose(), "top secret ");
        assert_eq!(config.component.secret_file(), Some(file.0.as_path()));

        let empty = TempFile::new("empty", "\n");
        let text = minimal(&format!(
            "secret_file = {:?}",
            empty.0.display().to_string()
        ));
        assert!(err(&text).contains("is empty"));

        let e = err(&minimal("secret_file = \"/nonexistent/reach/secret\""));
        assert!(
            e.contains("[component] secret_file: cannot read /nonexistent/reach/secret"),
            "{e}"
        );
    }

    #[test]
    fn relative_paths_start_at_the_config_folder() {
        let file = TempFile::new("relative", "s3cret");
        let name = file.0.file_name().unwrap().to_str().unwrap().to_owned();
        let text = minimal(&format!("secret_file = {name:?}")).replace("/var/lib/reach", "data");
        let config = Config::from_toml(&text, &std::env::temp_dir().join("reach.toml")).unwrap();
        assert_eq!(config.secret().expose(), "s3cret");
        assert_eq!(
            config.store.sled_path(),
            Some(std::env::temp_dir().join("data").as_path())
        );
    }

    #[test]
    fn load_reads_the_file_and_names_it() {
        let file = TempFile::new("load.toml", &minimal("secret = \"s3cret\""));
        let config = load(&file.0).unwrap();
        assert_eq!(config.component.domain, "reach.example.org");

        let e = load(Path::new("/nonexistent/reach.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot read config file /nonexistent/reach.toml: "),
            "{e}"
        );

        let bad = TempFile::new("bad.toml", "[component\n");
        let e = load(&bad.0).unwrap_err().to_string();
        assert!(e.contains(&bad.0.display().to_string()), "{e}");
    }

    #[test]
    fn secret_never_shown() {
        let config = parse(&minimal("secret = \"hunter2-very-secret\"")).unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("***"));
        assert!(!config.summary().contains("hunter2"));
    }

    #[test]
    fn ping_to_default() {
        let cases = [
            ("reach.example.org", "example.org"),
            ("reach.localhost", "localhost"),
            ("a.b.c.example", "b.c.example"),
            ("localhost", "localhost"),
        ];
        for (domain, ping_to) in cases {
            let text = minimal("secret = \"s\"").replace("reach.example.org", domain);
            let config = parse(&text).unwrap();
            assert_eq!(config.component.ping_to(), ping_to, "{domain}");
        }
        let config = parse(&minimal("secret = \"s\"\nping_to = \"xmpp.example.org\"")).unwrap();
        assert_eq!(config.component.ping_to(), "xmpp.example.org");
        let e = err(&minimal("secret = \"s\"\nping_to = \"a@b@c\""));
        assert!(
            e.contains("[component] ping_to: 'a@b@c' is not a valid JID"),
            "{e}"
        );
    }

    #[test]
    fn bad_domain() {
        let text = minimal("secret = \"s\"").replace("reach.example.org", "Reach.Example");
        assert_eq!(
            err(&text),
            "config file /etc/reach/config.toml: [component] domain: 'Reach.Example' is not a valid \
             domain: write it in lowercase ('reach.example')"
        );
        for bad in [
            "",
            "reach..example.org",
            "reach_x.example.org",
            "-reach.example.org",
            "reach.example.org.",
        ] {
            let text = minimal("secret = \"s\"").replace("reach.example.org", bad);
            let e = err(&text);
            assert!(e.contains("[component] domain:"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn bad_server() {
        for good in [
            "127.0.0.1:5347",
            "localhost:5347",
            "xmpp_server:5347",
            "[::1]:5347",
        ] {
            let text = minimal("secret = \"s\"").replace("127.0.0.1:5347", good);
            assert!(parse(&text).is_ok(), "{good}");
        }
        for bad in [
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:99999",
            ":5347",
            "::1:5347",
            "[nope]:5347",
            "a b:5347",
        ] {
            let text = minimal("secret = \"s\"").replace("127.0.0.1:5347", bad);
            let e = err(&text);
            assert!(e.contains("[component] server:"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn bad_allowed_domains() {
        let text = minimal("secret = \"s\"").replace("[\"example.org\"]", "[]");
        assert!(err(&text).contains("[users] allowed_domains: is empty"));
        let text = minimal("secret = \"s\"")
            .replace("[\"example.org\"]", "[\"example.org\", \"Example.NET\"]");
        assert!(err(&text).contains("[users] allowed_domains: 'Example.NET' is not a valid domain"));
        let text = minimal("secret = \"s\"")
            .replace("[\"example.org\"]", "[\"example.org\", \"localhost\"]");
        let config = parse(&text).unwrap();
        assert!(config.users.allows("localhost"));
        assert!(!config.users.allows("evil.example"));
    }

    #[test]
    fn other_checks() {
        let text = minimal("secret = \"s\"").replace("/var/lib/reach", "");
        assert!(err(&text).contains("[store] path: must not be empty"));
        let file = TempFile::new("not-a-folder", "x");
        let text =
            minimal("secret = \"s\"").replace("/var/lib/reach", &file.0.display().to_string());
        assert!(err(&text).contains("exists and is not a folder"));
        assert!(err(&minimal("secret = \"s\"\nidle_ping_secs = 0"))
            .contains("[component] idle_ping_secs"));
        assert!(err(&minimal("secret = \"s\"\nping_timeout_secs = 0"))
            .contains("[component] ping_timeout_secs"));
        let text = format!(
            "{}[log]\nlevel = \"reach=loud\"\n",
            minimal("secret = \"s\"")
        );
        assert!(err(&text).contains("[log] level: 'reach=loud' is not a valid log filter"));
        let text = format!(
            "{}[log]\nlevel = \"info,reach::xmpp=debug\"\n",
            minimal("secret = \"s\"")
        );
        assert_eq!(parse(&text).unwrap().log.level, "info,reach::xmpp=debug");
    }

    #[test]
    fn limits_have_defaults_and_are_checked() {
        let config = parse(&minimal("secret = \"s\"")).unwrap();
        assert_eq!(config.limits.to_limits(), crate::core::Limits::default());
        let example = parse(EXAMPLE).unwrap();
        assert_eq!(example.limits.to_limits(), crate::core::Limits::default());
        let text = format!(
            "{}[limits]\nmax_depth = 16\nemails_per_user_per_hour = 5\n",
            minimal("secret = \"s\"")
        );
        let limits = parse(&text).unwrap().limits.to_limits();
        assert_eq!(limits.max_depth, 16);
        assert_eq!(limits.emails_per_user_per_hour, 5);
        assert_eq!(limits.max_body_chars, 10_000);
        for (line, message) in [
            ("max_depth = 2", "[limits] max_depth: must be at least 8"),
            (
                "max_stanza_bytes = 100",
                "[limits] max_stanza_bytes: must be at least 4096",
            ),
            (
                "max_attributes = 0",
                "[limits] max_attributes: must be at least 8",
            ),
            (
                "max_body_chars = 0",
                "[limits] max_body_chars: must be at least 1",
            ),
            (
                "max_body_chars = 300000",
                "[limits] max_body_chars: must be less than limits.max_stanza_bytes",
            ),
            (
                "codes_per_terminal_per_day = 0",
                "[limits] codes_per_terminal_per_day: must be at least 1",
            ),
            (
                "registrations_per_jid_per_hour = 0",
                "[limits] registrations_per_jid_per_hour: must be at least 1",
            ),
            (
                "wrong_codes_per_user_per_day = 0",
                "[limits] wrong_codes_per_user_per_day: must be at least 1",
            ),
            (
                "verification_sms_per_hour = 0",
                "[limits] verification_sms_per_hour: must be at least 1",
            ),
            ("max_deepness = 3", "[limits] max_deepness: unknown key"),
        ] {
            let text = format!("{}[limits]\n{line}\n", minimal("secret = \"s\""));
            let e = err(&text);
            assert!(e.contains(message), "{line}: {e}");
        }
    }

    #[test]
    fn every_section_of_the_example_is_a_known_root_section() {
        let headers: Vec<&str> = EXAMPLE
            .lines()
            .filter_map(|l| l.trim().strip_prefix('[')?.strip_suffix(']'))
            .collect();
        assert!(headers.len() >= 9, "{headers:?}");
        for header in headers {
            assert!(
                ROOT_SECTIONS.contains(&header),
                "[{header}] missing in ROOT_SECTIONS"
            );
        }
    }

    #[test]
    fn check_config_warns_when_sms_may_go_to_every_country() {
        let all = parse(EXAMPLE).unwrap();
        assert!(all.sms.as_ref().unwrap().allowed_prefixes.is_empty());
        assert!(all
            .summary()
            .contains("Warning: [sms] allowed_prefixes is empty"));
        let listed = parse(&EXAMPLE.replace(
            "allowed_prefixes = []",
            "allowed_prefixes = [\"+1\", \"+44\"]",
        ))
        .unwrap();
        assert!(
            !listed.summary().contains("Warning"),
            "{}",
            listed.summary()
        );
    }

    #[test]
    fn storage_limits_are_read_and_checked() {
        let text = format!(
            "{}[limits]\nwaiting_per_user = 50\nheld_per_sender = 5\npending_per_conversation = 7\n\
             buddies_per_user = 9\ndigest_max_items = 3\ndigest_max_chars = 400\n",
            minimal("secret = \"s\"")
        );
        let limits = parse(&text).unwrap().limits.to_limits();
        assert_eq!(
            (
                limits.waiting_per_user,
                limits.held_per_sender,
                limits.pending_per_conversation,
                limits.buddies_per_user,
                limits.digest_max_items,
                limits.digest_max_chars
            ),
            (50, 5, 7, 9, 3, 400)
        );
        for key in [
            "waiting_per_user",
            "held_per_sender",
            "pending_per_conversation",
            "buddies_per_user",
            "digest_max_items",
            "digest_max_chars",
        ] {
            let text = format!("{}[limits]\n{key} = 0\n", minimal("secret = \"s\""));
            let e = err(&text);
            assert!(
                e.contains(&format!("[limits] {key}: must be at least 1")),
                "{key}: {e}"
            );
        }
    }

    #[test]
    fn smtp_listener_limits_have_defaults_and_are_checked() {
        let example = parse(EXAMPLE).unwrap().email.unwrap();
        let email_section = |extra: &str| {
            format!(
                "{}[email]\nrelay = \"smtp://127.0.0.1:25\"\nfrom_address = \"reach@reach.example.org\"\n\
                 reply_domain = \"reach.example.org\"\nlisten = \"127.0.0.1:2525\"\n{extra}\n",
                minimal("secret = \"s\"")
            )
        };
        let defaults = parse(&email_section("")).unwrap().email.unwrap();
        for email in [&example, &defaults] {
            assert_eq!(email.max_connections_per_ip, 20);
            assert_eq!(email.command_timeout_secs, 300);
            assert_eq!(email.idle_timeout_secs, 600);
            assert_eq!(email.transaction_timeout_secs, 1800);
            assert_eq!(email.data_timeout_secs, 600);
            assert_eq!(email.data_min_bytes_per_sec, 16384);
            assert_eq!(
                email.smtp_data_deadline_secs(),
                600 + 10 * 1024 * 1024 / 16384
            );
        }
        // A small global cap with the default per-address cap is fine (the smaller one counts).
        parse(&email_section("max_connections = 3")).unwrap();
        for (line, message) in [
            (
                "max_connections_per_ip = 0",
                "[email] max_connections_per_ip: must be at least 1",
            ),
            (
                "command_timeout_secs = 0",
                "[email] command_timeout_secs: must be from 1 to 86400",
            ),
            (
                "idle_timeout_secs = 90000",
                "[email] idle_timeout_secs: must be from 1 to 86400",
            ),
            (
                "data_min_bytes_per_sec = 0",
                "[email] data_min_bytes_per_sec: must be at least 1",
            ),
            (
                "transaction_timeout_secs = 1000",
                "[email] transaction_timeout_secs: must be at least the data deadline",
            ),
        ] {
            let e = err(&email_section(line));
            assert!(e.contains(message), "{line}: {e}");
        }
    }

    #[test]
    fn summary_reads_well() {
        let config = parse(EXAMPLE).unwrap();
        let summary = config.summary();
        for part in [
            "127.0.0.1:5347",
            "component reach.example.org",
            "ping example.org",
            "60 s",
            "20 s",
            "Users from example.org",
            "/var/lib/reach",
            "\"info\"",
        ] {
            assert!(summary.contains(part), "{part:?} missing in: {summary}");
        }
        assert_eq!(
            list_in_words(&["a".into(), "b".into(), "c".into()]),
            "a, b and c"
        );
    }

    #[test]
    fn check_summarises_a_file() {
        let file = TempFile::new("check.toml", &minimal("secret = \"s3cret\""));
        let summary = check(&file.0).unwrap();
        assert!(summary.starts_with("Reach would connect"), "{summary}");
        assert!(!summary.contains("s3cret"));
    }
}
