//! The email terminal: Reach's own SMTP listener for replies, reading replies, rendering and
//! sending outbound mail through the relay, and optional DKIM/DMARC checks.
//!
//! These adapters know nothing of XMPP or of the routing decision: the core decides what to send
//! and whether a reply is accepted; the adapters speak SMTP and MIME.

pub mod auth;
pub mod extract;
pub mod message;
pub mod outbound;
pub mod sender;
pub mod smtp;
