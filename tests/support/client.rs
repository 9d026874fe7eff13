//! A raw-XML c2s test client (no tokio-xmpp/xmpp-parsers: their `component`
//! feature, on in this build, would make a c2s client speak the component namespace).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use minidom::Element;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::server::Server;
use super::xml::{base64, escape, first_id, to_xml, Item, StreamParser, NS_STREAM};

pub const NS_CLIENT: &str = "jabber:client";
const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
const NS_BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
const NS_SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
const CONNECT_STEP: Duration = Duration::from_secs(10);
pub const IQ_TIMEOUT: Duration = Duration::from_secs(10);

/// A logged-in c2s session. After `connect` the client has bound a resource but
/// has NOT sent initial presence: call `presence("")` to become available.
pub struct Client {
    /// Full JID as bound by the server, e.g. "alice@localhost/phone".
    pub jid: String,
    /// Bare JID, e.g. "alice@localhost".
    pub bare: String,
    stream: TcpStream,
    parser: StreamParser,
    backlog: VecDeque<Element>,
    closed: bool,
    host: String,
}

impl Client {
    /// Connects, authenticates (SASL PLAIN, no TLS) and binds `resource`. Panics on failure.
    pub async fn connect(server: &Server, user: &str, password: &str, resource: &str) -> Client {
        match Client::try_connect(server, user, password, resource).await {
            Ok(c) => c,
            Err(e) => panic!(
                "{:?}: client {user}@{} cannot log in: {e}\n--- server log tail ---\n{}",
                server.kind,
                server.host(),
                server.log_tail(30)
            ),
        }
    }

    /// Like [`Client::connect`] but returns the failure (e.g. `SASL failure: <not-authorized/>`).
    pub async fn try_connect(
        server: &Server,
        user: &str,
        password: &str,
        resource: &str,
    ) -> Result<Client, String> {
        let stream = TcpStream::connect(("127.0.0.1", server.c2s_port()))
            .await
            .map_err(|e| format!("TCP connect to 127.0.0.1:{}: {e}", server.c2s_port()))?;
        stream.set_nodelay(true).ok();
        let host = server.host().to_string();
        let mut c = Client {
            jid: String::new(),
            bare: format!("{user}@{host}"),
            stream,
            parser: StreamParser::new(NS_CLIENT),
            backlog: VecDeque::new(),
            closed: false,
            host,
        };

        // 1. Stream, SASL PLAIN.
        let features = c.open_stream().await?;
        let plain = features
            .get_child("mechanisms", NS_SASL)
            .map(|m| m.children().any(|x| x.text() == "PLAIN"))
            .unwrap_or(false);
        if !plain {
            return Err(format!(
                "server offers no SASL PLAIN: {}",
                to_xml(&features)
            ));
        }
        let token = base64(format!("\0{user}\0{password}").as_bytes());
        c.send(&format!(
            "<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{token}</auth>"
        ))
        .await;
        let answer = c.read_element(CONNECT_STEP).await?;
        if answer.name() != "success" {
            return Err(format!("SASL failure: {}", to_xml(&answer)));
        }

        // 2. Restarted stream, resource binding, legacy session if required.
        c.parser.reset();
        let features = c.open_stream().await?;
        if !features.has_child("bind", NS_BIND) {
            return Err(format!(
                "no resource binding offered: {}",
                to_xml(&features)
            ));
        }
        c.send(&format!(
            "<iq type='set' id='bind1'><bind xmlns='{NS_BIND}'><resource>{}</resource></bind></iq>",
            escape(resource)
        ))
        .await;
        let bound = c.read_element(CONNECT_STEP).await?;
        let jid = bound
            .get_child("bind", NS_BIND)
            .and_then(|b| b.get_child("jid", NS_BIND))
            .map(|j| j.text())
            .filter(|_| attr(&bound, "type") == "result" && attr(&bound, "id") == "bind1")
            .ok_or_else(|| format!("bind failed: {}", to_xml(&bound)))?;
        c.bare = jid.split('/').next().unwrap_or(&jid).to_string();
        c.jid = jid;
        if let Some(session) = features.get_child("session", NS_SESSION) {
            if !session.has_child("optional", NS_SESSION) {
                c.send(&format!(
                    "<iq type='set' id='sess1'><session xmlns='{NS_SESSION}'/></iq>"
                ))
                .await;
                let r = c.read_element(CONNECT_STEP).await?;
                if attr(&r, "type") != "result" {
                    return Err(format!("session failed: {}", to_xml(&r)));
                }
            }
        }
        Ok(c)
    }

