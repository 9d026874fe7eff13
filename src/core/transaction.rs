//! The transaction the core decides in: every read and write of Reach's state during one batch
//! of events, committed at once by the caller (a sled flush, an SQL `COMMIT`).
//!
//! The core only knows this trait; `crate::store` implements it on each engine. Besides typed
//! reads and writes it names what several instances sharing one store rely on:
//! - [`Transaction::lock_user`]: *take a user for update*. Every operation on a user's data
//!   takes it (reading the user record does), so two instances never decide for the same user
//!   at once. A user another instance holds, asked for while this transaction holds another
//!   user, is [`StoreError::Busy`]: the runtime commits the batch so far and handles the event
//!   in a new transaction.
//! - [`Transaction::claim_user`]: *claim due items* of a user without waiting; a user another
//!   instance is busy with is skipped (its due work is done there or at the next tick).
//! - [`Transaction::bump_counter`], [`Transaction::count_sms`], [`Transaction::count_email`]:
//!   *atomic counters*: no increment is lost when instances count at the same time.
//! - [`Transaction::first_sight_of_mail`], [`Transaction::first_sight_of_sms`]: *first
//!   sight*: of two instances taking the same Message-ID or SMS id at once, one commits and
//!   the other runs again and sees it.
//! - [`Transaction::put_user`]: *unique handles*, the same way.

use minidom::Element;

use super::model::*;
use super::GlobalPresence;
use crate::address::Handle;

/// Reads and writes of one transaction (see the module comment).
pub trait Transaction {
    /// Takes the user (by bare JID) for update until the transaction ends (see the module
    /// comment). Reading or writing the user's data takes it too; calling it first makes the
    /// order explicit.
    fn lock_user(&mut self, jid: &str) -> Result<()>;

    /// What the server host `host` allows Reach (XEP-0356), as it last said.
    fn host_privileges(&mut self, host: &str) -> Result<Option<HostPrivileges>>;

    /// Records what the server host `host` allows Reach.
    fn put_host_privileges(&mut self, host: &str, privileges: &HostPrivileges) -> Result<()>;

    /// Notes that the user's resource went offline at `at` (see `presence::on_service_presence`).
    fn put_resource_gone(&mut self, jid: &str, resource: &str, at: u64) -> Result<()>;

    /// When the user's resource last went offline, if that was noted; the note is removed.
    fn take_resource_gone(&mut self, jid: &str, resource: &str) -> Result<Option<u64>>;

    /// Takes the user for update if no other instance holds it; false at once if one does.
    fn claim_user(&mut self, jid: &str) -> Result<bool>;

    /// Takes the walk over all users after a reconnect (one instance walks at a time); false
    /// if another instance is walking.
    fn claim_presence_walk(&mut self) -> Result<bool>;

    fn user(&mut self, jid: &str) -> Result<Option<User>>;

    fn user_by_handle(&mut self, handle: &Handle) -> Result<Option<User>>;

    /// Creates or updates a user. Fails with [`StoreError::HandleTaken`] if another user holds
    /// the handle; releases the user's previous handle when it changes.
    fn put_user(&mut self, user: &User) -> Result<()>;

    /// The user whose verified phone this is.
    fn user_by_phone(&mut self, phone: &str) -> Result<Option<User>>;

    /// Deletes the user and everything that belongs to them. Returns the removed record and the
    /// buddies of their reach address (so they can be told).
    fn remove_user(&mut self, jid: &str) -> Result<Option<(User, Vec<String>)>>;

    fn users(&mut self) -> Result<Vec<User>>;

    /// Up to `limit` users whose JID sorts after `after` (from the first with `None`), in JID
    /// order: for walking all users a step at a time.
    fn users_after(&mut self, after: Option<&str>, limit: usize) -> Result<Vec<User>>;

    /// Where the walk over all users after a reconnect stands: `Some("")` at its start,
    /// `Some(jid)` after that user, `None` when there is no walk.
    fn presence_walk(&mut self) -> Result<Option<String>>;

    fn set_presence_walk(&mut self, at: Option<&str>) -> Result<()>;

    fn buddy(&mut self, handle: &Handle, buddy: &str) -> Result<Option<Buddy>>;

    fn put_buddy(&mut self, handle: &Handle, buddy: &str, record: &Buddy) -> Result<()>;

    fn remove_buddy(&mut self, handle: &Handle, buddy: &str) -> Result<()>;

    fn buddies(&mut self, handle: &Handle) -> Result<Vec<(String, Buddy)>>;

    /// The global presence last sent to the reach address's buddies (`None`: never published).
    fn published_presence(&mut self, jid: &str) -> Result<Option<GlobalPresence>>;

    fn put_published_presence(&mut self, jid: &str, presence: &GlobalPresence) -> Result<()>;

