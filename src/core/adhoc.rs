//! Ad-hoc commands (XEP-0050) at the service `D`: the command list, and running one command.
//!
//! Commands are a table of nodes → handlers. The generic part here reads the request, checks the
//! sender is a registered user, handles `cancel`, `prev` and the session id, and turns a
//! handler's [`Outcome`] (a page to fill in, perhaps with notes, or notes saying what was done)
//! into the response. Handlers only decide; the settings they change are validated and applied by
//! `settings.rs`, which the chat commands (`commands.rs`) use too, so both doors say the same
//! sentences.
//!
//! Sessions are stateless: a command of two pages (choose, then fill in) carries what the first
//! page chose in hidden fields of the second (XEP-0004 §3.3), so the session id is only echoed
//! back and nothing is remembered between requests (several instances may serve one domain).
//! `prev` goes back to the first page. A refused value shows the same page again, with what the
//! user typed and an error note naming the field (status `executing`).
//!
//! This module must not parse XML by hand: the payloads are `xmpp::adhoc` and `xmpp::forms`.

use std::collections::BTreeMap;

use minidom::Element;
use rand::Rng;
use xmpp_parsers::ns;

use super::settings::{self, field, Draft, Invalid};
use super::{registration, Addressing, Core, Failure, Handled, Out};
use crate::core::model::{TerminalKind, User};
use crate::core::Transaction;
use crate::xmpp::adhoc::{Action, Actions, Command, Note, Status, COMMANDS};
use crate::xmpp::forms::{self, FieldSpec, FieldType, FormType};
use crate::xmpp::stanza::{an, iq_result, StanzaFault, NONE};

/// One command node: its disco name and what runs it.
pub(super) struct CommandNode {
    pub node: &'static str,
    /// The human-readable name in the command list.
    pub name: &'static str,
    /// Whether it may show a second page (so `prev` and `next` mean something).
    pages: Pages,
    run: Handler,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pages {
    One,
    Two,
}

/// A command's logic: given the stage the requester is at, what to show or what was done.
type Handler = fn(&mut Context<'_>, Stage<'_>, &mut Out) -> Result<Outcome, Failure>;

/// The commands at `D`, in the order clients list them.
pub(super) const NODES: &[CommandNode] = &[
    CommandNode {
        node: "terminals",
        name: "Terminals (list, add, remove, primary)",
        pages: Pages::Two,
        run: terminals,
    },
    CommandNode {
        node: "verify",
        name: "Verify a terminal",
        pages: Pages::One,
        run: verify,
    },
    CommandNode {
        node: "preferences",
        name: "Preferences",
        pages: Pages::Two,
        run: preferences,
    },
    CommandNode {
        node: "state",
        name: "Set a terminal's state",
        pages: Pages::One,
        run: state,
    },
    CommandNode {
        node: "status",
        name: "Status",
        pages: Pages::One,
        run: status,
    },
];

/// The command on `node`, if there is one.
pub(super) fn find(node: &str) -> Option<&'static CommandNode> {
    NODES.iter().find(|c| c.node == node)
}

/// What a handler works with.
struct Context<'a> {
    core: &'a Core,
    store: &'a mut dyn Transaction,
    now: u64,
    user: &'a User,
}

/// Where the requester is in a command.
enum Stage<'a> {
    /// Just executed: show the form (or say at once that there is nothing to do).
    Start,
    /// Submitted the form with these values.
    Submit(&'a BTreeMap<String, Vec<String>>),
}

/// What a handler decided.
enum Outcome {
    /// A page to fill in, with notes (e.g. why the last submission was refused).
    Form {
        page: Page,
        form: Element,
        notes: Vec<Note>,
    },
    /// The command is over; these notes say how it went.
    Completed(Vec<Note>),
}

/// Where a page stands among the command's pages: what the requester may do with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Page {
    /// The only page: complete it.
    Only,
    /// A first page: go on to the next.
    First,
    /// The second page: complete it, or go back.
    Last,
}

impl Page {
    fn actions(self) -> Actions {
        match self {
            Page::Only => Actions {
                execute: Some(Action::Complete),
                allowed: vec![Action::Complete],
            },
            Page::First => Actions {
                execute: Some(Action::Next),
                allowed: vec![Action::Next],
            },
            Page::Last => Actions {
                execute: Some(Action::Complete),
                allowed: vec![Action::Prev, Action::Complete],
            },
        }
    }
}

/// A page with no notes.
fn page(page: Page, form: Element) -> Outcome {
    Outcome::Form {
        page,
        form,
        notes: Vec::new(),
    }
}

/// A page shown again because these values were refused.
fn refused(page: Page, form: Element, refused: Vec<Invalid>) -> Outcome {
    Outcome::Form {
        page,
        form,
        notes: refused.iter().map(|e| Note::error(e.to_string())).collect(),
    }
}

/// The disco#items answer at node `COMMANDS`: every command, as an item of `service`.
pub(super) fn command_items(service: &str) -> Element {
    let mut query = Element::builder("query", ns::DISCO_ITEMS).build();
    query.set_attr(NONE, an("node"), COMMANDS);
    for command in NODES {
        query.append_child(
            Element::builder("item", ns::DISCO_ITEMS)
                .attr(an("jid"), service)
                .attr(an("node"), command.node)
                .attr(an("name"), command.name)
                .build(),
        );
    }
    query
}

