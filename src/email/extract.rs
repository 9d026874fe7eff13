//! Reading an emailed reply: from the raw bytes Reach's SMTP listener accepted to the short text
//! that goes to the peer as an IM.
//!
//! Three jobs, each a pure function of its input: [`parse_reply`] reads the MIME structure with
//! mail-parser and says whether the mail is an automatic one ([`Automatic`]: bounces, vacation
//! replies, bulk mail) that must never become an IM; [`strip_quoted_and_signature`] keeps only the
//! new text of a reply (quotes, attribution lines, Outlook header blocks, signatures and mobile
//! footers removed); [`html_to_text`] turns an HTML-only reply into text, dropping the quoted
//! blocks that mail clients mark up (`blockquote`, Gmail's `gmail_quote`, Outlook's
//! `divRplyFwdMsg`, Thunderbird's `moz-cite-prefix`).
//!
//! This module must not decide anything: whether the sender is allowed, which session a reply
//! belongs to, and what to do with an automatic mail are the core's decisions. It never panics
//! on input and never logs message content above `debug`.

use mail_parser::{HeaderValue, Message, MessageParser, MessagePart, MimeHeaders, PartType};

/// Why a mail is an automatic one that must never become an IM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Automatic {
    /// A delivery status notification (multipart/report; report-type=delivery-status) or a
    /// bounce-looking mail (a `message/delivery-status` part, `X-Failed-Recipients`, an empty
    /// `Return-Path`).
    Bounce,
    /// RFC 3834 Auto-Submitted other than "no" (value kept, trimmed).
    AutoSubmitted(String),
    /// Precedence: bulk / junk / list / auto_reply (value kept, lowercased).
    Precedence(String),
    /// X-Auto-Response-Suppress present, or X-Autoreply / X-Autorespond / Auto-Reply headers
    /// (Exchange/others). Holds the name of the header that gave it away.
    AutoResponder(String),
    /// From a MAILER-DAEMON / postmaster-style sender.
    MailerDaemon,
    /// A multipart/report other than a delivery status: a read receipt
    /// (`disposition-notification`), an abuse or TLS report... Holds the report-type, lowercased.
    Report(String),
}

impl Automatic {
    /// The variant's name, as written in the golden fixtures' `.auto` files and in logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Automatic::Bounce => "Bounce",
            Automatic::AutoSubmitted(_) => "AutoSubmitted",
            Automatic::Precedence(_) => "Precedence",
            Automatic::AutoResponder(_) => "AutoResponder",
            Automatic::MailerDaemon => "MailerDaemon",
            Automatic::Report(_) => "Report",
        }
    }
}

/// What Reach needs from an emailed reply.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reply {
    /// The Message-ID, without angle brackets.
    pub message_id: Option<String>,
    /// The first From address only (no display name), with its domain lowercased.
    pub from: Option<String>,
    /// The decoded subject, trimmed.
    pub subject: Option<String>,
    /// In-Reply-To ids, without angle brackets.
    pub in_reply_to: Vec<String>,
    /// References ids, without angle brackets, oldest first.
    pub references: Vec<String>,
    /// The new text only: quotes and signature removed, trimmed; attachments named at the end,
    /// one `[attachment: NAME]` line each. Empty when the reply only quoted.
    pub text: String,
    /// Attachment file names, or `unnamed TYPE/SUBTYPE` for parts without one.
    pub attachments: Vec<String>,
    /// Set for mails that must never become an IM; the caller checks it before using `text`.
    pub automatic: Option<Automatic>,
}

/// Why a mail was refused. Each text is what the SMTP client sees after `550 5.6.0 `.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ExtractError {
    #[error("the message could not be parsed as MIME")]
    Malformed,
    /// No usable From address (automatic mails are still returned, with `from: None`).
    #[error("the message has no From header")]
    NoFrom,
}

/// At most this many `[attachment: ...]` lines end the text; the rest are counted in one line.
const MAX_LISTED_ATTACHMENTS: usize = 10;
/// Attachment names are cut to this many characters.
const MAX_ATTACHMENT_NAME_CHARS: usize = 120;

/// Reads a raw RFC 5322 message (CRLF or LF line ends) into a [`Reply`].
///
/// An automatic mail is returned with `automatic` set (and its text extracted anyway, which may
/// help to explain a bounce); it is the caller's job never to deliver it as an IM.
pub fn parse_reply(raw: &[u8]) -> Result<Reply, ExtractError> {
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Err(ExtractError::Malformed);
    }
    // mail-parser is written to survive hostile input, but a few of its consistency checks are
    // `debug_assert!`s: contain any panic so that bad mail can only ever be refused.
    let parsed = std::panic::catch_unwind(|| MessageParser::default().parse(raw));
    let message = match parsed {
        Ok(Some(message)) => message,
        Ok(None) => return Err(ExtractError::Malformed),
        Err(_) => {
            tracing::warn!(
                len = raw.len(),
                "mail-parser panicked; message refused as malformed"
            );
            return Err(ExtractError::Malformed);
        }
    };
    if message.parts.is_empty() || !has_real_header(&message) {
        return Err(ExtractError::Malformed);
    }

    let from = message
        .from()
        .and_then(|address| address.first())
        .and_then(|addr| addr.address())
        .and_then(normalize_address);
    let automatic = classify_automatic(&message, from.as_deref());
    if from.is_none() && automatic.is_none() {
        return Err(ExtractError::NoFrom);
    }
    if let Some(automatic) = &automatic {
        tracing::debug!(kind = automatic.kind(), "automatic mail");
    }

    let (body, attachments) = content(&message);
    let mut text = strip_quoted_and_signature(&body);
    append_attachment_lines(&mut text, &attachments);

    Ok(Reply {
        message_id: message.message_id().and_then(clean_id),
        from,
        subject: message
            .subject()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty()),
        in_reply_to: ids(message.in_reply_to()),
        references: ids(message.references()),
        text,
        attachments,
        automatic,
    })
}

