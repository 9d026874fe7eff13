//! Integrated mode: a user's own JID plays her reach address's role.
//!
//! Her server (Prosody with mod_privilege and mod_firewall, see docs/integrated-mode.md) tells
//! Reach what it may do: when the component connects, each host sends an XEP-0356 `<privilege/>`
//! message, kept per host ([`HostPrivileges`]). It also copies to Reach, wrapped in an XEP-0297
//! `<forwarded/>` message from the host, the messages it delivers to its users (also while they
//! are offline), to `D/received`, and those they send, to `D/sent` ([`CopyKind`]). A message
//! between two users of the host is copied twice, once each way, and each copy is read for its
//! side only.
//!
//! For a user who chose her own address (`address own`, [`User::integrated`]):
//! - a copy of what a buddy sent her is routed as a message to her reach address would be, with
//!   one difference: her XMPP clients have it already (the server delivered it, or keeps it for
//!   them), so only her terminals are considered, and nothing is held for XMPP;
//! - a copy of what she sent a buddy from a client (an answer, a read marker) cancels what waits
//!   to be forwarded of that conversation, as reading or answering through Reach does;
//! - what she sends by email or SMS (and the receipts and notices Reach sends for her) goes to
//!   the buddy from her own JID, through the server ([`send_as_user`], the XEP-0356 message
//!   permission), marked with [`SENT_AS_USER`] so that the server's copy of it is recognised and
//!   never taken for hers.
//!
//! Copies come from the hosts in `[integrated] hosts` only, and are never answered: the server
//! delivered the original already, whatever Reach thinks of it. Copies for users who did not
//! choose their own address are dropped unread.

use minidom::Element;

use super::model::{HostPrivileges, StoreError, User};
use super::{Addressing, Core, Failure, Handled, Out, Transaction};
use crate::address::LocalTarget;
use crate::xmpp::stanza::{an, attr, stanza, CHAT_MARKERS, NONE, STANZA_NS};

/// XEP-0356 as Prosody's mod_privilege speaks it.
pub const PRIVILEGE: &str = "urn:xmpp:privilege:2";
/// XEP-0356's first version, as ejabberd's mod_privilege speaks it.
pub const PRIVILEGE_V1: &str = "urn:xmpp:privilege:1";
/// XEP-0297: a message wrapped in another.
pub const FORWARD: &str = "urn:xmpp:forward:0";
/// The namespace of the client stream, which messages inside `<forwarded/>` carry.
pub const CLIENT: &str = "jabber:client";
/// Reach's mark on what it sends as a user: the server's copy of such a message is Reach's
/// own, not the user's (and the shipped firewall rules do not copy it at all).
pub const SENT_AS_USER: &str = "urn:reach:sent-as-user:0";
/// XEP-0045: a private message through a chat room carries this; its sender is not a buddy
/// Reach could answer.
const MUC_USER: &str = "http://jabber.org/protocol/muc#user";

/// What a copy from the server shows, by the resource of `D` it was forwarded to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyKind {
    /// `D/received`: a message the server delivered to one of its users.
    Received,
    /// `D/sent`: a message one of its users sent.
    Sent,
    /// Bare `D` (rules that forward everything to one address): delivered to its recipient if
    /// she is reached at her own address, else sent by its sender.
    Either,
}

impl CopyKind {
    fn of(wrapper: &Element) -> CopyKind {
        let resource = attr(wrapper, "to")
            .parse::<jid::Jid>()
            .ok()
            .and_then(|to| to.resource().map(|r| r.as_str().to_owned()));
        match resource.as_deref() {
            Some("received") => CopyKind::Received,
            Some("sent") => CopyKind::Sent,
            _ => CopyKind::Either,
        }
    }
}

