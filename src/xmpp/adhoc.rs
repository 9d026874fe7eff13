//! XEP-0050 ad-hoc commands: the `<command/>` payload, which xmpp-parsers lacks.
//!
//! Plain structs converted from and to `minidom` elements, in the xmpp-parsers way. What a
//! command node does, and whether a session exists, is the core's business (`core::adhoc`);
//! this module only reads and writes the payload. The data form a command carries is kept as
//! an element: `crate::xmpp::forms` reads and builds those.

use minidom::Element;

use super::forms::DATA_FORMS;
use crate::xmpp::stanza::{an, NONE};

/// XEP-0050 ad-hoc commands (also the disco node that lists them, XEP-0050 §2.2).
pub use crate::xmpp::stanza::COMMANDS;

/// The `action` of a request, or an allowed next action (XEP-0050 §3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Execute,
    Cancel,
    Prev,
    Next,
    Complete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Execute => "execute",
            Action::Cancel => "cancel",
            Action::Prev => "prev",
            Action::Next => "next",
            Action::Complete => "complete",
        }
    }
}

impl std::str::FromStr for Action {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "execute" => Action::Execute,
            "cancel" => Action::Cancel,
            "prev" => Action::Prev,
            "next" => Action::Next,
            "complete" => Action::Complete,
            other => return Err(Error::UnknownAction(other.to_owned())),
        })
    }
}

/// The `status` of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Executing,
    Completed,
    Canceled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Executing => "executing",
            Status::Completed => "completed",
            Status::Canceled => "canceled",
        }
    }
}

impl std::str::FromStr for Status {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "executing" => Status::Executing,
            "completed" => Status::Completed,
            "canceled" => Status::Canceled,
            other => return Err(Error::UnknownStatus(other.to_owned())),
        })
    }
}

/// The `type` of a note; `info` when absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NoteType {
    #[default]
    Info,
    Warn,
    Error,
}

impl NoteType {
    pub fn as_str(self) -> &'static str {
        match self {
            NoteType::Info => "info",
            NoteType::Warn => "warn",
            NoteType::Error => "error",
        }
    }
}

impl std::str::FromStr for NoteType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "info" => NoteType::Info,
            "warn" => NoteType::Warn,
            "error" => NoteType::Error,
            other => return Err(Error::UnknownNoteType(other.to_owned())),
        })
    }
}

/// The `<actions/>` of a response: what the requester may do next, and the default.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Actions {
    /// The action a plain "execute" stands for (the `execute` attribute).
    pub execute: Option<Action>,
    /// `prev`, `next` and/or `complete`.
    pub allowed: Vec<Action>,
}

/// A `<note/>` for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub type_: NoteType,
    pub text: String,
}

impl Note {
    pub fn info(text: impl Into<String>) -> Note {
        Note {
            type_: NoteType::Info,
            text: text.into(),
        }
    }

    pub fn error(text: impl Into<String>) -> Note {
        Note {
            type_: NoteType::Error,
            text: text.into(),
        }
    }
}

/// A `<command/>` request or response.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub node: String,
    pub sessionid: Option<String>,
    /// Absent in a request means `execute`.
    pub action: Option<Action>,
    /// Set in responses only.
    pub status: Option<Status>,
    pub actions: Option<Actions>,
    pub notes: Vec<Note>,
    /// The `jabber:x:data` `<x/>` element, if any.
    pub form: Option<Element>,
}

impl Command {
    /// A bare command on `node`: a request to execute it, once `action` is set.
    pub fn new(node: impl Into<String>) -> Command {
        Command {
            node: node.into(),
            sessionid: None,
            action: None,
            status: None,
            actions: None,
            notes: Vec::new(),
            form: None,
        }
    }
}