/// An iq set with a `<command/>` payload at `D`.
pub(super) fn on_command(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    iq: &Element,
    payload: &Element,
    who: &Addressing,
    out: &mut Out,
) -> Handled {
    let request =
        Command::try_from(payload).map_err(|e| StanzaFault::bad_request(e.to_string()))?;
    let Some(command) = find(&request.node) else {
        return Err(StanzaFault::item_not_found(format!(
            "there is no command '{}' here",
            request.node
        ))
        .into());
    };
    let Some(user) = store.user(&who.from_bare)? else {
        return Err(registration::registration_required().into());
    };
    let sessionid = request
        .sessionid
        .clone()
        .unwrap_or_else(|| new_sessionid(core));
    let mut response = Command {
        sessionid: Some(sessionid),
        ..Command::new(command.node)
    };

    let action = request.action.unwrap_or(Action::Execute);
    let form = request.form.as_ref().map(|x| (forms::form_type(x), x));
    if action == Action::Cancel || matches!(form, Some((Some(FormType::Cancel), _))) {
        response.status = Some(Status::Canceled);
        out.send(iq_result(iq, Some(response.into())));
        return Ok(());
    }
    let values = match form {
        None => None,
        Some((Some(FormType::Submit), x)) => Some(forms::form_values(x)),
        Some(_) => {
            return Err(StanzaFault::bad_request(
                "the command carries a data form that is not a submitted one (type='submit')",
            )
            .into())
        }
    };
    let stage = match (action, &values) {
        (Action::Prev | Action::Next, _) if command.pages == Pages::One => {
            return Err(StanzaFault::bad_request(format!(
                "'{}' has a single page: use complete or cancel",
                command.node
            ))
            .into())
        }
        // Back to the first page (there are at most two).
        (Action::Prev, _) => Stage::Start,
        (_, Some(values)) => Stage::Submit(values),
        (Action::Complete | Action::Next, None) => {
            return Err(StanzaFault::bad_request(format!(
                "{} needs the filled-in form",
                action.as_str()
            ))
            .into())
        }
        // Execute without a form: (re)start, keeping the requester's session id if any.
        (_, None) => Stage::Start,
    };

    let mut context = Context {
        core,
        store,
        now,
        user: &user,
    };
    match (command.run)(&mut context, stage, out)? {
        Outcome::Form { page, form, notes } => {
            response.status = Some(Status::Executing);
            response.actions = Some(page.actions());
            response.notes = notes;
            response.form = Some(form);
        }
        Outcome::Completed(notes) => {
            response.status = Some(Status::Completed);
            response.notes = notes;
        }
    }
    out.send(iq_result(iq, Some(response.into())));
    Ok(())
}

/// A fresh session id: 64 random bits in hex.
fn new_sessionid(core: &Core) -> String {
    format!("{:016x}", core.rng().gen::<u64>())
}

/// `verify`: enter the code Reach sent to a terminal not verified yet (email or phone); an empty
/// code asks for new ones. The codes are checked by the same functions as `verify CODE` in the
/// chat, so both doors say the same sentences.
fn verify(r: &mut Context<'_>, stage: Stage<'_>, out: &mut Out) -> Result<Outcome, Failure> {
    let user = r.user;
    if user.email.is_none() && user.phone.is_none() {
        return Ok(done(Note::info(
            "There is nothing to verify: you have registered no email address or phone number.",
        )));
    }
    let waiting = waiting_terminals(user);
    if waiting.is_empty() {
        return Ok(done(Note::info("All your terminals are verified.")));
    }
    match stage {
        Stage::Start => {
            let mut instructions = String::new();
            for (kind, address) in &waiting {
                let live = r
                    .store
                    .verification(&user.jid, *kind)?
                    .is_some_and(|v| v.expires_at >= r.now && v.address == *address);
                if live {
                    continue;
                }
                // No code to type (expired, tries used up): send one, since the user came for it.
                let sent = match kind {
                    TerminalKind::Email => {
                        super::email::start_verification(r.core, r.store, r.now, user, out)?
                    }
                    TerminalKind::Phone => {
                        super::sms::start_verification(r.core, r.store, r.now, user, out)?
                    }
                };
                // A cap on codes may have refused it: then say why.
                if let Some(sent) = sent {
                    if r.store
                        .verification(&user.jid, *kind)?
                        .is_some_and(|v| v.expires_at >= r.now && v.address == *address)
                    {
                        instructions.push_str(&format!("A new code is on its way to {address}.\n"));
                    } else {
                        instructions.push_str(&format!("{sent}\n"));
                    }
                }
            }
            let names: Vec<String> = waiting
                .iter()
                .map(|(kind, address)| match kind {
                    TerminalKind::Email => format!("your email address {address}"),
                    TerminalKind::Phone => format!("your phone {address}"),
                })
                .collect();
            instructions.push_str(&format!(
                "Enter the 6-digit code Reach sent to {}.\n\
                 Codes are valid for {} minutes: if yours has expired, run this command again \
                 for a new one.",
                names.join(" or to "),
                super::email::CODE_VALIDITY_SECS / 60
            ));
            Ok(page(
                Page::Only,
                forms::form(
                    FormType::Form,
                    Some("Verify a terminal"),
                    Some(&instructions),
                    &[FieldSpec::new("code", FieldType::TextSingle)
                        .label("Verification code")
                        .required()],
                ),
            ))
        }
        Stage::Submit(values) => {
            let code = forms::first_value(values, "code").trim();
            if code.is_empty() {
                let said = super::commands::resend_codes(r.core, r.store, r.now, user, out)?;
                return Ok(done(Note::info(said)));
            }
            let said = super::commands::verify_any(r.core, r.store, r.now, user, code, out)?;
            let still_waiting = match r.store.user(&user.jid)? {
                Some(now_user) => waiting_terminals(&now_user).len(),
                None => 0,
            };
            Ok(done(if still_waiting < waiting.len() {
                Note::info(said)
            } else {
                Note::error(said)
            }))
        }
    }
}

