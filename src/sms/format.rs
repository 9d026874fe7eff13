//! The arithmetic and layout of an SMS sent to the user's phone (mobile-terminated, "MT"): which
//! GSM 03.38 alphabet a text needs (GSM-7 or UCS-2, 3GPP TS 23.038), how many segments it takes,
//! how to shorten it to a segment budget, and the `Bob: text` layout with its reply hint.
//!
//! Segments are counted the way the handset and the carrier will cut them: a single SMS holds 160
//! GSM-7 septets or 70 UCS-2 code units; a concatenated one spends room on its user data header
//! and holds 153 septets or 67 code units per segment. An extension character (`€`, `{`, ...) is
//! an escape plus a septet and a character outside the Basic Multilingual Plane (most emoji) is a
//! surrogate pair; neither is ever split across two segments, so the count comes from packing
//! the text, not from dividing its length.
//!
//! This module is pure: it does no I/O, reads no configuration (the caller passes
//! `sms.max_segments`), and never packs septets or builds user data headers, which are the SMS
//! provider's job (Kannel).

/// Septets in a single GSM-7 SMS.
pub const GSM7_SINGLE: usize = 160;
/// Septets per segment of a concatenated GSM-7 SMS (160 less the 7 taken by the header).
pub const GSM7_MULTI: usize = 153;
/// UTF-16 code units in a single UCS-2 SMS (140 octets).
pub const UCS2_SINGLE: usize = 70;
/// UTF-16 code units per segment of a concatenated UCS-2 SMS (134 octets after the header).
pub const UCS2_MULTI: usize = 67;

/// What ends a shortened GSM-7 text. The Unicode ellipsis `…` is not in GSM 03.38 and would turn
/// the whole SMS into UCS-2, halving its room.
pub const GSM7_ELLIPSIS: &str = "...";
/// What ends a shortened UCS-2 text.
pub const UCS2_ELLIPSIS: &str = "…";

/// How far back (in characters) [`fit`] looks for a space to cut at instead of mid-word.
const WORD_BOUNDARY_WINDOW: usize = 15;

/// The escape septet (0x1B): in the basic table it announces a character of the extension table
/// and is not a character itself.
const ESCAPE: char = '\u{1B}';

/// The GSM 03.38 default alphabet (3GPP TS 23.038 §6.2.1), indexed by septet value: row `0x00`
/// holds septets 0x00..=0x0F, and so on. Position 0x1B is [`ESCAPE`].
#[rustfmt::skip]
const BASIC: [char; 128] = [
    // 0x00
    '@', '£', '$', '¥', 'è', 'é', 'ù', 'ì', 'ò', 'Ç', '\n', 'Ø', 'ø', '\r', 'Å', 'å',
    // 0x10
    'Δ', '_', 'Φ', 'Γ', 'Λ', 'Ω', 'Π', 'Ψ', 'Σ', 'Θ', 'Ξ', ESCAPE, 'Æ', 'æ', 'ß', 'É',
    // 0x20
    ' ', '!', '"', '#', '¤', '%', '&', '\'', '(', ')', '*', '+', ',', '-', '.', '/',
    // 0x30
    '0', '1', '2', '3', '4', '5', '6', '7', '8', '9', ':', ';', '<', '=', '>', '?',
    // 0x40
    '¡', 'A', 'B', 'C', 'D', 'E', 'F', 'G', 'H', 'I', 'J', 'K', 'L', 'M', 'N', 'O',
    // 0x50
    'P', 'Q', 'R', 'S', 'T', 'U', 'V', 'W', 'X', 'Y', 'Z', 'Ä', 'Ö', 'Ñ', 'Ü', '§',
    // 0x60
    '¿', 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j', 'k', 'l', 'm', 'n', 'o',
    // 0x70
    'p', 'q', 'r', 's', 't', 'u', 'v', 'w', 'x', 'y', 'z', 'ä', 'ö', 'ñ', 'ü', 'à',
];

/// The GSM 03.38 default alphabet extension table (3GPP TS 23.038 §6.2.1.1): the septet that
/// follows [`ESCAPE`], and the character it stands for. The table's other positions are
/// reserved or national and are not sent.
const EXTENSION: [(u8, char); 10] = [
    (0x0A, '\u{0C}'), // form feed
    (0x14, '^'),
    (0x28, '{'),
    (0x29, '}'),
    (0x2F, '\\'),
    (0x3C, '['),
    (0x3D, '~'),
    (0x3E, ']'),
    (0x40, '|'),
    (0x65, '€'),
];

