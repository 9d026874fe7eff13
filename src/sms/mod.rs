//! The SMS terminal's adapters: the provider that sends SMS (MT) to users' phones, and the webhook
//! through which the gateway hands Reach incoming SMS (MO) and delivery reports.
//!
//! A provider is small on purpose (mautrix bridgev2 style): [`SmsProvider::send`] is the one
//! required method; delivery reports are an optional capability ([`SmsProvider::delivery_reports`]).
//! The first backend is Kannel ([`kannel`]); the webhook ([`webhook`]) speaks the parameters
//! Kannel's `get-url` / `dlr-url` send.
//!
//! No routing decisions here: the adapters translate between HTTP and the plain values below;
//! the core decides what to text and what an incoming SMS means. Phone numbers and message texts
//! are never logged above `debug`.

pub mod format;
pub mod kannel;
pub mod sender;
pub mod text;
pub mod webhook;

use std::future::Future;

/// An SMS to send to a user's phone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingSms {
    /// The user's number in E.164 form (`+15551234567`).
    pub to: String,
    /// The text, already formatted and shortened to fit (see [`format`](mod@format)).
    pub text: String,
    /// Reach's identifier for this SMS, echoed in delivery reports
    /// ([`DeliveryReport::reference`]). Printable ASCII, no spaces.
    pub reference: String,
}

/// Why an SMS was not handed to the gateway. The split decides retry versus giving up: the
/// sender retries [`Transient`](SmsSendError::Transient) failures with backoff and reports
/// [`Permanent`](SmsSendError::Permanent) ones to the buddy.
///
/// The texts never contain the gateway password, the number or the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SmsSendError {
    /// The gateway is down, overloaded or did not answer in time: try again later.
    #[error("SMS gateway temporarily unavailable: {0}")]
    Transient(String),
    /// The gateway refused this SMS (or Reach's credentials); retrying will not help.
    #[error("SMS gateway refused the message: {0}")]
    Permanent(String),
}

impl SmsSendError {
    /// Whether retrying cannot help.
    pub fn is_permanent(&self) -> bool {
        matches!(self, SmsSendError::Permanent(_))
    }
}

/// A gateway that sends SMS.
pub trait SmsProvider: Send + Sync + 'static {
    /// Hands one SMS to the gateway. `Ok` means the gateway accepted it (it may still be
    /// queued there); it says nothing about the phone having it.
    fn send(&self, sms: &OutgoingSms) -> impl Future<Output = Result<(), SmsSendError>> + Send;

    /// Optional capability: whether this provider will call back with delivery reports.
    fn delivery_reports(&self) -> bool {
        false
    }
}

/// An SMS a phone sent to Reach's number.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IncomingSms {
    /// The sender's number, E.164, normalised with `+`.
    pub from: String,
    /// The number or short code it was sent to (as the gateway gives it).
    pub to: String,
    /// The text, decoded to UTF-8 whatever the SMS coding was.
    pub text: String,
    /// The gateway's identifier for this SMS, if it gives one. The gateway may deliver the same
    /// SMS twice (it retries when Reach did not answer 200), with the same identifier.
    pub provider_id: Option<String>,
}

/// What a delivery report says about an SMS.
///
/// Kannel's report types: 1 delivered to the phone and 2 not delivered (final), 4 buffered and
/// 8 accepted by the SMSC (intermediate), 16 rejected by the SMSC (final).
///
/// Reports for one SMS can arrive out of order (Kannel makes its calls concurrently: a
/// `Pending` may come after `Delivered`), and twice (Kannel retries until it gets a 200): a
/// `Pending` must never replace a final status.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeliveryStatus {
    /// The phone has it.
    Delivered,
    /// It will not be delivered; the text says why (the SMSC's status, short).
    Failed(String),
    /// On its way (accepted or buffered by the SMSC); a final report may follow.
    Pending,
}

/// A delivery report for an SMS Reach sent.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeliveryReport {
    /// [`OutgoingSms::reference`] of the SMS it is about.
    pub reference: String,
    /// What happened.
    pub status: DeliveryStatus,
}
