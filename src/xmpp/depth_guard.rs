//! Bounds the nesting depth of what the XML parser ever sees from the server.
//!
//! The parser below the link (rxml, through tokio-xmpp) builds a whole stanza in memory before
//! Reach sees it, and neither bounds nesting. A stanza nested thousands deep would be built (and
//! later walked and dropped recursively) before the core's limit check could refuse it. This
//! guard sits between the socket and the parser and follows the markup byte by byte: an element
//! that would open deeper than the limit is dropped together with everything inside it, and an
//! empty `<too-deep xmlns='urn:x-reach:limits'/>` takes its place. The stanza stays well-formed,
//! reaches the core one level deeper than allowed, and the core refuses it with
//! `policy-violation` ([`crate::core::limits`]) while the link stays up.
//!
//! The guard also acknowledges what it reads at once (`TCP_QUICKACK`, see [`AfterRead`]): it is
//! the one place that sees every read of the link.
//!
//! The tracking is the markup's own: start tags (`<a ...>` opens, `<a .../>` does not), end tags,
//! attribute values in either quote (which may hold `>`), and the `<?…?>`, `<!--…-->`,
//! `<![CDATA[…]]>` and `<!…>` constructs, inside which nothing opens or closes. It never needs to
//! understand names, namespaces or encodings: every byte it looks for is ASCII, and UTF-8 never
//! uses ASCII bytes inside a multi-byte character.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What replaces an element that opens too deep. Its namespace is Reach's own.
pub const TOO_DEEP_MARKER: &[u8] = b"<too-deep xmlns='urn:x-reach:limits'/>";

/// Where in the markup the scanner is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Character data between tags.
    Text,
    /// Just after `<`.
    Open,
    /// Inside a start tag, outside attribute values.
    StartTag,
    /// Inside an attribute value quoted by this byte.
    Value(u8),
    /// Inside an end tag.
    EndTag,
    /// Just after `<!`.
    Bang,
    /// Inside `<?…?>`.
    Instruction,
    /// Inside `<!--…-->`.
    Comment,
    /// Inside `<![CDATA[…]]>`.
    CData,
    /// Inside another `<!…>` declaration.
    Declaration,
}

/// The byte-level filter: feed it what the socket gave, take what the parser may see.
#[derive(Debug)]
pub struct DepthFilter {
    /// Deepest element allowed, counting the stream element as depth 1.
    max_depth: usize,
    /// Elements open now.
    depth: usize,
    scan: Scan,
    /// The two previous bytes, for the multi-byte terminators (`?>`, `-->`, `]]>`, `/>`).
    prev: [u8; 2],
    /// While dropping a too-deep element: the depth it was opened from.
    dropping_from: Option<usize>,
    /// Elements dropped so far.
    dropped: u64,
}

impl DepthFilter {
    /// A filter letting elements open up to `max_depth` deep (the stream element being 1).
    pub fn new(max_depth: usize) -> Self {
        DepthFilter {
            max_depth: max_depth.max(1),
            depth: 0,
            scan: Scan::Text,
            prev: [0, 0],
            dropping_from: None,
            dropped: 0,
        }
    }

