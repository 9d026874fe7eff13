//! The HTTP endpoint the SMS gateway calls: incoming SMS (MO) on `/sms/mo` and delivery reports
//! on `/sms/dlr`, with the parameters Kannel's sms-service `get-url` and sendsms `dlr-url` send.
//!
//! ```text
//! GET|POST /sms/mo?secret=S&from=%p&to=%P&text=%b&coding=%c&charset=%C&id=%I
//! GET|POST /sms/dlr?secret=S&ref=REFERENCE&type=%d&reply=%A
//! ```
//!
//! - The shared secret comes as the `secret` query parameter or the `X-Reach-Secret` header
//!   (every one given must match; compared in constant time). Missing or wrong: 403, and the
//!   handler sees nothing. Unknown path: 404; other methods: 405.
//! - POST takes the same parameters as an `application/x-www-form-urlencoded` body (merged with
//!   the query); other bodies: 415 (Kannel's `post-url` with `X-Kannel-*` headers is not
//!   supported: use `get-url`). A body over `max_body_bytes`: 413. Missing or invalid
//!   parameters: 400.
//! - `text` is taken as bytes and decoded by `charset` (Kannel's `%C`: `UTF-8`, `UTF-16BE` for
//!   UCS-2, `ISO-8859-1`, `8-BIT` for binary SMS, read as UTF-8), or by `coding` (`%c`: 2 means
//!   UCS-2) when no charset is given, or as UTF-8. Use Kannel's `%b` (the message as it came),
//!   not `%a`, which collapses spaces and line breaks.
//! - `from` is normalised to E.164 with `+` (`+1555...`, `001555...` and `1555...` all become
//!   `+1555...`); a number in national form is refused (400): set Kannel's `unified-prefix`.
//! - 200 only after the handler returned `Ok` (for MO: the SMS is durably stored). A handler's
//!   temporary refusal: 503; its rejection: 422. Kannel 1.4.5 retries every non-2xx answer (and
//!   connection failures) `http-request-retry` times, `http-queue-delay` seconds apart, with the
//!   same `id`, so the handler must accept a repeated SMS idempotently.
//! - Every response body is empty: Kannel texts an sms-service's answer back to the phone unless
//!   `max-messages = 0`.
//!
//! No routing decisions here; numbers and texts are logged at `debug` only, the secret never.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use percent_encoding::percent_decode;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::kannel::dlr_status;
use super::{DeliveryReport, IncomingSms};

/// Path of incoming SMS.
pub const MO_PATH: &str = "/sms/mo";
/// Path of delivery reports.
pub const DLR_PATH: &str = "/sms/dlr";
/// Header that may carry the shared secret instead of the `secret` parameter.
pub const SECRET_HEADER: &str = "x-reach-secret";

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 256;
/// Longest wait for a request's headers (also ends idle keep-alive connections).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// What Reach does with the gateway's calls.
pub trait WebhookHandler: Send + Sync + 'static {
    /// Must answer Ok only after the SMS is durably stored (the webhook then answers 200).
    fn incoming(&self, sms: IncomingSms)
        -> impl Future<Output = Result<(), WebhookRefusal>> + Send;
    /// Ok once the report is taken into account (or deliberately ignored, e.g. unknown reference).
    fn delivery_report(
        &self,
        report: DeliveryReport,
    ) -> impl Future<Output = Result<(), WebhookRefusal>> + Send;
}

/// Why the handler did not take a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookRefusal {
    /// Cannot take it now (store busy or failing): 503, the gateway retries.
    Temporary(String),
    /// Will never take it: 422. Kannel still retries a few times; prefer `Ok` for calls that are
    /// merely uninteresting (an unknown sender, a report for a forgotten reference).
    Rejected(String),
}

/// The webhook's settings.
#[derive(Clone)]
pub struct WebhookConfig {
    /// The shared secret every call must carry. An empty secret refuses every call.
    pub secret: String,
    /// Largest request body accepted (POST form); larger: 413.
    pub max_body_bytes: usize,
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("secret", &"***")
            .field("max_body_bytes", &self.max_body_bytes)
            .finish()
    }
}

