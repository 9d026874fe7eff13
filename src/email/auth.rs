//! Optional DMARC enforcement for inbound replies (mail-auth): is a reply really from the domain
//! in its From header, by an aligned DKIM signature or an aligned SPF pass?
//!
//! This module only answers that question ([`Authenticator::dmarc_passes`]); whether a failing or
//! policy-less message is refused is the caller's (configurable) decision. It does not look at
//! tokens, addresses or sessions.
//!
//! DNS answers go through a small cache. [`Authenticator::system`] asks the resolvers of
//! `/etc/resolv.conf` and caches answers for their TTL; [`Authenticator::with_records`] answers
//! from a fixed set of TXT records and says "no such record" to everything else, never touching
//! the network (tests, offline checks).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::resolver::ToFqdn;
use mail_auth::common::verify::DomainKey;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::dmarc::{Dmarc, Policy};
use mail_auth::hickory_resolver::config::{ResolverConfig, ResolverOpts};
use mail_auth::hickory_resolver::proto::op::ResponseCode;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::spf::Spf;
use mail_auth::{
    AuthenticatedMessage, DkimOutput, DkimResult, DmarcOutput, DmarcResult, DnsError, Error,
    MessageAuthenticator, Parameters, RecordSet, ResolverCache, SpfOutput, SpfResult, Txt, MX,
};

/// The verdict on one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DmarcOutcome {
    /// The From domain publishes a DMARC policy and the message passes it (aligned DKIM or SPF).
    Pass,
    /// The From domain publishes a DMARC policy and the message fails it, or the message is not
    /// one DMARC can vouch for (no From, several From fields or domains). The text says why, for a
    /// person. A failure is reported whatever the policy says (`p=none` included).
    Fail(String),
    /// The From domain (and its organisational domain) publish no DMARC policy: DMARC cannot tell.
    NoPolicy,
    /// A DNS lookup failed temporarily; try again later (SMTP 451).
    TempError(String),
}

/// The authenticator cannot be set up.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// The system resolver configuration cannot be read or used.
    #[error("cannot set up DNS resolution from /etc/resolv.conf: {0}")]
    Resolver(String),
}

/// Bound on cached names per record type (system resolver); past it, expired entries go first,
/// then everything.
const MAX_CACHED: usize = 4096;

/// A DNS answer cache in the shape mail-auth asks for. Online, it keeps answers until they
/// expire. Offline (`missing` is set), it holds the answers given in advance and returns
/// `missing` for every other name, so no lookup ever reaches the resolver.
struct DnsCache<K, V> {
    entries: Mutex<HashMap<K, (V, Option<Instant>)>>,
    missing: Option<V>,
}

impl<K: Hash + Eq, V: Clone> DnsCache<K, V> {
    fn online() -> Self {
        DnsCache {
            entries: Mutex::new(HashMap::new()),
            missing: None,
        }
    }

    fn offline(missing: V) -> Self {
        DnsCache {
            entries: Mutex::new(HashMap::new()),
            missing: Some(missing),
        }
    }

    /// Adds an answer that never expires.
    fn put(&self, key: K, value: V) {
        self.lock().insert(key, (value, None));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, (V, Option<Instant>)>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<K: Hash + Eq, V: Clone> ResolverCache<K, V> for DnsCache<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut entries = self.lock();
        match entries.get(name) {
            Some((value, None)) => return Some(value.clone()),
            Some((value, Some(until))) if *until > Instant::now() => return Some(value.clone()),
            Some(_) => {
                entries.remove(name);
            }
            None => {}
        }
        self.missing.clone()
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.lock().remove(name).map(|(value, _)| value)
    }

    fn insert(&self, key: K, value: V, valid_until: Instant) {
        if self.missing.is_some() {
            // Offline: the answers are fixed.
            return;
        }
        let mut entries = self.lock();
        if entries.len() >= MAX_CACHED {
            let now = Instant::now();
            entries.retain(|_, (_, until)| until.is_none_or(|until| until > now));
            if entries.len() >= MAX_CACHED {
                entries.clear();
            }
        }
        entries.insert(key, (value, Some(valid_until)));
    }
}