/// The user's terminals not verified yet, with their addresses.
fn waiting_terminals(user: &User) -> Vec<(TerminalKind, String)> {
    let email = user
        .email
        .as_ref()
        .filter(|t| !t.verified)
        .map(|t| (TerminalKind::Email, t.address.as_str().to_owned()));
    let phone = user
        .phone
        .as_ref()
        .filter(|t| !t.verified)
        .map(|t| (TerminalKind::Phone, t.address.as_str().to_owned()));
    email.into_iter().chain(phone).collect()
}

fn done(note: Note) -> Outcome {
    Outcome::Completed(vec![note])
}

/// The hidden field saying which second page a submission comes from.
const PAGE: &str = "page";
/// The field naming a terminal (`email` or `phone`).
const TERMINAL: &str = "terminal";

/// The terminal a form suggests: the primary one, else the first.
fn default_kind(user: &User) -> Option<TerminalKind> {
    let kinds: Vec<TerminalKind> = settings::terminals(user).iter().map(|t| t.kind).collect();
    user.primary
        .filter(|p| kinds.contains(p))
        .or(kinds.first().copied())
}

/// A list-single field choosing one of the user's terminals.
fn terminal_field(user: &User, chosen: &str) -> FieldSpec {
    let mut spec = FieldSpec::new(TERMINAL, FieldType::ListSingle)
        .label("Terminal")
        .required()
        .value(chosen);
    for t in settings::terminals(user) {
        let label = match t.kind {
            TerminalKind::Email => format!("Email {}", t.address),
            TerminalKind::Phone => format!("Phone {}", t.address),
        };
        spec = spec.option(label, settings::kind_word(t.kind));
    }
    spec
}

fn list_single(var: &str, label: &str, value: &str, choices: &[(&str, &str)]) -> FieldSpec {
    choices.iter().fold(
        FieldSpec::new(var, FieldType::ListSingle)
            .label(label)
            .required()
            .value(value),
        |spec, (value, label)| spec.option(*label, *value),
    )
}

// ---- terminals ----

/// `terminals`: first the action (list, add, remove, primary), then what it needs.
fn terminals(r: &mut Context<'_>, stage: Stage<'_>, out: &mut Out) -> Result<Outcome, Failure> {
    let user = r.user;
    let Stage::Submit(values) = stage else {
        return Ok(page(Page::First, terminals_first_page(user, "list")));
    };
    let chosen = forms::first_value(values, TERMINAL);
    match forms::first_value(values, PAGE) {
        "add" => {
            let kind = forms::first_value(values, "kind");
            let address = forms::first_value(values, "address");
            let decision = match settings::parse_kind(kind) {
                Err(e) => Err(vec![e]),
                Ok(kind) => {
                    settings::add_terminal(r.core, r.store, r.now, user, kind, address, out)?
                }
            };
            Ok(match decision {
                Ok(said) => done(Note::info(said)),
                Err(e) => refused(Page::Last, add_page(r.core, kind, address), e),
            })
        }
        action @ ("remove" | "primary") => {
            let decision = match settings::parse_kind(chosen) {
                Err(e) => Err(vec![e]),
                Ok(kind) if action == "remove" => {
                    settings::remove_terminal(r.core, r.store, r.now, user, kind, out)?
                }
                Ok(kind) => settings::set_primary(r.store, user, kind)?,
            };
            Ok(match decision {
                Ok(said) => done(Note::info(said)),
                Err(e) => refused(Page::Last, choose_page(user, action, chosen), e),
            })
        }
        // The first page.
        _ => {
            let action = forms::first_value(values, "action").trim();
            let first_again = |problem: &str| {
                refused(
                    Page::First,
                    terminals_first_page(user, action),
                    vec![Invalid::new(field::ACTION, problem)],
                )
            };
            let suggested = default_kind(user).map_or("", settings::kind_word);
            Ok(match action {
                "list" => done(Note::info(settings::terminals_text(user))),
                "add" => match settings::offered_kinds(r.core).first() {
                    None => first_again("this service forwards to no email or phone"),
                    Some(kind) => {
                        // Suggest the kind the user does not have yet.
                        let kinds = settings::offered_kinds(r.core);
                        let missing = kinds
                            .iter()
                            .find(|k| settings::terminal(user, **k).is_none())
                            .unwrap_or(kind);
                        page(
                            Page::Last,
                            add_page(r.core, settings::kind_word(*missing), ""),
                        )
                    }
                },
                "remove" | "primary" if settings::terminals(user).is_empty() => {
                    first_again("you have no terminal yet: add one first")
                }
                "remove" | "primary" => page(Page::Last, choose_page(user, action, suggested)),
                other => first_again(&format!(
                    "'{other}' is not one of list, add, remove, primary"
                )),
            })
        }
    }
}

fn terminals_first_page(user: &User, action: &str) -> Element {
    forms::form(
        FormType::Form,
        Some("Terminals"),
        Some(&format!(
            "Your terminals:\n{}\nChoose what to do.",
            settings::terminals_text(user)
        )),
        &[FieldSpec::new("action", FieldType::ListSingle)
            .label("Action")
            .required()
            .value(action)
            .option("List my terminals", "list")
            .option("Add (or replace) a terminal", "add")
            .option("Remove a terminal", "remove")
            .option("Make a terminal primary", "primary")],
    )
}