/// Serves the webhook on `listener` until `shutdown` turns true (or its sender is dropped):
/// then stops accepting, lets requests in progress finish, closes idle connections and returns.
pub async fn serve<H: WebhookHandler>(
    listener: TcpListener,
    config: WebhookConfig,
    handler: Arc<H>,
    mut shutdown: watch::Receiver<bool>,
) {
    let config = Arc::new(config);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = crate::http::shutdown_requested(&mut shutdown) => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little instead of spinning.
                    tracing::warn!(error = %e, "SMS webhook: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = crate::http::shutdown_requested(&mut shutdown) => break,
        };
        let config = config.clone();
        let handler = handler.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _permit = permit;
            crate::http::serve_connection(
                stream,
                peer,
                HEADER_TIMEOUT,
                shutdown,
                "SMS webhook",
                move |request| {
                    let config = config.clone();
                    let handler = handler.clone();
                    async move { respond(request, peer, &config, &*handler).await }
                },
            )
            .await
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// The answer to one request: a status and an empty body.
async fn respond<H: WebhookHandler>(
    request: Request<Incoming>,
    peer: SocketAddr,
    config: &WebhookConfig,
    handler: &H,
) -> Response<Empty<Bytes>> {
    let incoming_sms = request.uri().path() == MO_PATH;
    let status = answer(request, peer, config, handler).await;
    if incoming_sms {
        let outcome = crate::metrics::Inbound::of_http_status(status.as_u16());
        crate::metrics::global().inbound_sms(outcome);
    }
    let mut response = Response::new(Empty::new());
    *response.status_mut() = status;
    if status == StatusCode::METHOD_NOT_ALLOWED {
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, POST"));
    }
    response
}

async fn answer<H: WebhookHandler>(
    request: Request<Incoming>,
    peer: SocketAddr,
    config: &WebhookConfig,
    handler: &H,
) -> StatusCode {
    let route = match request.uri().path() {
        MO_PATH => Route::Mo,
        DLR_PATH => Route::Dlr,
        _ => return StatusCode::NOT_FOUND,
    };
    if request.method() != Method::GET && request.method() != Method::POST {
        return StatusCode::METHOD_NOT_ALLOWED;
    }
    let query_params = Params::parse(request.uri().query().unwrap_or("").as_bytes());
    let no_params = Params::default();
    let header_secrets: Vec<&[u8]> = request
        .headers()
        .get_all(SECRET_HEADER)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    let given = query_params
        .as_ref()
        .unwrap_or(&no_params)
        .all("secret")
        .chain(header_secrets);
    if !secret_matches(&config.secret, given) {
        tracing::warn!(%peer, "SMS webhook: call without the right secret refused (403)");
        return StatusCode::FORBIDDEN;
    }

    let form = request.method() == Method::POST
        && request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.trim()
                    .to_ascii_lowercase()
                    .starts_with("application/x-www-form-urlencoded")
            });
    let declared_length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared_length.is_some_and(|n| n > config.max_body_bytes as u64) {
        return StatusCode::PAYLOAD_TOO_LARGE;
    }
    let body = match Limited::new(request.into_body(), config.max_body_bytes)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return StatusCode::PAYLOAD_TOO_LARGE
        }
        Err(_) => return StatusCode::BAD_REQUEST,
    };
    if request_has_unparsable_body(form, &body) {
        return StatusCode::UNSUPPORTED_MEDIA_TYPE;
    }
    let mut params = match query_params {
        Ok(params) => params,
        Err(e) => return bad_request(peer, &e),
    };
    if form {
        match Params::parse(&body) {
            Ok(body_params) => params.0.extend(body_params.0),
            Err(e) => return bad_request(peer, &e),
        }
    }

    let outcome = match route {
        Route::Mo => match parse_mo(&params) {
            Ok(sms) => {
                tracing::debug!(from = %sms.from, to = %sms.to, id = ?sms.provider_id, "SMS webhook: incoming SMS");
                handler.incoming(sms).await
            }
            Err(e) => return bad_request(peer, &e),
        },
        Route::Dlr => match parse_dlr(&params) {
            Ok(report) => {
                tracing::debug!(reference = %report.reference, status = ?report.status, "SMS webhook: delivery report");
                handler.delivery_report(report).await
            }
            Err(e) => return bad_request(peer, &e),
        },
    };
    match outcome {
        Ok(()) => StatusCode::OK,
        Err(WebhookRefusal::Temporary(why)) => {
            tracing::warn!(%peer, reason = %why, "SMS webhook: call refused for now (503)");
            StatusCode::SERVICE_UNAVAILABLE
        }
        Err(WebhookRefusal::Rejected(why)) => {
            tracing::warn!(%peer, reason = %why, "SMS webhook: call rejected (422)");
            StatusCode::UNPROCESSABLE_ENTITY
        }
    }
}

