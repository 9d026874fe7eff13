//! Reach's SMS adapters against a real Kannel 1.4.5 (bearerbox + smsbox + fake SMSC): what a
//! phone receives when Reach texts it, what Reach's webhook gets when the phone texts back,
//! delivery reports, and Kannel going away and coming back.
//!
//! Each test runs its own Kannel on free ports (about 0.2 s to start; a clean stop about 2 s).

use crate::support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reach::sms::kannel::{Kannel as KannelProvider, KannelConfig};
use reach::sms::webhook::{serve, WebhookConfig, WebhookHandler, WebhookRefusal};
use reach::sms::{
    DeliveryReport, DeliveryStatus, IncomingSms, OutgoingSms, SmsProvider, SmsSendError,
};
use support::kannel::{Handset, Kannel};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

const SECRET: &str = "kannelselftest42";
const PHONE: &str = "+15551234567";
const SHORT_CODE: &str = "12345";
const WAIT: Duration = Duration::from_secs(10);

/// What the webhook handed to Reach.
enum Call {
    Incoming(IncomingSms),
    Report(DeliveryReport),
}

struct Recorder {
    calls: mpsc::UnboundedSender<Call>,
    count: Mutex<usize>,
    /// How many incoming SMS to refuse with a temporary error (503) before taking them.
    refuse: Mutex<usize>,
    /// Kannel's ids of the SMS refused so far.
    refused_ids: Mutex<Vec<Option<String>>>,
}

impl WebhookHandler for Recorder {
    async fn incoming(&self, sms: IncomingSms) -> Result<(), WebhookRefusal> {
        {
            let mut refuse = self.refuse.lock().unwrap();
            if *refuse > 0 {
                *refuse -= 1;
                self.refused_ids.lock().unwrap().push(sms.provider_id);
                return Err(WebhookRefusal::Temporary("store busy".into()));
            }
        }
        *self.count.lock().unwrap() += 1;
        let _ = self.calls.send(Call::Incoming(sms));
        Ok(())
    }
    async fn delivery_report(&self, report: DeliveryReport) -> Result<(), WebhookRefusal> {
        *self.count.lock().unwrap() += 1;
        let _ = self.calls.send(Call::Report(report));
        Ok(())
    }
}

/// Reach's webhook on a free loopback port, recording every call.
struct Webhook {
    port: u16,
    recorder: Arc<Recorder>,
    calls: mpsc::UnboundedReceiver<Call>,
    _stop: watch::Sender<bool>,
}

impl Webhook {
    async fn start() -> Webhook {
        Webhook::start_on(0).await
    }

    async fn start_on(port: u16) -> Webhook {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, calls) = mpsc::unbounded_channel();
        let recorder = Arc::new(Recorder {
            calls: tx,
            count: Mutex::new(0),
            refuse: Mutex::new(0),
            refused_ids: Mutex::new(Vec::new()),
        });
        let (stop, shutdown) = watch::channel(false);
        let config = WebhookConfig {
            secret: SECRET.into(),
            max_body_bytes: 16 * 1024,
        };
        tokio::spawn(serve(listener, config, recorder.clone(), shutdown));
        Webhook {
            port,
            recorder,
            calls,
            _stop: stop,
        }
    }

    fn mo_url(&self) -> String {
        format!("http://127.0.0.1:{}/sms/mo?secret={SECRET}", self.port)
    }

    fn dlr_url(&self) -> String {
        format!("http://127.0.0.1:{}/sms/dlr?secret={SECRET}", self.port)
    }

    async fn next(&mut self) -> Call {
        tokio::time::timeout(WAIT, self.calls.recv())
            .await
            .expect("a webhook call within 10 s")
            .expect("webhook running")
    }

    async fn incoming(&mut self) -> IncomingSms {
        match self.next().await {
            Call::Incoming(sms) => sms,
            Call::Report(r) => panic!("expected an incoming SMS, got a report {r:?}"),
        }
    }

    async fn report(&mut self) -> DeliveryReport {
        match self.next().await {
            Call::Report(report) => report,
            Call::Incoming(sms) => panic!("expected a delivery report, got an SMS {sms:?}"),
        }
    }

    fn calls_seen(&self) -> usize {
        *self.recorder.count.lock().unwrap()
    }
}