/// The alphabet (data coding) an SMS is sent in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// The GSM 03.38 default alphabet and its extension table, 7 bits a character.
    Gsm7,
    /// UCS-2 (in practice UTF-16, so characters outside the BMP take a surrogate pair).
    Ucs2,
}

/// Septets `c` takes in GSM-7: 1 in the basic set, 2 in the extension table (escape + septet),
/// `None` when GSM-7 cannot carry it.
fn gsm7_cost(c: char) -> Option<usize> {
    if c.is_ascii_alphanumeric() || (c != ESCAPE && BASIC.contains(&c)) {
        Some(1)
    } else if EXTENSION.iter().any(|&(_, e)| e == c) {
        Some(2)
    } else {
        None
    }
}

/// [`Encoding::Gsm7`] when every character of `text` is in the GSM 03.38 basic set or its
/// extension table (the empty text included), else [`Encoding::Ucs2`].
pub fn encoding_of(text: &str) -> Encoding {
    if text.chars().all(|c| gsm7_cost(c).is_some()) {
        Encoding::Gsm7
    } else {
        Encoding::Ucs2
    }
}

/// Septets `text` takes in GSM-7 (an extension character counts 2), or `None` when a character
/// is not in GSM 03.38.
pub fn gsm7_septets(text: &str) -> Option<usize> {
    text.chars().map(gsm7_cost).sum()
}

/// UTF-16 code units `text` takes in UCS-2: 1 per character of the Basic Multilingual Plane, 2
/// for the others (a surrogate pair, e.g. most emoji).
pub fn ucs2_units(text: &str) -> usize {
    text.chars().map(char::len_utf16).sum()
}

/// How an SMS text is sent: its alphabet, its length in that alphabet and its segment count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Segments {
    /// The alphabet, from [`encoding_of`].
    pub encoding: Encoding,
    /// Septets for [`Encoding::Gsm7`], UTF-16 code units for [`Encoding::Ucs2`].
    pub units: usize,
    /// Segments the text is sent in (at least 1: the empty text is one empty SMS).
    pub count: usize,
}

/// The segments `text` is sent in: up to 160 septets (GSM-7) or 70 code units (UCS-2) make one
/// SMS; longer texts are packed 153 septets or 67 code units a segment, moving an extension
/// character or a surrogate pair that would straddle two segments whole into the next one.
pub fn segments(text: &str) -> Segments {
    let encoding = encoding_of(text);
    let mut packer = Packer::new(encoding);
    packer.push_str(text);
    Segments {
        encoding,
        units: packer.units,
        count: packer.count(),
    }
}

/// Running segment count of a text read character by character.
#[derive(Debug, Clone, Copy)]
struct Packer {
    encoding: Encoding,
    /// Units so far.
    units: usize,
    /// Concatenated segments already full, before the one being filled.
    full: usize,
    /// Units in the segment being filled.
    fill: usize,
}

impl Packer {
    fn new(encoding: Encoding) -> Packer {
        Packer {
            encoding,
            units: 0,
            full: 0,
            fill: 0,
        }
    }

    /// Adds `c`; false (and nothing added) when the encoding cannot carry it.
    fn push_char(&mut self, c: char) -> bool {
        let (cost, per_segment) = match self.encoding {
            Encoding::Gsm7 => match gsm7_cost(c) {
                Some(cost) => (cost, GSM7_MULTI),
                None => return false,
            },
            Encoding::Ucs2 => (c.len_utf16(), UCS2_MULTI),
        };
        self.units += cost;
        if self.fill + cost > per_segment {
            self.full += 1;
            self.fill = cost;
        } else {
            self.fill += cost;
        }
        true
    }

    /// Adds every character of `s`; false when one could not be carried.
    fn push_str(&mut self, s: &str) -> bool {
        s.chars().all(|c| self.push_char(c))
    }

    fn count(&self) -> usize {
        let single = match self.encoding {
            Encoding::Gsm7 => GSM7_SINGLE,
            Encoding::Ucs2 => UCS2_SINGLE,
        };
        if self.units <= single {
            1
        } else {
            self.full + 1
        }
    }
}

/// The ellipsis for a shortened text in `encoding`.
fn ellipsis_for(encoding: Encoding) -> &'static str {
    match encoding {
        Encoding::Gsm7 => GSM7_ELLIPSIS,
        Encoding::Ucs2 => UCS2_ELLIPSIS,
    }
}

