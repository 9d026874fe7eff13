//! IQ requests: service discovery (XEP-0030), ping (XEP-0199), software version (XEP-0092), and
//! dispatch of registration (XEP-0077) and ad-hoc commands (XEP-0050) to their modules.

use minidom::Element;

use crate::xmpp::stanza::{an, NONE};
use xmpp_parsers::ns;

use super::{adhoc, registration, Addressing, Core, Handled, Out};
use crate::address::LocalTarget;
use crate::core::Transaction;
use crate::xmpp::stanza::{attr, iq_result, StanzaFault, COMMANDS};

/// Features of the service `D`.
const SERVICE_FEATURES: &[&str] = &[
    ns::DISCO_INFO,
    ns::DISCO_ITEMS,
    ns::REGISTER,
    COMMANDS,
    ns::PING,
    ns::VERSION,
];

/// Features of a reach address `HANDLE@D` and of a per-session JID: what Reach relays.
const ADDRESS_FEATURES: &[&str] = &[
    ns::DISCO_INFO,
    ns::PING,
    ns::RECEIPTS,
    ns::CHATSTATES,
    crate::xmpp::stanza::CHAT_MARKERS,
];

pub(super) fn on_iq(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    iq: &Element,
    who: &Addressing,
    out: &mut Out,
) -> Handled {
    let type_ = attr(iq, "type");
    if type_ != "get" && type_ != "set" {
        // Results and errors answer nothing Reach asked that needs follow-up.
        return Ok(());
    }
    let Some(payload) = iq.children().next() else {
        return Err(StanzaFault::bad_request("an iq get/set needs exactly one payload").into());
    };
    let payload_ns = payload.ns();
    let request = (type_, payload.name(), payload_ns.as_str());
    match &who.target {
        LocalTarget::Service => match request {
            ("get", "query", ns::DISCO_INFO) => {
                out.send(iq_result(iq, Some(service_info(payload.attr("node"))?)));
                Ok(())
            }
            ("get", "query", ns::DISCO_ITEMS) => {
                out.send(iq_result(iq, Some(items(core, payload.attr("node"))?)));
                Ok(())
            }
            ("set", "command", COMMANDS) => {
                adhoc::on_command(core, store, now, iq, payload, who, out)
            }
            ("get", "ping", ns::PING) => {
                out.send(iq_result(iq, None));
                Ok(())
            }
            ("get", "query", ns::VERSION) => {
                out.send(iq_result(iq, Some(version())));
                Ok(())
            }
            (_, "query", ns::REGISTER) => {
                registration::on_register(core, store, now, iq, payload, who, out)
            }
            _ => Err(StanzaFault::service_unavailable().into()),
        },
        LocalTarget::User(handle) => {
            if store.user_by_handle(handle)?.is_none() {
                return Err(StanzaFault::item_not_found("no such reach address").into());
            }
            address_iq(
                iq,
                request,
                &format!("Reach address {}", handle.as_str()),
                out,
            )
        }
        LocalTarget::Session(peer) => {
            if store.user(&who.from_bare)?.is_none() {
                return Err(registration::registration_required().into());
            }
            address_iq(iq, request, &format!("Conversation with {peer}"), out)
        }
        LocalTarget::Invalid => {
            Err(StanzaFault::item_not_found("no such address at this service").into())
        }
    }
}

fn address_iq(iq: &Element, request: (&str, &str, &str), name: &str, out: &mut Out) -> Handled {
    match request {
        ("get", "query", ns::DISCO_INFO) => {
            out.send(iq_result(
                iq,
                Some(info(&[("client", "pc", name)], ADDRESS_FEATURES)),
            ));
            Ok(())
        }
        ("get", "ping", ns::PING) => {
            out.send(iq_result(iq, None));
            Ok(())
        }
        _ => Err(StanzaFault::service_unavailable().into()),
    }
}

/// disco#info at `D`, or at one of its nodes: the command list and each command.
fn service_info(node: Option<&str>) -> Result<Element, StanzaFault> {
    let Some(node) = node else {
        return Ok(info(
            &[("gateway", "smtp", "Reach"), ("gateway", "sms", "Reach")],
            SERVICE_FEATURES,
        ));
    };
    let mut query = if node == COMMANDS {
        info(&[("automation", "command-list", "Commands")], &[COMMANDS])
    } else if let Some(command) = adhoc::find(node) {
        info(
            &[("automation", "command-node", command.name)],
            &[COMMANDS, ns::DATA_FORMS],
        )
    } else {
        return Err(unknown_node(node));
    };
    query.set_attr(NONE, an("node"), node);
    Ok(query)
}

fn unknown_node(node: &str) -> StanzaFault {
    StanzaFault::item_not_found(format!("there is no node '{node}' here"))
}

