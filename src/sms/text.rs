//! What a text from the user's phone (mobile-originated, "MO") means, and which conversation it
//! is for.
//!
//! [`parse`] reads one SMS in the order DESIGN.md ("SMS terminal") gives: a keyword (`STOP`,
//! `START`, `HELP`, always honoured); a command starting with `/`; a message starting with
//! `@name ` for the conversation with that buddy; otherwise a reply to the most recent
//! conversation. [`as_verification_code`] recognises a texted-back verification code, for the
//! caller to try first while a verification is pending. [`find_target`] resolves the `name` of
//! `@name` or `/msg name` against the user's conversations, and [`usage_for_ambiguous`] words the
//! question when several match.
//!
//! This module is pure: it does not know who sent the text, does not read the store and decides
//! no action. Texts are matched as written apart from the trimming and case folding documented
//! on each function.

use std::fmt;

/// A carrier-style keyword: the whole text is the keyword.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Keyword {
    /// `STOP`, `STOPALL`, `UNSUBSCRIBE`, `CANCEL`, `END`, `QUIT`: stop sending SMS to this number.
    Stop,
    /// `START`, `UNSTOP`, `YES`: resume sending SMS to this number.
    ///
    /// "Yes" is also an ordinary answer to a buddy: a caller whose number is not stopped should
    /// treat it as a [`SmsInput::Reply`] rather than swallow it.
    Start,
    /// `HELP`, `INFO`: say what this number is and how to stop it.
    Help,
}

impl Keyword {
    /// The keyword that `word` is, ignoring ASCII case.
    fn from_word(word: &str) -> Option<Keyword> {
        const STOP: [&str; 6] = ["STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"];
        const START: [&str; 3] = ["START", "UNSTOP", "YES"];
        const HELP: [&str; 2] = ["HELP", "INFO"];
        let is = |words: &[&str]| words.iter().any(|w| w.eq_ignore_ascii_case(word));
        if is(&STOP) {
            Some(Keyword::Stop)
        } else if is(&START) {
            Some(Keyword::Start)
        } else if is(&HELP) {
            Some(Keyword::Help)
        } else {
            None
        }
    }
}

impl fmt::Display for Keyword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Keyword::Stop => "STOP",
            Keyword::Start => "START",
            Keyword::Help => "HELP",
        })
    }
}

/// A command: an SMS starting with `/`, the same commands as the chat lines to the service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Command {
    /// `/help` (or `/?`, `/info`): list the commands.
    Help,
    /// `/who`: the buddies online.
    Who,
    /// `/away [message]`: set the phone's local state to away, with an optional status message.
    Away(Option<String>),
    /// `/back`: set the phone's local state back to available.
    Back,
    /// `/dnd [message]`: set the phone's local state to do-not-disturb.
    Dnd(Option<String>),
    /// `/status`: the reach address, terminals and held messages.
    Status,
    /// `/msg PEER text`: send `text` in the conversation with `PEER` (resolved with
    /// [`find_target`]; a leading `@` is dropped).
    Msg {
        /// Who, as typed (without `@`).
        peer: String,
        /// What, as typed (trimmed).
        text: String,
    },
    /// `/verify CODE`: confirm a terminal. Six digits typed with spaces or dashes between them are
    /// joined (`123 456` → `123456`); anything else is passed as typed for the verifier to refuse.
    Verify(String),
    /// A command Reach does not know: its name as typed, without the `/`.
    Unknown(String),
}

/// A text that looks like a command or an `@name` message but is incomplete. The caller texts
/// back its [`Display`](fmt::Display) form, which starts with `Usage:` where there is one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ParseProblem {
    /// The text is empty or only whitespace.
    #[error("Your text was empty; nothing was sent.")]
    Empty,
    /// `/msg` without a peer, or without a text.
    #[error("Usage: /msg NAME text")]
    MsgUsage {
        /// The peer, when one was given.
        peer: Option<String>,
    },
    /// `@name` with nothing after it.
    #[error("Usage: @NAME text")]
    AddressedWithoutText {
        /// The name, as typed without `@`.
        target: String,
    },
    /// `/verify` without a code.
    #[error("Usage: /verify CODE (the 6 digits Reach sent you)")]
    VerifyUsage,
}

