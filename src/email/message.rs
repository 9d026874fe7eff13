//! One email as Reach writes it: [`OutgoingEmail`] says everything (sender, subject, threading,
//! text) and [`render`] turns it into RFC 5322 bytes. Pure: no sockets here, so the core may
//! build emails with it; sending the bytes is `super::outbound`'s job.
//!
//! Text that ends up in a header (display name, subject) is sanitised here: control characters,
//! CR and LF included, become spaces, so no caller-supplied text can start a header of its own.

use std::time::SystemTime;

use lettre::message::header::{Header, HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::{Address, Message};

/// One email Reach sends: everything is decided by the caller; this module only renders and sends.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutgoingEmail {
    /// Display name of the sender, e.g. "Bob via Reach". Any Unicode; control characters
    /// (CR/LF included) are replaced by spaces.
    pub from_name: String,
    /// The per-session alias `r-TOKEN@reply.domain`: From and Reply-To.
    pub from_address: String,
    /// The user's verified address.
    pub to: String,
    /// E.g. "IM from Bob (bob@example.net)"; sanitised like `from_name`.
    pub subject: String,
    /// This email's Message-ID without angle brackets, e.g. "abc@reply.domain".
    pub message_id: String,
    /// The Message-ID (without brackets) this email answers, if any.
    pub in_reply_to: Option<String>,
    /// The thread's Message-IDs (without brackets), oldest first.
    pub references: Vec<String>,
    /// The body: one paragraph per message, multi-line allowed.
    pub paragraphs: Vec<String>,
    /// Text after the signature separator, e.g. "Reply to this email to answer Bob."
    pub footer: String,
}

/// Why an email cannot be rendered or a relay cannot be set up. Not retryable: the input is wrong.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum OutboundError {
    /// An address field is not a valid email address.
    #[error("invalid {field} address {value:?}: {reason}")]
    InvalidAddress {
        /// Which field: "from", "to", ...
        field: &'static str,
        /// The offending value.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// The email's own Message-ID is not of the form `left@right` in plain ASCII.
    #[error("invalid Message-ID {0:?}: expected left@right with no spaces, brackets or quotes")]
    InvalidMessageId(String),
    /// lettre refused to build the message.
    #[error("cannot build the email: {0}")]
    Build(String),
    /// The relay URL cannot be understood.
    #[error("invalid relay URL {url:?}: {reason}")]
    InvalidRelayUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// TLS parameters for the relay cannot be set up.
    #[error("cannot set up TLS for relay {host}: {reason}")]
    Tls {
        /// The relay host.
        host: String,
        /// lettre's explanation.
        reason: String,
    },
}

/// `Auto-Submitted: auto-generated` (RFC 3834): tells well-behaved responders not to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AutoSubmitted;

impl Header for AutoSubmitted {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("Auto-Submitted")
    }

    fn parse(_: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(AutoSubmitted)
    }

    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), "auto-generated".to_owned())
    }
}

/// `X-Auto-Response-Suppress: All`: the same request for Exchange/Outlook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AutoResponseSuppress;

impl Header for AutoResponseSuppress {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("X-Auto-Response-Suppress")
    }

    fn parse(_: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(AutoResponseSuppress)
    }

    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), "All".to_owned())
    }
}

/// Text safe for one header line: every control character (CR, LF, TAB, DEL, C1, and the Unicode
/// line/paragraph separators) becomes a space, runs of whitespace collapse to one space, and the
/// ends are trimmed. lettre then RFC 2047-encodes whatever is not printable ASCII.
pub fn header_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let c = if c.is_control() || c.is_whitespace() {
            ' '
        } else {
            c
        };
        if c == ' ' && (out.is_empty() || out.ends_with(' ')) {
            continue;
        }
        out.push(c);
    }
    let trimmed = out.trim_end().len();
    out.truncate(trimmed);
    out
}

/// Body text with every line ending as `\n` (lettre writes CRLF on the wire).
fn body_text(text: &str) -> String {
    text.replace("\r\n", "\n").replace('\r', "\n")
}