fn info(identities: &[(&str, &str, &str)], features: &[&str]) -> Element {
    let mut query = Element::builder("query", ns::DISCO_INFO).build();
    for (category, type_, name) in identities {
        query.append_child(
            Element::builder("identity", ns::DISCO_INFO)
                .attr(an("category"), *category)
                .attr(an("type"), *type_)
                .attr(an("name"), *name)
                .build(),
        );
    }
    for feature in features {
        query.append_child(
            Element::builder("feature", ns::DISCO_INFO)
                .attr(an("var"), *feature)
                .build(),
        );
    }
    query
}

/// Items of `D`: none at the root; the ad-hoc commands at node `COMMANDS` (XEP-0050 §2.2); a
/// command node has no items.
fn items(core: &Core, node: Option<&str>) -> Result<Element, StanzaFault> {
    let mut query = Element::builder("query", ns::DISCO_ITEMS).build();
    match node {
        None => {}
        Some(COMMANDS) => return Ok(adhoc::command_items(&core.settings.domain)),
        Some(node) if adhoc::find(node).is_some() => query.set_attr(NONE, an("node"), node),
        Some(node) => return Err(unknown_node(node)),
    }
    Ok(query)
}

fn version() -> Element {
    Element::builder("query", ns::VERSION)
        .append(
            Element::builder("name", ns::VERSION)
                .append("Reach")
                .build(),
        )
        .append(
            Element::builder("version", ns::VERSION)
                .append(env!("CARGO_PKG_VERSION"))
                .build(),
        )
        .build()
}

#[cfg(test)]
mod tests {
    use crate::core::testing::*;
    #[allow(unused_imports)]
    use crate::core::Transaction;
    use xmpp_parsers::ns;

    #[test]
    fn service_discovery_names_the_gateway_identities_and_features() {
        let t = Harness::new();
        let reply = t.one(&format!(
            "<iq type='get' id='d1' from='bob@example.net/x' to='{D}'><query xmlns='{}'/></iq>",
            ns::DISCO_INFO
        ));
        assert_eq!(reply.attr("type"), Some("result"));
        let query = reply.get_child("query", ns::DISCO_INFO).unwrap();
        let identities: Vec<_> = query
            .children()
            .filter(|c| c.name() == "identity")
            .map(|c| {
                format!(
                    "{}/{}/{}",
                    c.attr("category").unwrap(),
                    c.attr("type").unwrap(),
                    c.attr("name").unwrap()
                )
            })
            .collect();
        assert_eq!(identities, vec!["gateway/smtp/Reach", "gateway/sms/Reach"]);
        let features: Vec<_> = query.children().filter_map(|c| c.attr("var")).collect();
        for f in [
            ns::REGISTER,
            "http://jabber.org/protocol/commands",
            ns::PING,
        ] {
            assert!(features.contains(&f), "{f} missing");
        }
    }

    #[test]
    fn discovery_at_an_unknown_handle_is_item_not_found() {
        let t = Harness::new();
        let reply = t.one(&format!(
            "<iq type='get' id='d2' from='bob@example.net/x' to='nobody@{D}'><query xmlns='{}'/></iq>",
            ns::DISCO_INFO
        ));
        assert_error(&reply, "item-not-found");
    }

    #[test]
    fn discovery_at_a_reach_address_and_ping_and_version() {
        let t = Harness::new();
        t.register("alice@example.org", "alice");
        let reply = t.one(&format!(
            "<iq type='get' id='d3' from='bob@example.net/x' to='alice@{D}'><query xmlns='{}'/></iq>",
            ns::DISCO_INFO
        ));
        assert_eq!(reply.attr("type"), Some("result"));
        let features: Vec<_> = reply
            .get_child("query", ns::DISCO_INFO)
            .unwrap()
            .children()
            .filter_map(|c| c.attr("var"))
            .collect();
        assert!(features.contains(&ns::RECEIPTS));
        let pong = t.one(&format!(
            "<iq type='get' id='p' from='bob@example.net/x' to='{D}'><ping xmlns='{}'/></iq>",
            ns::PING
        ));
        assert_eq!(pong.attr("type"), Some("result"));
        assert_eq!(pong.attr("id"), Some("p"));
        let version = t.one(&format!(
            "<iq type='get' id='v' from='bob@example.net/x' to='{D}'><query xmlns='{}'/></iq>",
            ns::VERSION
        ));
        let q = version.get_child("query", ns::VERSION).unwrap();
        assert_eq!(q.get_child("name", ns::VERSION).unwrap().text(), "Reach");
    }

    #[test]
    fn an_unknown_request_is_service_unavailable_and_results_are_ignored() {
        let t = Harness::new();
        let reply = t.one(&format!("<iq type='get' id='u' from='bob@example.net/x' to='{D}'><query xmlns='urn:example'/></iq>"));
        assert_error(&reply, "service-unavailable");
        assert!(t
            .run(&format!(
                "<iq type='result' id='u' from='bob@example.net/x' to='{D}'/>"
            ))
            .is_empty());
    }
}