fn add_page(core: &Core, kind: &str, address: &str) -> Element {
    let mut kinds = FieldSpec::new("kind", FieldType::ListSingle)
        .label("Kind")
        .required()
        .value(kind);
    for offered in settings::offered_kinds(core) {
        kinds = match offered {
            TerminalKind::Email => kinds.option("Email address", "email"),
            TerminalKind::Phone => kinds.option("Phone (SMS)", "phone"),
        };
    }
    forms::form(
        FormType::Form,
        Some("Add a terminal"),
        Some(
            "Reach sends the new terminal a code: confirm it with the Verify command.\n\
             A terminal of a kind you already have is replaced (its preferences are kept).",
        ),
        &[
            FieldSpec::hidden(PAGE, "add"),
            kinds,
            FieldSpec::new("address", FieldType::TextSingle)
                .label("Email address or phone number")
                .desc("A phone number in international form, like +15551234567.")
                .required()
                .value(address),
        ],
    )
}

fn choose_page(user: &User, action: &str, chosen: &str) -> Element {
    let (title, instructions) = if action == "remove" {
        (
            "Remove a terminal",
            "Reach forwards nothing to a removed terminal.",
        )
    } else {
        (
            "Primary terminal",
            "The primary terminal takes forwards first when several may.",
        )
    };
    forms::form(
        FormType::Form,
        Some(title),
        Some(instructions),
        &[
            FieldSpec::hidden(PAGE, action),
            terminal_field(user, chosen),
        ],
    )
}

// ---- preferences ----

/// The fields of the preferences form.
mod var {
    pub const WHEN: &str = "when";
    pub const GRACE: &str = "grace";
    pub const SENDERS: &str = "senders";
    pub const SENDER_LIST: &str = "senders_list";
    pub const QUIET_START: &str = "quiet_start";
    pub const QUIET_END: &str = "quiet_end";
    pub const QUIET_ACTION: &str = "quiet_action";
    pub const TIME_ZONE: &str = "time_zone";
    pub const SUBSCRIPTIONS: &str = "forward_subscriptions";
    pub const ALERTS: &str = "alerts";
    pub const DAILY_CAP: &str = "daily_cap";
    pub const POLICY: &str = "subscription_policy";
    pub const ADDRESS: &str = "address";
}

/// `preferences`: with two terminals, first which one; then its preferences and the account's
/// time zone and subscription policy, filled in with the current values.
fn preferences(r: &mut Context<'_>, stage: Stage<'_>, out: &mut Out) -> Result<Outcome, Failure> {
    let user = r.user;
    let kinds: Vec<TerminalKind> = settings::terminals(user).iter().map(|t| t.kind).collect();
    // With one terminal (or none) there is nothing to choose: the form is the only page.
    let form_page = if kinds.len() > 1 {
        Page::Last
    } else {
        Page::Only
    };
    let chosen = default_kind(user);
    let suggested = chosen.map_or("", settings::kind_word);
    let form_of = |kind: Option<TerminalKind>, draft: Draft| {
        preferences_form(r.core, user, kind, &draft.over(Draft::current(user, kind)))
    };
    let values = match stage {
        Stage::Start if form_page == Page::Last => {
            return Ok(page(Page::First, choose_preferences_page(user, suggested)))
        }
        Stage::Start => return Ok(page(Page::Only, form_of(chosen, Draft::default()))),
        Stage::Submit(values) => values,
    };
    let terminal = forms::first_value(values, TERMINAL).trim();
    if forms::first_value(values, PAGE) != "preferences" {
        // The first page: which terminal.
        let kind =
            settings::parse_kind(terminal).and_then(|kind| match settings::terminal(user, kind) {
                Some(_) => Ok(kind),
                None => Err(settings::no_terminal(kind)),
            });
        return Ok(match kind {
            Ok(kind) => page(form_page, form_of(Some(kind), Draft::default())),
            Err(e) => refused(
                Page::First,
                choose_preferences_page(user, terminal),
                vec![e],
            ),
        });
    }
    let kind = match terminal {
        "" => None,
        text => match settings::parse_kind(text) {
            Ok(kind) => Some(kind),
            Err(e) => return Ok(Outcome::Completed(vec![Note::error(e.to_string())])),
        },
    };
    let draft = draft_from(values);
    Ok(
        match settings::save_preferences(r.core, r.store, r.now, user, kind, &draft, out)? {
            Ok(said) => done(Note::info(said)),
            Err(e) => refused(form_page, form_of(kind, draft), e),
        },
    )
}

fn choose_preferences_page(user: &User, chosen: &str) -> Element {
    forms::form(
        FormType::Form,
        Some("Preferences"),
        Some("Choose the terminal whose preferences you want to see or change."),
        &[terminal_field(user, chosen)],
    )
}

/// What the preferences form submitted, field by field; a field left out changes nothing.
fn draft_from(values: &std::collections::BTreeMap<String, Vec<String>>) -> Draft {
    let one = |var: &str| {
        values
            .get(var)
            .map(|v| v.first().cloned().unwrap_or_default())
    };
    let many = |var: &str| values.get(var).cloned();
    Draft {
        when: one(var::WHEN),
        grace: one(var::GRACE),
        senders: one(var::SENDERS),
        sender_list: many(var::SENDER_LIST),
        quiet_start: one(var::QUIET_START),
        quiet_end: one(var::QUIET_END),
        quiet_action: one(var::QUIET_ACTION),
        time_zone: one(var::TIME_ZONE),
        forward_subscriptions: one(var::SUBSCRIPTIONS),
        alerts: many(var::ALERTS),
        daily_cap: one(var::DAILY_CAP),
        policy: one(var::POLICY),
        address: one(var::ADDRESS),
    }
}