/// One cache per record type mail-auth looks up.
struct Caches {
    txt: DnsCache<Box<str>, Txt>,
    mx: DnsCache<Box<str>, RecordSet<MX>>,
    ipv4: DnsCache<Box<str>, RecordSet<Ipv4Addr>>,
    ipv6: DnsCache<Box<str>, RecordSet<Ipv6Addr>>,
    ptr: DnsCache<IpAddr, RecordSet<Box<str>>>,
}

fn empty<T>() -> RecordSet<T> {
    RecordSet {
        rrset: Arc::from(Vec::new().into_boxed_slice()),
        dnssec_status: Default::default(),
    }
}

impl Caches {
    fn online() -> Self {
        Caches {
            txt: DnsCache::online(),
            mx: DnsCache::online(),
            ipv4: DnsCache::online(),
            ipv6: DnsCache::online(),
            ptr: DnsCache::online(),
        }
    }

    fn offline() -> Self {
        Caches {
            txt: DnsCache::offline(Txt::Error(Error::Dns(DnsError::RecordNotFound(
                ResponseCode::NXDomain,
            )))),
            mx: DnsCache::offline(empty()),
            ipv4: DnsCache::offline(empty()),
            ipv6: DnsCache::offline(empty()),
            ptr: DnsCache::offline(empty()),
        }
    }
}

/// mail-auth's lookup parameters wired to our caches.
type Params<'a, P> = Parameters<
    'a,
    P,
    DnsCache<Box<str>, Txt>,
    DnsCache<Box<str>, RecordSet<MX>>,
    DnsCache<Box<str>, RecordSet<Ipv4Addr>>,
    DnsCache<Box<str>, RecordSet<Ipv6Addr>>,
    DnsCache<IpAddr, RecordSet<Box<str>>>,
>;

/// Parses one TXT record the way a lookup of `name` would use it: `v=spf1` → SPF, `v=DMARC1` →
/// DMARC, a `._domainkey.` name or `v=DKIM1` → DKIM key; anything else is stored as a record of
/// no known type. A record that does not parse is stored as its parse error, as mail-auth does.
fn parse_txt(name: &str, value: &str) -> Txt {
    fn parsed<T: TxtRecordParser + Into<Txt>>(value: &str) -> Txt {
        match T::parse(value.as_bytes()) {
            Ok(record) => record.into(),
            Err(err) => Txt::Error(err),
        }
    }
    let head = value.trim_start().to_ascii_lowercase();
    if head.starts_with("v=spf1") {
        parsed::<Spf>(value)
    } else if head.starts_with("v=dmarc1") {
        parsed::<Dmarc>(value)
    } else if head.starts_with("v=dkim1") || name.contains("._domainkey.") {
        parsed::<DomainKey>(value)
    } else {
        Txt::Error(Error::Dns(DnsError::InvalidRecordType))
    }
}

/// Checks DKIM, SPF and DMARC for inbound replies.
pub struct Authenticator {
    resolver: MessageAuthenticator,
    caches: Caches,
    host_domain: String,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("offline", &self.caches.txt.missing.is_some())
            .field("host_domain", &self.host_domain)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Resolves through the name servers of `/etc/resolv.conf`, caching answers for their TTL.
    pub fn system() -> Result<Authenticator, AuthError> {
        let resolver = MessageAuthenticator::new_system_conf()
            .map_err(|err| AuthError::Resolver(err.to_string()))?;
        Ok(Authenticator {
            resolver,
            caches: Caches::online(),
            host_domain: "unknown".to_owned(),
        })
    }

    /// For tests and offline use: a resolver whose answers are all given in advance. `txt` holds
    /// (name, TXT value) pairs, one record per name (e.g. `("s1._domainkey.example.org",
    /// "v=DKIM1; k=ed25519; p=...")`, `("_dmarc.example.org", "v=DMARC1; p=reject")`,
    /// `("example.org", "v=spf1 ip4:192.0.2.1 -all")`). Every other lookup (TXT, A, AAAA, MX,
    /// PTR) answers "no such record"; nothing goes to the network.
    pub fn with_records(txt: Vec<(String, String)>) -> Authenticator {
        let caches = Caches::offline();
        for (name, value) in txt {
            let fqdn: Box<str> = name.to_fqdn().into_owned().into_boxed_str();
            let record = parse_txt(&fqdn, &value);
            caches.txt.put(fqdn, record);
        }
        // No name servers: every answer comes from the caches above, and a lookup that slipped
        // past them would fail at once ("no connections available") rather than leave the machine.
        let resolver = MessageAuthenticator::new(
            ResolverConfig::from_parts(None, vec![], vec![]),
            ResolverOpts::default(),
        )
        .expect("hickory builds a resolver without name servers");
        Authenticator {
            resolver,
            caches,
            host_domain: "unknown".to_owned(),
        }
    }