/// A POST body we cannot read: not a form, and not empty.
fn request_has_unparsable_body(form: bool, body: &[u8]) -> bool {
    !form && !body.is_empty()
}

fn bad_request(peer: SocketAddr, why: &str) -> StatusCode {
    tracing::warn!(%peer, reason = %why, "SMS webhook: bad call (400)");
    StatusCode::BAD_REQUEST
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Mo,
    Dlr,
}

/// Whether every secret given matches the configured one, and at least one was given.
fn secret_matches<'a>(expected: &str, given: impl IntoIterator<Item = &'a [u8]>) -> bool {
    if expected.is_empty() {
        return false;
    }
    let mut any = false;
    let mut all = true;
    for candidate in given {
        any = true;
        all &= bool::from(candidate.ct_eq(expected.as_bytes()));
    }
    any && all
}

/// Decoded `application/x-www-form-urlencoded` pairs, values as bytes (a UCS-2 text is not
/// UTF-8 until decoded by its charset).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Params(Vec<(String, Vec<u8>)>);

impl Params {
    fn parse(input: &[u8]) -> Result<Params, String> {
        let mut pairs = Vec::new();
        for pair in input.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
            let (name, value) = match pair.iter().position(|&b| b == b'=') {
                Some(at) => (&pair[..at], &pair[at + 1..]),
                None => (pair, &b""[..]),
            };
            let name = String::from_utf8(form_decode(name))
                .map_err(|_| "a parameter name is not UTF-8".to_owned())?;
            pairs.push((name, form_decode(value)));
        }
        Ok(Params(pairs))
    }

    fn all<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a [u8]> + 'a {
        let name = name.to_owned();
        self.0
            .iter()
            .filter(move |(n, _)| *n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The parameter's value; given twice is an error.
    fn one(&self, name: &str) -> Result<Option<&[u8]>, String> {
        let mut values = self.all(name);
        let first = values.next();
        if values.next().is_some() {
            return Err(format!("parameter '{name}' given more than once"));
        }
        Ok(first)
    }

    fn required(&self, name: &str) -> Result<&[u8], String> {
        self.one(name)?
            .ok_or_else(|| format!("parameter '{name}' is missing"))
    }

    /// A parameter that must be UTF-8, trimmed; empty counts as absent.
    fn text(&self, name: &str) -> Result<Option<String>, String> {
        match self.one(name)? {
            None => Ok(None),
            Some(v) => {
                let v = std::str::from_utf8(v)
                    .map_err(|_| format!("parameter '{name}' is not UTF-8"))?;
                let v = v.trim();
                Ok((!v.is_empty()).then(|| v.to_owned()))
            }
        }
    }
}

/// `+` is a space, then `%XX` escapes.
fn form_decode(input: &[u8]) -> Vec<u8> {
    let spaced: Vec<u8> = input
        .iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect();
    percent_decode(&spaced).collect()
}

