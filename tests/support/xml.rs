//! Incremental splitter for an XMPP stream: finds the stream header and each
//! complete depth-1 element, and parses the latter with minidom.

use minidom::Element;
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

pub const NS_STREAM: &str = "http://etherx.jabber.org/streams";

/// One unit read off the stream.
#[derive(Debug)]
pub enum Item {
    /// `<stream:stream ...>`; `id` is the stream id, if any.
    Header { id: Option<String> },
    /// A complete top-level element (stanza, features, SASL, stream error ...).
    Element(Element),
    /// `</stream:stream>`.
    End,
}

/// Accumulates bytes and hands out complete [`Item`]s.
pub struct StreamParser {
    buf: Vec<u8>,
    in_stream: bool,
    default_ns: &'static str,
}

impl StreamParser {
    /// `default_ns` is the namespace unprefixed elements inherit from the stream
    /// (`jabber:client`, `jabber:component:accept`).
    pub fn new(default_ns: &'static str) -> StreamParser {
        StreamParser {
            buf: Vec::new(),
            in_stream: false,
            default_ns,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// After a stream restart (SASL success): the next item must be a new header.
    pub fn reset(&mut self) {
        self.in_stream = false;
    }

    /// Bytes received but not yet part of a complete item.
    pub fn pending(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }

    /// The next complete item, `Ok(None)` if more data is needed.
    pub fn next_item(&mut self) -> Result<Option<Item>, String> {
        let mut reader = Reader::from_reader(&self.buf[..]);
        {
            let cfg = reader.config_mut();
            cfg.check_end_names = false;
            cfg.allow_unmatched_ends = true; // </stream:stream>
            cfg.trim_text(false);
            cfg.expand_empty_elements = false;
        }
        let mut depth = 0usize;
        let mut elem_start: Option<usize> = None;
        // Everything before this offset is insignificant (whitespace, declarations).
        let mut skip_to = 0usize;
        let outcome: Option<(usize, Option<Item>)> = loop {
            let before = reader.buffer_position() as usize;
            let event = match reader.read_event() {
                Ok(ev) => ev,
                // Truncated input reads as a syntax error: wait for more bytes.
                Err(quick_xml::Error::Syntax(_)) => break None,
                Err(e) => return Err(format!("{e} in {:?}", String::from_utf8_lossy(&self.buf))),
            };
            let after = reader.buffer_position() as usize;
            match event {
                Event::Eof => break None,
                Event::Start(e) if !self.in_stream => {
                    if e.local_name().as_ref() != b"stream" {
                        return Err(format!(
                            "expected a stream header, got <{}>",
                            String::from_utf8_lossy(e.name().as_ref())
                        ));
                    }
                    let id = attr_of(&e, b"id");
                    break Some((after, Some(Item::Header { id })));
                }
                Event::Start(_) => {
                    if depth == 0 {
                        elem_start = Some(before);
                    }
                    depth += 1;
                }
                Event::Empty(_) if depth == 0 => {
                    if !self.in_stream {
                        return Err("expected a stream header, got an empty element".into());
                    }
                    let el = self.parse(&self.buf[before..after])?;
                    break Some((after, Some(Item::Element(el))));
                }
                Event::End(_) => {
                    if depth == 0 {
                        // </stream:stream>
                        self.in_stream = false;
                        break Some((after, Some(Item::End)));
                    }
                    depth -= 1;
                    if depth == 0 {
                        let start = elem_start.take().expect("element start");
                        let el = self.parse(&self.buf[start..after])?;
                        break Some((after, Some(Item::Element(el))));
                    }
                }
                _ => {
                    if depth == 0 {
                        skip_to = after;
                    }
                }
            }
        };
        match outcome {
            Some((consumed, item)) => {
                if let Some(Item::Header { .. }) = item {
                    self.in_stream = true;
                }
                self.buf.drain(..consumed);
                Ok(item)
            }
            None => {
                self.buf.drain(..skip_to);
                Ok(None)
            }
        }
    }

    /// Parses one top-level element, re-declaring the stream's default namespace and
    /// the `stream:` prefix (unless the element declares them itself).
    fn parse(&self, raw: &[u8]) -> Result<Element, String> {
        let text = std::str::from_utf8(raw).map_err(|e| format!("invalid UTF-8: {e}"))?;
        let mut reader = Reader::from_str(text);
        let (name_len, has_default, has_stream) = match reader.read_event() {
            Ok(Event::Start(e)) | Ok(Event::Empty(e)) => (
                e.name().as_ref().len(),
                attr_of(&e, b"xmlns").is_some(),
                attr_of(&e, b"xmlns:stream").is_some(),
            ),
            other => return Err(format!("not an element: {other:?} in {text}")),
        };
        let mut decls = String::new();
        if !has_default {
            decls.push_str(&format!(" xmlns='{}'", self.default_ns));
        }
        if !has_stream && text.contains("stream:") {
            decls.push_str(&format!(" xmlns:stream='{NS_STREAM}'"));
        }
        let split = 1 + name_len;
        let fixed = format!("{}{}{}", &text[..split], decls, &text[split..]);
        fixed
            .parse::<Element>()
            .map_err(|e| format!("minidom cannot parse {fixed}: {e}"))
    }
}

fn attr_of(e: &BytesStart<'_>, name: &[u8]) -> Option<String> {
    e.attributes().with_checks(false).flatten().find_map(|a| {
        if a.key.as_ref() == name {
            a.unescape_value().ok().map(|v| v.into_owned())
        } else {
            None
        }
    })
}

/// The `id` attribute of the first element in an XML snippet.
pub fn first_id(xml: &str) -> Option<String> {
    let mut reader = Reader::from_str(xml);
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) | Ok(Event::Empty(e)) => return attr_of(&e, b"id"),
            Ok(Event::Eof) | Err(_) => return None,
            _ => {}
        }
    }
}

/// Serializes an element (for messages and logs).
pub fn to_xml(el: &Element) -> String {
    let mut out = Vec::new();
    match el.write_to(&mut out) {
        Ok(()) => String::from_utf8_lossy(&out).into_owned(),
        Err(e) => format!("<!-- cannot serialize {}: {e} -->", el.name()),
    }
}

/// Escapes text for use in XML character data or a quoted attribute value.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Standard base64 (for SASL PLAIN).
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