/// Is `id` (without brackets) a Message-ID we can write verbatim: `dot-atom-text@dot-atom-text`
/// (RFC 5322 msg-id without the obsolete and no-fold-literal forms)?
fn is_message_id(id: &str) -> bool {
    fn atom_char(c: u8) -> bool {
        c.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&c)
    }
    fn dot_atom(part: &str) -> bool {
        !part.is_empty()
            && part
                .split('.')
                .all(|atom| !atom.is_empty() && atom.bytes().all(atom_char))
    }
    match id.split_once('@') {
        Some((left, right)) => dot_atom(left) && dot_atom(right),
        None => false,
    }
}

fn parse_address(field: &'static str, value: &str) -> Result<Address, OutboundError> {
    value
        .parse::<Address>()
        .map_err(|err| OutboundError::InvalidAddress {
            field,
            value: value.to_owned(),
            reason: err.to_string(),
        })
}

/// HTML-escapes `text` (the five XML specials) for element content and attribute values.
fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// One paragraph of HTML content: escaped lines joined by `<br>`.
fn html_lines(text: &str) -> String {
    body_text(text)
        .split('\n')
        .map(escape_html)
        .collect::<Vec<_>>()
        .join("<br>\n")
}

/// The text/plain part: paragraphs separated by a blank line, then the signature separator
/// `-- ` and the footer.
fn plain_body(email: &OutgoingEmail) -> String {
    let mut text = email
        .paragraphs
        .iter()
        .map(|p| body_text(p))
        .collect::<Vec<_>>()
        .join("\n\n");
    if !text.is_empty() {
        text.push_str("\n\n");
    }
    text.push_str("-- \n");
    text.push_str(&body_text(&email.footer));
    text.push('\n');
    text
}

/// The text/html part: one `<p>` per paragraph, the footer in a small muted `<p>`.
fn html_body(email: &OutgoingEmail) -> String {
    let mut html =
        String::from("<!DOCTYPE html>\n<html>\n<head><meta charset=\"utf-8\"></head>\n<body>\n");
    for paragraph in &email.paragraphs {
        html.push_str("<p>");
        html.push_str(&html_lines(paragraph));
        html.push_str("</p>\n");
    }
    html.push_str("<p style=\"color:#777777;font-size:small\">");
    html.push_str(&html_lines(&email.footer));
    html.push_str("</p>\n</body>\n</html>\n");
    html
}

