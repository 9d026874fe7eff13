//! Presence: the user's own resources, buddies' subscriptions to reach addresses, and the global
//! presence Reach publishes for each reach address.
//!
//! Reach is subscribed to each user's bare JID, so the server sends it the presence of every
//! resource. The reach address shows the best of them (unavailable when none); every change is
//! pushed to the buddies who receive the address's presence. Held messages are released as soon
//! as the user has an available resource again.

use minidom::Element;

use super::{relay, Addressing, Core, Handled, Out};
use crate::address::LocalTarget;
use crate::store::{Buddy, ResourcePresence, Store, StoreError, User};
use crate::xmpp::stanza::{attr, child_text, presence, StanzaFault, STANZA_NS};

/// What the reach address shows to buddies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GlobalPresence {
    Unavailable,
    /// Available with an optional `show` (away, chat, dnd, xa) and status text.
    Available {
        show: Option<String>,
        status: Option<String>,
    },
}

/// How reachable a `show` value is; the best resource is the most reachable one.
fn rank(show: Option<&str>) -> u8 {
    match show {
        Some("chat") => 5,
        None => 4,
        Some("away") => 3,
        Some("dnd") => 2,
        Some("xa") => 1,
        Some(_) => 0,
    }
}

/// The best presence among a user's resources: most reachable `show` first, then highest
/// priority, then resource name (so the choice is stable).
pub fn best_presence(resources: &[(String, ResourcePresence)]) -> GlobalPresence {
    resources
        .iter()
        .max_by(|(ra, a), (rb, b)| {
            (rank(a.show.as_deref()), a.priority, rb).cmp(&(
                rank(b.show.as_deref()),
                b.priority,
                ra,
            ))
        })
        .map_or(GlobalPresence::Unavailable, |(_, p)| {
            GlobalPresence::Available {
                show: p.show.clone(),
                status: p.status.clone(),
            }
        })
}

impl GlobalPresence {
    fn to_stanza(&self, from: &str, to: &str) -> Element {
        match self {
            GlobalPresence::Unavailable => presence(from, to, Some("unavailable")),
            GlobalPresence::Available { show, status } => {
                let mut p = presence(from, to, None);
                if let Some(show) = show {
                    p.append_child(
                        Element::builder("show", STANZA_NS)
                            .append(show.as_str())
                            .build(),
                    );
                }
                if let Some(status) = status {
                    p.append_child(
                        Element::builder("status", STANZA_NS)
                            .append(status.as_str())
                            .build(),
                    );
                }
                p
            }
        }
    }

    pub fn is_available(&self) -> bool {
        matches!(self, GlobalPresence::Available { .. })
    }

    /// Available and not away, xa or dnd: the user is at an XMPP client.
    pub fn is_attentive(&self) -> bool {
        matches!(self, GlobalPresence::Available { show: None, .. })
            || matches!(self, GlobalPresence::Available { show: Some(s), .. } if s == "chat")
    }
}

pub(crate) fn global_presence(store: &Store, user: &User) -> Result<GlobalPresence, StoreError> {
    Ok(best_presence(&store.resources(&user.jid)?))
}

/// Recomputes the reach address's global presence after one of its inputs changed (a terminal's
/// local state, a terminal added or removed) and tells the buddies if it differs from what they
/// last saw. Resource changes go through `on_service_presence`.
pub(crate) fn refresh_global(_core: &Core, _store: &Store, _now: u64, _user: &User, _out: &mut Out) -> Result<(), StoreError> {
    // Today the global presence is the XMPP presence alone, which terminals do not change.
    Ok(())
}

/// After a (re)connect the resources Reach knew may be stale: forget them, tell buddies the
/// truth as it is re-learnt, and probe every user.
pub(super) fn on_link_up(core: &Core, store: &Store, out: &mut Out) -> Result<(), StoreError> {
    let users = store.users()?;
    for user in &users {
        let had_resources = !store.resources(&user.jid)?.is_empty();
        if had_resources {
            broadcast(core, store, user, &GlobalPresence::Unavailable, out)?;
        }
    }
    store.clear_resources()?;
    for user in &users {
        out.send(presence(&core.settings.domain, &user.jid, Some("probe")));
    }
    Ok(())
}