/// A message whose "headers" are all garbage is parsed by mail-parser as a body-only message;
/// require at least one header that looks like a real one.
fn has_real_header(message: &Message<'_>) -> bool {
    message.root_part().headers.iter().any(|h| {
        let name = h.name.as_str();
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// Lowercases the domain of `local@domain`; the local part is kept as sent (it may be
/// case-sensitive). Returns `None` for an empty address.
fn normalize_address(address: &str) -> Option<String> {
    let address = address.trim().trim_matches(|c| c == '<' || c == '>');
    if address.is_empty() {
        return None;
    }
    Some(match address.rsplit_once('@') {
        Some((local, domain)) => format!("{local}@{}", domain.to_ascii_lowercase()),
        None => address.to_string(),
    })
}

fn clean_id(id: &str) -> Option<String> {
    let id = id
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim();
    (!id.is_empty()).then(|| id.to_string())
}

fn ids(value: &HeaderValue<'_>) -> Vec<String> {
    match value {
        HeaderValue::Text(id) => id
            .split_whitespace()
            .filter_map(clean_id)
            .collect::<Vec<_>>(),
        HeaderValue::TextList(list) => list.iter().filter_map(|id| clean_id(id)).collect(),
        _ => Vec::new(),
    }
}

/// The unfolded, trimmed text of the first root header called `name` (case-insensitive).
fn header_text(message: &Message<'_>, name: &str) -> Option<String> {
    let header = message
        .root_part()
        .headers
        .iter()
        .find(|h| h.name.as_str().eq_ignore_ascii_case(name))?;
    let text = match header.value() {
        HeaderValue::Text(text) => text.to_string(),
        HeaderValue::TextList(list) => list.join(", "),
        HeaderValue::Empty => String::new(),
        _ => message
            .raw_message
            .get(header.offset_start as usize..header.offset_end as usize)
            .map(|raw| String::from_utf8_lossy(raw).into_owned())
            .unwrap_or_default(),
    };
    Some(text.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn has_header(message: &Message<'_>, name: &str) -> bool {
    message
        .root_part()
        .headers
        .iter()
        .any(|h| h.name.as_str().eq_ignore_ascii_case(name))
}

fn is_type(part: &MessagePart<'_>, ctype: &str, subtype: &str) -> bool {
    part.content_type().is_some_and(|ct| {
        ct.ctype().eq_ignore_ascii_case(ctype)
            && ct
                .subtype()
                .is_some_and(|s| s.eq_ignore_ascii_case(subtype))
    })
}

/// Decides whether a mail is automatic; the most specific reason wins (a bounce before the
/// headers an auto-replier adds).
fn classify_automatic(message: &Message<'_>, from: Option<&str>) -> Option<Automatic> {
    let root = message.root_part();
    if is_type(root, "multipart", "report") {
        let report_type = root
            .content_type()
            .and_then(|ct| ct.attribute("report-type"))
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        return Some(match report_type.as_str() {
            "" | "delivery-status" | "global-delivery-status" => Automatic::Bounce,
            _ => Automatic::Report(report_type),
        });
    }
    let has_dsn_part = message.parts.iter().any(|part| {
        is_type(part, "message", "delivery-status")
            || is_type(part, "message", "global-delivery-status")
    });
    if has_dsn_part || has_header(message, "X-Failed-Recipients") {
        return Some(Automatic::Bounce);
    }
    let empty_return_path = header_text(message, "Return-Path").is_some_and(|rp| {
        rp.trim_matches(|c: char| c == '<' || c == '>' || c == ' ')
            .is_empty()
    });
    if empty_return_path {
        return Some(Automatic::Bounce);
    }
    if let Some(from) = from {
        let local = from.rsplit_once('@').map_or(from, |(local, _)| local);
        let local = local.to_ascii_lowercase();
        if matches!(
            local.as_str(),
            "mailer-daemon" | "mailer_daemon" | "mailerdaemon" | "postmaster"
        ) {
            return Some(Automatic::MailerDaemon);
        }
    }
    if let Some(value) = header_text(message, "Auto-Submitted") {
        let token = value
            .split([';', '(', ' '])
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        if token != "no" {
            return Some(Automatic::AutoSubmitted(value));
        }
    }
    for name in [
        "X-Auto-Response-Suppress",
        "X-Autoreply",
        "X-Autorespond",
        "X-Autoresponder",
        "Auto-Reply",
        "X-Auto-Reply",
    ] {
        if has_header(message, name) {
            return Some(Automatic::AutoResponder(name.to_string()));
        }
    }
    if let Some(value) = header_text(message, "Precedence") {
        let value = value.to_ascii_lowercase();
        if matches!(
            value.as_str(),
            "bulk" | "junk" | "list" | "auto_reply" | "auto-reply"
        ) {
            return Some(Automatic::Precedence(value));
        }
    }
    None
}

/// The body text and the attachment names of a message.
fn content(message: &Message<'_>) -> (String, Vec<String>) {
    if let Some(recovered) = reparse_with_found_boundary(message) {
        return recovered;
    }
    let body_ids = body_part_ids(message);
    (
        body_text(message, &body_ids),
        attachment_names(message, &body_ids),
    )
}

/// The parts that make up the text: those mail-parser chose (text/plain preferred over its HTML
/// alternative; an HTML-only body stands in for text). If it chose none, text parts it could only
/// recover (a missing end boundary makes mail-parser file the last part as an attachment).
fn body_part_ids(message: &Message<'_>) -> Vec<usize> {
    let mut ids: Vec<usize> = message.text_body.iter().map(|&id| id as usize).collect();
    if ids.is_empty() {
        ids = message
            .attachments
            .iter()
            .map(|&id| id as usize)
            .filter(|&id| message.parts.get(id).is_some_and(is_recovered_body))
            .collect();
    }
    ids
}

fn is_recovered_body(part: &MessagePart<'_>) -> bool {
    let declared_text = part.content_type().is_none()
        || is_type(part, "text", "plain")
        || is_type(part, "text", "html");
    part.is_encoding_problem
        && matches!(part.body, PartType::Text(_) | PartType::Html(_))
        && declared_text
        && part.attachment_name().is_none()
        && !part
            .content_disposition()
            .is_some_and(|cd| cd.ctype().eq_ignore_ascii_case("attachment"))
}

/// When a multipart's declared boundary never occurs, mail-parser returns the whole body as
/// text. If the body opens with another `--boundary` line, parse it again with that one.
fn reparse_with_found_boundary(message: &Message<'_>) -> Option<(String, Vec<String>)> {
    let root = message.root_part();
    let ct = root.content_type()?;
    if !ct.ctype().eq_ignore_ascii_case("multipart")
        || !matches!(root.body, PartType::Text(_) | PartType::Html(_))
    {
        return None;
    }
    let body = message.raw_message.get(root.offset_body as usize..)?;
    let boundary = body.split(|&b| b == b'\n').find_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let token = line.strip_prefix(b"--")?;
        let token = token.strip_suffix(b"--").unwrap_or(token);
        let valid = (1..=70).contains(&token.len())
            && !token.ends_with(b" ")
            && token
                .iter()
                .all(|&b| (b.is_ascii_graphic() || b == b' ') && b != b'"' && b != b'\\');
        valid.then_some(token)
    })?;
    let subtype: String = ct
        .subtype()
        .unwrap_or("mixed")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    let mut raw = format!("Content-Type: multipart/{subtype}; boundary=\"").into_bytes();
    raw.extend_from_slice(boundary);
    raw.extend_from_slice(b"\"\r\n\r\n");
    raw.extend_from_slice(body);
    let parsed = std::panic::catch_unwind(|| MessageParser::default().parse(&raw[..]))
        .ok()
        .flatten()?;
    if !matches!(parsed.root_part().body, PartType::Multipart(_)) {
        return None;
    }
    tracing::debug!("multipart body re-read with the boundary it actually uses");
    let ids = body_part_ids(&parsed);
    Some((body_text(&parsed, &ids), attachment_names(&parsed, &ids)))
}

fn body_text(message: &Message<'_>, body_ids: &[usize]) -> String {
    let mut pieces = Vec::new();
    for part in body_ids.iter().filter_map(|&id| message.parts.get(id)) {
        match &part.body {
            PartType::Text(_) if part.is_encoding_problem && is_base64(part) => {
                pieces.push(plain_part_text(part, &lenient_base64_text(message, part)));
            }
            PartType::Text(html) if is_type(part, "text", "html") => {
                pieces.push(html_to_text(html))
            }
            PartType::Text(text) => pieces.push(plain_part_text(part, text)),
            PartType::Html(html) => pieces.push(html_to_text(html)),
            _ => {}
        }
    }
    pieces.join("\n")
}

fn is_base64(part: &MessagePart<'_>) -> bool {
    part.content_transfer_encoding()
        .is_some_and(|cte| cte.trim().eq_ignore_ascii_case("base64"))
}

/// mail-parser gives up on base64 with characters outside the alphabet and hands back the raw
/// encoded text; RFC 2045 says such characters are to be ignored, so decode the rest.
fn lenient_base64_text(message: &Message<'_>, part: &MessagePart<'_>) -> String {
    let raw = message
        .raw_message
        .get(part.offset_body as usize..part.offset_end as usize)
        .unwrap_or_default();
    let mut alphabet: Vec<u8> = raw
        .iter()
        .copied()
        .take_while(|&b| b != b'=')
        .filter(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
        .collect();
    if alphabet.len() % 4 == 1 {
        alphabet.pop();
    }
    while !alphabet.len().is_multiple_of(4) {
        alphabet.push(b'=');
    }
    let bytes = mail_parser::decoders::base64::base64_decode(&alphabet).unwrap_or_default();
    let decoder = part
        .content_type()
        .and_then(|ct| ct.attribute("charset"))
        .and_then(|cs| mail_parser::decoders::charsets::map::charset_decoder(cs.as_bytes()));
    match decoder {
        Some(decode) => decode(&bytes),
        None => String::from_utf8_lossy(&bytes).into_owned(),
    }
}

fn plain_part_text(part: &MessagePart<'_>, text: &str) -> String {
    let text = normalize_newlines(text);
    let flowed = part.content_type().is_some_and(|ct| {
        ct.attribute("format")
            .is_some_and(|f| f.trim().eq_ignore_ascii_case("flowed"))
    });
    if flowed {
        let delsp = part.content_type().is_some_and(|ct| {
            ct.attribute("delsp")
                .is_some_and(|d| d.trim().eq_ignore_ascii_case("yes"))
        });
        unflow(&text, delsp)
    } else {
        text
    }
}

fn normalize_newlines(text: &str) -> String {
    text.replace("\r\n", "\n").replace('\r', "\n")
}

/// Undoes RFC 3676 format=flowed: removes space-stuffing and joins soft-broken lines of the same
/// quote depth. Quoted lines are written back as `> ` per level.
fn unflow(text: &str, delsp: bool) -> String {
    fn emit(out: &mut String, depth: usize, line: &str) {
        for _ in 0..depth {
            out.push('>');
        }
        if depth > 0 && !line.is_empty() {
            out.push(' ');
        }
        out.push_str(line);
        out.push('\n');
    }
    let mut out = String::with_capacity(text.len());
    let mut paragraph = String::new();
    let mut paragraph_depth: Option<usize> = None;
    for line in text.split('\n') {
        let depth = line.bytes().take_while(|&b| b == b'>').count();
        let content = &line[depth..];
        let content = content.strip_prefix(' ').unwrap_or(content);
        let soft = content.ends_with(' ') && content != "-- ";
        if let Some(d) = paragraph_depth.filter(|&d| d != depth) {
            emit(&mut out, d, &paragraph);
            paragraph.clear();
        }
        let piece = if soft && delsp {
            &content[..content.len() - 1]
        } else {
            content
        };
        paragraph.push_str(piece);
        paragraph_depth = Some(depth);
        if !soft {
            emit(&mut out, depth, &paragraph);
            paragraph.clear();
            paragraph_depth = None;
        }
    }
    if let Some(d) = paragraph_depth {
        emit(&mut out, d, &paragraph);
    }
    out
}

/// Every part that is not text we show: what mail-parser files as attachments, and the inline
/// images and other non-text parts it counts as part of the body (JMAP-style).
fn attachment_names(message: &Message<'_>, body_ids: &[usize]) -> Vec<String> {
    let filed: std::collections::HashSet<usize> =
        message.attachments.iter().map(|&id| id as usize).collect();
    message
        .parts
        .iter()
        .enumerate()
        .filter(|(_, part)| !is_broken_container(part))
        .filter(|(id, part)| match part.body {
            PartType::Multipart(_) => false,
            PartType::Binary(_) | PartType::InlineBinary(_) | PartType::Message(_) => true,
            PartType::Text(_) | PartType::Html(_) => filed.contains(id) && !body_ids.contains(id),
        })
        .map(|(_, part)| attachment_name(part))
        .collect()
}

/// A part declared multipart/* whose boundary never came: a broken container, not an attachment.
fn is_broken_container(part: &MessagePart<'_>) -> bool {
    part.content_type()
        .is_some_and(|ct| ct.ctype().eq_ignore_ascii_case("multipart"))
}

fn attachment_name(part: &MessagePart<'_>) -> String {
    if let Some(name) = part.attachment_name().map(sanitize_file_name) {
        if !name.is_empty() {
            return name;
        }
    }
    let mime = part
        .content_type()
        .map(|ct| {
            format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or("octet-stream"))
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|| match part.body {
            PartType::Message(_) => "message/rfc822".to_string(),
            _ => "text/plain".to_string(),
        });
    let mime: String = mime.chars().filter(|c| !c.is_control()).take(80).collect();
    format!("unnamed {mime}")
}

/// Keeps the last path component, drops control and bidi-override characters, cuts long names.
fn sanitize_file_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    let cleaned: String = base
        .chars()
        .filter(|&c| !c.is_control() && !is_invisible_format_char(c))
        .take(MAX_ATTACHMENT_NAME_CHARS)
        .collect();
    cleaned.trim().to_string()
}

fn is_invisible_format_char(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

fn append_attachment_lines(text: &mut String, attachments: &[String]) {
    if attachments.is_empty() {
        return;
    }
    let mut lines: Vec<String> = attachments
        .iter()
        .take(MAX_LISTED_ATTACHMENTS)
        .map(|name| format!("[attachment: {name}]"))
        .collect();
    if attachments.len() > MAX_LISTED_ATTACHMENTS {
        lines.push(format!(
            "[and {} more attachments]",
            attachments.len() - MAX_LISTED_ATTACHMENTS
        ));
    }
    if !text.is_empty() {
        text.push('\n');
    }
    text.push_str(&lines.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Quotes and signatures
// ---------------------------------------------------------------------------------------------

/// Keeps only the new text of a plain-text reply.
///
/// Removed: lines starting with `>` (inline answers between them are kept); an attribution line
/// ("On ... wrote:", "Am ... schrieb ...:", "Le ... a écrit :", ..., possibly wrapped over up to
/// three lines) together with everything after it when the quote that follows is not marked with
/// `>`; Outlook header blocks (`-----Original Message-----`, a `____` rule or a `From:` line
/// followed by `Sent:`/`To:`/`Subject:`-style lines, in several languages), forwarded-message
/// markers; the signature from a `-- ` line; a mobile footer ("Sent from my iPhone", "Get
/// Outlook for Android", ...) when nothing of the user's follows it; a mailing-list or provider
/// footer (a `___`/`---` rule over a short block naming the list, `listinfo` or how to
/// unsubscribe); each to the end. A line of dashes or a sentence that merely starts like a
/// footer is the user's text and stays. Lines keep their text (trailing whitespace is dropped),
/// runs of blank lines become one, and the result is trimmed.
pub fn strip_quoted_and_signature(text: &str) -> String {
    let text = normalize_newlines(text);
    let lines: Vec<&str> = text.split('\n').collect();
    let mut kept: Vec<&str> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim();
        if is_quote_line(line) {
            i += 1;
            continue;
        }
        if is_signature_delimiter(line)
            || (is_mobile_footer(trimmed) && only_leftovers_follow(&lines, i + 1))
            || (is_rule_line(trimmed) && is_list_footer_at(&lines, i))
            || is_original_message_marker(trimmed)
            || trimmed == "-----BEGIN PGP SIGNATURE-----"
            || is_header_block_at(&lines, i)
            || (is_rule_line(trimmed) && next_is_header_block(&lines, i + 1))
        {
            break;
        }
        if trimmed == "-----BEGIN PGP SIGNED MESSAGE-----" {
            // Skip the armour line and its "Hash:" header; the signed text follows.
            i += 1;
            while i < lines.len() && lines[i].trim().starts_with("Hash:") {
                i += 1;
            }
            continue;
        }
        if let Some((len, strong)) = attribution_at(&lines, i) {
            let next = lines[i + len..]
                .iter()
                .take(LOOKAHEAD_LINES)
                .find(|l| !l.trim().is_empty());
            if next.is_some_and(|l| is_quote_line(l)) {
                i += len;
                continue;
            }
            if strong {
                break;
            }
        }
        kept.push(line.trim_end());
        i += 1;
    }
    join_collapsing_blank_lines(kept.iter().copied())
}

/// Joins lines with `\n`, turning runs of blank lines into one and dropping leading and trailing
/// blank lines; the result is trimmed.
fn join_collapsing_blank_lines<'a>(lines: impl Iterator<Item = &'a str>) -> String {
    let mut out = String::new();
    let mut blank_pending = false;
    for line in lines {
        let line = line.trim_end();
        if line.trim().is_empty() {
            blank_pending = !out.is_empty();
            continue;
        }
        if !out.is_empty() {
            out.push('\n');
            if blank_pending {
                out.push('\n');
            }
        }
        blank_pending = false;
        out.push_str(line);
    }
    out.trim().to_string()
}

fn is_quote_line(line: &str) -> bool {
    line.trim_start().starts_with('>')
}

fn is_signature_delimiter(line: &str) -> bool {
    line == "-- " || line == "--" || line == "--\u{a0}"
}

fn is_rule_line(trimmed: &str) -> bool {
    trimmed.chars().count() >= 8 && trimmed.chars().all(|c| c == '_' || c == '-' || c == '—')
}

/// Replaces the spaces mail clients put in attributions (no-break, narrow no-break) and the
/// full-width colon, so one set of patterns matches.
fn normalize_spaces(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\u{a0}' | '\u{202f}' | '\u{2007}' | '\t' => ' ',
            '：' => ':',
            other => other,
        })
        .collect()
}

/// Footers that name a mail app: they are footers whatever follows the prefix.
const APP_FOOTER_PREFIXES: &[&str] = &[
    "sent from mail for windows",
    "sent from outlook",
    "sent from yahoo mail",
    "sent from samsung",
    "sent from proton mail",
    "sent with proton mail",
    "get outlook for ",
    "envoyé à partir de outlook",
];

/// "Sent from my ..." in the languages mail apps are localised to: a footer only when what
/// follows names a device ("Sent from my iPhone"), never a sentence ("Sent from my desk I ...").
const DEVICE_FOOTER_PREFIXES: &[&str] = &[
    "sent from my ",
    "sent via my ",
    "envoyé de mon ",
    "envoyé depuis mon ",
    "envoyé à partir de ",
    "gesendet von meinem ",
    "gesendet mit ",
    "enviado desde mi ",
    "enviado do meu ",
    "enviado de meu ",
    "enviado do ",
    "inviato dal mio ",
    "inviato da ",
    "verzonden vanaf mijn ",
    "verstuurd vanaf mijn ",
    "verzonden met ",
    "skickat från min ",
    "отправлено с ",
    "отправлено из ",
    "wysłane z ",
    "发自我的",
    "从我的",
];

/// Words that name a phone, tablet or mail app in a mobile footer (matched as words or, for
/// the scripts without spaces, as parts).
const DEVICE_WORDS: &[&str] = &[
    "iphone",
    "ipad",
    "ipod",
    "android",
    "samsung",
    "galaxy",
    "phone",
    "smartphone",
    "mobile",
    "device",
    "tablet",
    "blackberry",
    "huawei",
    "honor",
    "pixel",
    "xiaomi",
    "redmi",
    "nokia",
    "sony",
    "xperia",
    "motorola",
    "oneplus",
    "oppo",
    "vivo",
    "watch",
    "ios",
    "k-9",
    "outlook",
    "gmail",
    "handy",
    "téléphone",
    "móvil",
    "celular",
    "telefono",
    "cellulare",
    "telefoon",
    "mobiel",
    "mobil",
    "мобильного",
    "телефона",
    "смартфона",
    "telefonu",
    "smartfona",
];

/// Whether a line looks like a mobile or app footer: short, one phrase (no comma, question or
/// exclamation mark), and naming a device or mail app. Where it stands is checked by the caller.
fn is_mobile_footer(trimmed: &str) -> bool {
    if trimmed.chars().count() > 70 || trimmed.contains([',', '?', '!', ';', '，', '？', '！']) {
        return false;
    }
    let lower = normalize_spaces(trimmed).to_lowercase();
    if lower.split_whitespace().count() > 12 {
        return false;
    }
    if APP_FOOTER_PREFIXES.iter().any(|p| lower.starts_with(p)) {
        return true;
    }
    let names_device = |rest: &str| {
        rest.split(|c: char| c.is_whitespace() || c == '\'' || c == '’' || c == '(' || c == ')')
            .map(|w| w.trim_end_matches('.'))
            .any(|w| DEVICE_WORDS.contains(&w))
            || rest.contains("iphone")
            || rest.contains("ipad")
            || rest.contains("android")
            || rest.contains("手机")
    };
    if let Some(rest) = DEVICE_FOOTER_PREFIXES
        .iter()
        .find_map(|p| lower.strip_prefix(p))
    {
        return names_device(rest);
    }
    if let Some(middle) = lower
        .strip_prefix("von meinem ")
        .and_then(|r| r.strip_suffix(" gesendet"))
    {
        return names_device(middle);
    }
    lower
        .strip_suffix("から送信")
        .is_some_and(|rest| rest.chars().count() <= 30 && !rest.is_empty())
}

/// Whether nothing of the user's own follows line `from`: only blank lines, then the end, a
/// quote, an attribution, a header block, a signature or a list footer. Decided by the first
/// non-blank line, so a run of footer-like lines is still read in linear time.
fn only_leftovers_follow(lines: &[&str], from: usize) -> bool {
    for j in from..lines.len() {
        let line = lines[j];
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        return is_quote_line(line)
            || is_signature_delimiter(line)
            || is_original_message_marker(trimmed)
            || is_header_block_at(lines, j)
            || (is_rule_line(trimmed)
                && (next_is_header_block(lines, j + 1) || is_list_footer_at(lines, j)))
            || attribution_at(lines, j).is_some();
    }
    true
}

/// What mailing-list software and mail providers append below a rule: the list's name and
/// address, its `listinfo` page, how to unsubscribe.
const LIST_FOOTER_WORDS: &[&str] = &[
    "mailing list",
    "mailinglist",
    "listinfo",
    "unsubscribe",
    "mailman",
    "list-request",
    "-request@",
    "mailingliste",
    "abmelden",
    "abbestellen",
    "liste de diffusion",
    "désabonner",
    "désinscri",
    "lista de correo",
    "darse de baja",
    "darte de baja",
    "cancelar la suscripción",
    "lista di distribuzione",
    "disiscriver",
    "cancelar a inscrição",
    "descadastr",
    "afmelden",
    "avregistrera",
    "avsluta prenumeration",
    "отписаться",
    "рассылк",
    "wypisać",
    "wypisz",
    "配信停止",
    "退订",
    "取消订阅",
];

/// At most this many non-blank lines below the rule make a footer; more is the user's text.
const MAX_LIST_FOOTER_LINES: usize = 8;

/// A rule line at `i` followed by a short block (to the end of the text, or to a quote) that
/// within its first lines says what list or provider it comes from or how to unsubscribe, and
/// gives a link or an address for it.
fn is_list_footer_at(lines: &[&str], i: usize) -> bool {
    let mut non_blank = 0;
    let mut names_list = false;
    let mut has_link = false;
    for line in lines.iter().skip(i + 1) {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        if is_quote_line(line) {
            break;
        }
        non_blank += 1;
        if non_blank > MAX_LIST_FOOTER_LINES {
            return false;
        }
        let lower = trimmed.to_lowercase();
        if non_blank <= 4 {
            names_list |= LIST_FOOTER_WORDS.iter().any(|w| lower.contains(w));
        }
        // Footers say where to go: a link or an address. A list of the user's own steps does not.
        has_link |= lower.contains("http://") || lower.contains("https://") || lower.contains('@');
    }
    names_list && has_link
}

const ORIGINAL_MESSAGE_MARKERS: &[&str] = &[
    "original message",
    "ursprüngliche nachricht",
    "originalnachricht",
    "message d'origine",
    "message d’origine",
    "mensaje original",
    "messaggio originale",
    "mensagem original",
    "oorspronkelijk bericht",
    "originalmeddelande",
    "исходное сообщение",
    "wiadomość oryginalna",
    "元のメッセージ",
    "forwarded message",
    "weitergeleitete nachricht",
    "message transféré",
    "mensaje reenviado",
    "copy of the message",
];

fn is_original_message_marker(trimmed: &str) -> bool {
    let lower = normalize_spaces(trimmed).to_lowercase();
    if lower.starts_with("---") && ORIGINAL_MESSAGE_MARKERS.iter().any(|m| lower.contains(m)) {
        return true;
    }
    matches!(
        lower.as_str(),
        "begin forwarded message:"
            | "anfang der weitergeleiteten nachricht:"
            | "début du message réexpédié :"
            | "début du message réexpédié:"
            | "inicio del mensaje reenviado:"
    )
}

const FROM_KEYS: &[&str] = &[
    "from",
    "von",
    "de",
    "da",
    "van",
    "från",
    "fra",
    "от",
    "od",
    "差出人",
    "发件人",
    "寄件者",
    "寄件人",
    "expéditeur",
    "remitente",
    "mittente",
    "afzender",
    "avsändare",
];

const OTHER_HEADER_KEYS: &[&str] = &[
    "sent",
    "date",
    "to",
    "subject",
    "cc",
    "reply-to",
    "gesendet",
    "datum",
    "an",
    "betreff",
    "envoyé",
    "à",
    "objet",
    "enviado",
    "fecha",
    "para",
    "asunto",
    "inviato",
    "data",
    "a",
    "oggetto",
    "assunto",
    "verzonden",
    "aan",
    "onderwerp",
    "skickat",
    "till",
    "ämne",
    "отправлено",
    "дата",
    "кому",
    "тема",
    "копия",
    "wysłano",
    "do",
    "temat",
    "送信日時",
    "日付",
    "宛先",
    "件名",
    "发送时间",
    "收件人",
    "主题",
    "寄件日期",
    "收件者",
    "主旨",
    "抄送",
    "日期",
];

/// The lowercased key of a `Key: value` line (Outlook's plain text may bold it as `*Key:*`).
fn header_key(line: &str) -> Option<String> {
    let line = normalize_spaces(line.trim());
    let (key, _) = line.split_once(':')?;
    let key = key.trim().trim_matches('*').trim();
    if key.is_empty() || key.chars().count() > 20 {
        return None;
    }
    Some(key.to_lowercase())
}

/// How far the line rules look ahead; bounded so that hostile input stays linear.
const LOOKAHEAD_LINES: usize = 12;

/// A `From:` line followed, within the next six non-blank lines, by at least two other header
/// lines (`Sent:`, `To:`, `Subject:`...): the header block of a quoted or forwarded mail.
fn is_header_block_at(lines: &[&str], i: usize) -> bool {
    let Some(key) = header_key(lines[i]) else {
        return false;
    };
    if !FROM_KEYS.contains(&key.as_str()) {
        return false;
    }
    let others = lines[i + 1..]
        .iter()
        .take(LOOKAHEAD_LINES)
        .filter(|l| !l.trim().is_empty())
        .take(6)
        .filter(|l| header_key(l).is_some_and(|k| OTHER_HEADER_KEYS.contains(&k.as_str())))
        .count();
    others >= 2
}

fn next_is_header_block(lines: &[&str], from: usize) -> bool {
    (from..lines.len().min(from + 3))
        .find(|&j| !lines[j].trim().is_empty())
        .is_some_and(|j| is_header_block_at(lines, j))
}

/// Attribution prefixes whose sentence must end with one of the given words (checked on the
/// line(s) joined with spaces).
const ATTRIBUTION_FORMS: &[(&str, &[&str])] = &[
    ("On ", &["wrote:", "writes:"]),
    ("Am ", &["schrieb", "geschrieben"]),
    ("Le ", &["a écrit"]),
    ("El ", &["escribió"]),
    ("Il ", &["ha scritto"]),
    ("Em ", &["escreveu"]),
    ("Op ", &["schreef"]),
    ("Den ", &["skrev"]),
    ("Op ", &["geschreven"]),
    ("Wiadomość napisana przez ", &["w dniu"]),
];

/// Words that end an attribution line in any position ("Bob <b@x> wrote:").
const ATTRIBUTION_ENDINGS: &[&str] = &[
    "wrote:",
    "writes:",
    "schrieb:",
    "a écrit :",
    "a écrit:",
    "escribió:",
    "ha scritto:",
    "escreveu:",
    "schreef:",
    "skrev:",
    "написал(а):",
    "написал:",
    "написала:",
    "пишет:",
    "napisał(a):",
    "napisał:",
    "napisała:",
    "のメッセージ:",
    "のメール:",
    "が書きました:",
    "写道:",
    "寫道:",
];

/// Whether lines `i..` start an attribution; returns how many lines it spans and whether it is
/// "strong" (recognisable on its own, so everything after it is cut even if the quote is not
/// marked with `>`) or "weak" (only recognised right before a `>` quote).
fn attribution_at(lines: &[&str], i: usize) -> Option<(usize, bool)> {
    let first = normalize_spaces(lines[i].trim());
    if first.is_empty() || first.starts_with('>') {
        return None;
    }
    let has_prefix = ATTRIBUTION_FORMS.iter().any(|(p, _)| first.starts_with(p));
    // A wrapped attribution: its first line starts like one, or breaks inside an address.
    let may_wrap = has_prefix || (first.contains('<') && !first.contains('>'));
    if !may_wrap {
        if let Some(found) = attribution_ending_on_next_line(lines, i, &first) {
            return Some(found);
        }
    }
    let mut joined = first.clone();
    for len in 1..=3 {
        if len > 1 {
            let Some(next) = lines.get(i + len - 1) else {
                break;
            };
            let next = normalize_spaces(next.trim());
            if !may_wrap || next.is_empty() || next.starts_with('>') {
                break;
            }
            joined.push(' ');
            joined.push_str(&next);
        }
        if joined.chars().count() > 300 {
            break;
        }
        if let Some(strong) = classify_attribution(&joined) {
            return Some((len, strong));
        }
    }
    None
}

/// An attribution that a mail client wrapped right before the address or before its last word
/// ("… Bob <b@x>" + "napisał(a):", "… Bob" + "<b@x>:"), where the first line alone does not
/// start like one. Only ever weak: it is removed right before a `>` quote, never otherwise.
fn attribution_ending_on_next_line(lines: &[&str], i: usize, first: &str) -> Option<(usize, bool)> {
    if !first.chars().any(|c| c.is_ascii_digit() || c == '@') || first.ends_with(':') {
        return None;
    }
    let next = normalize_spaces(lines.get(i + 1)?.trim());
    let short_ending = next.split_whitespace().count() <= 3 && next.chars().count() <= 40;
    let address_ending = next.starts_with('<') && next.chars().count() <= 120;
    if next.starts_with('>') || !(short_ending || address_ending) {
        return None;
    }
    let joined = format!("{first} {next}");
    classify_attribution(&joined).map(|_| (2, false))
}

fn classify_attribution(s: &str) -> Option<bool> {
    let s = s.trim();
    if !s.ends_with(':') {
        return None;
    }
    let lower = s.to_lowercase();
    for (prefix, words) in ATTRIBUTION_FORMS {
        if s.starts_with(prefix) {
            let before_colon = lower.trim_end_matches(':').trim_end();
            if words.iter().any(|w| {
                let w = w.trim_end_matches(':');
                before_colon.ends_with(w) || (w != "wrote" && lower.contains(w))
            }) {
                return Some(true);
            }
        }
    }
    if ATTRIBUTION_ENDINGS.iter().any(|e| lower.ends_with(e)) {
        let specific = s.contains('@') || s.chars().any(|c| c.is_ascii_digit());
        return Some(specific);
    }
    // Gmail in some languages, Yandex, mutt's "* Bob <b@x> [date]:": an address then a colon.
    if s.contains('@') {
        return Some(false);
    }
    None
}

// ---------------------------------------------------------------------------------------------
// HTML
// ---------------------------------------------------------------------------------------------

/// Elements whose content is never text.
const RAW_SKIP_ELEMENTS: &[&str] = &["script", "style", "head", "title", "template"];
/// Elements that end a line.
const BLOCK_ELEMENTS: &[&str] = &[
    "p", "div", "li", "ul", "ol", "tr", "table", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "pre",
    "section", "article", "header", "footer", "address", "dl", "dt", "dd", "center", "body",
    "html",
];
const VOID_ELEMENTS: &[&str] = &[
    "br", "hr", "img", "input", "meta", "link", "wbr", "col", "area", "base", "embed", "source",
    "track", "param",
];
/// Classes that mark a quoted block, or a signature, in a reply.
const QUOTE_CLASSES: &[&str] = &[
    "gmail_quote",
    "gmail_quote_container",
    "gmail_attr",
    "gmail_signature",
    "moz-cite-prefix",
    "moz-signature",
    "yahoo_quoted",
    "protonmail_quote",
];
/// Ids after which everything is the quoted mail (Outlook puts the original as siblings after).
const QUOTE_TAIL_IDS: &[&str] = &[
    "divrplyfwdmsg",
    "outlookmessageheader",
    "appendonsend",
    "mail-editor-reference-message-container",
];

/// Classes after which everything is the quoted mail: older Outlook's header of the original.
const QUOTE_TAIL_CLASSES: &[&str] = &["outlookmessageheader"];

/// Turns HTML into plain text, simply and safely: drops script/style/head, comments and quoted
/// blocks (`blockquote`, `div.gmail_quote`, `div.moz-cite-prefix`, `div.moz-signature`, and
/// everything from Outlook's `#divRplyFwdMsg` / `#appendonsend`); `br` and block elements
/// (`p`, `div`, `li`, ...) become line breaks; entities are decoded; whitespace is collapsed.
/// Runs of blank lines become one and the result is trimmed.
pub fn html_to_text(html: &str) -> String {
    let lower = html.to_ascii_lowercase();
    let bytes = html.as_bytes();
    let mut out = HtmlText::default();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'<' {
            let end = html[i..].find('<').map_or(html.len(), |p| i + p);
            out.text(&decode_entities(&html[i..end]));
            i = end;
            continue;
        }
        if lower[i..].starts_with("<!--") {
            i = lower[i + 4..]
                .find("-->")
                .map_or(html.len(), |p| i + 4 + p + 3);
            continue;
        }
        match bytes.get(i + 1) {
            Some(b'!') | Some(b'?') => {
                i = html[i..].find('>').map_or(html.len(), |p| i + p + 1);
                continue;
            }
            Some(b) if b.is_ascii_alphabetic() || *b == b'/' => {}
            _ => {
                out.text("<");
                i += 1;
                continue;
            }
        }
        let tag = parse_tag(html, i);
        i = tag.end;
        if tag.closing {
            if tag.name == "pre" {
                out.pre_depth = out.pre_depth.saturating_sub(1);
            }
            if BLOCK_ELEMENTS.contains(&tag.name.as_str()) || tag.name == "blockquote" {
                out.block_boundary();
            }
            continue;
        }
        if RAW_SKIP_ELEMENTS.contains(&tag.name.as_str()) {
            if !tag.self_closing {
                let close = format!("</{}", tag.name);
                i = match lower[i..].find(&close) {
                    Some(p) => html[i + p..]
                        .find('>')
                        .map_or(html.len(), |q| i + p + q + 1),
                    None => html.len(),
                };
            }
            continue;
        }
        let tail_class = tag.class.as_deref().is_some_and(|c| {
            c.split_whitespace()
                .any(|c| QUOTE_TAIL_CLASSES.contains(&c))
        });
        if tail_class
            || tag
                .id
                .as_deref()
                .is_some_and(|id| QUOTE_TAIL_IDS.contains(&id))
        {
            break;
        }
        let quoted = tag.name == "blockquote"
            || tag
                .class
                .as_deref()
                .is_some_and(|c| c.split_whitespace().any(|c| QUOTE_CLASSES.contains(&c)));
        if quoted {
            out.block_boundary();
            if !tag.self_closing && !VOID_ELEMENTS.contains(&tag.name.as_str()) {
                i = skip_element(html, i, &tag.name);
            }
            continue;
        }
        match tag.name.as_str() {
            "br" => out.line_break(),
            "td" | "th" => out.pending_space = true,
            "pre" => {
                out.block_boundary();
                if !tag.self_closing {
                    out.pre_depth += 1;
                }
            }
            name if BLOCK_ELEMENTS.contains(&name) => out.block_boundary(),
            _ => {}
        }
    }
    out.finish()
}

#[derive(Default)]
struct HtmlText {
    lines: Vec<String>,
    current: String,
    /// The current line has content (text, or a no-break space that keeps an empty paragraph).
    touched: bool,
    pending_space: bool,
    pre_depth: usize,
}

impl HtmlText {
    fn text(&mut self, text: &str) {
        for c in text.chars() {
            match c {
                '\n' if self.pre_depth > 0 => self.line_break(),
                ' ' | '\t' | '\r' if self.pre_depth > 0 => {
                    self.current.push(' ');
                    self.touched = true;
                }
                ' ' | '\t' | '\n' | '\r' | '\u{c}' => self.pending_space = true,
                '\u{a0}' => {
                    self.current.push(' ');
                    self.touched = true;
                    self.pending_space = false;
                }
                '\u{ad}' | '\u{200b}' | '\u{200c}' | '\u{200d}' | '\u{feff}' => {}
                c if c.is_control() => {}
                c => {
                    if self.pending_space && !self.current.is_empty() {
                        self.current.push(' ');
                    }
                    self.pending_space = false;
                    self.current.push(c);
                    self.touched = true;
                }
            }
        }
    }

    fn line_break(&mut self) {
        self.lines.push(std::mem::take(&mut self.current));
        self.touched = false;
        self.pending_space = false;
    }

    fn block_boundary(&mut self) {
        if self.touched {
            self.line_break();
        }
        self.pending_space = false;
    }

    fn finish(mut self) -> String {
        if self.touched {
            self.line_break();
        }
        join_collapsing_blank_lines(self.lines.iter().map(|l| l.trim()))
    }
}

struct Tag {
    name: String,
    closing: bool,
    self_closing: bool,
    id: Option<String>,
    class: Option<String>,
    /// Byte offset just after the tag (the input's end if the tag is not terminated).
    end: usize,
}

/// Parses the tag starting at `start` (a `<` followed by a letter or `/`). Never fails: an
/// unterminated tag or attribute value runs to the end of the input.
fn parse_tag(html: &str, start: usize) -> Tag {
    let b = html.as_bytes();
    let mut j = start + 1;
    let closing = b.get(j) == Some(&b'/');
    if closing {
        j += 1;
    }
    let name_start = j;
    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'-' || b[j] == b':') {
        j += 1;
    }
    let mut tag = Tag {
        name: html[name_start..j].to_ascii_lowercase(),
        closing,
        self_closing: false,
        id: None,
        class: None,
        end: b.len(),
    };
    loop {
        while j < b.len() && (b[j].is_ascii_whitespace() || b[j] == b'/') {
            tag.self_closing = b[j] == b'/';
            j += 1;
        }
        if j >= b.len() {
            return tag;
        }
        if b[j] == b'>' {
            tag.end = j + 1;
            return tag;
        }
        tag.self_closing = false;
        let attr_start = j;
        while j < b.len() && !b[j].is_ascii_whitespace() && !matches!(b[j], b'=' | b'>' | b'/') {
            j += 1;
        }
        let attr = html[attr_start..j].to_ascii_lowercase();
        while j < b.len() && b[j].is_ascii_whitespace() {
            j += 1;
        }
        let mut value = None;
        if b.get(j) == Some(&b'=') {
            j += 1;
            while j < b.len() && b[j].is_ascii_whitespace() {
                j += 1;
            }
            match b.get(j) {
                Some(&q) if q == b'"' || q == b'\'' => {
                    let value_start = j + 1;
                    let value_end = html[value_start..]
                        .find(q as char)
                        .map_or(b.len(), |p| value_start + p);
                    value = Some(&html[value_start..value_end]);
                    j = (value_end + 1).min(b.len());
                }
                _ => {
                    let value_start = j;
                    while j < b.len() && !b[j].is_ascii_whitespace() && b[j] != b'>' {
                        j += 1;
                    }
                    value = Some(&html[value_start..j]);
                }
            }
        } else if j == attr_start {
            // A stray character ('=' after whitespace): skip it.
            j += 1;
        }
        match (attr.as_str(), value) {
            ("id", Some(v)) => tag.id = Some(v.trim().to_ascii_lowercase()),
            ("class", Some(v)) => tag.class = Some(v.to_ascii_lowercase()),
            _ => {}
        }
    }
}

