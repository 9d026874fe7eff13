//! Kannel as the SMS provider: MT through smsbox's HTTP `sendsms` interface, over a keep-alive
//! HTTP/1.1 connection pool.
//!
//! What Kannel 1.4.5 does with what we send (checked against a real Kannel, see
//! `tests/kannel_selftest.rs`):
//! - Text goes as UTF-8 with `charset=UTF-8`. Without `coding`, Kannel sends GSM 03.38 7-bit:
//!   characters outside the GSM alphabet (Cyrillic, CJK, emoji, `ç`, backtick...) become `?`.
//!   So a text with any such character is sent with `coding=2` (UCS-2), which Kannel converts
//!   from UTF-8 correctly. GSM text (ASCII minus backtick, plus `é`, `€`, `Δ`...) stays 7-bit,
//!   where an SMS holds 160 characters instead of 70.
//! - Long texts are split by Kannel itself (concatenated SMS with UDH), up to the sendsms-user's
//!   `max-messages` parts.
//! - `202` with `0: Accepted for delivery` or `3: Queued for later delivery` means Kannel has it;
//!   `403` wrong credentials, `400` a request Kannel refuses; `5xx` Kannel trouble.
//! - Delivery reports: with `dlr-mask=31` and a `dlr-url`, Kannel calls the URL once per report,
//!   substituting `%d` (type) and `%A` (SMSC reply text). Percent escapes already in the URL
//!   (`%25`, `%2F`...) pass through unchanged; escapes whose first hex digit is a letter would
//!   be taken for Kannel's own `%A`, `%B`... so references are restricted to printable ASCII.
//!
//! This module only talks HTTP to Kannel; it does not decide what to send or when to retry.
//! The password, numbers and texts are never logged above `debug` and never appear in errors.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use super::format::{encoding_of, Encoding};
use super::{DeliveryStatus, OutgoingSms, SmsProvider, SmsSendError};

/// `dlr-mask` Reach asks for: every report type (1 + 2 + 4 + 8 + 16).
pub const DLR_MASK_ALL: u32 = 31;

/// Longest part of Kannel's answer kept for an error text.
const MAX_ANSWER_BYTES: usize = 4096;

/// Characters left as they are in a query value: RFC 3986 unreserved.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// How to reach Kannel's sendsms interface.
#[derive(Clone)]
pub struct KannelConfig {
    /// smsbox's sendsms address, e.g. `http://127.0.0.1:13013/cgi-bin/sendsms` (plain HTTP:
    /// Kannel runs on the same host or LAN).
    pub sendsms_url: String,
    /// The sendsms-user's `username`.
    pub username: String,
    /// The sendsms-user's `password`. Never logged.
    pub password: String,
    /// The sender id SMS come from (the number or short code users reply to).
    pub from: String,
    /// Reach's delivery-report webhook including its secret, e.g.
    /// `http://127.0.0.1:8088/sms/dlr?secret=S`. When set, every SMS asks for all delivery
    /// reports (`dlr-mask=31`) with a `dlr-url` that adds `ref=REFERENCE&type=%d&reply=%A`.
    pub dlr_url: Option<String>,
    /// Longest wait for Kannel's answer (connecting included).
    pub timeout: Duration,
}

impl fmt::Debug for KannelConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KannelConfig")
            .field("sendsms_url", &self.sendsms_url)
            .field("username", &self.username)
            .field("password", &"***")
            .field("from", &self.from)
            .field(
                "dlr_url",
                &self.dlr_url.as_ref().map(|_| "(set, carries a secret)"),
            )
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Why a [`KannelConfig`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KannelConfigError {
    /// `sendsms_url` is not a usable `http://` URL.
    #[error("sendsms_url: {0}")]
    SendsmsUrl(String),
    /// `dlr_url` is not a usable `http://` URL.
    #[error("dlr_url: {0}")]
    DlrUrl(String),
    /// `from` is empty.
    #[error("from: the sender id is empty")]
    EmptyFrom,
}

/// Kannel's sendsms interface as an [`SmsProvider`].
pub struct Kannel {
    config: KannelConfig,
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl fmt::Debug for Kannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kannel")
            .field("config", &self.config)
            .finish()
    }
}

