//! Alice's account at Reach as the stories set it up over XMPP: her email address and phone
//! number, registering (`jabber:iq:register`) and accepting Reach's subscription, the codes that
//! verify a terminal, and a chat line to the service with its answer.

use std::time::{Duration, Instant};

use super::kannel::Handset;
use super::mail::SinkMail;
use super::server::COMPONENT_DOMAIN;
use super::{body, Client};

pub const ALICE_MAIL: &str = "alice@mail.example";
pub const PHONE: &str = "+15551234567";
/// The number Reach sends its SMS from, and that the phone texts.
pub const SERVICE_NUMBER: &str = "+15550000000";

/// Registers with Reach (`fields`: the query's children, e.g. `<username>alice</username>`),
/// then accepts Reach's subscription request, which must come within `within`.
pub async fn register(client: &mut Client, fields: &str, within: Duration) {
    asks_to_register(client, fields).await;
    client
        .expect("Reach's subscription request", within, |s| {
            s.attr("type") == Some("subscribe")
        })
        .await;
    client
        .send(&format!(
            "<presence type='subscribed' to='{COMPONENT_DOMAIN}'/>"
        ))
        .await;
}

/// Sends the registration form (`fields`: the query's children); Reach must accept it.
pub async fn asks_to_register(client: &mut Client, fields: &str) {
    let ok = client
        .iq(&format!(
            "<iq type='set' id='reg' to='{COMPONENT_DOMAIN}'><query xmlns='jabber:iq:register'>{fields}</query></iq>"
        ))
        .await;
    assert_eq!(ok.attr("type"), Some("result"), "{}", String::from(&ok));
}

/// A chat line to the service; returns its answer (which must come within `within`).
pub async fn say(client: &mut Client, line: &str, within: Duration) -> String {
    client
        .send(&format!(
            "<message type='chat' to='{COMPONENT_DOMAIN}'><body>{line}</body></message>"
        ))
        .await;
    let reply = client
        .expect(line, within, |s| {
            s.attr("from") == Some(COMPONENT_DOMAIN)
                && body(s).is_some_and(|b| !b.contains("on its way"))
        })
        .await;
    body(&reply).unwrap()
}

/// The code in a verification email (the digits of its subject).
pub fn email_code(mail: &SinkMail) -> String {
    let subject = mail.header("Subject").unwrap();
    subject.chars().filter(char::is_ascii_digit).collect()
}

/// The six-digit code of the next SMS at the phone that has one; panics after `within`.
pub async fn phone_code(phone: &mut Handset, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mt = phone.recv_mt(left).await.expect("the phone's code");
        if let Some(code) = mt
            .text
            .split(|c: char| !c.is_ascii_digit())
            .find(|w| w.len() == 6)
        {
            return code.to_owned();
        }
    }
}