/// Shortens `text` to fit in `max_segments` segments (0 counts as 1), ending it with an ellipsis.
///
/// The result is the longest prefix of `text` that, with the ellipsis appended, still fits; the
/// cut moves back to the last space when one is within the last 15 characters (so words are not
/// cut in half), and trailing whitespace is dropped before the ellipsis. The ellipsis is `...` when
/// the result is GSM-7 and `…` when it is UCS-2: a text whose only non-GSM characters fall in the
/// cut-off part is sent in GSM-7 with more than twice the room. A text that fits is returned
/// unchanged.
pub fn fit(text: &str, max_segments: usize) -> String {
    if segments(text).count <= max_segments.max(1) {
        return text.to_owned();
    }
    // Never None: an ellipsis alone fits in one segment.
    fit_between("", text, "", max_segments).unwrap_or_default()
}

/// Shortens `body` so that `head`, the shortened body and its ellipsis, and `tail` fit together
/// in `max_segments` segments (0 counts as 1). `None` when even the ellipsis alone does not fit
/// between `head` and `tail`. The caller has checked that the whole text does not fit.
fn fit_between(head: &str, body: &str, tail: &str, max_segments: usize) -> Option<String> {
    let max = max_segments.max(1);
    let outer_is_gsm7 = encoding_of(head) == Encoding::Gsm7 && encoding_of(tail) == Encoding::Gsm7;

    // Both counts run over head + prefix; the GSM-7 one stops (becomes None) at the first
    // character GSM-7 cannot carry, from where on the SMS would be UCS-2.
    let mut gsm7 = outer_is_gsm7.then(|| {
        let mut packer = Packer::new(Encoding::Gsm7);
        packer.push_str(head);
        packer
    });
    let mut ucs2 = Packer::new(Encoding::Ucs2);
    ucs2.push_str(head);
    let fits_with_ellipsis = |gsm7: Option<Packer>, ucs2: Packer| {
        let (mut packer, ellipsis) = match gsm7 {
            Some(packer) => (packer, GSM7_ELLIPSIS),
            None => (ucs2, UCS2_ELLIPSIS),
        };
        packer.push_str(ellipsis) && packer.push_str(tail) && packer.count() <= max
    };

    if !fits_with_ellipsis(gsm7, ucs2) {
        return None;
    }
    // The prefixes that fit form an initial run: within one encoding a longer prefix never takes
    // fewer segments, and a UCS-2 prefix that fits is longer than any GSM-7 prefix that does not
    // (GSM-7 takes at most 2 septets a character, UCS-2 at least 1 unit, with 153/67 > 2).
    let mut cut = 0;
    for (at, c) in body.char_indices() {
        if let Some(packer) = gsm7.as_mut() {
            if !packer.push_char(c) {
                gsm7 = None;
            }
        }
        ucs2.push_char(c);
        if !fits_with_ellipsis(gsm7, ucs2) {
            break;
        }
        cut = at + c.len_utf8();
    }

    let with_ellipsis = |prefix: &str| {
        let prefix = prefix.trim_end();
        let encoding = if outer_is_gsm7 {
            encoding_of(prefix)
        } else {
            Encoding::Ucs2
        };
        format!("{prefix}{}", ellipsis_for(encoding))
    };
    let fits = |candidate: &str| segments(&format!("{head}{candidate}{tail}")).count <= max;

    let raw = &body[..cut];
    let at_word_end = body[cut..].starts_with(char::is_whitespace);
    if !at_word_end {
        let window_start = raw
            .char_indices()
            .rev()
            .nth(WORD_BOUNDARY_WINDOW - 1)
            .map_or(0, |(at, _)| at);
        if let Some(space) = raw[window_start..].rfind(char::is_whitespace) {
            let backed_off = raw[..window_start + space].trim_end();
            // Never back off to nothing; the fit check is belt and braces (a shorter prefix fits).
            if !backed_off.is_empty() {
                let candidate = with_ellipsis(backed_off);
                if fits(&candidate) {
                    return Some(candidate);
                }
            }
        }
    }
    let candidate = with_ellipsis(raw);
    if fits(&candidate) {
        Some(candidate)
    } else {
        // Unreachable (trimming only shortens), kept so a mistake cannot overflow the budget.
        Some(format!("{raw}{}", ellipsis_for(encoding_of(raw))))
    }
}

/// The hint on the first SMS of a session, telling the user how to answer by SMS.
pub fn reply_hint(peer_name: &str) -> String {
    format!(
        "Reply to answer {}, @name to pick a chat, /help",
        collapse_line(peer_name)
    )
}