    /// The name of the host doing the check (SPF's `%{r}` macro); "unknown" by default.
    pub fn with_host_domain(mut self, host_domain: impl Into<String>) -> Authenticator {
        self.host_domain = host_domain.into();
        self
    }

    fn params<P>(&self, params: P) -> Params<'_, P> {
        Parameters::new(params)
            .with_txt_cache(&self.caches.txt)
            .with_mx_cache(&self.caches.mx)
            .with_ipv4_cache(&self.caches.ipv4)
            .with_ipv6_cache(&self.caches.ipv6)
            .with_ptr_cache(&self.caches.ptr)
    }

    /// Is this message, received from `peer_ip` after `EHLO helo` and `MAIL FROM:<mail_from>`
    /// (empty for the null sender), DMARC-aligned and passing for the domain of its From header?
    pub async fn dmarc_passes(
        &self,
        raw_message: &[u8],
        peer_ip: IpAddr,
        helo: &str,
        mail_from: &str,
    ) -> DmarcOutcome {
        let Some(message) = AuthenticatedMessage::parse(raw_message) else {
            return DmarcOutcome::Fail("the message has no readable header".to_owned());
        };
        let from_fields = message
            .headers
            .iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case(b"From"))
            .count();
        if from_fields != 1 {
            return DmarcOutcome::Fail(format!(
                "the message has {from_fields} From header fields; DMARC needs exactly one"
            ));
        }
        let mut from_domains: Vec<String> = message
            .from
            .iter()
            .filter_map(|address| address.rsplit_once('@'))
            .map(|(_, domain)| domain.trim_end_matches('.').to_ascii_lowercase())
            .collect();
        from_domains.sort();
        from_domains.dedup();
        let from_domain = match from_domains.as_slice() {
            [] => return DmarcOutcome::Fail("the From header has no address".to_owned()),
            [domain] => domain.clone(),
            _ => {
                return DmarcOutcome::Fail(format!(
                    "the From header names addresses in several domains ({})",
                    from_domains.join(", ")
                ))
            }
        };

        let mail_from = mail_from
            .trim()
            .trim_start_matches('<')
            .trim_end_matches('>');
        let dkim = self.resolver.verify_dkim(self.params(&message)).await;
        let (spf, mail_from_domain) = match mail_from.rsplit_once('@') {
            Some((_, domain)) if !domain.is_empty() => {
                let spf = self
                    .resolver
                    .verify_spf(self.params(SpfParameters::verify_mail_from(
                        peer_ip,
                        helo,
                        &self.host_domain,
                        mail_from,
                    )))
                    .await;
                (spf, domain)
            }
            // The null sender (or a bare local part): SPF checks the HELO identity instead.
            _ => {
                let spf = self
                    .resolver
                    .verify_spf(self.params(SpfParameters::verify_ehlo(
                        peer_ip,
                        helo,
                        &self.host_domain,
                    )))
                    .await;
                (spf, helo)
            }
        };
        let dmarc = self
            .resolver
            .verify_dmarc(self.params(DmarcParameters::new(
                &message,
                &dkim,
                mail_from_domain,
                &spf,
            )))
            .await;
        let outcome = judge(&from_domain, peer_ip, &dkim, &spf, &dmarc);
        tracing::debug!(
            from_domain = %from_domain,
            %peer_ip,
            mail_from = %mail_from,
            dkim = ?dkim.iter().map(|o| o.result().to_string()).collect::<Vec<_>>(),
            spf = %spf.result(),
            ?outcome,
            "DMARC check"
        );
        outcome
    }
}