/// Whether buddies reach `user` at her own JID now: she chose it, and her server allows Reach
/// to send as her. Otherwise her reach address is her public identity.
pub(crate) fn uses_own_address(
    core: &Core,
    store: &mut dyn Transaction,
    user: &User,
) -> Result<bool, StoreError> {
    if !user.integrated {
        return Ok(false);
    }
    let Some(host) = host_of(&user.jid) else {
        return Ok(false);
    };
    if !core.settings.integrated_hosts.iter().any(|h| h == host) {
        return Ok(false);
    }
    Ok(store
        .host_privileges(host)?
        .is_some_and(|p| p.send_as_users))
}

/// The address buddies know the user by: her own JID or her reach address.
pub(crate) fn public_address(
    core: &Core,
    store: &mut dyn Transaction,
    user: &User,
) -> Result<String, StoreError> {
    Ok(if uses_own_address(core, store, user)? {
        user.jid.clone()
    } else {
        core.reach_address(&user.handle)
    })
}

/// Sends `message` (a message to a buddy, addressed from the user's reach address) from the
/// user's public identity: as it is, or from her own JID through her server.
pub(crate) fn send_as_user(
    core: &Core,
    store: &mut dyn Transaction,
    user: &User,
    message: Element,
    out: &mut Out,
) -> Result<(), StoreError> {
    if !uses_own_address(core, store, user)? {
        out.send(message);
        return Ok(());
    }
    let host = host_of(&user.jid).unwrap_or_default().to_owned();
    out.send(privileged(
        &core.settings.domain,
        &host,
        &user.jid,
        &message,
    ));
    Ok(())
}

/// `message` sent by the server `host` as `user` (XEP-0356): the message itself moves to the
/// client namespace, from the user's bare JID, with Reach's mark.
fn privileged(domain: &str, host: &str, user: &str, message: &Element) -> Element {
    let mut inner = in_namespace(message, CLIENT);
    inner.set_attr(NONE, an("from"), user);
    inner.append_child(Element::builder("sent-as-user", SENT_AS_USER).build());
    let mut wrapper = stanza("message", domain, host);
    if let Some(id) = message.attr("id") {
        wrapper.set_attr(NONE, an("id"), id);
    }
    wrapper.append_child(
        Element::builder("privilege", PRIVILEGE)
            .append(Element::builder("forwarded", FORWARD).append(inner).build())
            .build(),
    );
    wrapper
}

/// `el` with its own namespace and that of its children in `from`'s namespace moved to `to`
/// (the stanza namespace differs between the component and the client stream).
fn in_namespace(el: &Element, to: &str) -> Element {
    let from = el.ns();
    let mut builder = Element::builder(el.name(), to);
    for ((_, name), value) in el.attrs().iter() {
        builder = builder.attr(name.clone(), value.as_str());
    }
    for node in el.nodes() {
        match node {
            minidom::Node::Element(child) if child.ns() == from => {
                builder = builder.append(in_namespace(child, to));
            }
            minidom::Node::Element(child) => builder = builder.append(child.clone()),
            minidom::Node::Text(text) => builder = builder.append(text.as_str()),
        }
    }
    builder.build()
}

/// The domain of a bare JID.
fn host_of(jid: &str) -> Option<&str> {
    jid.rsplit_once('@').map(|(_, host)| host)
}

/// A message to the service `D` from a server host (a JID without a local part): a host's
/// privileges, or a copy of a message. Never answered.
pub(super) fn on_host_message(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    stanza: &Element,
    who: &Addressing,
    out: &mut Out,
) -> Handled {
    let host = who.from_bare.as_str();
    if !core.settings.integrated_hosts.iter().any(|h| h == host) {
        tracing::debug!("a message from a server host that is not in [integrated] hosts; ignored");
        return Ok(());
    }
    for privilege in stanza
        .children()
        .filter(|c| c.is("privilege", PRIVILEGE) || c.is("privilege", PRIVILEGE_V1))
    {
        record_privileges(store, now, host, privilege)?;
    }
    if let Some(copied) = stanza
        .get_child("forwarded", FORWARD)
        .and_then(|f| f.get_child("message", CLIENT))
    {
        // Read like any stanza of the component stream from here on.
        let copied = in_namespace(copied, STANZA_NS);
        match on_copy(core, store, now, host, CopyKind::of(stanza), &copied, out) {
            Err(Failure::Store(e)) => return Err(Failure::Store(e)),
            // The server delivered the original whatever Reach thinks of it: a copy is never
            // answered (e.g. past a storage cap it is only not forwarded).
            Err(Failure::Fault(fault)) => {
                tracing::debug!(
                    "a copy was not taken: {}",
                    fault.text.as_deref().unwrap_or(fault.condition)
                );
            }
            Ok(()) => {}
        }
    }
    Ok(())
}