/// Lays out an SMS for the user: `Bob: text`, then a line with `hint` when one is given (the first
/// SMS of a session says how to reply, see [`reply_hint`]), in at most `max_segments` segments
/// (0 counts as 1).
///
/// Runs of whitespace in the message text become one space, or one newline when the run holds a
/// line break; control characters are dropped; the text is trimmed. Whitespace in the peer name
/// becomes single spaces. When the SMS is too long the message text is shortened (see [`fit`])
/// and the hint is kept whole; only when not even one character of the text would fit beside the
/// hint is the hint left out, and only when `Bob: ...` alone does not fit is the name shortened.
pub fn format_mt(peer_name: &str, text: &str, hint: Option<&str>, max_segments: usize) -> String {
    let max = max_segments.max(1);
    let name = collapse_line(peer_name);
    let body = compact(text);
    let head = match (name.is_empty(), body.is_empty()) {
        (true, _) => String::new(),
        (false, true) => format!("{name}:"),
        (false, false) => format!("{name}: "),
    };
    let tail = match hint {
        Some(hint) if !hint.trim().is_empty() => format!("\n{hint}"),
        _ => String::new(),
    };

    let whole = format!("{head}{body}{tail}");
    if segments(&whole).count <= max {
        return whole;
    }
    if !tail.is_empty() {
        if let Some(fitted) = fit_between(&head, &body, &tail, max) {
            let kept_some_text = fitted != GSM7_ELLIPSIS && fitted != UCS2_ELLIPSIS;
            if kept_some_text {
                return format!("{head}{fitted}{tail}");
            }
        }
        let without_hint = format!("{head}{body}");
        if segments(&without_hint).count <= max {
            return without_hint;
        }
    }
    if let Some(fitted) = fit_between(&head, &body, "", max) {
        return format!("{head}{fitted}");
    }
    fit(&format!("{head}{body}"), max)
}

/// `s` on one line: whitespace runs become one space, ends trimmed.
fn collapse_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Is `c` a line break (as opposed to horizontal whitespace)?
fn is_line_break(c: char) -> bool {
    matches!(
        c,
        '\n' | '\r' | '\u{0B}' | '\u{0C}' | '\u{85}' | '\u{2028}' | '\u{2029}'
    )
}