fn parse_mo(params: &Params) -> Result<IncomingSms, String> {
    let from = params.text("from")?.ok_or("parameter 'from' is missing")?;
    let from = normalize_number(&from).ok_or("parameter 'from' is not an international number")?;
    let to = params.text("to")?.ok_or("parameter 'to' is missing")?;
    let raw_text = params.required("text")?;
    let charset = params.text("charset")?;
    let coding = params.text("coding")?;
    let text = decode_text(raw_text, charset.as_deref(), coding.as_deref())?;
    let provider_id = params.text("id")?;
    Ok(IncomingSms {
        from,
        to,
        text,
        provider_id,
    })
}

fn parse_dlr(params: &Params) -> Result<DeliveryReport, String> {
    let reference = params.text("ref")?.ok_or("parameter 'ref' is missing")?;
    let kind = params.text("type")?.ok_or("parameter 'type' is missing")?;
    let kind: u32 = kind
        .parse()
        .map_err(|_| "parameter 'type' is not a number".to_owned())?;
    let reply = params
        .one("reply")?
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    let status =
        dlr_status(kind, &reply).ok_or_else(|| format!("unknown delivery report type {kind}"))?;
    Ok(DeliveryReport { reference, status })
}

/// The SMS text as UTF-8, by `charset` (Kannel's `%C`) or else `coding` (`%c`).
fn decode_text(
    bytes: &[u8],
    charset: Option<&str>,
    coding: Option<&str>,
) -> Result<String, String> {
    let charset = charset.map(|c| c.to_ascii_uppercase().replace('_', "-"));
    let ucs2 = match charset.as_deref() {
        Some("UTF-16BE" | "UTF-16" | "UCS-2" | "UCS-2BE" | "UCS2") => true,
        Some("UTF-8" | "UTF8" | "8-BIT" | "US-ASCII" | "ASCII") => false,
        Some("ISO-8859-1" | "ISO8859-1" | "LATIN1" | "LATIN-1") => {
            return Ok(bytes.iter().map(|&b| char::from(b)).collect())
        }
        Some(other) => return Err(format!("unsupported charset '{other}'")),
        None => coding == Some("2"),
    };
    if ucs2 {
        if !bytes.len().is_multiple_of(2) {
            return Err("UCS-2 text with an odd number of bytes".into());
        }
        let units: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        Ok(String::from_utf16_lossy(&units))
    } else {
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }
}