    /// Writes raw XML. Stanzas without `xmlns` inherit `jabber:client`.
    pub async fn send(&mut self, xml: &str) {
        if let Err(e) = self.stream.write_all(xml.as_bytes()).await {
            panic!("{}: send failed ({e}) for {xml}", self.who());
        }
    }

    /// Writes raw bytes, which need not be UTF-8 (hostile-input tests). Errors are ignored: the
    /// server may already have closed the stream.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
        let _ = self.stream.flush().await;
    }

    /// Sends `<presence>extra</presence>`.
    pub async fn presence(&mut self, extra: &str) {
        self.send(&format!("<presence>{extra}</presence>")).await;
    }

    /// The next top-level stanza (from the backlog first), or None on timeout or end of stream.
    pub async fn recv(&mut self, timeout: Duration) -> Option<Element> {
        if let Some(el) = self.backlog.pop_front() {
            return Some(el);
        }
        self.read_stanza(timeout).await
    }

    /// Waits for a stanza matching `pred`, keeping the others in the backlog for later.
    /// Returns None on timeout or end of stream.
    pub async fn wait_for(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Element) -> bool,
    ) -> Option<Element> {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(i);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let el = self.read_stanza(left).await?;
            if pred(&el) {
                return Some(el);
            }
            self.backlog.push_back(el);
        }
    }

    /// Same as [`Client::wait_for`].
    pub async fn recv_matching(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Element) -> bool,
    ) -> Option<Element> {
        self.wait_for(timeout, pred).await
    }

    /// A stanza id unique within this process (same as `support::new_id()`).
    pub fn new_id() -> String {
        super::new_id()
    }

    /// Like [`Client::wait_for`] but panics with `what` and the stanzas seen.
    pub async fn expect(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Element) -> bool,
    ) -> Element {
        match self.wait_for(timeout, pred).await {
            Some(el) => el,
            None => panic!(
                "{}: expected {what} within {timeout:?}, got nothing matching{}.\nUnmatched stanzas:\n{}",
                self.who(),
                if self.closed { " (stream closed)" } else { "" },
                self.backlog_dump()
            ),
        }
    }

    /// Asserts that no stanza matching `pred` arrives within `timeout` (or is in the backlog).
    pub async fn expect_none(&mut self, timeout: Duration, pred: impl Fn(&Element) -> bool) {
        if let Some(el) = self.wait_for(timeout, &pred).await {
            panic!(
                "{}: expected no such stanza within {timeout:?}, got {}",
                self.who(),
                to_xml(&el)
            );
        }
    }

    /// Sends an iq (which must carry an `id`) and returns the result or error with that id.
    pub async fn iq(&mut self, xml_with_id: &str) -> Element {
        let id = first_id(xml_with_id)
            .unwrap_or_else(|| panic!("Client::iq needs an id attribute: {xml_with_id}"));
        self.send(xml_with_id).await;
        let what = format!("iq reply id='{id}' to {xml_with_id}");
        self.expect(&what, IQ_TIMEOUT, |e| {
            e.name() == "iq" && attr(e, "id") == id && matches!(attr(e, "type"), "result" | "error")
        })
        .await
    }

    /// Like [`Client::iq`] but panics unless the reply is `type='result'`.
    pub async fn iq_ok(&mut self, xml_with_id: &str) -> Element {
        let reply = self.iq(xml_with_id).await;
        assert_eq!(
            attr(&reply, "type"),
            "result",
            "{}: iq failed: {xml_with_id}\n  -> {}",
            self.who(),
            to_xml(&reply)
        );
        reply
    }

    /// Hands over the logged-in connection and the bytes received but not parsed yet, for load
    /// generators (benches) that write and count raw XML themselves.
    pub fn into_parts(self) -> (TcpStream, String) {
        let pending = self.parser.pending();
        (self.stream, pending)
    }

    /// Whether the server ended the stream or closed the connection.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Stanzas received but not consumed yet.
    pub fn backlog(&self) -> &VecDeque<Element> {
        &self.backlog
    }

    /// Ends the stream politely and waits briefly for the server to close it.
    pub async fn close(mut self) {
        if self.closed {
            return;
        }
        if self.stream.write_all(b"</stream:stream>").await.is_err() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.closed && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.read_stanza(left).await.is_none() {
                break;
            }
        }
        let _ = self.stream.shutdown().await;
    }

    // ---- internals -------------------------------------------------------------------

    fn who(&self) -> String {
        if self.jid.is_empty() {
            self.bare.clone()
        } else {
            self.jid.clone()
        }
    }

    fn backlog_dump(&self) -> String {
        if self.backlog.is_empty() {
            return "  (none)".into();
        }
        self.backlog
            .iter()
            .map(|e| format!("  {}", to_xml(e)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    async fn open_stream(&mut self) -> Result<Element, String> {
        let header = format!(
            "<?xml version='1.0'?><stream:stream xmlns='{NS_CLIENT}' xmlns:stream='{NS_STREAM}' \
             to='{}' version='1.0' xml:lang='en'>",
            self.host
        );
        self.send(&header).await;
        match self.read_item(CONNECT_STEP).await? {
            Item::Header { .. } => {}
            other => return Err(format!("expected a stream header, got {other:?}")),
        }
        let features = self.read_element(CONNECT_STEP).await?;
        if features.name() != "features" {
            return Err(format!(
                "expected stream features, got {}",
                to_xml(&features)
            ));
        }
        Ok(features)
    }

    async fn read_element(&mut self, timeout: Duration) -> Result<Element, String> {
        match self.read_item(timeout).await? {
            Item::Element(el) => Ok(el),
            other => Err(format!("expected an element, got {other:?}")),
        }
    }

    /// The next stanza off the wire; None on timeout or end of stream.
    async fn read_stanza(&mut self, timeout: Duration) -> Option<Element> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_item(left).await {
                Ok(Item::Element(el)) => return Some(el),
                Ok(Item::Header { .. }) => continue,
                Ok(Item::End) => {
                    self.closed = true;
                    return None;
                }
                Err(_) => return None,
            }
        }
    }

    /// The next item off the wire. Errors on timeout, EOF and parse failures.
    async fn read_item(&mut self, timeout: Duration) -> Result<Item, String> {
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 16384];
        loop {
            match self.parser.next_item() {
                Ok(Some(item)) => return Ok(item),
                Ok(None) => {}
                Err(e) => panic!("{}: unparsable XML from the server: {e}", self.who()),
            }
            if self.closed {
                return Err("stream closed".into());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "timed out after {timeout:?}; unparsed input: {:?}",
                    self.parser.pending()
                ));
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

/// An attribute's value, or "" if absent.
pub fn attr<'a>(el: &'a Element, name: &'a str) -> &'a str {
    el.attr(name).unwrap_or("")
}

/// The text of the first child `name` in namespace `ns`.
pub fn child_text(el: &Element, name: &str, ns: &str) -> Option<String> {
    el.get_child(name, ns).map(|c| c.text())
}

/// The `<body/>` text of a jabber:client message.
pub fn body(el: &Element) -> Option<String> {
    child_text(el, "body", NS_CLIENT)
}

/// The bare part of a JID ("a@b/c" -> "a@b").
pub fn bare(jid: &str) -> &str {
    jid.split('/').next().unwrap_or(jid)
}