fn provider(kannel: &Kannel, dlr_url: Option<String>) -> KannelProvider {
    KannelProvider::new(KannelConfig {
        sendsms_url: kannel.sendsms_url(),
        username: kannel.username().into(),
        password: kannel.password().into(),
        from: SHORT_CODE.into(),
        dlr_url,
        timeout: Duration::from_secs(5),
    })
    .expect("valid Kannel config")
}

fn sms(text: &str, reference: &str) -> OutgoingSms {
    OutgoingSms {
        to: PHONE.into(),
        text: text.into(),
        reference: reference.into(),
    }
}

async fn receive(handset: &mut Handset, kannel: &Kannel) -> support::kannel::Mt {
    match handset.recv_mt(WAIT).await {
        Some(mt) => mt,
        None => panic!("no MT at the handset within 10 s\n{}", kannel.logs(30)),
    }
}

#[tokio::test]
async fn texts_reach_the_phone_decoded() {
    let started = Instant::now();
    let kannel = Kannel::start("http://127.0.0.1:9/sms/mo?secret=unused").await;
    let mut handset = Handset::connect(&kannel).await;
    let kannel_up = started.elapsed();
    let provider = provider(&kannel, None);
    assert!(!provider.delivery_reports());

    for text in [
        "Bob: hello from XMPP",
        "Привет, мир",
        "héllo €",
        "Bob: two\nlines {with} [GSM] extension ~ chars",
        "emoji 👍 and ça",
    ] {
        provider
            .send(&sms(text, "r1"))
            .await
            .unwrap_or_else(|e| panic!("{text}: {e}"));
        let mt = receive(&mut handset, &kannel).await;
        assert_eq!(
            (mt.from.as_str(), mt.to.as_str()),
            (SHORT_CODE, PHONE),
            "{mt:?}"
        );
        assert_eq!(mt.text, text, "{:?}", mt.raw);
        assert_eq!(mt.parts, 1, "{:?}", mt.raw);
    }

    // 400 characters: three concatenated SMS (153 + 153 + 94), joined again by the phone.
    let long: String = (0..400)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    provider.send(&sms(&long, "r2")).await.unwrap();
    let mt = receive(&mut handset, &kannel).await;
    assert_eq!(mt.parts, 3, "{:?}", mt.raw);
    assert_eq!(mt.text, long);

    // 100 Cyrillic characters: UCS-2 parts of 67 characters.
    let cyrillic = "Ж".repeat(100);
    provider.send(&sms(&cyrillic, "r3")).await.unwrap();
    let mt = receive(&mut handset, &kannel).await;
    assert_eq!(
        (mt.parts, mt.text.as_str()),
        (2, cyrillic.as_str()),
        "{:?}",
        mt.raw
    );

    // A wrong password is refused for good.
    let wrong = KannelProvider::new(KannelConfig {
        sendsms_url: kannel.sendsms_url(),
        username: kannel.username().into(),
        password: "not-the-password".into(),
        from: SHORT_CODE.into(),
        dlr_url: None,
        timeout: Duration::from_secs(5),
    })
    .unwrap();
    let error = wrong.send(&sms("x", "r4")).await.unwrap_err();
    assert!(error.is_permanent(), "{error}");
    assert!(!error.to_string().contains("not-the-password"), "{error}");
    assert!(handset.recv_mt(Duration::from_millis(300)).await.is_none());
    eprintln!(
        "kannel up + handset attached in {kannel_up:?}; whole test {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn texts_from_the_phone_reach_the_webhook() {
    let mut webhook = Webhook::start().await;
    let kannel = Kannel::start(&webhook.mo_url()).await;
    let mut handset = Handset::connect(&kannel).await;

    let cases = [
        ("+15557654321", "hello Reach"),
        ("+15557654321", "Привет, мир"),
        ("+447700900123", "héllo €, ça va?"),
        ("+15557654321", "@bob two  spaces\nand a second line"),
        ("+15557654321", "emoji 👍"),
    ];
    for (from, text) in cases {
        let sent = Instant::now();
        handset.send_mo(from, SHORT_CODE, text).await;
        let sms = webhook.incoming().await;
        assert_eq!(sms.from, from);
        assert_eq!(sms.to, SHORT_CODE);
        assert_eq!(sms.text, text);
        assert!(
            sms.provider_id.as_deref().is_some_and(|id| !id.is_empty()),
            "{sms:?}"
        );
        eprintln!(
            "MO {:?} reached the webhook in {:?}",
            text.chars().take(12).collect::<String>(),
            sent.elapsed()
        );
    }

    // Kannel's 00-prefixed numbers are normalised too.
    handset
        .send_mo("0015557654321", SHORT_CODE, "zero zero")
        .await;
    assert_eq!(webhook.incoming().await.from, "+15557654321");

    // Forged calls straight to the webhook: no secret, a wrong one, a wrong header.
    let seen = webhook.calls_seen();
    let query = "from=%2B15557654321&to=12345&text=forged";
    for (target, header) in [
        (format!("/sms/mo?{query}"), ""),
        (format!("/sms/mo?secret=guess&{query}"), ""),
        (format!("/sms/mo?{query}"), "X-Reach-Secret: guess\r\n"),
        ("/sms/dlr?ref=r1&type=1".to_owned(), ""),
    ] {
        let status = raw_get(webhook.port, &target, header).await;
        assert_eq!(status, "HTTP/1.1 403 Forbidden", "{target}");
    }
    assert!(webhook.calls.try_recv().is_err());
    assert_eq!(webhook.calls_seen(), seen, "the handler saw a forged call");
}

#[tokio::test]
async fn texts_from_the_phone_wait_in_kannel_while_reach_is_down() {
    // Reach is not listening yet: smsbox retries every second (http-queue-delay).
    let port = support::free_port();
    let mo_url = format!("http://127.0.0.1:{port}/sms/mo?secret={SECRET}");
    let kannel = Kannel::start(&mo_url).await;
    let mut handset = Handset::connect(&kannel).await;
    handset
        .send_mo("+15557654321", SHORT_CODE, "sent while Reach was down")
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut webhook = Webhook::start_on(port).await;
    let up = Instant::now();
    let first = webhook.incoming().await;
    assert_eq!(first.text, "sent while Reach was down");
    eprintln!(
        "queued MO arrived {:?} after the webhook came up",
        up.elapsed()
    );

    // A temporary refusal (503) is retried with the same Kannel id.
    *webhook.recorder.refuse.lock().unwrap() = 2;
    handset
        .send_mo("+15557654321", SHORT_CODE, "store was busy")
        .await;
    let retried = Instant::now();
    let sms = webhook.incoming().await;
    assert_eq!(sms.text, "store was busy");
    assert_eq!(
        *webhook.recorder.refuse.lock().unwrap(),
        0,
        "both refusals were seen"
    );
    let refused = webhook.recorder.refused_ids.lock().unwrap().clone();
    assert_eq!(
        refused,
        vec![sms.provider_id.clone(), sms.provider_id.clone()]
    );
    eprintln!("MO taken after two 503s in {:?}", retried.elapsed());
}

#[tokio::test]
async fn delivery_reports_come_back_with_the_reference() {
    let mut webhook = Webhook::start().await;
    let kannel = Kannel::start(&webhook.mo_url()).await;
    let mut handset = Handset::connect(&kannel).await;
    let provider = provider(&kannel, Some(webhook.dlr_url()));
    assert!(provider.delivery_reports());

    let sent = Instant::now();
    provider
        .send(&sms("Bob: are you there?", "job-42/a%b"))
        .await
        .unwrap();
    receive(&mut handset, &kannel).await;
    // The fake SMSC acknowledges (type 8, "ACK/") and reports delivery (type 1) at once; smsbox
    // makes the two calls concurrently, so they may arrive in either order.
    let mut reports = vec![webhook.report().await, webhook.report().await];
    eprintln!(
        "both delivery reports within {:?}: {reports:?}",
        sent.elapsed()
    );
    reports.sort_by_key(|r| r.status == DeliveryStatus::Delivered);
    assert_eq!(
        reports,
        [
            DeliveryReport {
                reference: "job-42/a%b".into(),
                status: DeliveryStatus::Pending
            },
            DeliveryReport {
                reference: "job-42/a%b".into(),
                status: DeliveryStatus::Delivered
            },
        ]
    );

    // One report pair per SMS, also for long ones (Kannel reports the whole message).
    provider
        .send(&sms(&"x".repeat(200), "job-43"))
        .await
        .unwrap();
    assert_eq!(receive(&mut handset, &kannel).await.parts, 2);
    let mut statuses = Vec::new();
    while let Ok(Some(call)) =
        tokio::time::timeout(Duration::from_millis(1500), webhook.calls.recv()).await
    {
        match call {
            Call::Report(r) => {
                assert_eq!(r.reference, "job-43");
                statuses.push(r.status);
            }
            Call::Incoming(sms) => panic!("unexpected SMS {sms:?}"),
        }
    }
    assert!(
        statuses.contains(&DeliveryStatus::Delivered),
        "{statuses:?}"
    );
    eprintln!("reports for a 2-part SMS: {statuses:?}");
}

#[tokio::test]
async fn kannel_down_is_transient_and_nothing_accepted_is_lost() {
    let kannel_started = Instant::now();
    let mut kannel = Kannel::start("http://127.0.0.1:9/sms/mo?secret=unused").await;
    let start_time = kannel_started.elapsed();
    let mut handset = Handset::connect(&kannel).await;
    let provider = provider(&kannel, None);

    provider.send(&sms("before", "r1")).await.unwrap();
    assert_eq!(receive(&mut handset, &kannel).await.text, "before");

    // The phone is out of reach: Kannel accepts and keeps the SMS in its store.
    handset.disconnect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    provider.send(&sms("while away", "r2")).await.unwrap();

    let stopping = Instant::now();
    kannel.stop().await;
    let stop_time = stopping.elapsed();
    let error = provider.send(&sms("kannel down", "r3")).await.unwrap_err();
    assert!(matches!(error, SmsSendError::Transient(_)), "{error}");

    let restarting = Instant::now();
    kannel.restart().await;
    let restart_time = restarting.elapsed();
    // The same provider (and its connection pool) works again.
    provider.send(&sms("after restart", "r4")).await.unwrap();
    handset.reconnect(&kannel).await;
    let mut texts = vec![
        receive(&mut handset, &kannel).await.text,
        receive(&mut handset, &kannel).await.text,
    ];
    texts.sort();
    assert_eq!(texts, ["after restart", "while away"]);

    // A handset connected through a restart sees its socket end and must reconnect.
    kannel.restart().await;
    assert!(handset.recv_mt(Duration::from_millis(500)).await.is_none());
    assert!(handset.is_closed());
    handset.reconnect(&kannel).await;
    provider.send(&sms("second restart", "r5")).await.unwrap();
    assert_eq!(receive(&mut handset, &kannel).await.text, "second restart");
    eprintln!("kannel start {start_time:?}, stop {stop_time:?}, restart {restart_time:?}");
}

/// A GET straight to the webhook; returns the status line. Checks the body is empty.
async fn raw_get(port: u16, target: &str, extra_headers: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra_headers}Connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8(answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert_eq!(body, "", "webhook answers have no body");
    head.lines().next().unwrap().to_owned()
}