impl Kannel {
    /// Checks the configuration and sets up the connection pool (connects lazily).
    pub fn new(config: KannelConfig) -> Result<Kannel, KannelConfigError> {
        check_http_url(&config.sendsms_url).map_err(KannelConfigError::SendsmsUrl)?;
        if let Some(dlr_url) = &config.dlr_url {
            check_http_url(dlr_url).map_err(KannelConfigError::DlrUrl)?;
        }
        if config.from.trim().is_empty() {
            return Err(KannelConfigError::EmptyFrom);
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(8)
            .build(connector);
        Ok(Kannel { config, client })
    }

    /// The sendsms request for `sms`. Carries the password: never log it.
    pub(crate) fn sendsms_uri(&self, sms: &OutgoingSms) -> Result<Uri, SmsSendError> {
        let config = &self.config;
        let mut query = vec![
            ("username", config.username.as_str()),
            ("password", config.password.as_str()),
            ("from", config.from.as_str()),
            ("to", sms.to.as_str()),
            ("text", sms.text.as_str()),
            ("charset", "UTF-8"),
        ];
        if needs_ucs2(&sms.text) {
            query.push(("coding", "2"));
        }
        let dlr_url;
        let dlr_mask = DLR_MASK_ALL.to_string();
        if let Some(base) = &config.dlr_url {
            check_reference(&sms.reference)?;
            dlr_url = format!(
                "{base}{}ref={}&type=%d&reply=%A",
                if base.contains('?') { '&' } else { '?' },
                utf8_percent_encode(&sms.reference, QUERY_VALUE)
            );
            query.push(("dlr-mask", &dlr_mask));
            query.push(("dlr-url", &dlr_url));
        }
        let mut uri = config.sendsms_url.clone();
        let mut separator = if uri.contains('?') { '&' } else { '?' };
        for (name, value) in query {
            uri.push(separator);
            uri.push_str(name);
            uri.push('=');
            uri.extend(utf8_percent_encode(value, QUERY_VALUE));
            separator = '&';
        }
        uri.parse::<Uri>()
            .map_err(|_| SmsSendError::Permanent("cannot build the sendsms request".into()))
    }
}

impl SmsProvider for Kannel {
    async fn send(&self, sms: &OutgoingSms) -> Result<(), SmsSendError> {
        let uri = self.sendsms_uri(sms)?;
        tracing::debug!(to = %sms.to, reference = %sms.reference, ucs2 = needs_ucs2(&sms.text), "sendsms to Kannel");
        let request = Request::get(uri)
            .header(hyper::header::USER_AGENT, "reach")
            .body(Empty::<Bytes>::new())
            .map_err(|_| SmsSendError::Permanent("cannot build the sendsms request".into()))?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                SmsSendError::Transient(format!("no answer from Kannel: {}", error_chain(&e)))
            })?;
            let status = response.status();
            let body = match Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
            {
                Ok(body) => String::from_utf8_lossy(&body.to_bytes()).into_owned(),
                Err(_) => String::new(),
            };
            Ok::<_, SmsSendError>((status, body))
        };
        let (status, body) = match tokio::time::timeout(self.config.timeout, exchange).await {
            Ok(result) => result?,
            Err(_) => {
                return Err(SmsSendError::Transient(format!(
                    "Kannel did not answer within {:?}",
                    self.config.timeout
                )))
            }
        };
        let outcome = classify_answer(status, &body);
        tracing::debug!(reference = %sms.reference, %status, answer = %body.trim(), "Kannel answered");
        outcome
    }

    fn delivery_reports(&self) -> bool {
        self.config.dlr_url.is_some()
    }
}

/// Kannel's sendsms answer as an outcome: 2xx accepted (`0: Accepted for delivery`,
/// `3: Queued for later delivery`); 4xx refused for good (403 credentials, 400 bad request);
/// anything else (5xx) worth retrying.
pub fn classify_answer(status: StatusCode, body: &str) -> Result<(), SmsSendError> {
    let said = summarize(body);
    if status.is_success() {
        Ok(())
    } else if status.is_client_error() {
        Err(SmsSendError::Permanent(format!(
            "Kannel answered {status}: {said}"
        )))
    } else {
        Err(SmsSendError::Transient(format!(
            "Kannel answered {status}: {said}"
        )))
    }
}

/// What a Kannel delivery report type (`%d`) means; `reply` is the SMSC's text (`%A`).
/// `None` for a type Kannel does not define.
pub fn dlr_status(kind: u32, reply: &str) -> Option<DeliveryStatus> {
    match kind {
        1 => Some(DeliveryStatus::Delivered),
        2 => Some(DeliveryStatus::Failed(failure_reason(
            reply,
            "not delivered to the phone",
        ))),
        4 | 8 => Some(DeliveryStatus::Pending),
        16 => Some(DeliveryStatus::Failed(failure_reason(
            reply,
            "rejected by the SMSC",
        ))),
        _ => None,
    }
}