/// The preferences form, filled in with `draft` (the current values, or what the user typed).
fn preferences_form(
    core: &Core,
    user: &User,
    kind: Option<TerminalKind>,
    draft: &Draft,
) -> Element {
    let text = |v: &Option<String>| v.clone().unwrap_or_default();
    let list = |v: &Option<Vec<String>>| v.clone().unwrap_or_default();
    let view = kind.and_then(|kind| settings::terminal(user, kind));
    // Only a terminal the user has: one removed meanwhile leaves the account's fields.
    let mut fields = vec![
        FieldSpec::hidden(PAGE, "preferences"),
        FieldSpec::hidden(
            TERMINAL,
            view.as_ref().map_or("", |t| settings::kind_word(t.kind)),
        ),
    ];
    let instructions = match view {
        None => "You have no email or phone terminal yet: add one with the Terminals command.\n\
                 These settings are for your whole account."
            .to_owned(),
        Some(t) => {
            let service_cap = match (t.kind, &core.settings.sms) {
                (TerminalKind::Phone, Some(sms)) => format!("{} SMS", sms.daily_cap),
                _ => "no limit".to_owned(),
            };
            let quiet_actions: &[(&str, &str)] = match t.kind {
                // The email terminal cannot send itself its messages by email.
                TerminalKind::Email => &settings::QUIET_ACTION_CHOICES[..1],
                TerminalKind::Phone => settings::QUIET_ACTION_CHOICES,
            };
            fields.extend([
                list_single(
                    var::WHEN,
                    "Forward messages here",
                    &text(&draft.when),
                    settings::WHEN_CHOICES,
                ),
                FieldSpec::new(var::GRACE, FieldType::TextSingle)
                    .label("Grace delay (seconds)")
                    .desc(format!(
                        "How long an away XMPP client has to read a message before it is \
                         forwarded. Empty: the service's default ({} s).",
                        core.settings.grace_delay_secs
                    ))
                    .value(text(&draft.grace)),
                list_single(
                    var::SENDERS,
                    "Forward messages from",
                    &text(&draft.senders),
                    settings::SENDER_CHOICES,
                ),
                FieldSpec::new(var::SENDER_LIST, FieldType::JidMulti)
                    .label("Only these JIDs")
                    .desc("Used when messages are forwarded only from listed JIDs.")
                    .values(list(&draft.sender_list)),
                FieldSpec::new(var::QUIET_START, FieldType::TextSingle)
                    .label("Quiet hours start (HH:MM)")
                    .desc("In your time zone. Leave start and end empty for no quiet hours.")
                    .value(text(&draft.quiet_start)),
                FieldSpec::new(var::QUIET_END, FieldType::TextSingle)
                    .label("Quiet hours end (HH:MM)")
                    .value(text(&draft.quiet_end)),
                list_single(
                    var::QUIET_ACTION,
                    "During quiet hours",
                    &text(&draft.quiet_action),
                    quiet_actions,
                ),
                FieldSpec::new(var::SUBSCRIPTIONS, FieldType::Boolean)
                    .label("Forward subscription requests here")
                    .desc("When your subscription policy is to ask you.")
                    .value(text(&draft.forward_subscriptions)),
                FieldSpec::new(var::ALERTS, FieldType::JidMulti)
                    .label("Buddy alerts")
                    .desc("Tell me here when these buddies come online or go offline.")
                    .values(list(&draft.alerts)),
                FieldSpec::new(var::DAILY_CAP, FieldType::TextSingle)
                    .label("Most forwards a day")
                    .desc(format!("Empty: the service's default ({service_cap})."))
                    .value(text(&draft.daily_cap)),
            ]);
            match t.kind {
                TerminalKind::Email => format!("Preferences of your email address {}.", t.address),
                TerminalKind::Phone => format!("Preferences of your phone {}.", t.address),
            }
        }
    };
    fields.extend([
        FieldSpec::new(var::TIME_ZONE, FieldType::TextSingle)
            .label("Time zone")
            .desc("An IANA name like Europe/Berlin, for quiet hours. Empty: UTC. For your whole account.")
            .value(text(&draft.time_zone)),
        list_single(
            var::POLICY,
            "Who may subscribe to your reach address",
            &text(&draft.policy),
            settings::POLICY_CHOICES,
        ),
    ]);
    // Only where the user's server copies its users' messages to Reach (integrated mode).
    let host = user.jid.rsplit_once('@').map_or("", |(_, h)| h);
    if core.settings.integrated_hosts.iter().any(|h| h == host) {
        fields.push(list_single(
            var::ADDRESS,
            "Buddies reach me",
            &text(&draft.address),
            settings::ADDRESS_CHOICES,
        ));
    }
    forms::form(
        FormType::Form,
        Some("Preferences"),
        Some(&instructions),
        &fields,
    )
}

// ---- state and status ----

/// `state`: set one terminal's local state (what `/away`, `/back`, `/dnd` do from the phone).
fn state(r: &mut Context<'_>, stage: Stage<'_>, out: &mut Out) -> Result<Outcome, Failure> {
    let user = r.user;
    let Some(chosen) = default_kind(user) else {
        return Ok(done(Note::info(
            "You have no email or phone terminal: add one with the Terminals command.",
        )));
    };
    let Stage::Submit(values) = stage else {
        let state = settings::terminal(user, chosen).map_or(Default::default(), |t| t.state);
        return Ok(page(
            Page::Only,
            state_form(
                user,
                settings::kind_word(chosen),
                settings::state_word(state),
            ),
        ));
    };
    let terminal = forms::first_value(values, TERMINAL);
    let state = forms::first_value(values, "state");
    let mut errors = Vec::new();
    let kind = settings::parse_kind(terminal)
        .map_err(|e| errors.push(e))
        .ok();
    let new_state = settings::parse_state(state)
        .map_err(|e| errors.push(e))
        .ok();
    let decision = match (kind, new_state) {
        (Some(kind), Some(new_state)) => {
            settings::set_state(r.core, r.store, r.now, user, kind, new_state, out)?
        }
        _ => Err(errors),
    };
    Ok(match decision {
        Ok(said) => done(Note::info(said)),
        Err(e) => refused(Page::Only, state_form(user, terminal, state), e),
    })
}