/// A new link: what the hosts allowed Reach on the last one no longer counts. A host that
/// still grants it says so again right away (mod_privilege advertises on every connection);
/// one whose admin took the grant away says nothing, and its users are answered from their
/// reach addresses again instead of through a server that would refuse.
pub(crate) fn on_link_up(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
) -> Result<(), StoreError> {
    for host in &core.settings.integrated_hosts {
        if store
            .host_privileges(host)?
            .is_some_and(|p| p.send_as_users || p.roster.is_some() || p.presence.is_some())
        {
            store.put_host_privileges(
                host,
                &HostPrivileges {
                    at: now,
                    ..HostPrivileges::default()
                },
            )?;
        }
    }
    Ok(())
}

/// Keeps what the host allows Reach (its `<privilege/>` message).
fn record_privileges(
    store: &mut dyn Transaction,
    now: u64,
    host: &str,
    privilege: &Element,
) -> Result<(), StoreError> {
    let mut granted = HostPrivileges {
        at: now,
        ..HostPrivileges::default()
    };
    // Reach sends as a user in XEP-0356's second version (Prosody's mod_privilege); ejabberd
    // 23.01 speaks the first one only and refuses the other's <privilege/> as a bad request.
    let speaks_ours = privilege.ns() == PRIVILEGE;
    for perm in privilege.children().filter(|c| c.name() == "perm") {
        let kind = attr(perm, "type");
        match attr(perm, "access") {
            "message" => granted.send_as_users = speaks_ours && kind == "outgoing",
            "roster" if kind != "none" => granted.roster = Some(kind.to_owned()),
            "presence" if kind != "none" => granted.presence = Some(kind.to_owned()),
            _ => {}
        }
    }
    if !speaks_ours {
        tracing::warn!(
            host,
            "the server speaks XEP-0356 {PRIVILEGE_V1} only (ejabberd): Reach cannot send as its \
             users, who keep their reach addresses (integrated mode needs Prosody's mod_privilege)"
        );
    }
    tracing::info!(
        host,
        send_as_users = granted.send_as_users,
        roster = granted.roster.as_deref().unwrap_or("none"),
        presence = granted.presence.as_deref().unwrap_or("none"),
        "the server's privileges for Reach"
    );
    store.put_host_privileges(host, &granted)
}