/// What one SMS from the user means.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SmsInput {
    /// The whole text is a keyword (trimmed, any case, trailing punctuation ignored), or a stop
    /// or start keyword after a `/`.
    Keyword(Keyword),
    /// The text starts with `/` and names a command (the name in any case, arguments as written).
    Command(Command),
    /// `@name text`: `text` for the conversation with `name` (to resolve with [`find_target`]).
    /// Only an `@` at the very start, directly followed by the name, counts.
    Addressed {
        /// The name, as typed without `@` (and without a trailing `:` or `,`).
        target: String,
        /// The message, as typed (trimmed).
        text: String,
    },
    /// Anything else: a reply to the most recent conversation, as typed (trimmed).
    Reply(String),
    /// An incomplete command or `@name` message: text back the problem, send nothing.
    Invalid(ParseProblem),
}

/// Reads one SMS from the user's verified number; see [`SmsInput`] for what each shape means.
///
/// A bare verification code is not recognised here (it would be an ordinary reply): while a
/// verification is pending, the caller tries [`as_verification_code`] first.
pub fn parse(text: &str) -> SmsInput {
    let text = text.trim();
    if text.is_empty() {
        return SmsInput::Invalid(ParseProblem::Empty);
    }
    if let Some(keyword) = Keyword::from_word(without_trailing_punctuation(text)) {
        return SmsInput::Keyword(keyword);
    }
    if let Some(line) = text.strip_prefix('/') {
        return parse_command(line);
    }
    if let Some(rest) = text.strip_prefix('@') {
        if let Some(input) = parse_addressed(rest) {
            return input;
        }
    }
    SmsInput::Reply(text.to_owned())
}

/// `text` without the punctuation (and whitespace) that ends it: `stop.` and `STOP!` are `STOP`.
fn without_trailing_punctuation(text: &str) -> &str {
    text.trim_end_matches(|c: char| c.is_whitespace() || c.is_ascii_punctuation() || c == '…')
}

/// The first word of `s` and the rest, trimmed. The word ends at the first whitespace (a line
/// break included).
fn split_word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(end) => (&s[..end], s[end..].trim()),
        None => (s, ""),
    }
}

/// A name as typed after `@` or `/msg`: one leading `@` and a trailing `:` or `,` (as in
/// `@bob: hi`) are not part of it.
fn clean_name(word: &str) -> &str {
    let word = word.strip_prefix('@').unwrap_or(word);
    word.trim_end_matches([':', ','])
}

/// `line` is the text after the `/`.
fn parse_command(line: &str) -> SmsInput {
    // "/stop" is honoured like "stop": a user who types a slash out of habit must still be heard.
    if let Some(keyword @ (Keyword::Stop | Keyword::Start)) =
        Keyword::from_word(without_trailing_punctuation(line))
    {
        return SmsInput::Keyword(keyword);
    }
    let (name, args) = match line.find(char::is_whitespace) {
        Some(end) => (&line[..end], line[end..].trim()),
        None => (line, ""),
    };
    let folded = name.to_lowercase();
    // "/who?" and "/help." mean "/who" and "/help"; "/?" stays "?".
    let key = match without_trailing_punctuation(&folded) {
        "" => folded.as_str(),
        key => key,
    };
    let optional = (!args.is_empty()).then(|| args.to_owned());
    let command = match key {
        "help" | "?" | "info" => Command::Help,
        "who" => Command::Who,
        "away" => Command::Away(optional),
        "back" => Command::Back,
        "dnd" => Command::Dnd(optional),
        "status" => Command::Status,
        "msg" => {
            let (peer, text) = split_word(args);
            let peer = clean_name(peer);
            if peer.is_empty() || text.is_empty() {
                let peer = (!peer.is_empty()).then(|| peer.to_owned());
                return SmsInput::Invalid(ParseProblem::MsgUsage { peer });
            }
            Command::Msg {
                peer: peer.to_owned(),
                text: text.to_owned(),
            }
        }
        "verify" => {
            if args.is_empty() {
                return SmsInput::Invalid(ParseProblem::VerifyUsage);
            }
            Command::Verify(code_digits(args).unwrap_or_else(|| args.to_owned()))
        }
        _ => Command::Unknown(name.to_owned()),
    };
    SmsInput::Command(command)
}

