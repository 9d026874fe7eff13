//! SMS: a counting handset on Kannel's fake SMSC (how many SMS reached the "phone"), and plain
//! keep-alive `sendsms` requests as the baseline for what Reach hands to Kannel.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use percent_encoding::{percent_decode_str, utf8_percent_encode, NON_ALPHANUMERIC};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::support::kannel::Kannel;

/// The fake SMSC's only client, counting whole SMS (a long SMS's parts count once).
pub struct Handset {
    pub received: Arc<AtomicU64>,
}

impl Handset {
    pub async fn connect(kannel: &Kannel) -> Handset {
        let deadline = Instant::now() + Duration::from_secs(15);
        let stream = loop {
            if let Ok(s) = TcpStream::connect(("127.0.0.1", kannel.smsc_port())).await {
                break s;
            }
            assert!(Instant::now() < deadline, "fake SMSC port not open");
            tokio::time::sleep(Duration::from_millis(30)).await;
        };
        while !kannel.smsc_online().await {
            assert!(
                Instant::now() < deadline,
                "fake SMSC did not take the handset"
            );
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let received = Arc::new(AtomicU64::new(0));
        let count = received.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::with_capacity(64 * 1024, stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if starts_an_sms(&line) {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Handset { received }
    }

    pub fn count(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// `SENDER RECEIVER KIND ...`: a whole SMS, or the first part of a long one. Continuation lines
/// of a text with a line break have no known kind and do not count.
fn starts_an_sms(line: &str) -> bool {
    let mut fields = line.splitn(4, ' ');
    let (Some(_), Some(_), Some(kind)) = (fields.next(), fields.next(), fields.next()) else {
        return false;
    };
    match kind {
        "text" | "data" | "ucs-2" | "ucs2" => true,
        "udh" => {
            let udh: Vec<u8> = fields
                .next()
                .and_then(|rest| rest.split(' ').next())
                .map(|u| percent_decode_str(&u.replace('+', " ")).collect())
                .unwrap_or_default();
            // Concatenation element: 8-bit reference (IE 0) or 16-bit (IE 8); seq is its last byte.
            match (udh.get(1), udh.get(5), udh.get(6)) {
                (Some(0), Some(&seq), _) | (Some(8), _, Some(&seq)) => seq == 1,
                _ => true,
            }
        }
        _ => false,
    }
}

/// Plain keep-alive sendsms requests on `connections` connections, `total` in all. Returns
/// (answered 202, elapsed).
pub async fn sendsms_loop(
    kannel: &Kannel,
    from: &str,
    to: &[String],
    total: u64,
    connections: usize,
) -> (u64, Duration) {
    let port: u16 = kannel
        .sendsms_url()
        .rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("sendsms port");
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut jobs = Vec::new();
    for _ in 0..connections {
        let (next, to) = (next.clone(), to.to_vec());
        let user = kannel.username().to_owned();
        let password = kannel.password().to_owned();
        let from = from.to_owned();
        jobs.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect to sendsms");
            stream.set_nodelay(true).ok();
            let mut accepted = 0u64;
            let mut buf = vec![0u8; 4096];
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                let text = format!("bob{}: load message {n}", n % 4);
                let request = format!(
                    "GET /cgi-bin/sendsms?username={user}&password={password}&from={}&to={}&text={}&charset=UTF-8 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                    utf8_percent_encode(&from, NON_ALPHANUMERIC),
                    utf8_percent_encode(&to[n as usize % to.len()], NON_ALPHANUMERIC),
                    utf8_percent_encode(&text, NON_ALPHANUMERIC),
                );
                stream.write_all(request.as_bytes()).await.expect("send");
                let (status, closes) = read_response(&mut stream, &mut buf).await;
                if status == 202 {
                    accepted += 1;
                }
                if closes {
                    stream = TcpStream::connect(("127.0.0.1", port))
                        .await
                        .expect("reconnect to sendsms");
                    stream.set_nodelay(true).ok();
                }
            }
            accepted
        }));
    }
    let mut accepted = 0;
    for job in jobs {
        accepted += job.await.expect("sendsms loop");
    }
    (accepted, started.elapsed())
}

/// Reads one HTTP/1.x response; returns (status, whether the server closes the connection).
async fn read_response(stream: &mut TcpStream, buf: &mut [u8]) -> (u16, bool) {
    let mut head = Vec::new();
    let body_start = loop {
        let n = stream.read(buf).await.expect("read sendsms answer");
        assert!(n > 0, "sendsms closed the connection");
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let text = String::from_utf8_lossy(&head[..body_start]).to_ascii_lowercase();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let length: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let closes = text.contains("connection: close") || text.starts_with("http/1.0");
    let mut have = head.len() - body_start;
    while have < length {
        let n = stream.read(buf).await.expect("read sendsms body");
        assert!(n > 0, "sendsms closed mid-body");
        have += n;
    }
    (status, closes)
}
