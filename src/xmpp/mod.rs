//! The XMPP side: the component link (XEP-0114) and the payloads Reach builds and reads.

pub mod adhoc;
pub mod depth_guard;
pub mod forms;
pub mod link;
pub mod stanza;
pub mod xml_text;