/// `rest` is the text after the leading `@`. `None` when it is not `@name text`-shaped (the `@`
/// is followed by whitespace, or the name has no letter or digit), making the text a reply.
fn parse_addressed(rest: &str) -> Option<SmsInput> {
    if rest.starts_with(char::is_whitespace) {
        return None;
    }
    let (word, text) = split_word(rest);
    let target = clean_name(word);
    if !target.chars().any(char::is_alphanumeric) {
        return None;
    }
    let target = target.to_owned();
    Some(if text.is_empty() {
        SmsInput::Invalid(ParseProblem::AddressedWithoutText { target })
    } else {
        SmsInput::Addressed {
            target,
            text: text.to_owned(),
        }
    })
}

/// The digits of a verification code: exactly 6 ASCII digits, which may be separated by spaces
/// or dashes (`123456`, `123 456`, `123-456`).
fn code_digits(s: &str) -> Option<String> {
    if !s
        .chars()
        .all(|c| c.is_ascii_digit() || c == ' ' || c == '-')
    {
        return None;
    }
    let digits: String = s.chars().filter(char::is_ascii_digit).collect();
    (digits.len() == 6).then_some(digits)
}

/// The verification code in a text, for the caller to try while a verification of this phone is
/// pending: `123456`, `verify 123456` or `/verify 123456` (any case, trimmed, trailing
/// punctuation ignored; the digits may be grouped with spaces or dashes). `None` for anything
/// else, which the caller then reads with [`parse`].
pub fn as_verification_code(text: &str) -> Option<String> {
    let text = without_trailing_punctuation(text.trim());
    let text = text.strip_prefix('/').unwrap_or(text);
    let (first, rest) = split_word(text);
    if first.eq_ignore_ascii_case("verify") {
        code_digits(rest)
    } else {
        code_digits(text)
    }
}

// ---------------------------------------------------------------------------------------------
// Reply targeting
// ---------------------------------------------------------------------------------------------

/// One of the user's conversations, as far as targeting an SMS needs it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Conversation {
    /// The peer's bare JID (for another Reach user, their reach address).
    pub peer: String,
    /// The peer's nickname (roster name), when known.
    pub name: Option<String>,
    /// When the conversation was last active (seconds since the Unix epoch).
    pub last_active: u64,
}

impl Conversation {
    /// The local part of the peer's JID (`carol` for `carol@reach.example.org`), if it has one.
    fn local_part(&self) -> Option<&str> {
        self.peer.split_once('@').map(|(local, _)| local)
    }
}

/// Which conversation a name typed by the user stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target<'a> {
    /// Exactly one conversation matches best.
    Found(&'a Conversation),
    /// None matches.
    Unknown,
    /// Several match equally well, most recently active first.
    Ambiguous(Vec<&'a Conversation>),
}

/// How well a query matches a conversation; lower is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Rank {
    Jid,
    Name,
    LocalPart,
    Prefix,
}

/// A name or local part folded for matching: lowercase, without whitespace, `.`, `_` or `-`, so
/// `bob.smith`, `bob_smith` and `bobsmith` all match the nickname `Bob Smith`.
fn fold(s: &str) -> String {
    s.chars()
        .filter(|&c| !(c.is_whitespace() || matches!(c, '.' | '_' | '-')))
        .flat_map(char::to_lowercase)
        .collect()
}

fn rank(query_jid: &str, query: &str, conversation: &Conversation) -> Option<Rank> {
    let name = conversation.name.as_deref().map(fold);
    let local = conversation.local_part().map(fold);
    if conversation.peer.to_lowercase() == query_jid {
        Some(Rank::Jid)
    } else if name.as_deref() == Some(query) {
        Some(Rank::Name)
    } else if local.as_deref() == Some(query) {
        Some(Rank::LocalPart)
    } else if [name, local]
        .iter()
        .flatten()
        .any(|key| key.starts_with(query))
    {
        Some(Rank::Prefix)
    } else {
        None
    }
}