/// A copy of a message the server `host` delivered to one of its users, or that one of them
/// sent.
fn on_copy(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    host: &str,
    copy: CopyKind,
    copied: &Element,
    out: &mut Out,
) -> Handled {
    // What Reach sent itself (as a user, or from its own addresses) comes back as a copy too.
    // A private message through a chat room is no buddy's either.
    if copied.has_child("sent-as-user", SENT_AS_USER) || copied.has_child("x", MUC_USER) {
        return Ok(());
    }
    let (Ok(from), Ok(to)) = (
        attr(copied, "from").parse::<jid::Jid>(),
        attr(copied, "to").parse::<jid::Jid>(),
    ) else {
        return Ok(());
    };
    let domain = core.settings.domain.as_str();
    if from.domain().as_str() == domain || to.domain().as_str() == domain {
        return Ok(());
    }
    if matches!(attr(copied, "type"), "groupchat" | "error" | "headline") {
        return Ok(());
    }
    let (from_bare, to_bare) = (from.to_bare().to_string(), to.to_bare().to_string());
    if from_bare.len() > super::limits::MAX_JID_BYTES
        || to_bare.len() > super::limits::MAX_JID_BYTES
    {
        return Ok(());
    }
    // Delivered to one of the host's users: a buddy's message to her.
    if copy != CopyKind::Sent && to.domain().as_str() == host && from_bare != to_bare {
        if let Some(user) = store.user(&to_bare)? {
            if uses_own_address(core, store, &user)? {
                let who = Addressing {
                    from: from.clone(),
                    from_bare: from_bare.clone(),
                    target: LocalTarget::User(user.handle.clone()),
                };
                return super::relay::on_copied_message(core, store, now, &user, &who, copied, out);
            }
        }
    }
    // Sent by one of the host's users: her answer or read marker from a client.
    if copy != CopyKind::Received && from.domain().as_str() == host && from_bare != to_bare {
        if let Some(user) = store.user(&from_bare)? {
            if uses_own_address(core, store, &user)? {
                return on_sent_by_user(store, now, &user, &to_bare, copied);
            }
        }
    }
    Ok(())
}