pub(super) fn on_presence(
    core: &Core,
    store: &Store,
    now: u64,
    stanza: &Element,
    who: &Addressing,
    out: &mut Out,
) -> Handled {
    let type_ = attr(stanza, "type");
    match &who.target {
        LocalTarget::Service => on_service_presence(core, store, now, stanza, type_, who, out),
        LocalTarget::User(handle) => {
            let Some(user) = store.user_by_handle(handle)? else {
                return match type_ {
                    "subscribe" => Err(StanzaFault::item_not_found("no such reach address").into()),
                    "probe" => {
                        out.send(presence(
                            attr(stanza, "to"),
                            &who.from_bare,
                            Some("unsubscribed"),
                        ));
                        Ok(())
                    }
                    _ => Ok(()),
                };
            };
            on_address_presence(core, store, &user, type_, who, out)
        }
        LocalTarget::Session(peer) => {
            let Some(user) = store.user(&who.from_bare)? else {
                return match type_ {
                    "subscribe" | "probe" => {
                        Err(super::registration::registration_required().into())
                    }
                    _ => Ok(()),
                };
            };
            let session_jid = core.session_jid(&peer.to_string());
            match type_ {
                // The user may put a per-session JID in their roster.
                "subscribe" => out.send(presence(&session_jid, &user.jid, Some("subscribed"))),
                "probe" => {
                    let buddy = store
                        .buddy(&user.handle, &peer.to_string())?
                        .unwrap_or_default();
                    let shown = if buddy.online {
                        None
                    } else {
                        Some("unavailable")
                    };
                    out.send(presence(&session_jid, &user.jid, shown));
                }
                _ => {}
            }
            Ok(())
        }
        LocalTarget::Invalid => match type_ {
            "subscribe" => {
                Err(StanzaFault::item_not_found("no such address at this service").into())
            }
            _ => Ok(()),
        },
    }
}