/// Turns mail-auth's results into the verdict and its explanation.
fn judge(
    from_domain: &str,
    peer_ip: IpAddr,
    dkim: &[DkimOutput<'_>],
    spf: &SpfOutput,
    dmarc: &DmarcOutput,
) -> DmarcOutcome {
    let Some(record) = dmarc.dmarc_record() else {
        // No policy found; a lookup that failed temporarily leaves both results TempError.
        return match (dmarc.dkim_result(), dmarc.spf_result()) {
            (DmarcResult::TempError(err), _) | (_, DmarcResult::TempError(err)) => {
                DmarcOutcome::TempError(format!(
                    "cannot look up the DMARC policy of {from_domain}: {err}"
                ))
            }
            _ => DmarcOutcome::NoPolicy,
        };
    };
    match dmarc.result() {
        DmarcResult::Pass => DmarcOutcome::Pass,
        DmarcResult::TempError(err) => DmarcOutcome::TempError(format!(
            "a DNS lookup for {from_domain} failed temporarily: {err}"
        )),
        DmarcResult::Fail(_) | DmarcResult::PermError(_) | DmarcResult::None => {
            let policy = match record.p {
                Policy::Reject => "p=reject",
                Policy::Quarantine => "p=quarantine",
                Policy::None => "p=none",
                Policy::Unspecified => "no p= tag",
            };
            DmarcOutcome::Fail(format!(
                "{from_domain} publishes a DMARC policy ({policy}) and this message passes \
                 neither check: DKIM: {}; SPF: {}",
                dkim_reason(from_domain, dkim, dmarc),
                spf_reason(from_domain, peer_ip, spf, dmarc)
            ))
        }
    }
}

fn dkim_reason(from_domain: &str, dkim: &[DkimOutput<'_>], dmarc: &DmarcOutput) -> String {
    if dkim.is_empty() {
        return "the message is not signed".to_owned();
    }
    let signatures: Vec<String> = dkim
        .iter()
        .map(|output| {
            let by = output
                .signature()
                .map(|s| s.d.as_str())
                .unwrap_or("an unreadable signature");
            match output.result() {
                DkimResult::Pass => format!("valid signature by {by}"),
                DkimResult::Fail(err)
                | DkimResult::Neutral(err)
                | DkimResult::PermError(err)
                | DkimResult::TempError(err) => {
                    format!("signature by {by} does not verify ({err})")
                }
                DkimResult::None => format!("signature by {by} was not checked"),
            }
        })
        .collect();
    let mut text = signatures.join(", ");
    if matches!(dmarc.dkim_result(), DmarcResult::Fail(Error::NotAligned)) {
        text.push_str(&format!(" (none is by {from_domain})"));
    }
    text
}

fn spf_reason(from_domain: &str, peer_ip: IpAddr, spf: &SpfOutput, dmarc: &DmarcOutput) -> String {
    let domain = spf.domain();
    match spf.result() {
        SpfResult::Pass if matches!(dmarc.spf_result(), DmarcResult::Fail(Error::NotAligned)) => {
            format!("{peer_ip} may send for {domain}, which is not {from_domain}")
        }
        SpfResult::Pass => format!("{peer_ip} may send for {domain}"),
        SpfResult::None => format!("{domain} publishes no SPF record"),
        SpfResult::Fail | SpfResult::SoftFail | SpfResult::Neutral => {
            format!(
                "{peer_ip} is not authorised to send for {domain} (SPF {})",
                spf.result().to_string().to_ascii_lowercase()
            )
        }
        SpfResult::TempError | SpfResult::PermError => format!(
            "the SPF record of {domain} cannot be used (SPF {})",
            spf.result().to_string().to_ascii_lowercase()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256, SigningKey};
    use mail_auth::common::headers::HeaderWriter;
    use mail_auth::dkim::DkimSigner;
    use std::path::PathBuf;

    /// Allowed by the SPF record of example.org.
    const GOOD_IP: &str = "192.0.2.10";
    /// Not allowed by any SPF record (e.g. a forwarder).
    const OTHER_IP: &str = "198.51.100.7";

    fn fixture(name: &str) -> String {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/dkim")
            .join(name);
        std::fs::read_to_string(&path)
            .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
            .trim()
            .to_owned()
    }

    fn private_key(name: &str) -> tokio_rustls::rustls::pki_types::PrivateKeyDer<'static> {
        rustls_pemfile::private_key(&mut fixture(name).as_bytes())
            .unwrap()
            .unwrap()
    }

    fn ed25519_key() -> Ed25519Key {
        match private_key("ed25519.key.pem") {
            tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(der) => {
                Ed25519Key::from_pkcs8_der(der.secret_pkcs8_der()).unwrap()
            }
            other => panic!("not PKCS#8: {other:?}"),
        }
    }

    fn rsa_key() -> RsaKey<Sha256> {
        RsaKey::<Sha256>::from_key_der(private_key("rsa.key.pem")).unwrap()
    }

    fn records() -> Vec<(String, String)> {
        vec![
            ("ed._domainkey.example.org".into(), fixture("ed25519.txt")),
            ("rsa._domainkey.example.org".into(), fixture("rsa.txt")),
            // The same key, published for another domain.
            (
                "ed._domainkey.mailer.example.net".into(),
                fixture("ed25519.txt"),
            ),
            ("_dmarc.example.org".into(), "v=DMARC1; p=reject".into()),
            ("example.org".into(), format!("v=spf1 ip4:{GOOD_IP} -all")),
            (
                "mailer.example.net".into(),
                format!("v=spf1 ip4:{OTHER_IP} -all"),
            ),
            ("_dmarc.lax.example".into(), "v=DMARC1; p=none".into()),
        ]
    }

    fn authenticator() -> Authenticator {
        Authenticator::with_records(records())
    }

    fn reply(from: &str) -> String {
        format!(
            "From: Alice <{from}>\r\n\
             To: r-abcdef@reply.example.com\r\n\
             Subject: Re: IM from Bob (bob@example.net)\r\n\
             Date: Fri, 01 Mar 2024 10:05:00 +0000\r\n\
             Message-ID: <reply-1@example.org>\r\n\
             In-Reply-To: <m1@reply.example.com>\r\n\
             \r\n\
             Sure, see you at 6.\r\n\
             \r\n\
             On Fri, Bob via Reach wrote:\r\n\
             > 10:02 Bob: dinner?\r\n"
        )
    }

    fn sign(key: impl SigningKey, domain: &str, selector: &str, message: &str) -> String {
        let signature = DkimSigner::from_key(key)
            .domain(domain)
            .selector(selector)
            .headers(["From", "To", "Subject", "Date", "Message-ID", "In-Reply-To"])
            .sign(message.as_bytes())
            .unwrap();
        format!("{}{message}", signature.to_header())
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    async fn check(
        auth: &Authenticator,
        message: &str,
        peer: &str,
        mail_from: &str,
    ) -> DmarcOutcome {
        auth.dmarc_passes(message.as_bytes(), ip(peer), "mx.sender.example", mail_from)
            .await
    }

    fn fail_reason(outcome: DmarcOutcome) -> String {
        match outcome {
            DmarcOutcome::Fail(why) => {
                eprintln!("Fail: {why}");
                why
            }
            other => panic!("expected Fail, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn signed_aligned_message_passes_on_dkim_alone() {
        let auth = authenticator();
        let signed = sign(
            ed25519_key(),
            "example.org",
            "ed",
            &reply("alice@example.org"),
        );
        // From an IP SPF does not allow, with a foreign envelope: only DKIM can pass it.
        assert_eq!(
            check(&auth, &signed, OTHER_IP, "bounce@elsewhere.example").await,
            DmarcOutcome::Pass
        );
        assert_eq!(
            check(&auth, &signed, OTHER_IP, "").await,
            DmarcOutcome::Pass
        );
        let signed = sign(rsa_key(), "example.org", "rsa", &reply("alice@example.org"));
        assert_eq!(
            check(&auth, &signed, OTHER_IP, "bounce@elsewhere.example").await,
            DmarcOutcome::Pass
        );
    }

    #[tokio::test]
    async fn unsigned_message_passes_on_aligned_spf() {
        let auth = authenticator();
        assert_eq!(
            check(
                &auth,
                &reply("alice@example.org"),
                GOOD_IP,
                "alice@example.org"
            )
            .await,
            DmarcOutcome::Pass
        );
        assert_eq!(
            check(
                &auth,
                &reply("alice@example.org"),
                GOOD_IP,
                "<alice@example.org>"
            )
            .await,
            DmarcOutcome::Pass
        );
    }

    #[tokio::test]
    async fn altered_body_fails() {
        let auth = authenticator();
        let signed = sign(
            ed25519_key(),
            "example.org",
            "ed",
            &reply("alice@example.org"),
        );
        let altered = signed.replace("see you at 6", "send me your password");
        assert_ne!(altered, signed);
        let why = fail_reason(check(&auth, &altered, OTHER_IP, "alice@example.org").await);
        assert!(
            why.contains("example.org publishes a DMARC policy (p=reject)"),
            "{why}"
        );
        assert!(
            why.contains("signature by example.org does not verify"),
            "{why}"
        );
        assert!(why.to_ascii_lowercase().contains("body hash"), "{why}");
        assert!(
            why.contains(&format!(
                "{OTHER_IP} is not authorised to send for example.org"
            )),
            "{why}"
        );
    }

    #[tokio::test]
    async fn altered_signed_header_fails() {
        let auth = authenticator();
        let signed = sign(
            ed25519_key(),
            "example.org",
            "ed",
            &reply("alice@example.org"),
        );
        let altered = signed.replace("Subject: Re: IM", "Subject: Fw: IM");
        let why = fail_reason(check(&auth, &altered, OTHER_IP, "alice@example.org").await);
        assert!(why.contains("does not verify"), "{why}");
    }

    #[tokio::test]
    async fn from_domain_without_dmarc_record_has_no_policy() {
        let auth = authenticator();
        assert_eq!(
            check(
                &auth,
                &reply("carol@nopolicy.example"),
                OTHER_IP,
                "carol@nopolicy.example"
            )
            .await,
            DmarcOutcome::NoPolicy
        );
        // Even when signed by someone else.
        let signed = sign(
            ed25519_key(),
            "mailer.example.net",
            "ed",
            &reply("carol@nopolicy.example"),
        );
        assert_eq!(
            check(&auth, &signed, OTHER_IP, "").await,
            DmarcOutcome::NoPolicy
        );
    }

    #[tokio::test]
    async fn forged_from_without_signature_or_spf_fails() {
        let auth = authenticator();
        let why = fail_reason(
            check(
                &auth,
                &reply("alice@example.org"),
                OTHER_IP,
                "alice@example.org",
            )
            .await,
        );
        assert!(why.contains("the message is not signed"), "{why}");
        assert!(
            why.contains("not authorised to send for example.org (SPF fail)"),
            "{why}"
        );
        // Forged envelope too, from a domain without SPF.
        let why = fail_reason(
            check(
                &auth,
                &reply("alice@example.org"),
                OTHER_IP,
                "x@nospf.example",
            )
            .await,
        );
        assert!(
            why.contains("nospf.example publishes no SPF record"),
            "{why}"
        );
    }

    #[tokio::test]
    async fn valid_but_unaligned_signature_and_spf_fail() {
        let auth = authenticator();
        // A genuine signature and a genuine SPF pass, both for mailer.example.net, on a message
        // claiming to be from example.org.
        let signed = sign(
            ed25519_key(),
            "mailer.example.net",
            "ed",
            &reply("alice@example.org"),
        );
        let why = fail_reason(check(&auth, &signed, OTHER_IP, "bounce@mailer.example.net").await);
        assert!(
            why.contains("valid signature by mailer.example.net (none is by example.org)"),
            "{why}"
        );
        assert!(
            why.contains(&format!(
                "{OTHER_IP} may send for mailer.example.net, which is not example.org"
            )),
            "{why}"
        );
    }

    #[tokio::test]
    async fn policy_none_still_reports_failure() {
        let auth = authenticator();
        let why = fail_reason(
            check(
                &auth,
                &reply("dan@lax.example"),
                OTHER_IP,
                "dan@lax.example",
            )
            .await,
        );
        assert!(why.contains("(p=none)"), "{why}");
    }

    #[tokio::test]
    async fn from_header_that_dmarc_cannot_judge_fails() {
        let auth = authenticator();
        let message = reply("alice@example.org");
        let two_fields = format!("From: mallory@evil.example\r\n{message}");
        assert!(
            fail_reason(check(&auth, &two_fields, GOOD_IP, "alice@example.org").await)
                .contains("2 From header fields")
        );
        let two_domains = message.replace(
            "From: Alice <alice@example.org>",
            "From: Alice <alice@example.org>, mallory@evil.example",
        );
        assert!(
            fail_reason(check(&auth, &two_domains, GOOD_IP, "alice@example.org").await)
                .contains("several domains")
        );
        let no_address = message.replace("From: Alice <alice@example.org>", "From: Alice");
        assert!(
            fail_reason(check(&auth, &no_address, GOOD_IP, "alice@example.org").await)
                .contains("no address")
        );
        let no_from = message.replace("From: Alice <alice@example.org>\r\n", "");
        assert!(
            fail_reason(check(&auth, &no_from, GOOD_IP, "alice@example.org").await)
                .contains("0 From header fields")
        );
        assert!(matches!(
            check(&auth, "", GOOD_IP, "alice@example.org").await,
            DmarcOutcome::Fail(_)
        ));
    }

    #[tokio::test]
    async fn dns_trouble_is_a_temporary_error() {
        let auth = authenticator();
        auth.caches.txt.put(
            "_dmarc.flaky.example.".into(),
            Txt::Error(Error::Dns(DnsError::Resolver("SERVFAIL".into()))),
        );
        match check(
            &auth,
            &reply("eve@flaky.example"),
            OTHER_IP,
            "eve@flaky.example",
        )
        .await
        {
            DmarcOutcome::TempError(why) => assert!(why.contains("flaky.example"), "{why}"),
            other => panic!("{other:?}"),
        }
        // The key lookup of an aligned signature fails temporarily: no verdict yet.
        auth.caches.txt.put(
            "flaky._domainkey.example.org.".into(),
            Txt::Error(Error::Dns(DnsError::Resolver("timeout".into()))),
        );
        let signed = sign(
            ed25519_key(),
            "example.org",
            "flaky",
            &reply("alice@example.org"),
        );
        assert!(matches!(
            check(&auth, &signed, OTHER_IP, "bounce@elsewhere.example").await,
            DmarcOutcome::TempError(_)
        ));
    }

    #[test]
    fn records_are_typed_by_content_and_name() {
        assert!(matches!(
            parse_txt("example.org.", "v=spf1 -all"),
            Txt::Spf(_)
        ));
        assert!(matches!(
            parse_txt("_dmarc.example.org.", "v=DMARC1; p=reject"),
            Txt::Dmarc(_)
        ));
        assert!(matches!(
            parse_txt("ed._domainkey.example.org.", &fixture("ed25519.txt")),
            Txt::DomainKey(_)
        ));
        assert!(matches!(
            parse_txt("example.org.", "google-site-verification=x"),
            Txt::Error(_)
        ));
    }

    #[test]
    fn offline_cache_answers_every_name_and_never_expires() {
        let auth = authenticator();
        assert!(matches!(
            auth.caches.txt.get("_dmarc.example.org."),
            Some(Txt::Dmarc(_))
        ));
        assert!(matches!(
            auth.caches.txt.get("unknown.example."),
            Some(Txt::Error(Error::Dns(DnsError::RecordNotFound(
                ResponseCode::NXDomain
            ))))
        ));
        assert_eq!(
            auth.caches
                .ipv4
                .get("unknown.example.")
                .map(|r| r.rrset.len()),
            Some(0)
        );
        // Lookups mail-auth would cache are ignored offline.
        auth.caches.txt.insert(
            "unknown.example.".into(),
            Txt::Error(Error::Dns(DnsError::InvalidRecordType)),
            Instant::now(),
        );
        assert!(matches!(
            auth.caches.txt.get("unknown.example."),
            Some(Txt::Error(Error::Dns(DnsError::RecordNotFound(_))))
        ));
    }

    #[test]
    fn online_cache_honours_expiry() {
        let cache: DnsCache<Box<str>, u32> = DnsCache::online();
        cache.insert(
            "a.".into(),
            1,
            Instant::now() + std::time::Duration::from_secs(60),
        );
        cache.insert("b.".into(), 2, Instant::now());
        assert_eq!(cache.get("a."), Some(1));
        assert_eq!(cache.get("b."), None);
        assert_eq!(cache.get("c."), None);
    }

    #[tokio::test]
    async fn system_resolver_can_be_built() {
        if std::path::Path::new("/etc/resolv.conf").exists() {
            let auth = Authenticator::system()
                .unwrap()
                .with_host_domain("reach.example.com");
            assert!(format!("{auth:?}").contains("offline: false"));
        }
    }

    #[test]
    fn checking_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let auth = authenticator();
        let future = auth.dmarc_passes(b"", ip(GOOD_IP), "h", "");
        assert_send(&future);
    }
}