/// The useful part of an SMSC's report text, short and without the message text it may quote
/// (SMPP receipts look like `id:.. sub:001 dlvrd:000 ... stat:UNDELIV err:001 text:Bob: hi`).
fn failure_reason(reply: &str, default: &str) -> String {
    let field = |name: &str| {
        reply
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .filter(|v| !v.is_empty())
    };
    match (field("stat:"), field("err:")) {
        (Some(stat), Some(err)) => format!("{default} ({stat}, error {err})"),
        (Some(stat), None) => format!("{default} ({stat})"),
        _ => {
            let reply = reply.split("text:").next().unwrap_or("").trim();
            if reply.is_empty() {
                default.to_owned()
            } else {
                format!("{default} ({})", summarize(reply))
            }
        }
    }
}

/// Whether `text` needs UCS-2: it has a character outside the GSM 03.38 alphabet (default table
/// plus its extension table), which Kannel's 7-bit path would turn into `?`. The same rule
/// [`format`](super::format) counts segments by, so what Reach measured is what Kannel sends.
pub fn needs_ucs2(text: &str) -> bool {
    encoding_of(text) == Encoding::Ucs2
}

/// References travel inside the dlr-url, where Kannel expands `%` escapes: keep them to printable
/// ASCII, whose percent-encoding always starts with a digit.
fn check_reference(reference: &str) -> Result<(), SmsSendError> {
    if !reference.is_empty() && reference.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        Ok(())
    } else {
        Err(SmsSendError::Permanent(
            "the SMS reference must be printable ASCII without spaces".into(),
        ))
    }
}

fn check_http_url(url: &str) -> Result<(), String> {
    if url.starts_with("https://") {
        return Err(
            "https is not supported towards Kannel; use http:// on loopback or the LAN".into(),
        );
    }
    if !url.starts_with("http://") {
        return Err("not an http:// URL".into());
    }
    match url.parse::<Uri>() {
        Ok(uri) if uri.host().is_some_and(|h| !h.is_empty()) => Ok(()),
        _ => Err("not a valid URL with a host".into()),
    }
}

/// A short, log-safe version of Kannel's answer: first line, at most 100 characters, with long
/// digit runs (numbers) masked.
fn summarize(body: &str) -> String {
    let line = body.trim().lines().next().unwrap_or("").trim();
    let mut out = String::new();
    let mut digits = String::new();
    let flush = |digits: &mut String, out: &mut String| {
        if digits.len() >= 5 {
            out.push_str("#####");
        } else {
            out.push_str(digits);
        }
        digits.clear();
    };
    for c in line.chars().take(100) {
        if c.is_ascii_digit() {
            digits.push(c);
        } else {
            flush(&mut digits, &mut out);
            out.push(c);
        }
    }
    flush(&mut digits, &mut out);
    if out.is_empty() {
        "(no text)".into()
    } else {
        out
    }
}