    /// How many too-deep elements were replaced so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Runs `input` through the filter, appending what the parser may see to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &byte in input {
            self.step(byte, out);
            self.prev = [self.prev[1], byte];
            if self.dropping_from == Some(self.depth) && self.scan == Scan::Text {
                // The dropped element just closed: its marker takes its place.
                self.dropping_from = None;
                out.extend_from_slice(TOO_DEEP_MARKER);
            }
        }
    }

    fn emit(&self, bytes: &[u8], out: &mut Vec<u8>) {
        if self.dropping_from.is_none() {
            out.extend_from_slice(bytes);
        }
    }

    fn step(&mut self, byte: u8, out: &mut Vec<u8>) {
        match self.scan {
            Scan::Text => {
                if byte == b'<' {
                    // Held back until the next byte says what kind of markup this is.
                    self.scan = Scan::Open;
                } else {
                    self.emit(&[byte], out);
                }
            }
            Scan::Open => {
                self.scan = match byte {
                    b'/' => Scan::EndTag,
                    b'?' => Scan::Instruction,
                    b'!' => Scan::Bang,
                    _ => {
                        if self.dropping_from.is_none() && self.depth >= self.max_depth {
                            self.dropping_from = Some(self.depth);
                            self.dropped += 1;
                        }
                        Scan::StartTag
                    }
                };
                self.emit(&[b'<', byte], out);
            }
            Scan::StartTag => {
                self.emit(&[byte], out);
                match byte {
                    b'"' | b'\'' => self.scan = Scan::Value(byte),
                    b'>' => {
                        self.scan = Scan::Text;
                        if self.prev[1] != b'/' {
                            self.depth += 1;
                        }
                    }
                    _ => {}
                }
            }
            Scan::Value(quote) => {
                self.emit(&[byte], out);
                if byte == quote {
                    self.scan = Scan::StartTag;
                }
            }
            Scan::EndTag => {
                self.emit(&[byte], out);
                if byte == b'>' {
                    self.scan = Scan::Text;
                    self.depth = self.depth.saturating_sub(1);
                }
            }
            Scan::Bang => {
                self.emit(&[byte], out);
                self.scan = match byte {
                    b'-' => Scan::Comment,
                    b'[' => Scan::CData,
                    b'>' => Scan::Text,
                    _ => Scan::Declaration,
                };
                // The opening `<!-` / `<![` must not count towards the terminator.
                self.prev = [0, 0];
            }
            Scan::Instruction => {
                self.emit(&[byte], out);
                if byte == b'>' && self.prev[1] == b'?' {
                    self.scan = Scan::Text;
                }
            }
            Scan::Comment => {
                self.emit(&[byte], out);
                if byte == b'>' && self.prev == [b'-', b'-'] {
                    self.scan = Scan::Text;
                }
            }
            Scan::CData => {
                self.emit(&[byte], out);
                if byte == b'>' && self.prev == [b']', b']'] {
                    self.scan = Scan::Text;
                }
            }
            Scan::Declaration => {
                self.emit(&[byte], out);
                if byte == b'>' {
                    self.scan = Scan::Text;
                }
            }
        }
    }
}

/// A socket whose reads go through a [`DepthFilter`]; writes pass unchanged.
#[derive(Debug)]
pub struct DepthGuard<S> {
    inner: S,
    filter: DepthFilter,
    /// Filtered bytes not yet handed to the reader, from `ready_from` on.
    ready: Vec<u8>,
    ready_from: usize,
    scratch: Box<[u8]>,
}

impl<S> DepthGuard<S> {
    /// Wraps `inner`, letting elements open up to `max_depth` deep (the stream element being 1).
    pub fn new(inner: S, max_depth: usize) -> Self {
        DepthGuard {
            inner,
            filter: DepthFilter::new(max_depth),
            ready: Vec::new(),
            ready_from: 0,
            scratch: vec![0; 16 * 1024].into_boxed_slice(),
        }
    }
}

/// Something to do on the socket after each read that brought data.
pub trait AfterRead {
    /// Called with how many bytes the read brought.
    fn after_read(&self, _bytes: usize) {}
}

impl AfterRead for tokio::io::DuplexStream {}

/// The server's stanzas come with nothing for Reach to answer most of the time, so the kernel
/// would delay its ACKs (up to 40 ms), and a server using Nagle's algorithm then holds its next
/// small write until that ACK: a stanza in a hundred waited ~40 ms. Acknowledge at once instead
/// (Linux re-enters delayed-ACK mode by itself, so this is asked again after each small read;
/// large reads mean a busy stream whose ACKs flow anyway, and an ACK per read would only add
/// packets for the server to handle).
impl AfterRead for tokio::net::TcpStream {
    fn after_read(&self, bytes: usize) {
        #[cfg(target_os = "linux")]
        if bytes < QUICKACK_BELOW {
            let _ = socket2::SockRef::from(self).set_tcp_quickack(true);
        }
        #[cfg(not(target_os = "linux"))]
        let _ = bytes;
    }
}

/// Reads smaller than this (a few stanzas) ask for an immediate ACK.
const QUICKACK_BELOW: usize = 4096;