/// The user answered or read a conversation from one of her clients: nothing of it needs
/// forwarding any more. A delivery receipt (XEP-0184) or a `received` marker is sent by her
/// client on its own, read or not: it cancels nothing.
fn on_sent_by_user(
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    peer: &str,
    copied: &Element,
) -> Handled {
    let answered = copied.has_child("body", STANZA_NS);
    let read = copied.has_child("displayed", CHAT_MARKERS);
    if answered {
        store.touch_session(&user.jid, peer, now)?;
    }
    if answered || read {
        super::forward::cancel_pending(store, user, peer)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::email::{InboundMail, SmtpAnswer};
    use crate::core::model::EmailJob;
    use crate::core::testing::*;
    use crate::core::{Action, Event};
    use crate::email::extract::Reply;
    use crate::xmpp::stanza::child_text;

    const ALICE: &str = "alice@example.org";
    const ALICE_MAIL: &str = "alice@mail.example.org";
    const BOB: &str = "bob@example.net";
    const HOST: &str = "example.org";

    /// What Prosody's mod_privilege says when Reach connects.
    fn privileges(t: &Harness, from: &str, message: &str) -> Vec<Element> {
        t.run(&format!(
            "<message from='{from}' to='{D}'><privilege xmlns='{PRIVILEGE}'>\
             <perm access='roster' type='both'/><perm access='message' type='{message}'/>\
             <perm access='presence' type='roster'/></privilege></message>"
        ))
    }

    /// Alice registered with a verified email address.
    fn alice_with_email(t: &Harness) {
        t.register_verified(ALICE, "alice", ALICE_MAIL, "");
    }

    fn say(t: &Harness, line: &str) -> String {
        let out = t.run(&format!(
            "<message type='chat' from='{ALICE}/pc' to='{D}'><body>{line}</body></message>"
        ));
        child_text(&out[0], "body").unwrap()
    }

    /// Alice on her own address: the host granted the message permission, she chose it.
    fn integrated_alice(t: &Harness) {
        alice_with_email(t);
        assert!(privileges(t, HOST, "outgoing").is_empty());
        let said = say(t, "address own");
        assert!(
            said.contains("Buddies reach you at: your own address"),
            "{said}"
        );
    }

    /// The server's copy of a message it delivered (mod_firewall FORWARD).
    fn copy(t: &Harness, from: &str, to: &str, inner: &str) -> Vec<Action> {
        t.actions(Event::Stanza(
            format!(
                "<message xmlns='jabber:component:accept' from='{HOST}' to='{D}'>\
                 <forwarded xmlns='{FORWARD}'><message xmlns='{CLIENT}' from='{from}' to='{to}' \
                 type='chat' id='c1'>{inner}</message></forwarded></message>"
            )
            .parse()
            .unwrap(),
        ))
    }

    /// The same, forwarded to `D/RESOURCE` as the shipped rules do (`received`, `sent`).
    fn copy_to(t: &Harness, resource: &str, from: &str, to: &str, inner: &str) -> Vec<Action> {
        t.actions(Event::Stanza(
            format!(
                "<message xmlns='jabber:component:accept' from='{HOST}' to='{D}/{resource}'>\
                 <forwarded xmlns='{FORWARD}'><message xmlns='{CLIENT}' from='{from}' to='{to}' \
                 type='chat' id='c1'>{inner}</message></forwarded></message>"
            )
            .parse()
            .unwrap(),
        ))
    }

    fn from_bob(t: &Harness, body: &str) -> Vec<Action> {
        copy(
            t,
            &format!("{BOB}/pc"),
            ALICE,
            &format!("<body>{body}</body>"),
        )
    }

    fn emails(actions: &[Action]) -> Vec<EmailJob> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::SendEmail(job) => Some((**job).clone()),
                _ => None,
            })
            .collect()
    }

    fn stanzas(actions: &[Action]) -> Vec<&Element> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::SendStanza(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    fn forwarded_after_the_digest(t: &Harness) -> Vec<EmailJob> {
        t.advance(31);
        emails(&t.actions(Event::Tick))
    }

    fn reply(t: &Harness, alias: &str, text: &str) -> (SmtpAnswer, Vec<Element>) {
        t.mail(InboundMail {
            envelope_from: ALICE_MAIL.into(),
            rcpt: alias.into(),
            reply: Reply {
                // One per text: a second reply is no duplicate of the first.
                message_id: Some(format!("<{}@mail.example.org>", text.replace(' ', "."))),
                from: Some(ALICE_MAIL.into()),
                subject: Some("Re: IM".into()),
                in_reply_to: vec![],
                references: vec![],
                text: text.into(),
                attachments: vec![],
                automatic: None,
            },
        })
    }

    #[test]
    fn own_address_needs_the_host_in_the_config_and_its_message_permission() {
        let t = Harness::new();
        alice_with_email(&t);
        let said = say(&t, "address own");
        assert!(
            said.contains("has not allowed Reach to send messages as you"),
            "{said}"
        );
        assert!(said.contains("Nothing was changed"), "{said}");
        // Another server's say-so counts for nothing.
        privileges(&t, "other.example", "outgoing");
        assert!(say(&t, "address own").contains("has not allowed Reach"));
        // A host that withholds the message permission.
        privileges(&t, HOST, "none");
        assert!(say(&t, "address own").contains("has not allowed Reach"));
        privileges(&t, HOST, "outgoing");
        let said = say(&t, "address own");
        assert!(said.starts_with("Saved."), "{said}");
        assert!(t.store.tx().user(ALICE).unwrap().unwrap().integrated);
        assert!(say(&t, "address").contains("your own address alice@example.org"));
        // A server whose users' messages are not copied to Reach ([integrated] hosts).
        let mut t = Harness::new();
        let mut settings = t.core.settings().clone();
        settings.integrated_hosts.clear();
        t.core = crate::core::Core::with_seed(settings, 7);
        alice_with_email(&t);
        privileges(&t, HOST, "outgoing");
        let said = say(&t, "address own");
        assert!(
            said.contains("does not copy your messages to Reach"),
            "{said}"
        );
        assert!(!t.store.tx().user(ALICE).unwrap().unwrap().integrated);
    }

    #[test]
    fn a_buddys_message_to_her_own_address_goes_by_email_while_she_is_offline_and_her_reply_comes_from_her_jid(
    ) {
        let t = Harness::new();
        integrated_alice(&t);
        let actions = from_bob(&t, "hello Alice");
        assert!(
            stanzas(&actions).is_empty(),
            "her server delivered it: Reach relays nothing, and never answers a copy: {actions:?}"
        );
        assert_eq!(
            t.store.tx().held_count(ALICE).unwrap(),
            0,
            "nothing is held"
        );
        let mails = forwarded_after_the_digest(&t);
        assert_eq!(mails.len(), 1);
        assert_eq!(mails[0].email.paragraphs, ["hello Alice"]);
        assert!(
            mails[0]
                .email
                .footer
                .contains("reaches bob@example.net from alice@example.org"),
            "{}",
            mails[0].email.footer
        );
        let (answer, out) = reply(&t, &mails[0].email.from_address, "hi Bob, from the beach");
        assert_eq!(answer.code, 250, "{answer:?}");
        assert_eq!(out.len(), 1, "{out:?}");
        let wrapper = &out[0];
        // Through her server, as her (XEP-0356).
        assert_eq!(wrapper.attr("to"), Some(HOST));
        assert_eq!(wrapper.attr("from"), Some(D));
        let inner = wrapper
            .get_child("privilege", PRIVILEGE)
            .and_then(|p| p.get_child("forwarded", FORWARD))
            .and_then(|f| f.get_child("message", CLIENT))
            .expect("a message inside privilege/forwarded");
        assert_eq!(inner.attr("from"), Some(ALICE));
        assert_eq!(inner.attr("to"), Some(BOB));
        assert_eq!(inner.attr("type"), Some("chat"));
        assert_eq!(
            inner.get_child("body", CLIENT).map(|b| b.text()).as_deref(),
            Some("hi Bob, from the beach")
        );
        assert!(inner.has_child("sent-as-user", SENT_AS_USER));
        // The server's copy of that reply (sent by "her") is Reach's own: nothing happens.
        let echoed = copy(
            &t,
            ALICE,
            BOB,
            &format!("<body>hi Bob, from the beach</body><sent-as-user xmlns='{SENT_AS_USER}'/>"),
        );
        assert!(echoed.is_empty(), "{echoed:?}");
    }

    #[test]
    fn while_a_client_is_online_reach_does_nothing_and_reading_from_a_client_cancels_the_forward() {
        let t = Harness::new();
        integrated_alice(&t);
        t.run(&format!("<presence from='{ALICE}/laptop' to='{D}'/>"));
        assert!(from_bob(&t, "you are online").is_empty());
        assert!(forwarded_after_the_digest(&t).is_empty());
        // Away: forwarded after the grace delay unless she reads it from a client.
        t.run(&format!(
            "<presence from='{ALICE}/laptop' to='{D}'><show>away</show></presence>"
        ));
        from_bob(&t, "are you there?");
        t.advance(30);
        let read = copy(
            &t,
            &format!("{ALICE}/laptop"),
            BOB,
            "<displayed xmlns='urn:xmpp:chat-markers:0' id='c1'/>",
        );
        assert!(read.is_empty(), "{read:?}");
        t.advance(200);
        assert!(
            emails(&t.actions(Event::Tick)).is_empty(),
            "read: not forwarded"
        );
        // Unread, it goes out after the grace delay.
        from_bob(&t, "still there?");
        t.advance(200);
        let mails = emails(&t.actions(Event::Tick));
        assert_eq!(mails.len(), 1);
        assert_eq!(mails[0].email.paragraphs, ["still there?"]);
    }

    #[test]
    fn copies_for_users_on_their_reach_address_and_from_unknown_hosts_are_ignored() {
        let t = Harness::new();
        alice_with_email(&t);
        privileges(&t, HOST, "outgoing");
        let before = t.snapshot(ALICE);
        assert!(from_bob(&t, "not for Reach").is_empty());
        assert!(forwarded_after_the_digest(&t).is_empty());
        assert_eq!(t.snapshot(ALICE), before, "nothing is kept of it");
        say(&t, "address own");
        // A copy from a host Reach does not take copies from.
        let forged = t.actions(Event::Stanza(
            format!(
                "<message xmlns='jabber:component:accept' from='evil.example' to='{D}'>\
                 <forwarded xmlns='{FORWARD}'><message xmlns='{CLIENT}' from='{BOB}/pc' \
                 to='{ALICE}' type='chat'><body>forged</body></message></forwarded></message>"
            )
            .parse()
            .unwrap(),
        ));
        assert!(forged.is_empty(), "{forged:?}");
        // Reach's own messages to her (the service's chat) come back as copies: ignored.
        let own = copy(&t, D, ALICE, "<body>Reach: a code</body>");
        assert!(own.is_empty());
        assert!(forwarded_after_the_digest(&t).is_empty());
    }

    #[test]
    fn back_to_the_reach_address_undoes_what_the_copies_left_and_replies_come_from_it_again() {
        let t = Harness::new();
        integrated_alice(&t);
        from_bob(&t, "waiting for its email");
        let said = say(&t, "address reach");
        assert!(said.contains("your reach address"), "{said}");
        assert!(
            t.store.tx().pending_for(ALICE).unwrap().is_empty(),
            "her clients have it from her server: no email"
        );
        assert!(forwarded_after_the_digest(&t).is_empty());
        assert!(from_bob(&t, "after").is_empty());
        assert!(
            forwarded_after_the_digest(&t).is_empty(),
            "copies are ignored now"
        );
        // A buddy writing to the reach address, answered by email: from the reach address.
        t.run(&format!(
            "<message type='chat' id='r1' from='{BOB}/pc' to='alice@{D}'><body>to the reach address</body></message>"
        ));
        let mails = forwarded_after_the_digest(&t);
        let (_, out) = reply(&t, &mails[0].email.from_address, "answer");
        assert_eq!(out[0].attr("from"), Some(format!("alice@{D}").as_str()));
        assert_eq!(out[0].attr("to"), Some(BOB));
    }

    #[test]
    fn a_message_between_two_users_of_the_host_is_read_once_from_each_copy() {
        // Carol is a user of the same host: her message is copied as sent by her and as
        // delivered to Alice. Only the second is Alice's to route: one email, not two.
        const CAROL: &str = "carol@example.org";
        let t = Harness::new();
        integrated_alice(&t);
        let from_carol = |text: &str| {
            let body = format!("<body>{text}</body>");
            assert!(copy_to(&t, "sent", &format!("{CAROL}/pc"), ALICE, &body).is_empty());
            assert!(copy_to(&t, "received", &format!("{CAROL}/pc"), ALICE, &body).is_empty());
        };
        from_carol("same host");
        let mails = forwarded_after_the_digest(&t);
        assert_eq!(mails.len(), 1);
        assert_eq!(mails[0].email.paragraphs, ["same host"]);
        // Alice answers from a client, copied both ways too: the copy delivered to Carol (who
        // is no Reach user) is nothing to Reach; the sent one cancels what waits.
        from_carol("waiting");
        let answer = "<body>answered</body>";
        copy_to(&t, "received", &format!("{ALICE}/pc"), CAROL, answer);
        assert_eq!(t.store.tx().pending_for(ALICE).unwrap().len(), 1);
        copy_to(&t, "sent", &format!("{ALICE}/pc"), CAROL, answer);
        assert!(t.store.tx().pending_for(ALICE).unwrap().is_empty());
        // A copy of Carol's message as sent by her is routed nowhere.
        let body = "<body>not routed</body>";
        copy_to(&t, "sent", &format!("{CAROL}/pc"), ALICE, body);
        assert!(t.store.tx().pending_for(ALICE).unwrap().is_empty());
        assert!(forwarded_after_the_digest(&t).is_empty());
    }

    #[test]
    fn her_clients_automatic_receipts_are_no_reading_but_a_displayed_marker_is() {
        let t = Harness::new();
        integrated_alice(&t);
        t.run(&format!(
            "<presence from='{ALICE}/phone' to='{D}'><show>away</show></presence>"
        ));
        from_bob(&t, "did you get this?");
        for automatic in [
            "<received xmlns='urn:xmpp:receipts' id='c1'/>",
            "<received xmlns='urn:xmpp:chat-markers:0' id='c1'/>",
        ] {
            copy_to(&t, "sent", &format!("{ALICE}/phone"), BOB, automatic);
        }
        t.advance(200);
        let mails = emails(&t.actions(Event::Tick));
        assert_eq!(mails.len(), 1, "delivered to her phone is not read");
        from_bob(&t, "and this?");
        copy_to(
            &t,
            "sent",
            &format!("{ALICE}/phone"),
            BOB,
            "<displayed xmlns='urn:xmpp:chat-markers:0' id='c1'/>",
        );
        t.advance(200);
        assert!(emails(&t.actions(Event::Tick)).is_empty(), "read");
    }

    #[test]
    fn a_private_message_through_a_chat_room_is_not_forwarded() {
        let t = Harness::new();
        integrated_alice(&t);
        let pm = copy_to(
            &t,
            "received",
            "room@chat.example.net/bob",
            &format!("{ALICE}/pc"),
            "<body>psst</body><x xmlns='http://jabber.org/protocol/muc#user'/>",
        );
        assert!(pm.is_empty(), "{pm:?}");
        assert!(forwarded_after_the_digest(&t).is_empty());
        assert!(t.store.tx().pending_for(ALICE).unwrap().is_empty());
    }

    #[test]
    fn a_grant_counts_for_the_link_it_was_advertised_on() {
        // The admin took Reach out of privileged_entities and restarted: the server says
        // nothing on the new link, so Alice is answered from her reach address again.
        let t = Harness::new();
        integrated_alice(&t);
        from_bob(&t, "hello Alice");
        let mails = forwarded_after_the_digest(&t);
        t.actions(Event::LinkUp);
        assert!(
            !t.store
                .tx()
                .host_privileges(HOST)
                .unwrap()
                .unwrap()
                .send_as_users
        );
        let (answer, out) = reply(&t, &mails[0].email.from_address, "from the reach address");
        assert_eq!(answer.code, 250, "{answer:?}");
        assert_eq!(out[0].attr("from"), Some(format!("alice@{D}").as_str()));
        assert_eq!(out[0].attr("to"), Some(BOB));
        assert!(
            t.store.tx().user(ALICE).unwrap().unwrap().integrated,
            "her choice stays"
        );
        // Granted again on the next link: her own JID again.
        t.actions(Event::LinkUp);
        privileges(&t, HOST, "outgoing");
        let (_, out) = reply(&t, &mails[0].email.from_address, "as her again");
        assert_eq!(out[0].attr("to"), Some(HOST));
        assert!(out[0].has_child("privilege", PRIVILEGE));
    }

    #[test]
    fn ejabberds_first_version_of_the_privileges_does_not_let_users_choose_their_own_address() {
        // ejabberd 23.01 grants the message permission in urn:xmpp:privilege:1 and refuses
        // what Reach sends in the second version: its users keep their reach addresses.
        let t = Harness::new();
        alice_with_email(&t);
        t.run(&format!(
            "<message from='{HOST}' to='{D}'><privilege xmlns='{PRIVILEGE_V1}'>\
             <perm access='message' type='outgoing'/><perm access='roster' type='both'/>\
             <perm access='presence' type='roster'/></privilege></message>"
        ));
        let granted = t.store.tx().host_privileges(HOST).unwrap().unwrap();
        assert!(!granted.send_as_users);
        assert_eq!(granted.roster.as_deref(), Some("both"));
        let said = say(&t, "address own");
        assert!(said.contains("has not allowed Reach"), "{said}");
        assert!(!t.store.tx().user(ALICE).unwrap().unwrap().integrated);
    }
}
