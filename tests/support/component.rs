//! A bare XEP-0114 component connection, for probing the server side without Reach
//! (e.g. to hold the component domain, or to prove the server's component config).

use std::time::{Duration, Instant};

use minidom::Element;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::server::Server;
use super::xml::{to_xml, Item, StreamParser, NS_STREAM};

pub const NS_COMPONENT: &str = "jabber:component:accept";

pub struct RawComponent {
    pub domain: String,
    stream: TcpStream,
    parser: StreamParser,
    closed: bool,
}

impl RawComponent {
    /// Connects to the server's component port and authenticates with `secret`.
    /// Err carries the server's refusal (e.g. a stream error for a wrong secret or a
    /// duplicate connection on Prosody).
    pub async fn connect(
        server: &Server,
        domain: &str,
        secret: &str,
    ) -> Result<RawComponent, String> {
        let stream = TcpStream::connect(("127.0.0.1", server.component_port()))
            .await
            .map_err(|e| format!("connect {}: {e}", server.component_addr()))?;
        let mut c = RawComponent {
            domain: domain.to_string(),
            stream,
            parser: StreamParser::new(NS_COMPONENT),
            closed: false,
        };
        c.send(&format!(
            "<?xml version='1.0'?><stream:stream xmlns='{NS_COMPONENT}' xmlns:stream='{NS_STREAM}' to='{domain}'>"
        ))
        .await;
        let id = match c.read_item(Duration::from_secs(10)).await? {
            Item::Header { id: Some(id) } => id,
            other => {
                return Err(format!(
                    "expected a stream header with an id, got {other:?}"
                ))
            }
        };
        let hs = xmpp_parsers::component::Handshake::from_stream_id_and_password(id, secret);
        let digest: String = hs
            .data
            .expect("handshake digest")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        c.send(&format!("<handshake>{digest}</handshake>")).await;
        match c.read_item(Duration::from_secs(10)).await? {
            Item::Element(el) if el.name() == "handshake" => Ok(c),
            Item::Element(el) => Err(format!("handshake refused: {}", to_xml(&el))),
            other => Err(format!("handshake refused: {other:?}")),
        }
    }

    pub async fn send(&mut self, xml: &str) {
        self.stream
            .write_all(xml.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("component {}: send failed: {e}", self.domain));
    }

    /// The next stanza (in namespace jabber:component:accept), None on timeout or close.
    pub async fn recv(&mut self, timeout: Duration) -> Option<Element> {
        match self.read_item(timeout).await {
            Ok(Item::Element(el)) => Some(el),
            Ok(Item::End) => {
                self.closed = true;
                None
            }
            _ => None,
        }
    }

    /// Hands over the authenticated connection, for load generators (benches) that count raw XML.
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    pub async fn close(mut self) {
        let _ = self.stream.write_all(b"</stream:stream>").await;
        let _ = self.stream.shutdown().await;
    }

    async fn read_item(&mut self, timeout: Duration) -> Result<Item, String> {
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 16384];
        loop {
            if let Some(item) = self.parser.next_item()? {
                return Ok(item);
            }
            if self.closed {
                return Err("stream closed".into());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("timed out; unparsed: {:?}", self.parser.pending()));
            }
            match tokio::time::timeout(left, self.stream.read(&mut chunk)).await {
                Err(_) => {}
                Ok(Ok(0)) | Ok(Err(_)) => {
                    self.closed = true;
                    return Err("connection closed by the server".into());
                }
                Ok(Ok(n)) => self.parser.push(&chunk[..n]),
            }
        }
    }
}