fn state_form(user: &User, terminal: &str, state: &str) -> Element {
    forms::form(
        FormType::Form,
        Some("Set a terminal's state"),
        Some(&format!(
            "{}\nReach forwards nothing to a terminal on do not disturb.",
            settings::terminals_text(user)
        )),
        &[
            terminal_field(user, terminal),
            FieldSpec::new("state", FieldType::ListSingle)
                .label("State")
                .required()
                .value(state)
                .option("Available", "available")
                .option("Away", "away")
                .option("Do not disturb", "dnd"),
        ],
    )
}

/// `status`: everything at once, in words.
fn status(r: &mut Context<'_>, _stage: Stage<'_>, _out: &mut Out) -> Result<Outcome, Failure> {
    Ok(done(Note::info(settings::status_text(
        r.core, r.store, r.user,
    )?)))
}

#[cfg(test)]
mod tests {
    #[allow(unused_imports)]
    use crate::core::Transaction;
    use minidom::Element;
    use xmpp_parsers::ns;

    use crate::core::model::{Terminal, TerminalKind};
    use crate::core::testing::*;
    use crate::xmpp::adhoc::{Action, Command, NoteType, Status, COMMANDS};
    use crate::xmpp::stanza::STANZA_NS;

    const ALICE: &str = "alice@example.org";
    const ALICE_MAIL: &str = "alice@mail.example.org";

    fn command(t: &Harness, from: &str, attrs: &str, inner: &str) -> Element {
        t.one(&format!(
            "<iq type='set' id='c1' from='{from}/pc' to='{D}'><command xmlns='{COMMANDS}' {attrs}>{inner}</command></iq>"
        ))
    }

    /// The `<command/>` of a result, read back with the payload parser.
    fn response(reply: &Element) -> Command {
        assert_eq!(
            reply.attr("type"),
            Some("result"),
            "{}",
            String::from(reply)
        );
        assert_eq!(reply.attr("id"), Some("c1"));
        Command::try_from(reply.get_child("command", COMMANDS).expect("a <command/>")).unwrap()
    }

    fn submit(code: &str) -> String {
        format!(
            "<x xmlns='{}' type='submit'><field var='code'><value>{code}</value></field></x>",
            ns::DATA_FORMS
        )
    }

    fn alice_with_email(t: &Harness) -> String {
        t.run(&register_form(ALICE, "alice", ALICE_MAIL, ""));
        code(t)
    }

    fn code(t: &Harness) -> String {
        t.store
            .tx()
            .verification(ALICE, TerminalKind::Email)
            .unwrap()
            .expect("a pending verification")
            .code
    }

    fn verified(t: &Harness) -> bool {
        t.store
            .tx()
            .user(ALICE)
            .unwrap()
            .unwrap()
            .email
            .unwrap()
            .verified
    }

    fn only_note(c: &Command) -> (NoteType, &str) {
        assert_eq!(c.notes.len(), 1, "{c:?}");
        (c.notes[0].type_, c.notes[0].text.as_str())
    }

    #[test]
    fn the_command_list_and_the_verify_node_are_discoverable() {
        let t = Harness::new();
        let reply = t.one(&format!(
            "<iq type='get' id='i' from='bob@example.net/x' to='{D}'><query xmlns='{}' node='{COMMANDS}'/></iq>",
            ns::DISCO_ITEMS
        ));
        let query = reply.get_child("query", ns::DISCO_ITEMS).unwrap();
        assert_eq!(query.attr("node"), Some(COMMANDS));
        let items: Vec<_> = query
            .children()
            .map(|i| {
                format!(
                    "{}|{}|{}",
                    i.attr("jid").unwrap(),
                    i.attr("node").unwrap(),
                    i.attr("name").unwrap()
                )
            })
            .collect();
        assert_eq!(
            items,
            vec![
                format!("{D}|terminals|Terminals (list, add, remove, primary)"),
                format!("{D}|verify|Verify a terminal"),
                format!("{D}|preferences|Preferences"),
                format!("{D}|state|Set a terminal's state"),
                format!("{D}|status|Status"),
            ]
        );

        let reply = t.one(&format!(
            "<iq type='get' id='i' from='bob@example.net/x' to='{D}'><query xmlns='{}' node='verify'/></iq>",
            ns::DISCO_INFO
        ));
        let query = reply.get_child("query", ns::DISCO_INFO).unwrap();
        assert_eq!(query.attr("node"), Some("verify"));
        let identity = query.get_child("identity", ns::DISCO_INFO).unwrap();
        assert_eq!(
            (identity.attr("category"), identity.attr("type")),
            (Some("automation"), Some("command-node"))
        );
        let features: Vec<_> = query.children().filter_map(|c| c.attr("var")).collect();
        assert_eq!(features, vec![COMMANDS, ns::DATA_FORMS]);

        // The list itself has an identity, and a command node has no items.
        let reply = t.one(&format!(
            "<iq type='get' id='i' from='bob@example.net/x' to='{D}'><query xmlns='{}' node='{COMMANDS}'/></iq>",
            ns::DISCO_INFO
        ));
        let query = reply.get_child("query", ns::DISCO_INFO).unwrap();
        let identity = query.get_child("identity", ns::DISCO_INFO).unwrap();
        assert_eq!(identity.attr("type"), Some("command-list"));
        let reply = t.one(&format!(
            "<iq type='get' id='i' from='bob@example.net/x' to='{D}'><query xmlns='{}' node='verify'/></iq>",
            ns::DISCO_ITEMS
        ));
        let query = reply.get_child("query", ns::DISCO_ITEMS).unwrap();
        assert_eq!(query.attr("node"), Some("verify"));
        assert_eq!(query.children().count(), 0);

        for q in [ns::DISCO_INFO, ns::DISCO_ITEMS] {
            let reply = t.one(&format!(
                "<iq type='get' id='i' from='bob@example.net/x' to='{D}'><query xmlns='{q}' node='nope'/></iq>"
            ));
            assert_error(&reply, "item-not-found");
        }
    }