/// Presence addressed to the service itself: the user's resources, and subscriptions to `D`.
fn on_service_presence(
    core: &Core,
    store: &Store,
    now: u64,
    stanza: &Element,
    type_: &str,
    who: &Addressing,
    out: &mut Out,
) -> Handled {
    let service = core.settings.domain.as_str();
    match type_ {
        "probe" => out.send(presence(service, &who.from_bare, None)),
        "subscribe" => {
            out.send(presence(service, &who.from_bare, Some("subscribed")));
            out.send(presence(service, &who.from_bare, None));
        }
        "" | "unavailable" => {
            let Some(user) = store.user(&who.from_bare)? else {
                return Ok(());
            };
            let resource = who
                .from
                .resource()
                .map(|r| r.as_str().to_owned())
                .unwrap_or_default();
            let before = global_presence(store, &user)?;
            if type_ == "unavailable" {
                store.remove_resource(&user.jid, &resource)?;
            } else {
                let show = child_text(stanza, "show").filter(|s| rank(Some(s)) > 0);
                let priority = child_text(stanza, "priority")
                    .and_then(|p| p.trim().parse().ok())
                    .unwrap_or(0);
                let status = child_text(stanza, "status");
                store.set_resource(
                    &user.jid,
                    &resource,
                    &ResourcePresence {
                        show,
                        priority,
                        status,
                    },
                )?;
            }
            let after = global_presence(store, &user)?;
            if after != before {
                broadcast(core, store, &user, &after, out)?;
            }
            if after.is_available() && !before.is_available() {
                relay::release_held(store, &user, now, out)?;
            }
            if after.is_available()
                && (!before.is_available() || (after.is_attentive() && !before.is_attentive()))
            {
                super::forward::on_user_back(store, &user, after.is_attentive(), out)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Presence addressed to a reach address, from a buddy.
fn on_address_presence(
    core: &Core,
    store: &Store,
    user: &User,
    type_: &str,
    who: &Addressing,
    out: &mut Out,
) -> Handled {
    let address = core.reach_address(&user.handle);
    let buddy_jid = who.from_bare.as_str();
    let mut buddy = store.buddy(&user.handle, buddy_jid)?.unwrap_or_default();
    let before = buddy.clone();
    match type_ {
        "subscribe" => {
            buddy.receives_presence = true;
            out.send(presence(&address, buddy_jid, Some("subscribed")));
            out.send(global_presence(store, user)?.to_stanza(&address, buddy_jid));
            if !buddy.we_subscribed {
                buddy.we_subscribed = true;
                out.send(presence(&address, buddy_jid, Some("subscribe")));
            }
        }
        "unsubscribe" => {
            buddy.receives_presence = false;
            out.send(presence(&address, buddy_jid, Some("unsubscribed")));
        }
        "subscribed" => buddy.we_subscribed = true,
        "unsubscribed" => {
            buddy.we_subscribed = false;
            buddy.online = false;
        }
        "probe" => {
            if buddy.receives_presence {
                out.send(global_presence(store, user)?.to_stanza(&address, buddy_jid));
            } else {
                out.send(presence(&address, buddy_jid, Some("unsubscribed")));
            }
        }
        "" => buddy.online = true,
        "unavailable" => buddy.online = false,
        _ => {}
    }
    if buddy != before {
        if buddy == Buddy::default() {
            store.remove_buddy(&user.handle, buddy_jid)?;
        } else {
            store.put_buddy(&user.handle, buddy_jid, &buddy)?;
        }
    }
    Ok(())
}

/// Sends the reach address's presence to every buddy who receives it.
fn broadcast(
    core: &Core,
    store: &Store,
    user: &User,
    global: &GlobalPresence,
    out: &mut Out,
) -> Result<(), StoreError> {
    let address = core.reach_address(&user.handle);
    for (buddy, record) in store.buddies(&user.handle)? {
        if record.receives_presence {
            out.send(global.to_stanza(&address, &buddy));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testing::*;

    fn res(name: &str, show: Option<&str>, priority: i8) -> (String, ResourcePresence) {
        (
            name.into(),
            ResourcePresence {
                show: show.map(Into::into),
                priority,
                status: Some(name.into()),
            },
        )
    }

    type Case<'a> = (&'a [(String, ResourcePresence)], Option<&'a str>, &'a str);

    #[test]
    fn best_presence_prefers_the_most_reachable_then_priority() {
        assert_eq!(best_presence(&[]), GlobalPresence::Unavailable);
        let cases: &[Case] = &[
            (&[res("a", Some("away"), 5), res("b", None, 0)], None, "b"),
            (
                &[res("a", Some("xa"), 0), res("b", Some("dnd"), 0)],
                Some("dnd"),
                "b",
            ),
            (&[res("a", None, 1), res("b", None, 2)], None, "b"),
            (
                &[res("a", Some("chat"), -1), res("b", None, 10)],
                Some("chat"),
                "a",
            ),
            (
                &[res("a", Some("away"), 0), res("b", Some("xa"), 9)],
                Some("away"),
                "a",
            ),
        ];
        for (resources, show, status) in cases {
            assert_eq!(
                best_presence(resources),
                GlobalPresence::Available {
                    show: show.map(Into::into),
                    status: Some((*status).into())
                },
                "{resources:?}"
            );
        }
    }

    #[test]
    fn a_buddy_subscription_is_accepted_and_returned() {
        let t = Harness::new();
        t.register("alice@example.org", "alice");
        let out = t.run(&format!(
            "<presence type='subscribe' from='bob@example.net/x' to='alice@{D}'/>"
        ));
        let types: Vec<_> = out
            .iter()
            .map(|p| p.attr("type").unwrap_or("available"))
            .collect();
        assert_eq!(types, vec!["subscribed", "unavailable", "subscribe"]);
        assert!(out
            .iter()
            .all(|p| p.attr("from") == Some(&*format!("alice@{D}"))
                && p.attr("to") == Some("bob@example.net")));
        // Asking again does not ask back again.
        let again = t.run(&format!(
            "<presence type='subscribe' from='bob@example.net/x' to='alice@{D}'/>"
        ));
        assert_eq!(again.len(), 2);
    }

    #[test]
    fn the_reach_address_follows_the_users_resources() {
        let t = Harness::new();
        t.register("alice@example.org", "alice");
        t.run(&format!(
            "<presence type='subscribe' from='bob@example.net' to='alice@{D}'/>"
        ));
        let out = t.run(&format!("<presence from='alice@example.org/laptop' to='{D}'><show>away</show><status>lunch</status></presence>"));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].attr("to"), Some("bob@example.net"));
        assert_eq!(child_text(&out[0], "show").as_deref(), Some("away"));
        assert_eq!(child_text(&out[0], "status").as_deref(), Some("lunch"));
        // A second, better resource changes the global presence.
        let out = t.run(&format!(
            "<presence from='alice@example.org/phone' to='{D}'/>"
        ));
        assert_eq!(child_text(&out[0], "show"), None);
        // The same presence again changes nothing.
        assert!(t
            .run(&format!(
                "<presence from='alice@example.org/phone' to='{D}'/>"
            ))
            .is_empty());
        t.run(&format!(
            "<presence type='unavailable' from='alice@example.org/phone' to='{D}'/>"
        ));
        let out = t.run(&format!(
            "<presence type='unavailable' from='alice@example.org/laptop' to='{D}'/>"
        ));
        assert_eq!(out[0].attr("type"), Some("unavailable"));
        // A probe is answered with the current state.
        let out = t.run(&format!(
            "<presence type='probe' from='bob@example.net' to='alice@{D}'/>"
        ));
        assert_eq!(out[0].attr("type"), Some("unavailable"));
        let out = t.run(&format!(
            "<presence type='probe' from='stranger@example.net' to='alice@{D}'/>"
        ));
        assert_eq!(out[0].attr("type"), Some("unsubscribed"));
    }

    #[test]
    fn link_up_forgets_resources_and_probes_users() {
        let t = Harness::new();
        t.register("alice@example.org", "alice");
        t.run(&format!(
            "<presence type='subscribe' from='bob@example.net' to='alice@{D}'/>"
        ));
        t.run(&format!(
            "<presence from='alice@example.org/laptop' to='{D}'/>"
        ));
        let out = t.event(crate::core::Event::LinkUp);
        assert_eq!(out[0].attr("to"), Some("bob@example.net"));
        assert_eq!(out[0].attr("type"), Some("unavailable"));
        assert_eq!(out[1].attr("type"), Some("probe"));
        assert_eq!(out[1].attr("to"), Some("alice@example.org"));
        assert!(t.store.resources("alice@example.org").unwrap().is_empty());
    }

    #[test]
    fn subscribing_to_an_unknown_handle_is_an_error() {
        let t = Harness::new();
        let reply = t.one(&format!(
            "<presence type='subscribe' from='bob@example.net' to='ghost@{D}'/>"
        ));
        assert_error(&reply, "item-not-found");
    }
}