fn find_among<'a>(
    query: &str,
    conversations: impl Iterator<Item = &'a Conversation>,
) -> Target<'a> {
    let query = query.trim();
    let query = query.strip_prefix('@').unwrap_or(query);
    // A full JID names its bare JID.
    let query_jid = query.split('/').next().unwrap_or(query).to_lowercase();
    let folded = fold(query);
    if folded.is_empty() {
        return Target::Unknown;
    }
    let mut best: Option<Rank> = None;
    let mut matches: Vec<&Conversation> = Vec::new();
    for conversation in conversations {
        let Some(rank) = rank(&query_jid, &folded, conversation) else {
            continue;
        };
        if best.is_none_or(|best| rank < best) {
            best = Some(rank);
            matches.clear();
        }
        if best == Some(rank) {
            matches.push(conversation);
        }
    }
    match matches.len() {
        0 => Target::Unknown,
        1 => Target::Found(matches[0]),
        _ => {
            matches.sort_by(|a, b| {
                b.last_active
                    .cmp(&a.last_active)
                    .then_with(|| a.peer.cmp(&b.peer))
            });
            Target::Ambiguous(matches)
        }
    }
}

/// The conversation `query` (a name as typed after `@` or `/msg`, with or without its `@`) stands
/// for. Matching ignores case, and for names and local parts also whitespace, `.`, `_` and `-`;
/// the first of these that matches anything decides:
/// 1. the peer's bare JID (a full JID counts as its bare JID);
/// 2. the peer's nickname;
/// 3. the local part of the peer's JID (`carol` for `carol@reach.example.org`);
/// 4. the start of the nickname or of the local part.
///
/// Several conversations matching at the same step are [`Target::Ambiguous`].
pub fn find_target<'a>(query: &str, conversations: &'a [Conversation]) -> Target<'a> {
    find_among(query, conversations.iter())
}

/// The most recently active conversation, the one a plain reply goes to. On a tie, the later one
/// in `conversations`.
pub fn most_recent(conversations: &[Conversation]) -> Option<&Conversation> {
    conversations.iter().max_by_key(|c| c.last_active)
}

/// A short SMS asking which of `matches` the user meant: `Which one? @bob.smith @bob.jones`, most
/// recently active first. Each one is named by the first of its nickname (spaces written as
/// `.`), its local part and its bare JID that, typed as `@name text`, picks it alone among
/// `matches`.
pub fn usage_for_ambiguous(matches: &[&Conversation]) -> String {
    let mut ordered = matches.to_vec();
    ordered.sort_by(|a, b| {
        b.last_active
            .cmp(&a.last_active)
            .then_with(|| a.peer.cmp(&b.peer))
    });
    let mut out = String::from("Which one?");
    for conversation in ordered {
        out.push_str(" @");
        out.push_str(&distinguishing_name(conversation, matches));
    }
    out
}