/// Skips to just after the end tag that closes the element `name` opened before `from`,
/// counting nested elements of the same name. Runs to the end if it is never closed.
fn skip_element(html: &str, from: usize, name: &str) -> usize {
    let bytes = html.as_bytes();
    let mut depth = 1usize;
    let mut i = from;
    while let Some(p) = html[i..].find('<') {
        i += p;
        if html[i..].starts_with("<!--") {
            i = html[i + 4..]
                .find("-->")
                .map_or(html.len(), |q| i + 4 + q + 3);
            continue;
        }
        let starts_tag = bytes
            .get(i + 1)
            .is_some_and(|b| b.is_ascii_alphabetic() || *b == b'/');
        if !starts_tag {
            i += 1;
            continue;
        }
        let tag = parse_tag(html, i);
        i = tag.end;
        if tag.name == name {
            if tag.closing {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            } else if !tag.self_closing {
                depth += 1;
            }
        }
    }
    html.len()
}

/// Decodes HTML character references: named ones for the common set (`&amp;`, `&nbsp;`, Latin-1
/// letters, typographic quotes...) and numeric ones. Unknown references are kept as written.
fn decode_entities(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains('&') {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(p) = rest.find('&') {
        out.push_str(&rest[..p]);
        rest = &rest[p..];
        match decode_one_entity(rest) {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
}

/// Decodes the reference at the start of `s` (which starts with `&`): the character and how many
/// bytes it used.
fn decode_one_entity(s: &str) -> Option<(char, usize)> {
    let body = &s[1..];
    if let Some(num) = body.strip_prefix('#') {
        let (digits, radix, skip) = match num.strip_prefix(['x', 'X']) {
            Some(hex) => (hex, 16, 3),
            None => (num, 10, 2),
        };
        let len = digits
            .bytes()
            .take_while(|b| b.is_ascii_hexdigit() && (radix == 16 || b.is_ascii_digit()))
            .take(8)
            .count();
        if len == 0 {
            return None;
        }
        let value = u32::from_str_radix(&digits[..len], radix).ok()?;
        let c = match value {
            0 => '\u{fffd}',
            // Windows-1252 code points that HTML maps to their intended characters.
            0x80..=0x9f => windows_1252_c1(value),
            v => char::from_u32(v).unwrap_or('\u{fffd}'),
        };
        let semicolon = usize::from(digits[len..].starts_with(';'));
        return Some((c, skip + len + semicolon));
    }
    let len = body
        .bytes()
        .take_while(|b| b.is_ascii_alphanumeric())
        .take(10)
        .count();
    let name = &body[..len];
    let has_semicolon = body[len..].starts_with(';');
    let c = named_entity(name)?;
    if !has_semicolon && !matches!(name, "amp" | "lt" | "gt" | "quot" | "nbsp") {
        return None;
    }
    Some((c, 1 + len + usize::from(has_semicolon)))
}

fn windows_1252_c1(value: u32) -> char {
    const TABLE: [char; 32] = [
        '€', '\u{81}', '‚', 'ƒ', '„', '…', '†', '‡', 'ˆ', '‰', 'Š', '‹', 'Œ', '\u{8d}', 'Ž',
        '\u{8f}', '\u{90}', '‘', '’', '“', '”', '•', '–', '—', '˜', '™', 'š', '›', 'œ', '\u{9d}',
        'ž', 'Ÿ',
    ];
    TABLE[(value - 0x80) as usize]
}

fn named_entity(name: &str) -> Option<char> {
    const LATIN1: [&str; 96] = [
        "nbsp", "iexcl", "cent", "pound", "curren", "yen", "brvbar", "sect", "uml", "copy", "ordf",
        "laquo", "not", "shy", "reg", "macr", "deg", "plusmn", "sup2", "sup3", "acute", "micro",
        "para", "middot", "cedil", "sup1", "ordm", "raquo", "frac14", "frac12", "frac34", "iquest",
        "Agrave", "Aacute", "Acirc", "Atilde", "Auml", "Aring", "AElig", "Ccedil", "Egrave",
        "Eacute", "Ecirc", "Euml", "Igrave", "Iacute", "Icirc", "Iuml", "ETH", "Ntilde", "Ograve",
        "Oacute", "Ocirc", "Otilde", "Ouml", "times", "Oslash", "Ugrave", "Uacute", "Ucirc",
        "Uuml", "Yacute", "THORN", "szlig", "agrave", "aacute", "acirc", "atilde", "auml", "aring",
        "aelig", "ccedil", "egrave", "eacute", "ecirc", "euml", "igrave", "iacute", "icirc",
        "iuml", "eth", "ntilde", "ograve", "oacute", "ocirc", "otilde", "ouml", "divide", "oslash",
        "ugrave", "uacute", "ucirc", "uuml", "yacute", "thorn", "yuml",
    ];
    if let Some(pos) = LATIN1.iter().position(|&n| n == name) {
        return char::from_u32(0xa0 + pos as u32);
    }
    Some(match name {
        "amp" | "AMP" => '&',
        "lt" | "LT" => '<',
        "gt" | "GT" => '>',
        "quot" | "QUOT" => '"',
        "apos" => '\'',
        "ensp" | "emsp" | "thinsp" => ' ',
        "ndash" => '–',
        "mdash" => '—',
        "lsquo" => '‘',
        "rsquo" => '’',
        "sbquo" => '‚',
        "ldquo" => '“',
        "rdquo" => '”',
        "bdquo" => '„',
        "lsaquo" => '‹',
        "rsaquo" => '›',
        "hellip" => '…',
        "bull" => '•',
        "euro" => '€',
        "trade" => '™',
        "dagger" => '†',
        "Dagger" => '‡',
        "permil" => '‰',
        "larr" => '←',
        "rarr" => '→',
        "uarr" => '↑',
        "darr" => '↓',
        "harr" => '↔',
        "OElig" => 'Œ',
        "oelig" => 'œ',
        "Scaron" => 'Š',
        "scaron" => 'š',
        "Yuml" => 'Ÿ',
        "zwnj" => '\u{200c}',
        "zwj" => '\u{200d}',
        "lrm" => '\u{200e}',
        "rlm" => '\u{200f}',
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_quote_after_wrapped_english_attribution() {
        let text = "Sounds good, see you at 6.\n\nOn Tue, 3 Mar 2026 at 10:00, Bob via Reach <\nr-abc@reply.example.org> wrote:\n\n> Dinner tonight?\n> Bob\n";
        assert_eq!(
            strip_quoted_and_signature(text),
            "Sounds good, see you at 6."
        );
    }

    #[test]
    fn keeps_inline_answers_between_quotes() {
        let text = "On Tue, Mar 03, 2026 at 10:00:00AM +0000, Bob wrote:\n> Dinner?\nYes.\n\n> Where?\n\nAt Luigi's.\n\n-- \nAlice\n";
        assert_eq!(strip_quoted_and_signature(text), "Yes.\n\nAt Luigi's.");
    }

    #[test]
    fn attribution_forms_in_other_languages() {
        for attribution in [
            "Am 03.03.2026 um 10:00 schrieb Bob via Reach:",
            "Am Di., 3. März 2026 um 10:00 Uhr schrieb Bob <b@example.net>:",
            "Le mar. 3 mars 2026 à 10:00, Bob <b@example.net> a écrit :",
            "Le 03/03/2026 à 10:00, Bob a écrit\u{a0}:",
            "El mar, 3 mar 2026 a las 10:00, Bob (<b@example.net>) escribió:",
            "Il giorno mar 3 mar 2026 alle ore 10:00 Bob <b@example.net> ha scritto:",
            "Em ter., 3 de mar. de 2026 às 10:00, Bob <b@example.net> escreveu:",
            "Op di 3 mrt 2026 om 10:00 schreef Bob <b@example.net>:",
            "Den tis 3 mars 2026 kl 10:00 skrev Bob <b@example.net>:",
            "3 марта 2026 г., в 10:00, Bob <b@example.net> написал(а):",
            "wt., 3 mar 2026 o 10:00 Bob <b@example.net> napisał(a):",
            "2026/03/03 10:00、Bob <b@example.net>のメッセージ:",
            "2026年3月3日(火) 10:00 Bob <b@example.net>:",
            "* Bob <b@example.net> [2026-03-03 10:00]:",
        ] {
            let quoted = format!("Answer.\n\n{attribution}\n> question\n");
            assert_eq!(
                strip_quoted_and_signature(&quoted),
                "Answer.",
                "{attribution}"
            );
        }
    }

    #[test]
    fn strong_attribution_cuts_unmarked_quote() {
        let text = "Ja, gerne.\n\nAm 03.03.2026 um 10:00 schrieb Bob via Reach:\nWollen wir essen gehen?\n";
        assert_eq!(strip_quoted_and_signature(text), "Ja, gerne.");
    }

    #[test]
    fn weak_attribution_is_kept_without_a_quote() {
        let text = "Here is what my boss wrote:\nplease be on time";
        assert_eq!(strip_quoted_and_signature(text), text);
    }

    #[test]
    fn two_line_text_is_not_mistaken_for_a_wrapped_attribution() {
        let text = "I agree.\nBob wrote:\n> question";
        assert_eq!(strip_quoted_and_signature(text), "I agree.");
    }

    #[test]
    fn outlook_header_blocks() {
        let en = "Fine.\n\n________________________________\nFrom: Bob via Reach <r-x@reply.example.org>\nSent: Tuesday, March 3, 2026 10:00 AM\nTo: Alice <alice@example.com>\nSubject: IM from Bob\n\nDinner?\n";
        assert_eq!(strip_quoted_and_signature(en), "Fine.");
        let de = "Gut.\n\nVon: Bob via Reach <r-x@reply.example.org>\nGesendet: Dienstag, 3. März 2026 10:00\nAn: Alice <alice@example.com>\nBetreff: IM from Bob\n\nEssen?\n";
        assert_eq!(strip_quoted_and_signature(de), "Gut.");
        let fr = "Bien.\n\nDe : Bob via Reach <r-x@reply.example.org>\nEnvoyé : mardi 3 mars 2026 10:00\nÀ : Alice <alice@example.com>\nObjet : IM from Bob\n";
        assert_eq!(strip_quoted_and_signature(fr), "Bien.");
        let original = "Ok\n\n-----Original Message-----\nFrom: Bob\nDinner?";
        assert_eq!(strip_quoted_and_signature(original), "Ok");
        let forwarded = "See below\n\nBegin forwarded message:\n\nFrom: Carol\n";
        assert_eq!(strip_quoted_and_signature(forwarded), "See below");
    }

    #[test]
    fn a_single_from_line_is_user_text() {
        let text = "From: the team, with love.\nSee you.";
        assert_eq!(strip_quoted_and_signature(text), text);
    }

    #[test]
    fn signatures_and_mobile_footers() {
        assert_eq!(strip_quoted_and_signature("Hi\n-- \nAlice\n+1 555"), "Hi");
        assert_eq!(strip_quoted_and_signature("Hi\n--\nAlice"), "Hi");
        for footer in [
            "Sent from my iPhone",
            "Sent from my Android phone",
            "Get Outlook for iOS<https://aka.ms/o0ukef>",
            "Get Outlook for Android",
            "Envoyé de mon iPhone",
            "Von meinem iPhone gesendet",
            "iPhoneから送信",
        ] {
            let text = format!("On my way\n\n{footer}\n\n> Where are you?");
            assert_eq!(strip_quoted_and_signature(&text), "On my way", "{footer}");
        }
        let sentence = "Von meinem Standpunkt aus ist das gut.";
        assert_eq!(strip_quoted_and_signature(sentence), sentence);
    }

    #[test]
    fn a_mobile_footer_is_cut_only_at_the_end() {
        let sentence = "Sent from my desk I can see the harbour, and the ferry is late.";
        assert_eq!(strip_quoted_and_signature(sentence), sentence);
        let last = "Sent from my desk I can see the harbour";
        assert_eq!(strip_quoted_and_signature(last), last);
        let text = "Sent from my iPhone, but I read it on the laptop.\n\nSee you at 8.";
        assert_eq!(strip_quoted_and_signature(text), text);
        let middle = "Yes.\nSent from my iPhone\nAnd bring the cake.";
        assert_eq!(strip_quoted_and_signature(middle), middle);
        let end = "Yes.\n\nSent from my iPhone\n";
        assert_eq!(strip_quoted_and_signature(end), "Yes.");
        let far_quote = format!("Yes.\n\nSent from my iPhone{}> Bob: ok?\n", "\n".repeat(30));
        assert_eq!(strip_quoted_and_signature(&far_quote), "Yes.");
        let before_quote = "Yes.\n\nSent from my Samsung Galaxy smartphone.\n\nOn Tue, 3 Mar 2026 at 10:00, Bob <b@example.net> wrote:\n> x";
        assert_eq!(strip_quoted_and_signature(before_quote), "Yes.");
        for footer in [
            "Inviato da iPhone",
            "Enviado desde mi iPhone",
            "Enviado do meu iPhone",
            "Verzonden vanaf mijn iPhone",
            "Skickat från min iPhone",
            "Отправлено с iPhone",
            "Wysłane z iPhone'a",
            "发自我的iPhone",
            "Sent from my Android device with K-9 Mail. Please excuse my brevity.",
        ] {
            let text = format!("Ok\n\n{footer}\n");
            assert_eq!(strip_quoted_and_signature(&text), "Ok", "{footer}");
        }
        for sentence in [
            "Inviato da Marco ieri sera",
            "Sent from my office",
            "Gesendet mit Liebe",
        ] {
            let text = format!("Ok\n\n{sentence}\n");
            assert_eq!(strip_quoted_and_signature(&text), text.trim(), "{sentence}");
        }
    }

    #[test]
    fn list_and_provider_footers_are_cut_without_a_quote_header() {
        let mailman = "I can take that one.\n\n_______________________________________________\ndev mailing list\ndev@lists.example.org\nhttps://lists.example.org/mailman/listinfo/dev\n";
        assert_eq!(strip_quoted_and_signature(mailman), "I can take that one.");
        let apache = "+1 from me\n\n---------------------------------------------------------------------\nTo unsubscribe, e-mail: dev-unsubscribe@example.org\nFor additional commands, e-mail: dev-help@example.org\n";
        assert_eq!(strip_quoted_and_signature(apache), "+1 from me");
        let after_quote = "Agreed.\n\n> earlier\n> text\n\n_______________________________________________\nusers mailing list\nhttps://lists.example.org/listinfo/users\n";
        assert_eq!(strip_quoted_and_signature(after_quote), "Agreed.");
        let german = "Passt.\n\n__________\nMailingliste team@example.de\nAbmelden: https://lists.example.de/abmelden\n";
        assert_eq!(strip_quoted_and_signature(german), "Passt.");
    }

    #[test]
    fn a_line_of_dashes_in_the_users_text_stays() {
        let table =
            "Scores so far:\n--------------------\nAlice 3\nBob 2\n--------------------\nTotal 5";
        assert_eq!(strip_quoted_and_signature(table), table);
        let aside = "Plan:\n__________\n1. book\n2. pay";
        assert_eq!(strip_quoted_and_signature(aside), aside);
        // A rule over a long text that mentions unsubscribing is still the user's.
        let long =
            "Notes\n----------\nI will unsubscribe from the old list.\na\nb\nc\nd\ne\nf\ng\nh";
        assert_eq!(strip_quoted_and_signature(long), long);
        // A short one too, as long as it points nowhere.
        let steps =
            "Steps:\n----------\n1. unsubscribe from the old mailing list\n2. join the new one";
        assert_eq!(strip_quoted_and_signature(steps), steps);
    }

    #[test]
    fn attributions_wrapped_before_the_last_word_or_the_address() {
        for attribution in [
            "wt., 3 mar 2026 o 10:00 Bob via Reach <r-abc@reply.example.org>\nnapisał(a):",
            "2026年3月3日(火) 10:00 Bob via Reach\n<r-abc@reply.example.org>:",
            "вт, 3 мар. 2026 г. в 10:00, Bob via Reach <\nr-abc@reply.example.org>:",
            "Bob via Reach <r-abc@reply.example.org> 于2026年3月3日周二\n10:00写道：",
            "Op 3 mrt. 2026 om 10:00 heeft Bob via Reach <r-abc@reply.example.org> het\nvolgende geschreven:",
            "Wiadomość napisana przez Bob w dniu 03.03.2026, o godz. 10:00:",
        ] {
            let quoted = format!("Answer.\n\n{attribution}\n\n> question\n");
            assert_eq!(
                strip_quoted_and_signature(&quoted),
                "Answer.",
                "{attribution}"
            );
        }
        // Without a quote after it, the user's own two lines stay.
        let text = "Call me at 555 0100 after\nwork:\nI am free then";
        assert_eq!(strip_quoted_and_signature(text), text);
    }

    #[test]
    fn html_outlook_message_header_starts_the_quote() {
        let html = "<div>Fine by me.</div><div class=OutlookMessageHeader lang=en-us dir=ltr align=left><hr tabindex=-1><b>From:</b> Bob<br><b>Sent:</b> Tuesday<br>Dinner?</div>";
        assert_eq!(html_to_text(html), "Fine by me.");
    }

    #[test]
    fn blank_lines_collapse_and_text_is_trimmed() {
        let text = "\n\n  Hello\n\n\n\nWorld  \n\n";
        assert_eq!(strip_quoted_and_signature(text), "Hello\n\nWorld");
        assert_eq!(strip_quoted_and_signature("a\r\n\r\n\r\nb\r\n"), "a\n\nb");
    }

    #[test]
    fn only_quotes_leaves_nothing() {
        assert_eq!(strip_quoted_and_signature("> a\n> b\n"), "");
        assert_eq!(
            strip_quoted_and_signature("On Tue, Bob <b@x.org> wrote:\n> a\n"),
            ""
        );
    }

    #[test]
    fn pgp_armour_is_removed() {
        let text = "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nSigned hello\n-----BEGIN PGP SIGNATURE-----\niQEz\n-----END PGP SIGNATURE-----\n";
        assert_eq!(strip_quoted_and_signature(text), "Signed hello");
    }

    #[test]
    fn unflow_joins_soft_breaks() {
        let text = "This is a long \nparagraph.\n> quoted \n> more\n-- \nsig";
        assert_eq!(
            unflow(text, false),
            "This is a long paragraph.\n> quoted more\n-- \nsig\n"
        );
        assert_eq!(unflow("ab \ncd", true), "abcd\n");
        assert_eq!(unflow(" From me", false), "From me\n");
    }

    #[test]
    fn html_basic_conversion() {
        let html = "<html><head><title>t</title><style>p{}</style></head><body>\
            <div>Hello&nbsp;<b>world</b> &amp; friends</div><div><br></div>\
            <p>Caf&eacute; &#x263A; &#8364;5 &lt;ok&gt;</p><script>alert(1)</script>\
            <ul><li>one</li><li>two</li></ul>line<br>break</body></html>";
        assert_eq!(
            html_to_text(html),
            "Hello world & friends\n\nCafé ☺ €5 <ok>\none\ntwo\nline\nbreak"
        );
    }

    #[test]
    fn html_drops_quote_markup_of_each_client() {
        let gmail = "<div dir=\"ltr\">Yes!</div><br><div class=\"gmail_quote gmail_quote_container\"><div dir=\"ltr\" class=\"gmail_attr\">On Tue, Bob wrote:<br></div><blockquote class=\"gmail_quote\"><div>Q?</div></blockquote></div>";
        assert_eq!(html_to_text(gmail), "Yes!");
        let outlook = "<div>Fine</div><div id=\"appendonsend\"></div><hr><div id=\"divRplyFwdMsg\"><b>From:</b> Bob</div><div>Q?</div>";
        assert_eq!(html_to_text(outlook), "Fine");
        let apple = "<div>Ok</div><div><br><blockquote type=\"cite\">On 3 Mar 2026, Bob wrote:</blockquote></div><blockquote type=\"cite\"><div>Q?</div></blockquote>";
        assert_eq!(html_to_text(apple), "Ok");
        let thunderbird = "<p>Sure</p><div class=\"moz-cite-prefix\">On 3/3/26 10:00, Bob wrote:<br></div><blockquote type=\"cite\" cite=\"mid:x@y\">Q?</blockquote><div class=\"moz-signature\">-- <br>Alice</div>";
        assert_eq!(html_to_text(thunderbird), "Sure");
        let nested = "<div>A<blockquote>x<blockquote>y</blockquote>z</blockquote>B</div>";
        assert_eq!(html_to_text(nested), "A\nB");
    }

    #[test]
    fn html_outlook_word_paragraphs() {
        let html = "<div class=WordSection1><p class=MsoNormal>First line<o:p></o:p></p>\
            <p class=MsoNormal><o:p>&nbsp;</o:p></p><p class=MsoNormal>Second&nbsp;&nbsp;line<o:p></o:p></p>\
            <!--[if gte mso 9]><xml>junk</xml><![endif]--></div>";
        assert_eq!(html_to_text(html), "First line\n\nSecond  line");
    }

    #[test]
    fn html_is_robust_to_broken_markup() {
        assert_eq!(html_to_text("a < b and c > d"), "a < b and c > d");
        assert_eq!(html_to_text("x<div class=\"unterminated"), "x");
        assert_eq!(html_to_text("<blockquote>never closed"), "");
        assert_eq!(
            html_to_text("&unknown; &amp &#0; &#xZZ;"),
            "&unknown; & \u{fffd} &#xZZ;"
        );
        assert_eq!(html_to_text("<pre>  a\n  b</pre>"), "a\nb");
        let sample = "<div class=\"gmail_quote\">é<b a='1' c=\"2\">x</b>&eacute;<!-- c --><br/>";
        for end in (0..=sample.len()).filter(|&e| sample.is_char_boundary(e)) {
            let _ = html_to_text(&sample[..end]);
            let _ = strip_quoted_and_signature(&sample[..end]);
        }
    }

    #[test]
    /// Sized so that a rule that rescanned the rest of the text (quadratic) would not finish;
    /// no clock (speed belongs in benchmarks).
    fn line_rules_stay_linear_on_hostile_input() {
        // Lines that each trigger a look-ahead but are never cut, separated by blank runs.
        let hostile = format!("from: x\nBob wrote:\n________\n{}", "\n".repeat(50)).repeat(5_000);
        assert!(strip_quoted_and_signature(&hostile).len() <= hostile.len());
        let html = "<blockquote><script>".repeat(20_000) + &"<div class=\"x".repeat(20_000);
        assert!(html_to_text(&html).len() <= html.len());
    }

    /// Sized so that a rule that rescanned the rest of the text (quadratic) would not finish.
    #[test]
    fn footer_rules_read_hostile_input_once() {
        // Footer candidates that are never cut: each looks ahead, none may rescan the text.
        let footers = format!(
            "Sent from my iPhone\nstill mine\n__________\n{}unsubscribe\n",
            "\n".repeat(50)
        )
        .repeat(5_000);
        let kept = strip_quoted_and_signature(&footers);
        assert!(
            kept.starts_with("Sent from my iPhone\nstill mine"),
            "{}",
            &kept[..40]
        );
        let blank_runs = format!("Sent from my iPhone{}", "\n".repeat(200)).repeat(2_000) + "x";
        assert!(strip_quoted_and_signature(&blank_runs).ends_with('x'));
        let wrapped = "Bob 10:00 <b@x>\nwrote:\n".repeat(20_000);
        assert_eq!(strip_quoted_and_signature(&wrapped), wrapped.trim());
    }

    #[test]
    fn a_multipart_whose_boundary_never_comes_is_no_attachment() {
        let raw = b"From: a@example.org\r\nMessage-ID: <x@y>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"never\"\r\n\r\nno boundary ever\r\n";
        let reply = parse_reply(raw).unwrap();
        assert!(reply.attachments.is_empty(), "{reply:?}");
        assert!(!reply.text.contains("attachment"), "{reply:?}");
    }

    #[test]
    fn attachment_names_are_sanitized() {
        assert_eq!(sanitize_file_name("C:\\Users\\a\\photo.jpg"), "photo.jpg");
        assert_eq!(sanitize_file_name("../../etc/passwd"), "passwd");
        assert_eq!(sanitize_file_name("evil\u{202e}gpj.exe\n"), "evilgpj.exe");
    }

    #[test]
    fn automatic_headers() {
        let base =
            "From: Alice <alice@Example.COM>\r\nTo: r-x@reply.example.org\r\nSubject: hi\r\n";
        let parse = |extra: &str| {
            let raw = format!("{base}{extra}\r\nbody\r\n");
            parse_reply(raw.as_bytes()).unwrap().automatic
        };
        assert_eq!(parse(""), None);
        assert_eq!(parse("Auto-Submitted: no\r\n"), None);
        assert_eq!(
            parse("Auto-Submitted: auto-replied\r\n"),
            Some(Automatic::AutoSubmitted("auto-replied".into()))
        );
        assert_eq!(
            parse("Precedence: Bulk\r\n"),
            Some(Automatic::Precedence("bulk".into()))
        );
        assert_eq!(parse("Precedence: first-class\r\n"), None);
        assert_eq!(
            parse("X-Autoreply: yes\r\n"),
            Some(Automatic::AutoResponder("X-Autoreply".into()))
        );
        assert_eq!(
            parse("X-Failed-Recipients: a@b.c\r\n"),
            Some(Automatic::Bounce)
        );
        assert_eq!(parse("Return-Path: <>\r\n"), Some(Automatic::Bounce));
    }

    #[test]
    fn reply_headers() {
        let raw = b"From: \"Alice\" <Alice.Smith@Example.COM>\r\nTo: r-x@reply.example.org\r\nSubject: =?utf-8?q?Re:_caf=C3=A9?=\r\nMessage-ID: <m1@example.com>\r\nIn-Reply-To: <a@reach>\r\nReferences: <a@reach>\r\n <b@reach>\r\n\r\nok\r\n";
        let reply = parse_reply(raw).unwrap();
        assert_eq!(reply.from.as_deref(), Some("Alice.Smith@example.com"));
        assert_eq!(reply.subject.as_deref(), Some("Re: café"));
        assert_eq!(reply.message_id.as_deref(), Some("m1@example.com"));
        assert_eq!(reply.in_reply_to, vec!["a@reach"]);
        assert_eq!(reply.references, vec!["a@reach", "b@reach"]);
        assert_eq!(reply.text, "ok");
    }

    #[test]
    fn errors() {
        assert_eq!(parse_reply(b""), Err(ExtractError::Malformed));
        assert_eq!(parse_reply(b" \r\n"), Err(ExtractError::Malformed));
        assert_eq!(
            parse_reply(b"To: r-x@reply.example.org\r\nSubject: hi\r\n\r\nbody\r\n"),
            Err(ExtractError::NoFrom)
        );
        assert_eq!(
            ExtractError::Malformed.to_string(),
            "the message could not be parsed as MIME"
        );
    }
}