    fn subscription_request(
        &mut self,
        handle: &Handle,
        buddy: &str,
    ) -> Result<Option<SubscriptionRequest>>;

    fn put_subscription_request(
        &mut self,
        handle: &Handle,
        buddy: &str,
        request: &SubscriptionRequest,
    ) -> Result<()>;

    /// Removes a waiting request; returns it if there was one.
    fn take_subscription_request(
        &mut self,
        handle: &Handle,
        buddy: &str,
    ) -> Result<Option<SubscriptionRequest>>;

    /// The waiting requests to a reach address, as (buddy, request).
    fn subscription_requests(
        &mut self,
        handle: &Handle,
    ) -> Result<Vec<(String, SubscriptionRequest)>>;

    /// How many buddy records and waiting subscription requests the reach address has
    /// (`[limits] buddies_per_user`); counts keys, decodes nothing.
    fn buddy_count(&mut self, handle: &Handle) -> Result<usize>;

    fn buddy_alert(
        &mut self,
        jid: &str,
        terminal: TerminalKind,
        buddy: &str,
    ) -> Result<Option<BuddyAlert>>;

    fn put_buddy_alert(&mut self, alert: &BuddyAlert) -> Result<()>;

    /// Asks for another look at this alert record at `due_at` (an alert was held back by the
    /// rate limit, so the terminal may not know the buddy's latest state).
    fn schedule_alert_recheck(&mut self, alert: &BuddyAlert, due_at: u64) -> Result<()>;

    /// Removes and returns the rechecks due at `now`, as (user, terminal, buddy).
    fn take_due_alert_rechecks(&mut self, now: u64) -> Result<Vec<(String, TerminalKind, String)>>;

    fn set_resource(
        &mut self,
        jid: &str,
        resource: &str,
        presence: &ResourcePresence,
    ) -> Result<()>;

    fn remove_resource(&mut self, jid: &str, resource: &str) -> Result<()>;

    fn resources(&mut self, jid: &str) -> Result<Vec<(String, ResourcePresence)>>;

    /// Forgets every resource of every user (their presence is re-learnt after a reconnect).
    fn clear_resources(&mut self) -> Result<()>;

    fn session(&mut self, jid: &str, peer: &str) -> Result<Option<Session>>;

    /// Marks activity in the conversation, creating it if new.
    fn touch_session(&mut self, jid: &str, peer: &str, now: u64) -> Result<Session>;

    fn put_session(&mut self, jid: &str, session: &Session) -> Result<()>;

    fn sessions(&mut self, jid: &str) -> Result<Vec<Session>>;

    fn hold(&mut self, jid: &str, message: &HeldMessage) -> Result<()>;

    /// Removes and returns the user's oldest held messages, at most `limit` of them, oldest
    /// first. Only that page is read.
    fn take_held_page(&mut self, jid: &str, limit: usize) -> Result<Vec<HeldMessage>>;

    /// Removes and returns all the user's held messages, oldest first (bounded by the caps on
    /// what may be held, `[limits] held_per_user`).
    fn take_held(&mut self, jid: &str) -> Result<Vec<HeldMessage>>;

    /// How many messages are held for the user (one read).
    fn held_count(&mut self, jid: &str) -> Result<usize>;

    /// How many messages wait for the user, held for XMPP or pending a forward (two reads).
    fn waiting_count(&mut self, jid: &str) -> Result<usize>;

    /// How many messages from `peer` are held for the user (one read).
    fn held_from(&mut self, jid: &str, peer: &str) -> Result<usize>;

    /// Notes that the user's held messages are being delivered a page at a time.
    fn mark_held_release(&mut self, jid: &str) -> Result<()>;

    /// Whether the user's held messages are being delivered a page at a time.
    fn held_release_running(&mut self, jid: &str) -> Result<bool>;

    fn end_held_release(&mut self, jid: &str) -> Result<()>;

    /// The users whose held messages are being delivered a page at a time.
    fn held_releases(&mut self) -> Result<Vec<String>>;

    /// Puts messages back on hold (in front of nothing: they keep their own order after what is held).
    fn hold_stanza(&mut self, jid: &str, peer: &str, stanza: &str, now: u64) -> Result<()>;

    fn put_alias(&mut self, token_hash: &[u8], alias: &Alias) -> Result<()>;

    fn alias(&mut self, token_hash: &[u8]) -> Result<Option<Alias>>;

    fn remove_alias(&mut self, token_hash: &[u8]) -> Result<()>;

    fn put_verification(&mut self, jid: &str, v: &Verification) -> Result<()>;

    fn verification(&mut self, jid: &str, kind: TerminalKind) -> Result<Option<Verification>>;