/// Renders `email` as RFC 5322 bytes (CRLF line endings), dated `now`.
///
/// Fails when an address or the email's own Message-ID is malformed. Malformed `in_reply_to` or
/// `references` entries (they may come from other people's mail clients) are dropped with a
/// warning rather than failing the email.
pub fn render(email: &OutgoingEmail, now: SystemTime) -> Result<Vec<u8>, OutboundError> {
    let from_address = parse_address("from", &email.from_address)?;
    let to = parse_address("to", &email.to)?;
    let name = header_text(&email.from_name);
    let from = Mailbox::new((!name.is_empty()).then_some(name), from_address);
    if !is_message_id(&email.message_id) {
        return Err(OutboundError::InvalidMessageId(email.message_id.clone()));
    }

    let mut builder = Message::builder()
        .from(from.clone())
        .reply_to(from)
        .to(Mailbox::new(None, to))
        .subject(header_text(&email.subject))
        .message_id(Some(format!("<{}>", email.message_id)))
        .date(now)
        .header(AutoSubmitted)
        .header(AutoResponseSuppress);

    if let Some(parent) = &email.in_reply_to {
        if is_message_id(parent) {
            builder = builder.in_reply_to(format!("<{parent}>"));
        } else {
            tracing::warn!(in_reply_to = %parent.escape_debug(), "dropping malformed In-Reply-To");
        }
    }
    let references: Vec<String> = email
        .references
        .iter()
        .filter(|id| {
            let ok = is_message_id(id);
            if !ok {
                tracing::warn!(reference = %id.escape_debug(), "dropping malformed References entry");
            }
            ok
        })
        .map(|id| format!("<{id}>"))
        .collect();
    if !references.is_empty() {
        builder = builder.references(references.join(" "));
    }

    let message = builder
        .multipart(MultiPart::alternative_plain_html(
            plain_body(email),
            html_body(email),
        ))
        .map_err(|err| OutboundError::Build(err.to_string()))?;
    Ok(message.formatted())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use mail_parser::{MessageParser, MimeHeaders};
    use std::time::{Duration, UNIX_EPOCH};

    pub(crate) fn sample() -> OutgoingEmail {
        OutgoingEmail {
            from_name: "Bob via Reach".into(),
            from_address: "r-abcdef@reply.example.com".into(),
            to: "alice@example.org".into(),
            subject: "IM from Bob (bob@example.net)".into(),
            message_id: "m1.xyz@reply.example.com".into(),
            in_reply_to: None,
            references: vec![],
            paragraphs: vec![
                "10:02 Bob: hi there".into(),
                "10:03 Bob: two lines\nsecond <b>line</b> & more".into(),
            ],
            footer: "Reply to this email to answer Bob.".into(),
        }
    }

    pub(crate) fn at() -> SystemTime {
        // 2024-03-01T10:02:03Z
        UNIX_EPOCH + Duration::from_secs(1_709_287_323)
    }

    fn header_section(raw: &[u8]) -> String {
        let raw = String::from_utf8(raw.to_vec()).expect("rendered mail is ASCII/UTF-8");
        let end = raw.find("\r\n\r\n").expect("header/body separator");
        raw[..end].to_owned()
    }

    /// Top-level header names, in order, lower-cased (continuation lines are not headers).
    fn header_names(raw: &[u8]) -> Vec<String> {
        header_section(raw)
            .split("\r\n")
            .filter(|line| !line.starts_with([' ', '\t']))
            .map(|line| line.split(':').next().unwrap_or("").to_ascii_lowercase())
            .collect()
    }

    pub(crate) fn raw_header<'a>(
        msg: &'a mail_parser::Message<'a>,
        name: &'a str,
    ) -> Option<&'a str> {
        msg.header_raw(name).map(str::trim)
    }

    /// Message-IDs of a parsed In-Reply-To/References header.
    fn ids(value: &mail_parser::HeaderValue<'_>) -> Option<Vec<String>> {
        value
            .as_text_list()
            .map(|list| list.iter().map(|id| id.to_string()).collect())
            .or_else(|| value.as_text().map(|id| vec![id.to_owned()]))
    }

    #[test]
    fn renders_every_header_and_both_parts() {
        let raw = render(&sample(), at()).unwrap();
        assert!(
            raw.windows(2).all(|w| w[1] != b'\n' || w[0] == b'\r'),
            "bare LF"
        );
        let msg = MessageParser::default().parse(&raw).unwrap();

        let from = msg.from().unwrap().first().unwrap();
        assert_eq!(from.name(), Some("Bob via Reach"));
        assert_eq!(from.address(), Some("r-abcdef@reply.example.com"));
        let reply_to = msg.reply_to().unwrap().first().unwrap();
        assert_eq!(reply_to.name(), Some("Bob via Reach"));
        assert_eq!(reply_to.address(), Some("r-abcdef@reply.example.com"));
        let to = msg.to().unwrap();
        assert_eq!(to.iter().count(), 1);
        assert_eq!(to.first().unwrap().address(), Some("alice@example.org"));
        assert_eq!(msg.subject(), Some("IM from Bob (bob@example.net)"));
        assert_eq!(msg.message_id(), Some("m1.xyz@reply.example.com"));
        assert_eq!(msg.date().unwrap().to_timestamp(), 1_709_287_323);
        assert_eq!(raw_header(&msg, "Auto-Submitted"), Some("auto-generated"));
        assert_eq!(raw_header(&msg, "X-Auto-Response-Suppress"), Some("All"));
        assert!(msg.header("In-Reply-To").is_none());
        assert!(msg.header("References").is_none());
        assert!(msg.header("Bcc").is_none());
        let ct = msg.content_type().unwrap();
        assert_eq!(ct.ctype(), "multipart");
        assert_eq!(ct.subtype(), Some("alternative"));

        assert_eq!(msg.text_body.len(), 1);
        assert_eq!(msg.html_body.len(), 1);
        let text_part = msg.part(msg.text_body[0]).unwrap();
        let text_ct = text_part.content_type().unwrap();
        assert_eq!(
            (text_ct.ctype(), text_ct.subtype()),
            ("text", Some("plain"))
        );
        assert_eq!(
            text_ct.attribute("charset").map(str::to_ascii_lowercase),
            Some("utf-8".into())
        );
        let text = msg.body_text(0).unwrap().replace("\r\n", "\n");
        assert_eq!(
            text,
            "10:02 Bob: hi there\n\n10:03 Bob: two lines\nsecond <b>line</b> & more\n\n\
             -- \nReply to this email to answer Bob.\n"
        );
        let html_part = msg.part(msg.html_body[0]).unwrap();
        let html_ct = html_part.content_type().unwrap();
        assert_eq!((html_ct.ctype(), html_ct.subtype()), ("text", Some("html")));
        let html = msg.body_html(0).unwrap().replace("\r\n", "\n");
        assert!(html.contains("<p>10:02 Bob: hi there</p>"), "{html}");
        assert!(
            html.contains(
                "<p>10:03 Bob: two lines<br>\nsecond &lt;b&gt;line&lt;/b&gt; &amp; more</p>"
            ),
            "{html}"
        );
        assert!(
            html.contains(
                "<p style=\"color:#777777;font-size:small\">Reply to this email to answer Bob.</p>"
            ),
            "{html}"
        );
        assert!(!html.contains("<b>"), "unescaped markup: {html}");
    }

    #[test]
    fn threading_headers_only_when_set() {
        let mut email = sample();
        email.in_reply_to = Some("m0@reply.example.com".into());
        email.references = vec![
            "root@reply.example.com".into(),
            "m0@reply.example.com".into(),
        ];
        let raw = render(&email, at()).unwrap();
        let msg = MessageParser::default().parse(&raw).unwrap();
        assert_eq!(
            ids(msg.in_reply_to()),
            Some(vec!["m0@reply.example.com".to_owned()])
        );
        assert_eq!(
            ids(msg.references()),
            Some(vec![
                "root@reply.example.com".to_owned(),
                "m0@reply.example.com".to_owned()
            ])
        );

        // Only In-Reply-To.
        email.references.clear();
        let raw = render(&email, at()).unwrap();
        let names = header_names(&raw);
        assert!(names.contains(&"in-reply-to".to_owned()));
        assert!(!names.contains(&"references".to_owned()));
    }

    #[test]
    fn malformed_thread_ids_are_dropped_but_own_id_must_be_valid() {
        let mut email = sample();
        email.in_reply_to = Some("not an id".into());
        email.references = vec![
            "ok@reply.example.com".into(),
            "bad>\r\nBcc: evil@x".into(),
            "".into(),
        ];
        let raw = render(&email, at()).unwrap();
        let msg = MessageParser::default().parse(&raw).unwrap();
        assert!(msg.header("In-Reply-To").is_none());
        assert_eq!(
            ids(msg.references()),
            Some(vec!["ok@reply.example.com".to_owned()])
        );
        assert!(msg.header("Bcc").is_none());

        for bad in [
            "",
            "no-at-sign",
            "<x@y>",
            "a b@c",
            "x@y\r\nBcc: e@x",
            "a@b@c",
            "a..b@c",
        ] {
            let mut email = sample();
            email.message_id = bad.into();
            assert_eq!(
                render(&email, at()),
                Err(OutboundError::InvalidMessageId(bad.into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn header_injection_through_name_or_subject_creates_no_header() {
        let clean_raw = render(&sample(), at()).unwrap();
        let clean = header_names(&clean_raw);
        let clean_count = MessageParser::default()
            .parse(&clean_raw)
            .unwrap()
            .headers()
            .len();
        for evil in [
            "Bob\r\nBcc: evil@x",
            "Bob\nBcc: evil@x",
            "Bob\rBcc: evil@x",
            "Bob\r\n\r\nBcc: evil@x",
            "Bob\u{85}Bcc: evil@x",
            "Bob\u{2028}Bcc: evil@x",
        ] {
            let mut email = sample();
            email.from_name = evil.into();
            email.subject = format!("IM from {evil}");
            let raw = render(&email, at()).unwrap();
            assert_eq!(header_names(&raw), clean, "{evil:?}");
            let msg = MessageParser::default().parse(&raw).unwrap();
            assert!(msg.header("Bcc").is_none(), "{evil:?}");
            assert!(msg.bcc().is_none(), "{evil:?}");
            assert_eq!(msg.headers().len(), clean_count, "{evil:?}");
            let from = msg.from().unwrap().first().unwrap();
            assert_eq!(from.address(), Some("r-abcdef@reply.example.com"));
            assert_eq!(from.name(), Some("Bob Bcc: evil@x"), "{evil:?}");
            assert_eq!(msg.subject(), Some("IM from Bob Bcc: evil@x"), "{evil:?}");
            assert_eq!(msg.to().unwrap().iter().count(), 1);
        }
    }

    #[test]
    fn non_ascii_name_and_subject_are_encoded_and_decode_back() {
        let mut email = sample();
        email.from_name = "Zoë \"the\" Ünïcødé 🦀 via Reach".into();
        email.subject = "IM from Zoë (zoë@exämple.net) — «ça va?» ".repeat(3);
        let raw = render(&email, at()).unwrap();
        let headers = header_section(&raw);
        assert!(headers.is_ascii(), "raw 8-bit header: {headers}");
        assert!(
            headers.to_ascii_lowercase().contains("=?utf-8?"),
            "{headers}"
        );
        assert!(headers.split("\r\n").all(|l| l.len() <= 998));
        let msg = MessageParser::default().parse(&raw).unwrap();
        let from = msg.from().unwrap().first().unwrap();
        assert_eq!(from.name(), Some("Zoë \"the\" Ünïcødé 🦀 via Reach"));
        assert_eq!(from.address(), Some("r-abcdef@reply.example.com"));
        assert_eq!(msg.subject(), Some(header_text(&email.subject).as_str()));
        let mut body_email = sample();
        body_email.paragraphs = vec!["10:02 Zoë: ça va? 🦀".into()];
        let raw = render(&body_email, at()).unwrap();
        let msg = MessageParser::default().parse(&raw).unwrap();
        assert!(msg
            .body_text(0)
            .unwrap()
            .starts_with("10:02 Zoë: ça va? 🦀"));
        assert!(msg
            .body_html(0)
            .unwrap()
            .contains("<p>10:02 Zoë: ça va? 🦀</p>"));
    }

    #[test]
    fn ascii_specials_in_name_round_trip() {
        let mut email = sample();
        email.from_name = "O'Brien, Bob <boss> \\ (x) via Reach".into();
        let raw = render(&email, at()).unwrap();
        let msg = MessageParser::default().parse(&raw).unwrap();
        let from = msg.from().unwrap();
        assert_eq!(from.iter().count(), 1, "{}", header_section(&raw));
        let from = from.first().unwrap();
        assert_eq!(from.name(), Some("O'Brien, Bob <boss> \\ (x) via Reach"));
        assert_eq!(from.address(), Some("r-abcdef@reply.example.com"));
    }

    #[test]
    fn empty_name_gives_bare_address_and_empty_paragraphs_give_footer_only() {
        let mut email = sample();
        email.from_name = " \r\n ".into();
        email.paragraphs.clear();
        let raw = render(&email, at()).unwrap();
        let msg = MessageParser::default().parse(&raw).unwrap();
        let from = msg.from().unwrap().first().unwrap();
        assert_eq!(from.name(), None);
        assert_eq!(from.address(), Some("r-abcdef@reply.example.com"));
        assert_eq!(
            msg.body_text(0).unwrap().replace("\r\n", "\n"),
            "-- \nReply to this email to answer Bob.\n"
        );
    }

    #[test]
    fn bad_addresses_are_refused() {
        let mut email = sample();
        email.to = "alice@example.org\r\nBcc: evil@x".into();
        assert!(matches!(
            render(&email, at()),
            Err(OutboundError::InvalidAddress { field: "to", .. })
        ));
        let mut email = sample();
        email.from_address = "not an address".into();
        assert!(matches!(
            render(&email, at()),
            Err(OutboundError::InvalidAddress { field: "from", .. })
        ));
    }

    #[test]
    fn header_text_sanitises() {
        assert_eq!(header_text("  a\r\n\tb \u{7f}c\u{2029}d  "), "a b c d");
        assert_eq!(header_text("\r\n"), "");
        assert_eq!(header_text("Zoë 🦀"), "Zoë 🦀");
    }
}