/// Why a `<command/>` could not be read. The texts are what the requester sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("this is not an ad-hoc command (expected <command xmlns='{COMMANDS}'/>)")]
    NotACommand,
    #[error("missing node attribute on command")]
    MissingNode,
    #[error("unknown action '{0}'")]
    UnknownAction(String),
    #[error("unknown status '{0}'")]
    UnknownStatus(String),
    #[error("unknown note type '{0}'")]
    UnknownNoteType(String),
    #[error("unknown child <{0}/> in command")]
    UnknownChild(String),
    #[error("more than one data form in command")]
    SeveralForms,
}

impl TryFrom<&Element> for Command {
    type Error = Error;

    fn try_from(el: &Element) -> Result<Command, Error> {
        if !el.is("command", COMMANDS) {
            return Err(Error::NotACommand);
        }
        let node = el.attr("node").ok_or(Error::MissingNode)?;
        let mut command = Command::new(node);
        command.sessionid = el.attr("sessionid").map(str::to_owned);
        command.action = el.attr("action").map(str::parse).transpose()?;
        command.status = el.attr("status").map(str::parse).transpose()?;
        for child in el.children() {
            if child.is("x", DATA_FORMS) {
                if command.form.is_some() {
                    return Err(Error::SeveralForms);
                }
                command.form = Some(child.clone());
            } else if child.ns() != COMMANDS {
                // Another payload (XEP-0050 allows any): not Reach's to read, not an error.
                continue;
            } else if child.name() == "note" {
                command.notes.push(Note {
                    type_: child
                        .attr("type")
                        .map(str::parse)
                        .transpose()?
                        .unwrap_or_default(),
                    text: child.text(),
                });
            } else if child.name() == "actions" {
                let mut actions = Actions {
                    execute: child.attr("execute").map(str::parse).transpose()?,
                    allowed: Vec::new(),
                };
                for allowed in child.children() {
                    if allowed.ns() == COMMANDS {
                        actions.allowed.push(allowed.name().parse()?);
                    }
                }
                command.actions = Some(actions);
            } else {
                return Err(Error::UnknownChild(child.name().to_owned()));
            }
        }
        Ok(command)
    }
}

impl TryFrom<Element> for Command {
    type Error = Error;

    fn try_from(el: Element) -> Result<Command, Error> {
        Command::try_from(&el)
    }
}