/// A message text made compact for SMS: a whitespace run becomes `\n` if it holds a line break,
/// else one space; other control characters are dropped; the ends are trimmed.
fn compact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending: Option<char> = None;
    for c in text.chars() {
        if c.is_whitespace() {
            let separator = if is_line_break(c) { '\n' } else { ' ' };
            if pending != Some('\n') {
                pending = Some(separator);
            }
        } else if c.is_control() {
            continue;
        } else {
            if let Some(separator) = pending.take() {
                if !out.is_empty() {
                    out.push(separator);
                }
            }
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The basic set as listed in TS 23.038, in septet order, without the escape.
    const SPEC_BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?\
                              ¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";
    /// The extension table's characters.
    const SPEC_EXTENSION: &str = "\u{0C}^{}\\[~]|€";

    fn ascii(n: usize) -> String {
        "a".repeat(n)
    }

    fn count(text: &str) -> usize {
        segments(text).count
    }

    // ---- the tables --------------------------------------------------------------------------

    #[test]
    fn basic_table_has_128_distinct_positions_in_spec_order() {
        let mut sorted = BASIC.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 128);
        let without_escape: String = BASIC.iter().filter(|&&c| c != ESCAPE).collect();
        assert_eq!(without_escape, SPEC_BASIC);
        // Spot checks against the spec's code chart.
        for (septet, c) in [
            (0x00, '@'),
            (0x09, 'Ç'),
            (0x0A, '\n'),
            (0x0D, '\r'),
            (0x10, 'Δ'),
            (0x11, '_'),
            (0x1B, ESCAPE),
            (0x1F, 'É'),
            (0x24, '¤'),
            (0x40, '¡'),
            (0x41, 'A'),
            (0x5F, '§'),
            (0x60, '¿'),
            (0x7F, 'à'),
        ] {
            assert_eq!(BASIC[septet], c, "septet {septet:#04x}");
        }
    }

    #[test]
    fn extension_table_is_disjoint_from_the_basic_set() {
        let chars: String = EXTENSION.iter().map(|&(_, c)| c).collect();
        assert_eq!(chars, SPEC_EXTENSION);
        for (septet, c) in EXTENSION {
            assert!(!BASIC.contains(&c), "{c:?} in both tables");
            assert!(septet < 0x80);
        }
    }

    #[test]
    fn every_basic_character_is_one_septet() {
        assert_eq!(SPEC_BASIC.chars().count(), 127);
        for c in SPEC_BASIC.chars() {
            let s = c.to_string();
            assert_eq!(encoding_of(&s), Encoding::Gsm7, "{c:?}");
            assert_eq!(gsm7_septets(&s), Some(1), "{c:?}");
        }
        assert_eq!(gsm7_septets(SPEC_BASIC), Some(127));
    }

    #[test]
    fn every_extension_character_is_two_septets() {
        for c in SPEC_EXTENSION.chars() {
            let s = c.to_string();
            assert_eq!(encoding_of(&s), Encoding::Gsm7, "{c:?}");
            assert_eq!(gsm7_septets(&s), Some(2), "{c:?}");
        }
        assert_eq!(gsm7_septets(SPEC_EXTENSION), Some(20));
        assert_eq!(gsm7_septets("€5"), Some(3));
    }

    #[test]
    fn look_alikes_and_common_non_gsm_characters_force_ucs2() {
        for (c, why) in [
            ('ç', "only the capital Ç is in the table"),
            ('á', "accents beyond the table"),
            ('í', "accents beyond the table"),
            ('ó', "accents beyond the table"),
            ('ú', "accents beyond the table"),
            ('â', "accents beyond the table"),
            ('ê', "accents beyond the table"),
            ('È', "only the small è is in the table"),
            ('À', "only the small à is in the table"),
            ('`', "grave accent"),
            ('\t', "tab"),
            (ESCAPE, "the escape is not a character of its own"),
            ('\u{A0}', "no-break space"),
            ('…', "ellipsis"),
            ('\u{2019}', "right single quote, typed by many phones"),
            ('\u{201C}', "left double quotation mark"),
            ('Α', "Greek capital alpha, looks like A"),
            ('А', "Cyrillic A"),
            ('\u{2126}', "ohm sign, looks like Ω"),
            ('ő', "Hungarian double acute"),
            ('😀', "emoji"),
        ] {
            let s = format!("plain {c} text");
            assert_eq!(encoding_of(&s), Encoding::Ucs2, "{c:?}: {why}");
            assert_eq!(gsm7_septets(&s), None, "{c:?}: {why}");
        }
        assert_eq!(encoding_of(""), Encoding::Gsm7);
        assert_eq!(gsm7_septets(""), Some(0));
    }

    #[test]
    fn ucs2_units_count_surrogate_pairs() {
        assert_eq!(ucs2_units(""), 0);
        assert_eq!(ucs2_units("abc"), 3);
        assert_eq!(ucs2_units("Привет"), 6);
        assert_eq!(ucs2_units("€"), 1);
        assert_eq!(ucs2_units("😀"), 2);
        assert_eq!(ucs2_units("a😀b"), 4);
        // A family emoji: three people joined by zero-width joiners.
        assert_eq!(ucs2_units("👨\u{200D}👩\u{200D}👧"), 8);
    }

    // ---- segments ----------------------------------------------------------------------------

    #[test]
    fn empty_text_is_one_segment() {
        assert_eq!(
            segments(""),
            Segments {
                encoding: Encoding::Gsm7,
                units: 0,
                count: 1
            }
        );
    }

    #[test]
    fn gsm7_single_and_concatenated_limits() {
        let table = [
            (1, 1),
            (160, 1),
            (161, 2),
            (306, 2),
            (307, 3),
            (459, 3),
            (460, 4),
            (153 * 10, 10),
            (153 * 10 + 1, 11),
        ];
        for (len, expected) in table {
            let s = segments(&ascii(len));
            assert_eq!(s.encoding, Encoding::Gsm7);
            assert_eq!(s.units, len);
            assert_eq!(s.count, expected, "{len} septets");
        }
    }

    #[test]
    fn euro_counts_double() {
        // 80 euros are 160 septets: one SMS; one more character makes two.
        let euros = "€".repeat(80);
        assert_eq!(
            segments(&euros),
            Segments {
                encoding: Encoding::Gsm7,
                units: 160,
                count: 1
            }
        );
        assert_eq!(count(&format!("{euros}a")), 2);
        // 159 plain + € = 161 septets.
        assert_eq!(count(&format!("{}€", ascii(158))), 1);
        assert_eq!(count(&format!("{}€", ascii(159))), 2);
    }

    #[test]
    fn extension_character_is_not_split_across_segments() {
        // 152 + 2 + 152 = 306 septets, which division would put in 2 segments; but the € cannot
        // take the last septet of the first segment, so it opens the second, which then
        // overflows by one septet.
        let text = format!("{}€{}", ascii(152), ascii(152));
        let s = segments(&text);
        assert_eq!(s.units, 306);
        assert_eq!(s.count, 3);
        // Moved one septet earlier, the € fits the first segment exactly.
        assert_eq!(count(&format!("{}€{}", ascii(151), ascii(153))), 2);
        // An extension character ending exactly on the boundary.
        assert_eq!(count(&format!("{}{{{}", ascii(151), ascii(153))), 2);
        assert_eq!(count(&format!("{}{{{}", ascii(152), ascii(153))), 3);
    }

    #[test]
    fn ucs2_single_and_concatenated_limits() {
        let table = [
            (1, 1),
            (70, 1),
            (71, 2),
            (134, 2),
            (135, 3),
            (201, 3),
            (202, 4),
        ];
        for (len, expected) in table {
            let s = segments(&"ж".repeat(len));
            assert_eq!(s.encoding, Encoding::Ucs2);
            assert_eq!(s.units, len);
            assert_eq!(s.count, expected, "{len} units");
        }
        // One non-GSM character turns a short ASCII text into UCS-2.
        let mixed = format!("{}ç", ascii(69));
        assert_eq!(
            segments(&mixed),
            Segments {
                encoding: Encoding::Ucs2,
                units: 70,
                count: 1
            }
        );
        assert_eq!(count(&format!("{}ç", ascii(70))), 2);
    }

    #[test]
    fn emoji_count_two_units_and_are_not_split() {
        assert_eq!(segments(&"😀".repeat(35)).units, 70);
        assert_eq!(count(&"😀".repeat(35)), 1);
        assert_eq!(count(&format!("{}a", "😀".repeat(35))), 2);
        // 66 + 2 + 66 = 134 units, which division would put in 2 segments; the surrogate pair
        // cannot straddle, so the second segment starts with it and overflows.
        let text = format!("{}😀{}", "ж".repeat(66), "ж".repeat(66));
        let s = segments(&text);
        assert_eq!(s.units, 134);
        assert_eq!(s.count, 3);
        assert_eq!(count(&format!("{}😀{}", "ж".repeat(65), "ж".repeat(67))), 2);
    }

    // ---- fit ---------------------------------------------------------------------------------

    /// A GSM-7 text of words, ~1000 septets.
    fn gsm_words() -> String {
        let words = [
            "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta",
        ];
        (0..150)
            .map(|i| words[i % words.len()])
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn fit_returns_text_that_fits_unchanged() {
        assert_eq!(fit("", 1), "");
        assert_eq!(fit("hello", 1), "hello");
        let full = ascii(160);
        assert_eq!(fit(&full, 1), full);
        let three = ascii(459);
        assert_eq!(fit(&three, 3), three);
        let unicode = "ж".repeat(70);
        assert_eq!(fit(&unicode, 1), unicode);
        // 0 segments counts as 1.
        assert_eq!(fit("hello", 0), "hello");
    }

    #[test]
    fn fit_gsm7_text_for_one_to_three_segments() {
        let text = gsm_words();
        for max in 1..=3 {
            let fitted = fit(&text, max);
            let s = segments(&fitted);
            assert_eq!(s.encoding, Encoding::Gsm7, "max {max}: {fitted}");
            assert!(s.count <= max, "max {max}: {} segments", s.count);
            assert!(fitted.ends_with("..."), "{fitted}");
            assert!(!fitted.contains('…'));
            let kept = fitted.trim_end_matches("...");
            assert!(text.starts_with(kept));
            // Cut at a word boundary, so `kept` ends with a whole word.
            assert!(text[kept.len()..].starts_with(' '), "{kept:?}");
            // Not much room wasted: within a word and an ellipsis of the limit.
            let limit = if max == 1 { 160 } else { 153 * max };
            assert!(s.units + 12 >= limit, "max {max}: only {} septets", s.units);
        }
    }

    #[test]
    fn fit_ucs2_text_for_one_to_three_segments() {
        let text = format!("Привет 👋 {}", gsm_words());
        for max in 1..=3 {
            let fitted = fit(&text, max);
            let s = segments(&fitted);
            assert_eq!(s.encoding, Encoding::Ucs2, "max {max}");
            assert!(s.count <= max, "max {max}: {} segments", s.count);
            assert!(fitted.ends_with('…'), "{fitted}");
            let kept = fitted.trim_end_matches('…');
            assert!(text.starts_with(kept));
            let limit = if max == 1 { 70 } else { 67 * max };
            assert!(s.units + 12 >= limit, "max {max}: only {} units", s.units);
        }
    }

    #[test]
    fn fit_cuts_mid_word_when_no_space_is_near() {
        let fitted = fit(&ascii(500), 1);
        assert_eq!(fitted, format!("{}...", ascii(157)));
        assert_eq!(segments(&fitted).units, 160);

        let fitted = fit(&"ж".repeat(500), 1);
        assert_eq!(fitted, format!("{}…", "ж".repeat(69)));

        // A space 20 characters back is too far; 10 back is near enough.
        let far = format!("{} {}", ascii(137), ascii(300));
        assert_eq!(fit(&far, 1), format!("{}...", &far[..157]));
        let near = format!("{} {}", ascii(147), ascii(300));
        assert_eq!(fit(&near, 1), format!("{}...", ascii(147)));
    }

    #[test]
    fn fit_never_splits_an_emoji_or_an_extension_character() {
        // 69 units of room before the ellipsis: the emoji would need units 69 and 70.
        let text = format!("{}😀{}", "ж".repeat(68), "ж".repeat(50));
        assert_eq!(fit(&text, 1), format!("{}…", "ж".repeat(68)));
        // 157 septets of room before "...": a € at septets 157-158 does not fit.
        let text = format!("{}€{}", ascii(156), ascii(50));
        assert_eq!(fit(&text, 1), format!("{}...", ascii(156)));
    }

    #[test]
    fn fit_uses_gsm7_when_the_ucs2_part_is_cut_off() {
        // The only non-GSM character is far beyond the first SMS: the result is GSM-7 with 157
        // characters, not UCS-2 with 69.
        let text = format!("{}ç", ascii(400));
        let fitted = fit(&text, 1);
        assert_eq!(fitted, format!("{}...", ascii(157)));
        assert_eq!(segments(&fitted).encoding, Encoding::Gsm7);
    }

    #[test]
    fn fit_result_is_within_budget_for_many_shapes() {
        let shapes = [
            gsm_words(),
            "€".repeat(400),
            "😀".repeat(400),
            format!("{} 😀 {}", ascii(150), ascii(400)),
            format!("{}ç{}", ascii(155), ascii(400)),
            "a\u{A0}".repeat(300),
            "word ".repeat(200),
        ];
        for text in &shapes {
            for max in 0..=4 {
                let fitted = fit(text, max);
                assert!(
                    count(&fitted) <= max.max(1),
                    "{max}: {} segments for {fitted:?}",
                    count(&fitted)
                );
                assert!(fitted.ends_with("...") || fitted.ends_with('…'));
            }
        }
    }

    /// Brute force: `fit` relies on the prefixes that fit (with their ellipsis) forming an initial
    /// run, and on keeping the longest one less at most a word.
    #[test]
    fn fit_keeps_the_longest_prefix_that_fits_less_at_most_a_word() {
        let shapes = [
            format!("{}€ {}😀{}", ascii(140), "€".repeat(30), ascii(300)),
            format!("{}ç{}", ascii(60), "€".repeat(300)),
            format!("{} {}", "😀".repeat(40), ascii(300)),
            format!("{}😀{}", "ж".repeat(130), ascii(300)),
            "ab€ ".repeat(200),
        ];
        for text in &shapes {
            for max in 1..=3 {
                let fits = |prefix: &str| {
                    let ellipsis = ellipsis_for(encoding_of(prefix));
                    count(&format!("{prefix}{ellipsis}")) <= max
                };
                let boundaries: Vec<usize> = text
                    .char_indices()
                    .map(|(at, _)| at)
                    .chain([text.len()])
                    .collect();
                let fitting: Vec<bool> = boundaries.iter().map(|&b| fits(&text[..b])).collect();
                let run = fitting.iter().take_while(|&&f| f).count();
                assert!(fitting[run..].iter().all(|&f| !f), "not an initial run");
                let longest = boundaries[run - 1];

                let fitted = fit(text, max);
                let kept = fitted.trim_end_matches("...").trim_end_matches('…');
                assert!(text.starts_with(kept));
                assert!(kept.len() <= longest);
                let lost = text[kept.len()..longest].chars().count();
                assert!(lost <= WORD_BOUNDARY_WINDOW, "max {max}: lost {lost}");
                assert!(count(&fitted) <= max);
            }
        }
    }

    // ---- format_mt ---------------------------------------------------------------------------

    const HINT: &str = "Reply to answer Bob, @name to pick a chat, /help";

    #[test]
    fn reply_hint_names_the_peer() {
        assert_eq!(reply_hint("Bob"), HINT);
        assert_eq!(
            reply_hint(" Bob \n Smith "),
            "Reply to answer Bob Smith, @name to pick a chat, /help"
        );
    }

    #[test]
    fn format_mt_without_hint() {
        assert_eq!(format_mt("Bob", "hi there", None, 3), "Bob: hi there");
        assert_eq!(format_mt("Bob", "hi there", Some(""), 3), "Bob: hi there");
        assert_eq!(format_mt("Bob", "Привет", None, 1), "Bob: Привет");
    }

    #[test]
    fn format_mt_with_hint() {
        assert_eq!(
            format_mt("Bob", "hi there", Some(HINT), 3),
            format!("Bob: hi there\n{HINT}")
        );
    }

    #[test]
    fn format_mt_collapses_whitespace_and_keeps_single_newlines() {
        assert_eq!(
            format_mt("Bob", "  hi \t  there\n\n\n  how  are\r\nyou?  \n", None, 3),
            "Bob: hi there\nhow are\nyou?"
        );
        // No-break spaces and tabs would force UCS-2; collapsed, the SMS stays GSM-7.
        let sms = format_mt("Bob", "a\u{A0}b\tc", None, 1);
        assert_eq!(sms, "Bob: a b c");
        assert_eq!(encoding_of(&sms), Encoding::Gsm7);
        // Control characters go; the name is one line.
        assert_eq!(format_mt("Bob\nSmith", "x\u{7}y", None, 1), "Bob Smith: xy");
    }

    #[test]
    fn format_mt_shortens_the_text_and_keeps_the_hint() {
        let text = gsm_words();
        for max in 1..=3 {
            let sms = format_mt("Bob", &text, Some(HINT), max);
            assert!(count(&sms) <= max, "max {max}: {sms}");
            assert!(sms.starts_with("Bob: alpha"), "{sms}");
            assert!(sms.ends_with(&format!("...\n{HINT}")), "{sms}");
        }
        let sms = format_mt("Bob", &text, None, 1);
        assert!(sms.starts_with("Bob: alpha") && sms.ends_with("..."));
        assert!(count(&sms) == 1 && segments(&sms).units >= 148);
    }

    #[test]
    fn format_mt_ucs2_text_makes_the_whole_sms_ucs2() {
        let text = format!("👋 {}", gsm_words());
        let sms = format_mt("Bob", &text, Some(HINT), 2);
        assert_eq!(segments(&sms).encoding, Encoding::Ucs2);
        assert!(count(&sms) <= 2);
        assert!(sms.starts_with("Bob: 👋 alpha"));
        assert!(sms.ends_with(&format!("…\n{HINT}")), "{sms}");
        // The text just fits in one UCS-2 SMS beside the hint (70 - 5 - 1 - 48 = 16 units).
        let sms = format_mt("Bob", &text, Some(HINT), 1);
        assert_eq!(count(&sms), 1);
        assert!(sms.ends_with(&format!("…\n{HINT}")), "{sms}");
    }

    #[test]
    fn format_mt_drops_the_hint_only_when_no_text_would_be_left() {
        // An 18-character name leaves room for the ellipsis but for no text beside the hint in
        // one UCS-2 SMS: 18 + 2 + 1 + 1 + 48 = 70.
        let long_name = "B".repeat(18);
        let sms = format_mt(&long_name, &"ж".repeat(100), Some(HINT), 1);
        assert!(count(&sms) == 1);
        assert!(!sms.contains(HINT), "{sms}");
        assert!(sms.starts_with(&format!("{long_name}: жжж")), "{sms}");
        // A short text that fits without the hint is sent whole rather than cut.
        let sms = format_mt(&long_name, &"ж".repeat(40), Some(HINT), 1);
        assert_eq!(sms, format!("{long_name}: {}", "ж".repeat(40)));
    }

    #[test]
    fn format_mt_with_an_absurd_name_still_fits() {
        let name = "N".repeat(500);
        for max in 0..=3 {
            let sms = format_mt(&name, "hello", Some(HINT), max);
            assert!(count(&sms) <= max.max(1), "{max}");
            assert!(sms.ends_with("..."), "{sms}");
        }
    }
}