impl<S: AsyncRead + AfterRead + Unpin> AsyncRead for DepthGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready_from < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.ready_from);
                buf.put_slice(&this.ready[this.ready_from..this.ready_from + n]);
                this.ready_from += n;
                if this.ready_from == this.ready.len() {
                    this.ready.clear();
                    this.ready_from = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut raw = ReadBuf::new(&mut this.scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut raw) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let got = raw.filled();
                    if got.is_empty() {
                        // End of stream.
                        return Poll::Ready(Ok(()));
                    }
                    this.inner.after_read(got.len());
                    this.filter.feed(got, &mut this.ready);
                    // Everything read may have been dropped: read on.
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for DepthGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn filter(max_depth: usize, input: &str) -> String {
        let mut f = DepthFilter::new(max_depth);
        let mut out = Vec::new();
        f.feed(input.as_bytes(), &mut out);
        String::from_utf8(out).unwrap()
    }

    /// The same input fed one byte at a time gives the same output as fed at once.
    fn filter_bytewise(max_depth: usize, input: &str) -> String {
        let mut f = DepthFilter::new(max_depth);
        let mut out = Vec::new();
        for b in input.as_bytes() {
            f.feed(std::slice::from_ref(b), &mut out);
        }
        String::from_utf8(out).unwrap()
    }

    const MARK: &str = "<too-deep xmlns='urn:x-reach:limits'/>";

    #[test]
    fn markup_within_the_limit_passes_unchanged() {
        let stream = "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' \
            xmlns:stream='http://etherx.jabber.org/streams' id='a>b'>\
            <message to=\"x@y\" from='a/b>c'><body>1 > 0 &amp; \"q\" é ☃</body>\
            <thread/><x a='/'/><![CDATA[<a><b><c>]]><!-- <d><e> --></message>";
        assert_eq!(filter(4, stream), stream);
        assert_eq!(filter_bytewise(4, stream), stream);
    }

    #[test]
    fn an_element_too_deep_is_replaced_by_the_marker_with_everything_inside() {
        // Depth: stream 1, message 2, a 3, b 4 (too deep with a limit of 3).
        let input = "<stream:stream><message><a><b x='1'><c>text</c><d/></b>after</a></message>";
        let want = format!("<stream:stream><message><a>{MARK}after</a></message>");
        assert_eq!(filter(3, input), want);
        assert_eq!(filter_bytewise(3, input), want);
    }

    #[test]
    fn self_closing_too_deep_elements_and_siblings_each_get_a_marker() {
        let input = "<s><m><a/><b>t</b></m><m2/></s>";
        // Limit 1: only the stream element may open; each stanza is replaced.
        assert_eq!(filter(1, input), format!("<s>{MARK}{MARK}</s>"));
        // Limit 2: the stanzas pass, their children are replaced one by one.
        assert_eq!(filter(2, input), format!("<s><m>{MARK}{MARK}</m><m2/></s>"));
    }

    #[test]
    fn a_deep_stanza_leaves_the_next_stanza_untouched() {
        let deep = "<a>".repeat(10_000) + &"</a>".repeat(10_000);
        let input =
            format!("<s><message id='1'>{deep}</message><message id='2'><body>hi</body></message>");
        let out = filter(33, &input);
        assert!(
            out.len() < 33 * 4 + 200,
            "the deep part was dropped: {} bytes",
            out.len()
        );
        assert!(out.contains(MARK));
        assert!(
            out.ends_with("<message id='2'><body>hi</body></message>"),
            "{out}"
        );
        assert_eq!(out, filter_bytewise(33, &input));
    }

    #[test]
    fn markup_inside_values_comments_and_cdata_does_not_count() {
        // None of these open elements, so a limit of 2 leaves them alone.
        let input = "<s><m a='<x>' b=\"<y>\"><![CDATA[<p><q>]]]]><!--<r>--><?pi <t>?>x</m></s>";
        assert_eq!(filter(2, input), input);
    }

    #[tokio::test]
    async fn the_guard_filters_reads_and_passes_writes() {
        let (mut far, near) = tokio::io::duplex(64);
        let mut guard = DepthGuard::new(near, 2);
        let input = format!("<s><m><a>{}</a></m><m/></s>", "<b>x</b>".repeat(100));
        let far_side = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            far.write_all(input.as_bytes()).await.unwrap();
            far.shutdown().await.unwrap();
            let mut echoed = String::new();
            far.read_to_string(&mut echoed).await.unwrap();
            assert_eq!(echoed, "written");
        });
        let mut got = String::new();
        guard.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, format!("<s><m>{MARK}</m><m/></s>"));
        use tokio::io::AsyncWriteExt;
        guard.write_all(b"written").await.unwrap();
        guard.shutdown().await.unwrap();
        far_side.await.unwrap();
    }
}