impl From<Command> for Element {
    fn from(command: Command) -> Element {
        let mut el = Element::builder("command", COMMANDS)
            .attr(an("node"), command.node)
            .build();
        if let Some(sessionid) = command.sessionid {
            el.set_attr(NONE, an("sessionid"), sessionid);
        }
        if let Some(action) = command.action {
            el.set_attr(NONE, an("action"), action.as_str());
        }
        if let Some(status) = command.status {
            el.set_attr(NONE, an("status"), status.as_str());
        }
        if let Some(actions) = command.actions {
            let mut a = Element::builder("actions", COMMANDS).build();
            if let Some(execute) = actions.execute {
                a.set_attr(NONE, an("execute"), execute.as_str());
            }
            for allowed in actions.allowed {
                a.append_child(Element::builder(allowed.as_str(), COMMANDS).build());
            }
            el.append_child(a);
        }
        for note in command.notes {
            el.append_child(
                Element::builder("note", COMMANDS)
                    .attr(an("type"), note.type_.as_str())
                    .append(note.text)
                    .build(),
            );
        }
        if let Some(form) = command.form {
            el.append_child(form);
        }
        el
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(xml: &str) -> Result<Command, Error> {
        let el: Element = xml.parse().expect("well-formed test XML");
        Command::try_from(&el)
    }

    #[test]
    fn parses_a_minimal_execute_request() {
        let c =
            parse("<command xmlns='http://jabber.org/protocol/commands' node='verify'/>").unwrap();
        assert_eq!(c, Command::new("verify"));
        let c = parse(
            "<command xmlns='http://jabber.org/protocol/commands' node='verify' action='execute'/>",
        )
        .unwrap();
        assert_eq!(c.action, Some(Action::Execute));
        assert_eq!(c.sessionid, None);
    }

    #[test]
    fn parses_a_response_with_actions_notes_and_a_form() {
        let c = parse(
            "<command xmlns='http://jabber.org/protocol/commands' node='verify' sessionid='s1' status='executing'>\
             <actions execute='complete'><prev/><complete/></actions>\
             <note>hello</note><note type='warn'>careful</note>\
             <x xmlns='jabber:x:data' type='form'><field var='code'/></x>\
             <extra xmlns='urn:example'/></command>",
        )
        .unwrap();
        assert_eq!(c.sessionid.as_deref(), Some("s1"));
        assert_eq!(c.status, Some(Status::Executing));
        assert_eq!(
            c.actions,
            Some(Actions {
                execute: Some(Action::Complete),
                allowed: vec![Action::Prev, Action::Complete],
            })
        );
        assert_eq!(
            c.notes,
            vec![
                Note::info("hello"),
                Note {
                    type_: NoteType::Warn,
                    text: "careful".into()
                }
            ]
        );
        assert_eq!(c.form.unwrap().attr("type"), Some("form"));
    }

    #[test]
    fn rejects_what_it_cannot_read_with_exact_texts() {
        let err = |xml: &str| parse(xml).unwrap_err().to_string();
        assert_eq!(
            err("<command xmlns='http://jabber.org/protocol/commands'/>"),
            "missing node attribute on command"
        );
        assert_eq!(
            err("<command xmlns='http://jabber.org/protocol/commands' node='n' action='jump'/>"),
            "unknown action 'jump'"
        );
        assert_eq!(
            err("<command xmlns='http://jabber.org/protocol/commands' node='n' status='done'/>"),
            "unknown status 'done'"
        );
        assert_eq!(
            err("<command xmlns='http://jabber.org/protocol/commands' node='n'><note type='fyi'>x</note></command>"),
            "unknown note type 'fyi'"
        );
        assert_eq!(
            err("<command xmlns='http://jabber.org/protocol/commands' node='n'><actions execute='jump'/></command>"),
            "unknown action 'jump'"
        );
        assert_eq!(
            err("<command xmlns='http://jabber.org/protocol/commands' node='n'><actions><finish/></actions></command>"),
            "unknown action 'finish'"
        );
        assert_eq!(
            err("<command xmlns='http://jabber.org/protocol/commands' node='n'><bogus/></command>"),
            "unknown child <bogus/> in command"
        );
        assert_eq!(
            err("<command xmlns='http://jabber.org/protocol/commands' node='n'>\
                 <x xmlns='jabber:x:data' type='submit'/><x xmlns='jabber:x:data' type='submit'/></command>"),
            "more than one data form in command"
        );
        assert_eq!(
            err("<command xmlns='urn:example' node='n'/>"),
            Error::NotACommand.to_string()
        );
    }

    #[test]
    fn serialises_and_parses_back() {
        let command = Command {
            node: "verify".into(),
            sessionid: Some("abc".into()),
            action: None,
            status: Some(Status::Executing),
            actions: Some(Actions {
                execute: Some(Action::Complete),
                allowed: vec![Action::Complete],
            }),
            notes: vec![Note::error("That code is wrong.")],
            form: Some(
                "<x xmlns='jabber:x:data' type='form'><field var='code' type='text-single'/></x>"
                    .parse()
                    .unwrap(),
            ),
        };
        let el = Element::from(command.clone());
        let expected: Element = "<command xmlns='http://jabber.org/protocol/commands' node='verify' sessionid='abc' status='executing'>\
             <actions execute='complete'><complete/></actions>\
             <note type='error'>That code is wrong.</note>\
             <x xmlns='jabber:x:data' type='form'><field var='code' type='text-single'/></x></command>"
            .parse()
            .unwrap();
        assert_eq!(el, expected);
        assert_eq!(Command::try_from(&el).unwrap(), command);
        let request = Command {
            action: Some(Action::Cancel),
            ..Command::new("verify")
        };
        assert_eq!(
            Command::try_from(Element::from(request.clone())).unwrap(),
            request
        );
    }
}