fn distinguishing_name(conversation: &Conversation, among: &[&Conversation]) -> String {
    let nickname = conversation
        .name
        .as_deref()
        .map(|name| name.split_whitespace().collect::<Vec<_>>().join("."));
    let candidates = [nickname, conversation.local_part().map(str::to_owned)];
    let picks_it_alone = |name: &str| {
        // Through `parse`, exactly as the user will send it back.
        let SmsInput::Addressed { target, .. } = parse(&format!("@{name} x")) else {
            return false;
        };
        matches!(find_among(&target, among.iter().copied()), Target::Found(found) if found == conversation)
    };
    candidates
        .into_iter()
        .flatten()
        .map(|name| name.to_lowercase())
        .find(|name| !name.is_empty() && picks_it_alone(name))
        .unwrap_or_else(|| conversation.peer.to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(s: &str) -> SmsInput {
        SmsInput::Reply(s.to_owned())
    }

    fn command(c: Command) -> SmsInput {
        SmsInput::Command(c)
    }

    fn addressed(target: &str, text: &str) -> SmsInput {
        SmsInput::Addressed {
            target: target.to_owned(),
            text: text.to_owned(),
        }
    }

    fn some(s: &str) -> Option<String> {
        Some(s.to_owned())
    }

    // ---- keywords ----------------------------------------------------------------------------

    #[test]
    fn every_keyword_in_any_case() {
        let table = [
            ("STOP", Keyword::Stop),
            ("STOPALL", Keyword::Stop),
            ("UNSUBSCRIBE", Keyword::Stop),
            ("CANCEL", Keyword::Stop),
            ("END", Keyword::Stop),
            ("QUIT", Keyword::Stop),
            ("START", Keyword::Start),
            ("UNSTOP", Keyword::Start),
            ("YES", Keyword::Start),
            ("HELP", Keyword::Help),
            ("INFO", Keyword::Help),
        ];
        for (word, keyword) in table {
            let lower = word.to_lowercase();
            let mut title = lower.clone();
            title[..1].make_ascii_uppercase();
            for text in [word.to_owned(), lower, title] {
                assert_eq!(parse(&text), SmsInput::Keyword(keyword), "{text:?}");
            }
        }
    }

    #[test]
    fn keywords_ignore_surrounding_whitespace_and_trailing_punctuation() {
        for text in [
            "Stop", "stop.", " STOP ", "STOP!", "stop!!!", "Stop?", "\nstop\n", "stop …", "stop .",
            "/stop", "/STOP!",
        ] {
            assert_eq!(parse(text), SmsInput::Keyword(Keyword::Stop), "{text:?}");
        }
        assert_eq!(parse("/start"), SmsInput::Keyword(Keyword::Start));
        assert_eq!(parse("Yes!"), SmsInput::Keyword(Keyword::Start));
        assert_eq!(parse("help?"), SmsInput::Keyword(Keyword::Help));
    }

    #[test]
    fn a_keyword_inside_a_sentence_is_a_reply() {
        for text in [
            "Stop please",
            "please stop",
            "stop stop",
            "S T O P",
            "yes, see you at 8",
            "STOP😀",
            "¡stop",
            "stopped",
            "help me with this",
        ] {
            assert_eq!(parse(text), reply(text), "{text:?}");
        }
    }

    #[test]
    fn keyword_display() {
        assert_eq!(Keyword::Stop.to_string(), "STOP");
        assert_eq!(Keyword::Start.to_string(), "START");
        assert_eq!(Keyword::Help.to_string(), "HELP");
    }

    // ---- commands ----------------------------------------------------------------------------

    #[test]
    fn commands_without_arguments() {
        let table = [
            ("/help", Command::Help),
            ("/HELP", Command::Help),
            ("/Help.", Command::Help),
            ("/?", Command::Help),
            ("/info", Command::Help),
            ("/who", Command::Who),
            ("/Who?", Command::Who),
            ("/away", Command::Away(None)),
            ("/back", Command::Back),
            ("/BACK", Command::Back),
            ("/dnd", Command::Dnd(None)),
            ("/status", Command::Status),
            ("  /status  ", Command::Status),
        ];
        for (text, expected) in table {
            assert_eq!(parse(text), command(expected), "{text:?}");
        }
    }

    #[test]
    fn commands_keep_their_arguments_as_written() {
        let table = [
            ("/away In a Meeting", Command::Away(some("In a Meeting"))),
            ("/AWAY  back at 3pm  ", Command::Away(some("back at 3pm"))),
            ("/away\nOn a train", Command::Away(some("On a train"))),
            ("/dnd Sleeping 😴", Command::Dnd(some("Sleeping 😴"))),
            ("/help msg", Command::Help),
            ("/back now", Command::Back),
        ];
        for (text, expected) in table {
            assert_eq!(parse(text), command(expected), "{text:?}");
        }
    }

    #[test]
    fn msg_command() {
        let msg = |peer: &str, text: &str| {
            command(Command::Msg {
                peer: peer.to_owned(),
                text: text.to_owned(),
            })
        };
        assert_eq!(parse("/msg bob hi there"), msg("bob", "hi there"));
        assert_eq!(parse("/MSG Bob Hi  There "), msg("Bob", "Hi  There"));
        assert_eq!(parse("/msg @bob hi"), msg("bob", "hi"));
        assert_eq!(parse("/msg bob: hi"), msg("bob", "hi"));
        assert_eq!(
            parse("/msg bob@example.net see\nyou"),
            msg("bob@example.net", "see\nyou")
        );
        assert_eq!(parse("/msg bob.smith Привет"), msg("bob.smith", "Привет"));
    }

    #[test]
    fn msg_without_peer_or_text_gets_the_usage() {
        assert_eq!(
            parse("/MSG Bob"),
            SmsInput::Invalid(ParseProblem::MsgUsage { peer: some("Bob") })
        );
        assert_eq!(
            parse("/msg"),
            SmsInput::Invalid(ParseProblem::MsgUsage { peer: None })
        );
        assert_eq!(
            parse("/msg @ hi"),
            SmsInput::Invalid(ParseProblem::MsgUsage { peer: None })
        );
        assert_eq!(
            ParseProblem::MsgUsage { peer: None }.to_string(),
            "Usage: /msg NAME text"
        );
    }

    #[test]
    fn verify_command() {
        let verify = |code: &str| command(Command::Verify(code.to_owned()));
        assert_eq!(parse("/verify 123456"), verify("123456"));
        assert_eq!(parse("/VERIFY 123 456"), verify("123456"));
        assert_eq!(parse("/verify 123-456"), verify("123456"));
        // Not a code: passed on for the verifier to refuse (and count as a try).
        assert_eq!(parse("/verify 12345"), verify("12345"));
        assert_eq!(parse("/verify abc"), verify("abc"));
        assert_eq!(
            parse("/verify"),
            SmsInput::Invalid(ParseProblem::VerifyUsage)
        );
        assert_eq!(
            ParseProblem::VerifyUsage.to_string(),
            "Usage: /verify CODE (the 6 digits Reach sent you)"
        );
        // Without the slash, it is a reply unless the caller asks as_verification_code first.
        assert_eq!(parse("verify 123456"), reply("verify 123456"));
        assert_eq!(parse("123456"), reply("123456"));
    }

    #[test]
    fn unknown_commands_keep_their_name_as_typed() {
        let table = [
            ("/Foo", "Foo"),
            ("/foo bar baz", "foo"),
            ("/usr/bin/env", "usr/bin/env"),
            ("/Привет мир", "Привет"),
            ("/", ""),
            ("/ help", ""),
        ];
        for (text, name) in table {
            assert_eq!(
                parse(text),
                command(Command::Unknown(name.to_owned())),
                "{text:?}"
            );
        }
    }

    // ---- verification codes ------------------------------------------------------------------

    #[test]
    fn verification_codes() {
        let table = [
            ("123456", some("123456")),
            (" 123456 ", some("123456")),
            ("123456.", some("123456")),
            ("123 456", some("123456")),
            ("123-456", some("123456")),
            ("verify 123456", some("123456")),
            ("Verify 123456", some("123456")),
            ("/verify 123456", some("123456")),
            ("/VERIFY 654 321!", some("654321")),
            ("12345", None),
            ("1234567", None),
            ("12345a", None),
            ("verify", None),
            ("verify me 123456", None),
            ("code 123456", None),
            ("123456 thanks", None),
            ("１２３４５６", None), // full-width digits
            ("", None),
        ];
        for (text, expected) in table {
            assert_eq!(as_verification_code(text), expected, "{text:?}");
        }
    }

    // ---- @name messages and replies ----------------------------------------------------------

    #[test]
    fn addressed_messages() {
        let table = [
            ("@bob hi", addressed("bob", "hi")),
            ("@Bob Hi there!", addressed("Bob", "Hi there!")),
            ("@bob: hi", addressed("bob", "hi")),
            ("@bob, hi", addressed("bob", "hi")),
            ("@bob\nhi", addressed("bob", "hi")),
            ("  @bob   hi  ", addressed("bob", "hi")),
            ("@bob.smith hi", addressed("bob.smith", "hi")),
            ("@bob@example.net hi", addressed("bob@example.net", "hi")),
            ("@Боб привет 👋", addressed("Боб", "привет 👋")),
            // Keywords after a name are messages for that buddy.
            ("@bob stop", addressed("bob", "stop")),
            ("@bob /help", addressed("bob", "/help")),
        ];
        for (text, expected) in table {
            assert_eq!(parse(text), expected, "{text:?}");
        }
    }

    #[test]
    fn a_name_alone_gets_the_usage() {
        assert_eq!(
            parse("@bob"),
            SmsInput::Invalid(ParseProblem::AddressedWithoutText {
                target: "bob".to_owned()
            })
        );
        assert_eq!(
            parse("@bob:  "),
            SmsInput::Invalid(ParseProblem::AddressedWithoutText {
                target: "bob".to_owned()
            })
        );
        assert_eq!(
            ParseProblem::AddressedWithoutText {
                target: "bob".to_owned()
            }
            .to_string(),
            "Usage: @NAME text"
        );
    }

    #[test]
    fn only_an_at_name_at_the_very_start_counts() {
        for text in [
            "@ bob hi",
            "@",
            "@@@ lol",
            "@: hi",
            "bob@example.net is my new address",
            "mail me at bob@example.net",
            "hi @bob",
            "https://example.org/@bob hi",
            ".@bob hi",
        ] {
            assert_eq!(parse(text), reply(text.trim()), "{text:?}");
        }
    }

    #[test]
    fn replies_are_kept_as_written() {
        for text in [
            "hi",
            "See you at 8, ok?",
            "line one\nline two",
            "Привет, как дела? 👋",
            "日本語のテキスト",
            "€5 {ok} [sure] ~tilde~ |pipe| ^caret^ back\\slash",
            "stop by later",
        ] {
            assert_eq!(parse(text), reply(text), "{text:?}");
        }
        assert_eq!(parse("  padded  "), reply("padded"));
    }

    #[test]
    fn empty_texts() {
        for text in ["", " ", "\n\t "] {
            assert_eq!(
                parse(text),
                SmsInput::Invalid(ParseProblem::Empty),
                "{text:?}"
            );
        }
        assert_eq!(
            ParseProblem::Empty.to_string(),
            "Your text was empty; nothing was sent."
        );
    }

    // ---- targeting ---------------------------------------------------------------------------

    fn conversation(peer: &str, name: Option<&str>, last_active: u64) -> Conversation {
        Conversation {
            peer: peer.to_owned(),
            name: name.map(str::to_owned),
            last_active,
        }
    }

    fn book() -> Vec<Conversation> {
        vec![
            conversation("bob.smith@example.net", Some("Bob Smith"), 10),
            conversation("bob.jones@example.org", Some("Bob Jones"), 30),
            conversation("carol@reach.example.org", None, 20),
            conversation("dave@example.net", Some("Dave"), 40),
            conversation("d@example.com", Some("Dee"), 5),
            conversation("erin@example.net", Some("Frank"), 1),
            conversation("frank@example.com", Some("Erin"), 2),
            conversation("gw.example.net", Some("Gateway"), 3),
        ]
    }

    /// The peer found for `query`, or "?" (unknown) or the peers of an ambiguous match.
    fn found(query: &str, conversations: &[Conversation]) -> String {
        match find_target(query, conversations) {
            Target::Found(c) => c.peer.clone(),
            Target::Unknown => "?".to_owned(),
            Target::Ambiguous(all) => all
                .iter()
                .map(|c| c.peer.as_str())
                .collect::<Vec<_>>()
                .join(" | "),
        }
    }

    #[test]
    fn targeting_table() {
        let book = book();
        let table = [
            // Exact bare JID, any case; a full JID counts as its bare JID; @ is optional.
            ("bob.smith@example.net", "bob.smith@example.net"),
            ("Bob.Smith@Example.NET", "bob.smith@example.net"),
            ("dave@example.net/phone", "dave@example.net"),
            ("@carol@reach.example.org", "carol@reach.example.org"),
            ("gw.example.net", "gw.example.net"),
            // Exact nickname, ignoring case and separators.
            ("dave", "dave@example.net"),
            ("bob smith", "bob.smith@example.net"),
            ("bob.jones", "bob.jones@example.org"),
            ("BobJones", "bob.jones@example.org"),
            ("bob_smith", "bob.smith@example.net"),
            ("Gateway", "gw.example.net"),
            // Exact local part (a reach handle's too).
            ("carol", "carol@reach.example.org"),
            ("d", "d@example.com"),
            // Unique prefix of a nickname or a local part.
            ("car", "carol@reach.example.org"),
            ("bob.s", "bob.smith@example.net"),
            ("bobj", "bob.jones@example.org"),
            ("gate", "gw.example.net"),
            ("de", "d@example.com"),
            // Several equally good: most recently active first.
            ("bob", "bob.jones@example.org | bob.smith@example.net"),
            ("B", "bob.jones@example.org | bob.smith@example.net"),
            ("da", "dave@example.net"),
            // Unknown.
            ("zed", "?"),
            ("", "?"),
            ("@", "?"),
            ("...", "?"),
            ("bob@example.net", "?"),
        ];
        for (query, expected) in table {
            assert_eq!(found(query, &book), expected, "{query:?}");
        }
    }

    #[test]
    fn a_nickname_beats_a_local_part_and_a_jid_beats_both() {
        let book = book();
        // erin@ is nicknamed Frank and frank@ is nicknamed Erin: the nickname wins.
        assert_eq!(found("erin", &book), "frank@example.com");
        assert_eq!(found("frank", &book), "erin@example.net");
        // "d" is d@'s local part but a prefix of Dave's and Dee's names: exact beats prefix.
        assert_eq!(found("d", &book), "d@example.com");
        // A nickname that is another peer's JID: the JID wins.
        let tricky = vec![
            conversation("alice@example.net", None, 1),
            conversation("mallory@example.net", Some("alice@example.net"), 2),
        ];
        assert_eq!(found("alice@example.net", &tricky), "alice@example.net");
    }

    #[test]
    fn same_nickname_twice_is_ambiguous() {
        let book = vec![
            conversation("bob@a.example", Some("Bob"), 1),
            conversation("bob@b.example", Some("Bob"), 2),
        ];
        assert_eq!(found("bob", &book), "bob@b.example | bob@a.example");
        assert_eq!(found("bob@a.example", &book), "bob@a.example");
        let Target::Ambiguous(matches) = find_target("bob", &book) else {
            panic!("not ambiguous");
        };
        assert_eq!(
            usage_for_ambiguous(&matches),
            "Which one? @bob@b.example @bob@a.example"
        );
    }

    #[test]
    fn most_recent_conversation() {
        assert_eq!(most_recent(&[]), None);
        let book = book();
        assert_eq!(
            most_recent(&book).map(|c| c.peer.as_str()),
            Some("dave@example.net")
        );
        let tie = vec![
            conversation("first@example.net", None, 7),
            conversation("second@example.net", None, 7),
        ];
        assert_eq!(
            most_recent(&tie).map(|c| c.peer.as_str()),
            Some("second@example.net")
        );
    }

    #[test]
    fn usage_for_ambiguous_names_each_one_distinctly() {
        let book = book();
        let Target::Ambiguous(matches) = find_target("bob", &book) else {
            panic!("not ambiguous");
        };
        assert_eq!(
            usage_for_ambiguous(&matches),
            "Which one? @bob.jones @bob.smith"
        );
        // Local parts when there is no nickname; JIDs when local parts clash.
        let book = vec![
            conversation("carol@reach.example.org", None, 3),
            conversation("carla@example.net", None, 2),
            conversation("carl@a.example", Some("Carl"), 1),
            conversation("carl@b.example", Some("Carl"), 0),
        ];
        let Target::Ambiguous(matches) = find_target("car", &book) else {
            panic!("not ambiguous");
        };
        assert_eq!(
            usage_for_ambiguous(&matches),
            "Which one? @carol @carla @carl@a.example @carl@b.example"
        );
    }

    #[test]
    fn usage_for_ambiguous_round_trips_through_parse_and_find_target() {
        let book = book();
        for query in ["bob", "b"] {
            let Target::Ambiguous(matches) = find_target(query, &book) else {
                panic!("not ambiguous: {query}");
            };
            let usage = usage_for_ambiguous(&matches);
            let names: Vec<&str> = usage
                .strip_prefix("Which one? ")
                .unwrap_or_default()
                .split(' ')
                .collect();
            assert_eq!(names.len(), matches.len());
            for (name, expected) in names.iter().zip(&matches) {
                let SmsInput::Addressed { target, .. } = parse(&format!("{name} hello")) else {
                    panic!("{name} does not parse");
                };
                assert_eq!(find_target(&target, &book), Target::Found(expected));
            }
        }
    }
}