/// An error and its sources, one line (hyper's top-level text alone says little).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use percent_encoding::percent_decode_str;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn config(url: &str, dlr_url: Option<&str>) -> KannelConfig {
        KannelConfig {
            sendsms_url: url.into(),
            username: "reach".into(),
            password: "p&ss word".into(),
            from: "12345".into(),
            dlr_url: dlr_url.map(str::to_owned),
            timeout: Duration::from_millis(500),
        }
    }

    fn sms(text: &str) -> OutgoingSms {
        OutgoingSms {
            to: "+15551234567".into(),
            text: text.into(),
            reference: "r-1".into(),
        }
    }

    /// The decoded query parameters of a URI.
    fn params(uri: &Uri) -> Vec<(String, String)> {
        uri.query()
            .unwrap_or("")
            .split('&')
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap();
                (
                    name.to_owned(),
                    percent_decode_str(value)
                        .decode_utf8()
                        .unwrap()
                        .into_owned(),
                )
            })
            .collect()
    }

    fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
        params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn sendsms_request_carries_every_parameter_encoded() {
        let kannel = Kannel::new(config("http://127.0.0.1:13013/cgi-bin/sendsms", None)).unwrap();
        let uri = kannel.sendsms_uri(&sms("Bob: a&b=c 100% +")).unwrap();
        assert_eq!(uri.path(), "/cgi-bin/sendsms");
        let p = params(&uri);
        assert_eq!(param(&p, "username"), Some("reach"));
        assert_eq!(param(&p, "password"), Some("p&ss word"));
        assert_eq!(param(&p, "from"), Some("12345"));
        assert_eq!(param(&p, "to"), Some("+15551234567"));
        assert_eq!(param(&p, "text"), Some("Bob: a&b=c 100% +"));
        assert_eq!(param(&p, "charset"), Some("UTF-8"));
        assert_eq!(param(&p, "coding"), None);
        assert_eq!(param(&p, "dlr-mask"), None);
        assert!(uri.query().unwrap().contains("to=%2B15551234567"));
    }

    #[test]
    fn non_gsm_text_goes_as_ucs2() {
        let kannel = Kannel::new(config("http://127.0.0.1:13013/cgi-bin/sendsms", None)).unwrap();
        for (text, ucs2) in [
            ("hello", false),
            ("héllo € {x} [y] ~ ^ | \\ Δ ß ¿ @ £ $", false),
            ("line\nbreak", false),
            ("Привет, мир", true),
            ("ça va", true),
            ("`code`", true),
            ("ok 👍", true),
            ("日本", true),
        ] {
            assert_eq!(needs_ucs2(text), ucs2, "{text}");
            let p = params(&kannel.sendsms_uri(&sms(text)).unwrap());
            assert_eq!(param(&p, "coding"), ucs2.then_some("2"), "{text}");
            assert_eq!(param(&p, "text"), Some(text));
        }
    }

    #[test]
    fn delivery_reports_ask_for_every_type_with_the_reference() {
        let kannel = Kannel::new(config(
            "http://127.0.0.1:13013/cgi-bin/sendsms",
            Some("http://127.0.0.1:8088/sms/dlr?secret=s%2Bcret"),
        ))
        .unwrap();
        assert!(kannel.delivery_reports());
        let mut message = sms("hi");
        message.reference = "job/42%x".into();
        let p = params(&kannel.sendsms_uri(&message).unwrap());
        assert_eq!(param(&p, "dlr-mask"), Some("31"));
        assert_eq!(
            param(&p, "dlr-url"),
            Some("http://127.0.0.1:8088/sms/dlr?secret=s%2Bcret&ref=job%2F42%25x&type=%d&reply=%A")
        );

        let without_query = Kannel::new(config(
            "http://k/cgi-bin/sendsms",
            Some("http://reach:8088/sms/dlr"),
        ))
        .unwrap();
        let p = params(&without_query.sendsms_uri(&sms("hi")).unwrap());
        assert_eq!(
            param(&p, "dlr-url"),
            Some("http://reach:8088/sms/dlr?ref=r-1&type=%d&reply=%A")
        );

        message.reference = "with space".into();
        assert!(kannel.sendsms_uri(&message).unwrap_err().is_permanent());
        message.reference = "é".into();
        assert!(kannel.sendsms_uri(&message).unwrap_err().is_permanent());
        let plain = Kannel::new(config("http://k/cgi-bin/sendsms", None)).unwrap();
        assert!(!plain.delivery_reports());
    }

    #[test]
    fn configuration_is_checked() {
        let bad = |url: &str| Kannel::new(config(url, None)).unwrap_err();
        assert!(
            matches!(bad("https://k/cgi-bin/sendsms"), KannelConfigError::SendsmsUrl(m) if m.contains("https"))
        );
        assert!(matches!(bad("ftp://k/"), KannelConfigError::SendsmsUrl(_)));
        assert!(matches!(bad("http://"), KannelConfigError::SendsmsUrl(_)));
        assert!(matches!(
            Kannel::new(config("http://k/s", Some("reach/dlr"))).unwrap_err(),
            KannelConfigError::DlrUrl(_)
        ));
        let mut c = config("http://k/s", None);
        c.from = " ".into();
        assert_eq!(Kannel::new(c).unwrap_err(), KannelConfigError::EmptyFrom);
        let debug = format!(
            "{:?}",
            Kannel::new(config("http://k/s", Some("http://r/d?secret=x"))).unwrap()
        );
        assert!(
            !debug.contains("p&ss") && !debug.contains("secret=x"),
            "{debug}"
        );
    }

    #[test]
    fn answers_are_classified() {
        assert_eq!(
            classify_answer(StatusCode::ACCEPTED, "0: Accepted for delivery"),
            Ok(())
        );
        assert_eq!(
            classify_answer(StatusCode::ACCEPTED, "3: Queued for later delivery"),
            Ok(())
        );
        assert_eq!(classify_answer(StatusCode::OK, ""), Ok(()));
        let e =
            classify_answer(StatusCode::FORBIDDEN, "Authorization failed for sendsms").unwrap_err();
        assert_eq!(
            e,
            SmsSendError::Permanent(
                "Kannel answered 403 Forbidden: Authorization failed for sendsms".into()
            )
        );
        assert!(
            classify_answer(StatusCode::BAD_REQUEST, "Missing receiver number, rejected")
                .unwrap_err()
                .is_permanent()
        );
        for status in [
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::BAD_GATEWAY,
        ] {
            assert!(!classify_answer(status, "").unwrap_err().is_permanent());
        }
        // Numbers in Kannel's text are masked.
        let e = classify_answer(
            StatusCode::BAD_REQUEST,
            "Number +15551234567 rejected\nmore",
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "SMS gateway refused the message: Kannel answered 400 Bad Request: Number +##### rejected");
    }

    #[test]
    fn delivery_report_types() {
        assert_eq!(dlr_status(1, ""), Some(DeliveryStatus::Delivered));
        assert_eq!(dlr_status(8, "ACK/"), Some(DeliveryStatus::Pending));
        assert_eq!(dlr_status(4, ""), Some(DeliveryStatus::Pending));
        assert_eq!(
            dlr_status(2, "id:1 sub:001 dlvrd:000 submit date:2401011200 stat:UNDELIV err:001 text:Bob: secret"),
            Some(DeliveryStatus::Failed("not delivered to the phone (UNDELIV, error 001)".into()))
        );
        assert_eq!(
            dlr_status(16, "NACK/0x0000000b/Invalid Destination Address"),
            Some(DeliveryStatus::Failed(
                "rejected by the SMSC (NACK/0x#####b/Invalid Destination Address)".into()
            ))
        );
        assert_eq!(
            dlr_status(16, ""),
            Some(DeliveryStatus::Failed("rejected by the SMSC".into()))
        );
        assert_eq!(dlr_status(0, ""), None);
        assert_eq!(dlr_status(3, ""), None);
        assert_eq!(dlr_status(32, ""), None);
    }

    /// A one-shot HTTP server: answers every request on every connection with `answer`, and
    /// counts connections.
    async fn fake_kannel(
        answer: &'static str,
    ) -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/cgi-bin/sendsms", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut connection = 0;
            while let Ok((mut stream, _)) = listener.accept().await {
                connection += 1;
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        while let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
                            buffer.drain(..end + 4);
                            let _ = tx.send(format!(
                                "{connection} {}",
                                head.lines().next().unwrap_or("")
                            ));
                            if stream.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        (url, rx)
    }

    #[tokio::test]
    async fn sends_over_one_kept_alive_connection() {
        let (url, mut requests) = fake_kannel(
            "HTTP/1.1 202 Accepted\r\nContent-Length: 24\r\nConnection: Keep-Alive\r\n\r\n0: Accepted for delivery",
        )
        .await;
        let kannel = Kannel::new(config(&url, None)).unwrap();
        kannel.send(&sms("one")).await.unwrap();
        kannel.send(&sms("two")).await.unwrap();
        let first = requests.recv().await.unwrap();
        let second = requests.recv().await.unwrap();
        assert!(
            first.starts_with("1 GET /cgi-bin/sendsms?username=reach&"),
            "{first}"
        );
        assert!(
            second.starts_with("1 GET "),
            "second request on a new connection: {second}"
        );
        assert!(second.contains("text=two"));
    }

    #[tokio::test]
    async fn refusals_are_permanent_and_trouble_transient() {
        let (url, _r) = fake_kannel(
            "HTTP/1.1 403 Forbidden\r\nContent-Length: 32\r\n\r\nAuthorization failed for sendsms",
        )
        .await;
        let e = Kannel::new(config(&url, None))
            .unwrap()
            .send(&sms("x"))
            .await
            .unwrap_err();
        assert!(e.is_permanent(), "{e}");
        assert!(!e.to_string().contains("p&ss"));

        let (url, _r) =
            fake_kannel("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n").await;
        let e = Kannel::new(config(&url, None))
            .unwrap()
            .send(&sms("x"))
            .await
            .unwrap_err();
        assert!(!e.is_permanent(), "{e}");

        // Nobody listening.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = format!("http://127.0.0.1:{port}/cgi-bin/sendsms");
        let e = Kannel::new(config(&url, None))
            .unwrap()
            .send(&sms("x"))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, SmsSendError::Transient(m) if m.contains("no answer")),
            "{e}"
        );

        // Listening but never answering.
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/cgi-bin/sendsms", silent.local_addr().unwrap());
        let started = std::time::Instant::now();
        let e = Kannel::new(config(&url, None))
            .unwrap()
            .send(&sms("x"))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, SmsSendError::Transient(m) if m.contains("within")),
            "{e}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        drop(silent);
    }
}