    #[test]
    fn execute_shows_a_form_naming_the_address_waiting_for_its_code() {
        let t = Harness::new();
        alice_with_email(&t);
        for attrs in ["node='verify' action='execute'", "node='verify'"] {
            let c = response(&command(&t, ALICE, attrs, ""));
            assert_eq!(c.node, "verify");
            assert_eq!(c.status, Some(Status::Executing));
            assert_eq!(c.sessionid.as_ref().map(String::len), Some(16));
            let actions = c.actions.as_ref().unwrap();
            assert_eq!(actions.execute, Some(Action::Complete));
            assert_eq!(actions.allowed, vec![Action::Complete]);
            let form = c.form.as_ref().unwrap();
            assert_eq!(form.attr("type"), Some("form"));
            let instructions = form.get_child("instructions", ns::DATA_FORMS).unwrap();
            assert!(
                instructions.text().contains(ALICE_MAIL),
                "{}",
                instructions.text()
            );
            let field = form.get_child("field", ns::DATA_FORMS).unwrap();
            assert_eq!(field.attr("var"), Some("code"));
            assert_eq!(field.attr("type"), Some("text-single"));
            assert!(field.has_child("required", ns::DATA_FORMS));
        }
        // Two executions, two sessions.
        let a = response(&command(&t, ALICE, "node='verify'", "")).sessionid;
        let b = response(&command(&t, ALICE, "node='verify'", "")).sessionid;
        assert_ne!(a, b);
    }

    #[test]
    fn the_right_code_completes_and_verifies() {
        let t = Harness::new();
        let code = alice_with_email(&t);
        let start = response(&command(&t, ALICE, "node='verify'", ""));
        let sid = start.sessionid.unwrap();
        let c = response(&command(
            &t,
            ALICE,
            &format!("node='verify' sessionid='{sid}' action='complete'"),
            &submit(&code),
        ));
        assert_eq!(c.status, Some(Status::Completed));
        assert_eq!(c.sessionid.as_deref(), Some(sid.as_str()));
        assert!(c.form.is_none() && c.actions.is_none());
        let (type_, text) = only_note(&c);
        assert_eq!(type_, NoteType::Info);
        assert!(text.contains("is verified"), "{text}");
        assert!(verified(&t));
        // Nothing waits any more.
        let c = response(&command(&t, ALICE, "node='verify'", ""));
        assert_eq!(c.status, Some(Status::Completed));
        assert_eq!(
            only_note(&c),
            (NoteType::Info, "All your terminals are verified.")
        );
    }

    #[test]
    fn a_wrong_code_is_an_error_note_and_verifies_nothing() {
        let t = Harness::new();
        let code = alice_with_email(&t);
        let wrong = if code == "000000" { "111111" } else { "000000" };
        // Submitted with execute (the default action) works too.
        let c = response(&command(
            &t,
            ALICE,
            "node='verify' sessionid='s1' action='execute'",
            &submit(wrong),
        ));
        assert_eq!(c.status, Some(Status::Completed));
        assert_eq!(
            only_note(&c),
            (NoteType::Error, "That code is wrong (4 tries left).")
        );
        assert!(!verified(&t));
        assert_eq!(code, self::code(&t), "the same code still works");
    }

    #[test]
    fn an_empty_code_sends_a_new_one() {
        let t = Harness::new();
        let first = alice_with_email(&t);
        let actions = t.actions(crate::core::Event::Stanza(
            format!(
                "<iq xmlns='{STANZA_NS}' type='set' id='c1' from='{ALICE}/pc' to='{D}'>\
                 <command xmlns='{COMMANDS}' node='verify' sessionid='s1'>{}</command></iq>",
                submit("")
            )
            .parse()
            .unwrap(),
        ));
        let mails = actions
            .iter()
            .filter(|a| matches!(a, crate::core::Action::SendEmail(_)))
            .count();
        assert_eq!(mails, 1);
        let reply = actions
            .into_iter()
            .find_map(|a| match a {
                crate::core::Action::SendStanza(s) => Some(s),
                _ => None,
            })
            .unwrap();
        let c = response(&reply);
        let (type_, text) = only_note(&c);
        assert_eq!(type_, NoteType::Info);
        assert!(
            text.starts_with("A verification code is on its way to"),
            "{text}"
        );
        assert_ne!(code(&t), first, "a fresh code");
    }