/// E.164 with `+`: `+15551234567`, `0015551234567` and `15551234567` give `+15551234567`.
/// `None` for anything else (national form, letters, more than 15 digits).
pub fn normalize_number(raw: &str) -> Option<String> {
    let raw = raw.trim();
    let digits = raw
        .strip_prefix('+')
        .or_else(|| raw.strip_prefix("00"))
        .unwrap_or(raw);
    let valid = (2..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0');
    valid.then(|| format!("+{digits}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sms::DeliveryStatus;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const SECRET: &str = "s3cr3t+/=";
    const SECRET_Q: &str = "s3cr3t%2B%2F%3D";

    #[derive(Default)]
    struct Recorder {
        incoming: Mutex<Vec<IncomingSms>>,
        reports: Mutex<Vec<DeliveryReport>>,
        refuse: Mutex<Option<WebhookRefusal>>,
    }

    impl WebhookHandler for Recorder {
        async fn incoming(&self, sms: IncomingSms) -> Result<(), WebhookRefusal> {
            if let Some(refusal) = self.refuse.lock().unwrap().clone() {
                return Err(refusal);
            }
            self.incoming.lock().unwrap().push(sms);
            Ok(())
        }
        async fn delivery_report(&self, report: DeliveryReport) -> Result<(), WebhookRefusal> {
            if let Some(refusal) = self.refuse.lock().unwrap().clone() {
                return Err(refusal);
            }
            self.reports.lock().unwrap().push(report);
            Ok(())
        }
    }

    struct Running {
        addr: SocketAddr,
        recorder: Arc<Recorder>,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    async fn start() -> Running {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let recorder = Arc::new(Recorder::default());
        let (stop, shutdown) = watch::channel(false);
        let config = WebhookConfig {
            secret: SECRET.into(),
            max_body_bytes: 1024,
        };
        let task = tokio::spawn(serve(listener, config, recorder.clone(), shutdown));
        Running {
            addr,
            recorder,
            stop,
            task,
        }
    }

    /// Sends raw HTTP/1.1 requests on one connection; returns (status, body) per request.
    async fn exchange(addr: SocketAddr, requests: &[String]) -> Vec<(u16, String)> {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut answers = Vec::new();
        let mut buffer = Vec::new();
        for request in requests {
            stream.write_all(request.as_bytes()).await.unwrap();
            loop {
                if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8(buffer[..end].to_vec()).unwrap();
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .expect("content-length in every answer");
                    if buffer.len() >= end + 4 + length {
                        let body =
                            String::from_utf8(buffer[end + 4..end + 4 + length].to_vec()).unwrap();
                        let status = head[9..12].parse().unwrap();
                        buffer.drain(..end + 4 + length);
                        answers.push((status, body));
                        break;
                    }
                }
                let mut chunk = [0u8; 4096];
                let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk))
                    .await
                    .unwrap()
                    .unwrap();
                assert!(n > 0, "connection closed before an answer");
                buffer.extend_from_slice(&chunk[..n]);
            }
        }
        answers
    }

    fn get(target: &str) -> String {
        format!("GET {target} HTTP/1.1\r\nHost: reach\r\n\r\n")
    }

    async fn status_of(addr: SocketAddr, request: String) -> u16 {
        let answers = exchange(addr, &[request]).await;
        assert_eq!(answers[0].1, "", "response bodies are empty");
        answers[0].0
    }

    #[tokio::test]
    async fn incoming_sms_reaches_the_handler_and_gets_an_empty_200() {
        let w = start().await;
        let requests = [
            get(&format!("/sms/mo?secret={SECRET_Q}&from=%2B15557654321&to=12345&text=hello++two%0Alines&coding=0&charset=UTF-8&id=abc-1")),
            // UCS-2 as Kannel sends it without mo-recode: raw UTF-16BE bytes, '+' for 0x20.
            get(&format!("/sms/mo?secret={SECRET_Q}&from=0015557654321&to=12345&text=%04%1F%04%40%048%042%045%04B%00%2C%00+%04%3C%048%04%40&coding=2&charset=UTF-16BE")),
            get(&format!("/sms/mo?secret={SECRET_Q}&from=15557654321&to=12345&text=h%C3%A9llo+%E2%82%AC")),
        ];
        let answers = exchange(w.addr, &requests).await;
        assert_eq!(answers, vec![(200, String::new()); 3]);
        let got = w.recorder.incoming.lock().unwrap().clone();
        assert_eq!(
            got,
            vec![
                IncomingSms {
                    from: "+15557654321".into(),
                    to: "12345".into(),
                    text: "hello  two\nlines".into(),
                    provider_id: Some("abc-1".into()),
                },
                IncomingSms {
                    from: "+15557654321".into(),
                    to: "12345".into(),
                    text: "Привет, мир".into(),
                    provider_id: None,
                },
                IncomingSms {
                    from: "+15557654321".into(),
                    to: "12345".into(),
                    text: "héllo €".into(),
                    provider_id: None,
                },
            ]
        );
        w.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.task)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn the_secret_is_required_and_checked() {
        let w = start().await;
        let mo = "from=%2B15557654321&to=12345&text=x";
        // Missing, wrong, wrong in the header, right in the query but wrong in the header.
        assert_eq!(status_of(w.addr, get(&format!("/sms/mo?{mo}"))).await, 403);
        assert_eq!(
            status_of(w.addr, get(&format!("/sms/mo?secret=nope&{mo}"))).await,
            403
        );
        assert_eq!(
            status_of(w.addr, get(&format!("/sms/mo?secret=&{mo}"))).await,
            403
        );
        assert_eq!(
            status_of(w.addr, get(&format!("/sms/mo?secret=s3cr3t&{mo}"))).await,
            403
        );
        assert_eq!(
            status_of(
                w.addr,
                format!("GET /sms/mo?{mo} HTTP/1.1\r\nHost: r\r\nX-Reach-Secret: nope\r\n\r\n")
            )
            .await,
            403
        );
        assert_eq!(
            status_of(
                w.addr,
                format!("GET /sms/mo?secret={SECRET_Q}&{mo} HTTP/1.1\r\nHost: r\r\nX-Reach-Secret: nope\r\n\r\n")
            )
            .await,
            403
        );
        assert_eq!(status_of(w.addr, get("/sms/dlr?ref=r1&type=1")).await, 403);
        // A forged call with bad parameters is refused for the secret, not parsed.
        assert_eq!(status_of(w.addr, get("/sms/mo?from=BANK")).await, 403);
        assert!(w.recorder.incoming.lock().unwrap().is_empty());
        assert!(w.recorder.reports.lock().unwrap().is_empty());

        // The header alone will do.
        assert_eq!(
            status_of(
                w.addr,
                format!("GET /sms/mo?{mo} HTTP/1.1\r\nHost: r\r\nX-Reach-Secret: {SECRET}\r\n\r\n")
            )
            .await,
            200
        );
        assert_eq!(w.recorder.incoming.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn an_empty_configured_secret_refuses_everything() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let recorder = Arc::new(Recorder::default());
        let (_stop, shutdown) = watch::channel(false);
        let config = WebhookConfig {
            secret: String::new(),
            max_body_bytes: 1024,
        };
        tokio::spawn(serve(listener, config, recorder.clone(), shutdown));
        assert_eq!(
            status_of(addr, get("/sms/mo?secret=&from=%2B15557654321&to=1&text=x")).await,
            403
        );
        assert_eq!(
            status_of(addr, "GET /sms/mo?from=%2B15557654321&to=1&text=x HTTP/1.1\r\nHost: r\r\nX-Reach-Secret:\r\n\r\n".into()).await,
            403
        );
        assert!(recorder.incoming.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn bad_calls_get_4xx_and_change_nothing() {
        let w = start().await;
        let s = format!("secret={SECRET_Q}");
        for (request, status) in [
            (get(&format!("/sms/other?{s}")), 404),
            (get(&format!("/?{s}")), 404),
            (format!("PUT /sms/mo?{s}&from=%2B15557654321&to=1&text=x HTTP/1.1\r\nHost: r\r\nContent-Length: 0\r\n\r\n"), 405),
            (get(&format!("/sms/mo?{s}&to=1&text=x")), 400),
            (get(&format!("/sms/mo?{s}&from=BANK&to=1&text=x")), 400),
            (get(&format!("/sms/mo?{s}&from=0612345678&to=1&text=x")), 400),
            (get(&format!("/sms/mo?{s}&from=%2B15557654321&text=x")), 400),
            (get(&format!("/sms/mo?{s}&from=%2B15557654321&to=1")), 400),
            (get(&format!("/sms/mo?{s}&from=%2B15557654321&from=%2B15550000000&to=1&text=x")), 400),
            (get(&format!("/sms/mo?{s}&from=%2B15557654321&to=1&text=%00&coding=2&charset=UTF-16BE")), 400),
            (get(&format!("/sms/mo?{s}&from=%2B15557654321&to=1&text=x&charset=KOI8-R")), 400),
            (get(&format!("/sms/dlr?{s}&type=1")), 400),
            (get(&format!("/sms/dlr?{s}&ref=r1")), 400),
            (get(&format!("/sms/dlr?{s}&ref=r1&type=x")), 400),
            (get(&format!("/sms/dlr?{s}&ref=r1&type=3")), 400),
            (
                format!("POST /sms/mo?{s} HTTP/1.1\r\nHost: r\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 2000\r\n\r\n{}", "a".repeat(2000)),
                413,
            ),
            (
                format!("POST /sms/mo?{s} HTTP/1.1\r\nHost: r\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"),
                415,
            ),
        ] {
            assert_eq!(status_of(w.addr, request.clone()).await, status, "{request}");
        }
        // Chunked, so the length is only known while reading.
        let chunk = "b".repeat(600);
        let request = format!(
            "POST /sms/mo?{s} HTTP/1.1\r\nHost: r\r\nContent-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n\r\n258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
        );
        assert_eq!(status_of(w.addr, request).await, 413);
        assert!(w.recorder.incoming.lock().unwrap().is_empty());
        assert!(w.recorder.reports.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn post_forms_and_delivery_reports() {
        let w = start().await;
        let form = "from=%2B15557654321&to=12345&text=posted+text&id=k1";
        let post = format!(
            "POST /sms/mo HTTP/1.1\r\nHost: r\r\nX-Reach-Secret: {SECRET}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
            form.len()
        );
        let answers = exchange(
            w.addr,
            &[
                post,
                get(&format!(
                    "/sms/dlr?secret={SECRET_Q}&ref=job%2F42&type=8&reply=ACK%2F"
                )),
                get(&format!(
                    "/sms/dlr?secret={SECRET_Q}&ref=job%2F42&type=1&reply="
                )),
                get(&format!(
                    "/sms/dlr?secret={SECRET_Q}&ref=job%2F43&type=16&reply=NACK"
                )),
            ],
        )
        .await;
        assert_eq!(answers, vec![(200, String::new()); 4]);
        assert_eq!(w.recorder.incoming.lock().unwrap()[0].text, "posted text");
        assert_eq!(
            w.recorder.incoming.lock().unwrap()[0]
                .provider_id
                .as_deref(),
            Some("k1")
        );
        assert_eq!(
            *w.recorder.reports.lock().unwrap(),
            vec![
                DeliveryReport {
                    reference: "job/42".into(),
                    status: DeliveryStatus::Pending
                },
                DeliveryReport {
                    reference: "job/42".into(),
                    status: DeliveryStatus::Delivered
                },
                DeliveryReport {
                    reference: "job/43".into(),
                    status: DeliveryStatus::Failed("rejected by the SMSC (NACK)".into())
                },
            ]
        );
    }

    #[tokio::test]
    async fn handler_refusals_map_to_503_and_422() {
        let w = start().await;
        let mo = get(&format!(
            "/sms/mo?secret={SECRET_Q}&from=%2B15557654321&to=1&text=x"
        ));
        *w.recorder.refuse.lock().unwrap() = Some(WebhookRefusal::Temporary("store busy".into()));
        assert_eq!(status_of(w.addr, mo.clone()).await, 503);
        *w.recorder.refuse.lock().unwrap() = Some(WebhookRefusal::Rejected("no".into()));
        assert_eq!(status_of(w.addr, mo.clone()).await, 422);
        assert_eq!(
            status_of(
                w.addr,
                get(&format!("/sms/dlr?secret={SECRET_Q}&ref=r&type=1"))
            )
            .await,
            422
        );
        *w.recorder.refuse.lock().unwrap() = None;
        assert_eq!(status_of(w.addr, mo).await, 200);
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections_and_returns() {
        let w = start().await;
        let mut idle = TcpStream::connect(w.addr).await.unwrap();
        idle.write_all(get(&format!("/sms/dlr?secret={SECRET_Q}&ref=r&type=8")).as_bytes())
            .await
            .unwrap();
        let mut buffer = [0u8; 1024];
        let n = idle.read(&mut buffer).await.unwrap();
        assert!(String::from_utf8_lossy(&buffer[..n]).starts_with("HTTP/1.1 200"));
        w.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.task)
            .await
            .unwrap()
            .unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buffer))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "idle keep-alive connection closed");
        assert!(TcpStream::connect(w.addr).await.is_err(), "listener closed");
    }

    #[test]
    fn parameters_are_form_decoded() {
        let p = Params::parse(b"a=1+2%2B3&b=&c&d=%E2%82%AC&a%20b=x&=y&&").unwrap();
        assert_eq!(p.one("a").unwrap(), Some(&b"1 2+3"[..]));
        assert_eq!(p.one("b").unwrap(), Some(&b""[..]));
        assert_eq!(p.one("c").unwrap(), Some(&b""[..]));
        assert_eq!(p.one("d").unwrap(), Some("€".as_bytes()));
        assert_eq!(p.one("a b").unwrap(), Some(&b"x"[..]));
        assert_eq!(p.one("missing").unwrap(), None);
        assert_eq!(p.text("b").unwrap(), None);
        let twice = Params::parse(b"x=1&x=2").unwrap();
        assert_eq!(
            twice.one("x").unwrap_err(),
            "parameter 'x' given more than once"
        );
        assert_eq!(Params::parse(b"").unwrap(), Params::default());
        // Malformed escapes are kept literally rather than refused.
        assert_eq!(
            Params::parse(b"t=100%").unwrap().one("t").unwrap(),
            Some(&b"100%"[..])
        );
    }

    #[test]
    fn texts_are_decoded_by_charset_then_coding() {
        let ucs2: Vec<u8> = "Привет €"
            .encode_utf16()
            .flat_map(|u| u.to_be_bytes())
            .collect();
        assert_eq!(
            decode_text(&ucs2, Some("UTF-16BE"), Some("2")).unwrap(),
            "Привет €"
        );
        assert_eq!(decode_text(&ucs2, None, Some("2")).unwrap(), "Привет €");
        assert_eq!(decode_text(&ucs2, Some("ucs-2"), None).unwrap(), "Привет €");
        assert_eq!(
            decode_text("é€".as_bytes(), Some("UTF-8"), Some("0")).unwrap(),
            "é€"
        );
        assert_eq!(decode_text("é€".as_bytes(), None, None).unwrap(), "é€");
        assert_eq!(
            decode_text("é".as_bytes(), Some("8-BIT"), Some("1")).unwrap(),
            "é"
        );
        assert_eq!(
            decode_text(b"\xe9t\xe9", Some("ISO-8859-1"), None).unwrap(),
            "été"
        );
        assert_eq!(
            decode_text(b"\xff", Some("UTF-8"), None).unwrap(),
            "\u{FFFD}"
        );
        assert!(decode_text(b"\x04", Some("UTF-16BE"), None).is_err());
        assert!(decode_text(b"x", Some("EBCDIC"), None).is_err());
    }

    #[test]
    fn numbers_are_normalised_to_e164() {
        assert_eq!(
            normalize_number("+15551234567").as_deref(),
            Some("+15551234567")
        );
        assert_eq!(
            normalize_number(" 15551234567 ").as_deref(),
            Some("+15551234567")
        );
        assert_eq!(
            normalize_number("0015551234567").as_deref(),
            Some("+15551234567")
        );
        assert_eq!(
            normalize_number("+441234567890").as_deref(),
            Some("+441234567890")
        );
        for bad in [
            "",
            "+",
            "BANK",
            "0612345678",
            "+0612345678",
            "+1555123456789012",
            "+1 555",
            "++1555",
        ] {
            assert_eq!(normalize_number(bad), None, "{bad}");
        }
    }

    #[test]
    fn secrets_must_all_match() {
        assert!(secret_matches("k", [&b"k"[..]]));
        assert!(secret_matches("k", [&b"k"[..], &b"k"[..]]));
        assert!(!secret_matches("k", [&b"k"[..], &b"x"[..]]));
        assert!(!secret_matches("k", std::iter::empty()));
        assert!(!secret_matches("k", [&b"kk"[..]]));
        assert!(!secret_matches("", [&b""[..]]));
        let debug = format!(
            "{:?}",
            WebhookConfig {
                secret: "hidden".into(),
                max_body_bytes: 1
            }
        );
        assert!(!debug.contains("hidden"));
    }
}