    /// Every user waiting to verify `address` as a terminal of this kind (several may have
    /// asked for the same number before one of them proved it), with the verification; read
    /// from the index, not by a scan.
    fn verifications_for_address(
        &mut self,
        kind: TerminalKind,
        address: &str,
    ) -> Result<Vec<(String, Verification)>>;

    fn remove_verification(&mut self, jid: &str, kind: TerminalKind) -> Result<()>;

    fn pending_of(&mut self, jid: &str, peer: &str) -> Result<Option<Pending>>;

    /// How many items wait in the conversation's pending forward (reads the head only).
    fn pending_count(&mut self, jid: &str, peer: &str) -> Result<usize>;

    /// Adds one item (with its terminal and due time) to the conversation's pending forward:
    /// it joins its terminal's batch, which is then due at the earlier of the two times. Reads
    /// and writes the head and writes the item, nothing else.
    fn add_pending(&mut self, jid: &str, peer: &str, item: &PendingItem) -> Result<()>;

    /// Replaces the conversation's pending forward with this one (an empty one removes it).
    fn put_pending(&mut self, jid: &str, pending: &Pending) -> Result<()>;

    fn remove_pending(&mut self, jid: &str, peer: &str) -> Result<()>;

    /// Everything pending for the user, by conversation.
    fn pending_for(&mut self, jid: &str) -> Result<Vec<Pending>>;

    /// Every conversation whose forward is due, as (user, pending). Reads only what is due.
    fn due_pending(&mut self, now: u64) -> Result<Vec<(String, Pending)>>;

    fn enqueue_email(&mut self, job: &EmailJob) -> Result<u64>;

    fn remove_email_job(&mut self, seq: u64) -> Result<()>;

    fn enqueue_sms(&mut self, job: &SmsJob) -> Result<u64>;

    fn remove_sms_job(&mut self, seq: u64) -> Result<()>;

    /// Remembers what an SMS carried, for its delivery report.
    fn put_sent_sms(&mut self, reference: &str, sent: &SentSms) -> Result<()>;

    fn sent_sms(&mut self, reference: &str) -> Result<Option<SentSms>>;

    fn take_sent_sms(&mut self, reference: &str) -> Result<Option<SentSms>>;

    /// SMS sent to the user on `day` (days since the Unix epoch).
    fn sms_count(&mut self, jid: &str, day: u64) -> Result<u32>;

    fn count_sms(&mut self, jid: &str, day: u64) -> Result<u32>;

    /// Forwarding emails sent to the user on `day` (days since the Unix epoch).
    fn email_count(&mut self, jid: &str, day: u64) -> Result<u32>;

    fn count_email(&mut self, jid: &str, day: u64) -> Result<u32>;

    /// Records an incoming SMS's provider id; false if it was seen before.
    fn first_sight_of_sms(&mut self, provider_id: &str, now: u64) -> Result<bool>;

    /// How many times `name` happened for `scope` in the current window of `period` seconds.
    fn counter(&mut self, name: &str, scope: &str, period: u64, now: u64) -> Result<u32>;

    /// Counts one more `name` for `scope` in the current window; returns the new count.
    fn bump_counter(&mut self, name: &str, scope: &str, period: u64, now: u64) -> Result<u32>;

    /// Removes the counters of windows that are over.
    /// Reads only the counters whose window ended.
    fn prune_counters(&mut self, now: u64) -> Result<()>;

    /// Everything held about one user (see [`UserState`]).
    fn user_state(&mut self, jid: &str) -> Result<UserState>;

    /// Records that the mail with this Message-ID was taken for one recipient alias (given by its
    /// token hash); false if that pair was seen before. One mail sent to two aliases is two
    /// deliveries (one per conversation); the same mail resent to one alias is one.
    ///
    /// Key: `mail \0 HEX(alias hash) \0 Message-ID`. Ids recorded before the key named the alias
    /// (the bare Message-ID) are not consulted: they age out like any other.
    fn first_sight_of_mail(
        &mut self,
        message_id: &str,
        alias_hash: &[u8; 32],
        now: u64,
    ) -> Result<bool>;

    /// Forgets the ids of mail and SMS first seen before `cutoff` (a resend after that is taken
    /// again). Reads only what it forgets. Returns how many were forgotten.
    fn forget_seen_before(&mut self, cutoff: u64) -> Result<usize>;

    /// Queues a stanza for the component link; it leaves once the transaction is committed.
    fn enqueue_stanza(&mut self, stanza: &Element) -> Result<()>;

    /// Sets an input aside (once committed). Returns its id.
    fn put_dead_letter(&mut self, letter: &DeadLetter) -> Result<u64>;

    /// The dead letter whose input has this fingerprint, if one was set aside.
    fn dead_letter_by_fingerprint(&mut self, fingerprint: &[u8]) -> Result<Option<u64>>;
}