    #[test]
    fn executing_after_the_code_expired_sends_a_new_one() {
        let t = Harness::new();
        let first = alice_with_email(&t);
        t.advance(crate::core::email::CODE_VALIDITY_SECS + 1);
        let c = response(&command(&t, ALICE, "node='verify'", ""));
        let form = c.form.unwrap();
        let instructions: Vec<_> = form
            .children()
            .filter(|c| c.is("instructions", ns::DATA_FORMS))
            .map(|c| c.text())
            .collect();
        assert_eq!(
            instructions[0],
            format!("A new code is on its way to {ALICE_MAIL}.")
        );
        assert_ne!(code(&t), first);
    }

    #[test]
    fn a_phone_waiting_for_its_code_is_verified_the_same_way() {
        let t = Harness::new();
        t.run(&register_form(ALICE, "alice", ALICE_MAIL, "+15551234567"));
        let phone_code = t
            .store
            .tx()
            .verification(ALICE, TerminalKind::Phone)
            .unwrap()
            .expect("a pending phone verification")
            .code;
        let c = response(&command(&t, ALICE, "node='verify'", ""));
        let first_line = c
            .form
            .unwrap()
            .get_child("instructions", ns::DATA_FORMS)
            .unwrap()
            .text();
        assert_eq!(
            first_line,
            format!(
                "Enter the 6-digit code Reach sent to your email address {ALICE_MAIL} \
                 or to your phone +15551234567."
            )
        );
        let c = response(&command(
            &t,
            ALICE,
            "node='verify' sessionid='s1' action='complete'",
            &submit(&phone_code),
        ));
        let (type_, text) = only_note(&c);
        assert_eq!(type_, NoteType::Info, "{text}");
        let user = t.store.tx().user(ALICE).unwrap().unwrap();
        assert!(user.phone.unwrap().verified);
        assert!(!user.email.unwrap().verified);
        // Only the email address waits now.
        let c = response(&command(&t, ALICE, "node='verify'", ""));
        let first_line = c
            .form
            .unwrap()
            .get_child("instructions", ns::DATA_FORMS)
            .unwrap()
            .text();
        assert!(!first_line.contains("phone"), "{first_line}");
        assert!(first_line.contains(ALICE_MAIL), "{first_line}");
    }

    #[test]
    fn cancel_ends_the_session() {
        let t = Harness::new();
        alice_with_email(&t);
        let c = response(&command(
            &t,
            ALICE,
            "node='verify' sessionid='s1' action='cancel'",
            "",
        ));
        assert_eq!(c.status, Some(Status::Canceled));
        assert_eq!(c.sessionid.as_deref(), Some("s1"));
        assert!(c.notes.is_empty() && c.form.is_none());
        // A form of type cancel says the same.
        let c = response(&command(
            &t,
            ALICE,
            "node='verify' sessionid='s1'",
            &format!("<x xmlns='{}' type='cancel'/>", ns::DATA_FORMS),
        ));
        assert_eq!(c.status, Some(Status::Canceled));
        assert!(!verified(&t));
    }

    #[test]
    fn a_user_with_no_terminal_has_nothing_to_verify() {
        let t = Harness::new();
        t.register(ALICE, "alice");
        let c = response(&command(&t, ALICE, "node='verify'", ""));
        assert_eq!(c.status, Some(Status::Completed));
        let (type_, text) = only_note(&c);
        assert_eq!(type_, NoteType::Info);
        assert!(text.starts_with("There is nothing to verify"), "{text}");
    }

    #[test]
    fn an_already_verified_user_is_told_so() {
        let t = Harness::new();
        alice_with_email(&t);
        let mut user = t.store.tx().user(ALICE).unwrap().unwrap();
        user.email = Some(Terminal {
            verified: true,
            ..Terminal::unverified(user.email.unwrap().address)
        });
        t.store.tx().put_user(&user).unwrap();
        let c = response(&command(&t, ALICE, "node='verify'", ""));
        assert_eq!(
            only_note(&c),
            (NoteType::Info, "All your terminals are verified.")
        );
    }

    #[test]
    fn unknown_nodes_strangers_and_bad_payloads_get_errors() {
        let t = Harness::new();
        alice_with_email(&t);
        let reply = command(&t, ALICE, "node='frobnicate'", "");
        assert_error(&reply, "item-not-found");
        assert_eq!(error_text(&reply), "there is no command 'frobnicate' here");

        let reply = command(&t, "bob@example.net", "node='verify'", "");
        assert_error(&reply, "registration-required");

        let reply = command(&t, ALICE, "", "");
        assert_error(&reply, "bad-request");
        assert_eq!(error_text(&reply), "missing node attribute on command");
        let reply = command(&t, ALICE, "node='verify' action='jump'", "");
        assert_error(&reply, "bad-request");
        assert_eq!(error_text(&reply), "unknown action 'jump'");
        let reply = command(&t, ALICE, "node='verify' sessionid='s' action='next'", "");
        assert_error(&reply, "bad-request");
        let reply = command(
            &t,
            ALICE,
            "node='verify' sessionid='s' action='complete'",
            "",
        );
        assert_error(&reply, "bad-request");
        assert_eq!(error_text(&reply), "complete needs the filled-in form");
        let reply = command(
            &t,
            ALICE,
            "node='verify' sessionid='s' action='complete'",
            &format!("<x xmlns='{}' type='form'/>", ns::DATA_FORMS),
        );
        assert_error(&reply, "bad-request");
        // A get is no command.
        let reply = t.one(&format!(
            "<iq type='get' id='c1' from='{ALICE}/pc' to='{D}'><command xmlns='{COMMANDS}' node='verify'/></iq>"
        ));
        assert_error(&reply, "service-unavailable");
        assert!(!verified(&t));
    }
}
