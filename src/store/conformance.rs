//! The store's conformance suite: what every engine must do the same way, written once and run
//! against each engine (`conformance!` below, instantiated for sled here and for PostgreSQL in
//! `super::postgres`). Besides the domain operations it checks the guarantees several instances
//! rely on, with two transactions (or two `Store`s, i.e. two instances) at once.

use super::*;
use crate::address::Handle;

pub(crate) fn alice() -> User {
    User {
        jid: "alice@example.org".into(),
        handle: Handle::parse("alice").unwrap(),
        email: None,
        phone: None,
        registered_at: 1,
        primary: None,
        subscription_policy: Default::default(),
        time_zone: None,
        integrated: false,
    }
}

pub(crate) fn sms_job(text: &str, next_attempt_at: u64) -> SmsJob {
    SmsJob {
        user: "a@x".into(),
        peer: None,
        to: "+15550001111".into(),
        text: text.into(),
        reference: text.into(),
        items: Vec::new(),
        attempts: 0,
        next_attempt_at,
        queued_at: 0,
        claimed_by: None,
    }
}

fn texts(jobs: &[(u64, SmsJob)]) -> Vec<&str> {
    jobs.iter().map(|(_, j)| j.text.as_str()).collect()
}

fn pending_item(text: &str, due_at: Option<u64>) -> PendingItem {
    PendingItem {
        at: 1,
        id: None,
        text: text.into(),
        stanza: format!("<message><body>{text}</body></message>"),
        on_xmpp: false,
        receipt: false,
        terminal: Some(TerminalKind::Email),
        due_at,
        unconditional: false,
    }
}

fn message(id: &str) -> Element {
    format!("<message xmlns='jabber:component:accept' id='{id}'/>")
        .parse()
        .unwrap()
}

pub(crate) fn handles_are_unique_and_released_on_rename(store: &Store) {
    store.write(|tx| tx.put_user(&alice())).unwrap();
    let mut mallory = alice();
    mallory.jid = "mallory@example.org".into();
    assert!(matches!(
        store.write(|tx| tx.put_user(&mallory)),
        Err(StoreError::HandleTaken)
    ));
    // Updating oneself with the same handle is fine.
    store.write(|tx| tx.put_user(&alice())).unwrap();
    let mut renamed = alice();
    renamed.handle = Handle::parse("al").unwrap();
    store.write(|tx| tx.put_user(&renamed)).unwrap();
    let old = Handle::parse("alice").unwrap();
    assert!(store.read(|tx| tx.user_by_handle(&old)).unwrap().is_none());
    store.write(|tx| tx.put_user(&mallory)).unwrap();
    assert_eq!(
        store
            .read(|tx| tx.user_by_handle(&old))
            .unwrap()
            .unwrap()
            .jid,
        "mallory@example.org"
    );
}

pub(crate) fn removing_a_user_removes_everything_of_theirs(store: &Store) {
    let a = alice();
    let bob = "bob@example.net";
    store
        .write(|tx| {
            tx.put_user(&a)?;
            tx.put_buddy(&a.handle, bob, &Buddy::default())?;
            tx.set_resource(
                &a.jid,
                "phone",
                &ResourcePresence {
                    show: None,
                    priority: 0,
                    status: None,
                },
            )?;
            tx.touch_session(&a.jid, bob, 5)?;
            tx.hold(
                &a.jid,
                &HeldMessage {
                    peer: bob.into(),
                    stanza: "<message/>".into(),
                    held_at: 5,
                },
            )?;
            tx.add_pending(&a.jid, bob, &pending_item("p", Some(9)))?;
            tx.count_sms(&a.jid, 3)?;
            let mut job = sms_job("for alice", 7);
            job.user = a.jid.clone();
            tx.enqueue_sms(&job)?;
            // Another user's data sharing a prefix must survive.
            tx.touch_session("alice@example.org.evil", "x@y", 5)?;
            Ok(())
        })
        .unwrap();

    let (removed, buddies) = store.write(|tx| tx.remove_user(&a.jid)).unwrap().unwrap();
    assert_eq!(removed, a);
    assert_eq!(buddies, vec![bob.to_string()]);
    store
        .read(|tx| {
            assert!(tx.user(&a.jid)?.is_none());
            assert!(tx.user_by_handle(&a.handle)?.is_none());
            assert!(tx.buddies(&a.handle)?.is_empty());
            assert!(tx.resources(&a.jid)?.is_empty());
            assert!(tx.sessions(&a.jid)?.is_empty());
            assert_eq!(tx.held_count(&a.jid)?, 0);
            assert_eq!(tx.waiting_count(&a.jid)?, 0);
            assert!(tx.pending_for(&a.jid)?.is_empty());
            assert!(tx.due_pending(u64::MAX - 1)?.is_empty());
            assert_eq!(tx.sms_count(&a.jid, 3)?, 0);
            assert!(tx.sms_jobs()?.is_empty());
            assert_eq!(tx.sessions("alice@example.org.evil")?.len(), 1);
            Ok(())
        })
        .unwrap();
}

pub(crate) fn held_messages_are_counted_and_taken_a_page_at_a_time_in_order(store: &Store) {
    store
        .write(|tx| {
            for i in 0..5 {
                let peer = if i % 2 == 0 { "b@c" } else { "d@e" };
                tx.hold(
                    "a@b",
                    &HeldMessage {
                        peer: peer.into(),
                        stanza: format!("<m{i}/>"),
                        held_at: i,
                    },
                )?;
            }
            Ok(())
        })
        .unwrap();
    store
        .read(|tx| {
            assert_eq!(tx.held_count("a@b")?, 5);
            assert_eq!(tx.held_from("a@b", "b@c")?, 3);
            assert_eq!(tx.held_from("a@b", "d@e")?, 2);
            Ok(())
        })
        .unwrap();
    let page = store.write(|tx| tx.take_held_page("a@b", 2)).unwrap();
    assert_eq!(page.iter().map(|m| m.held_at).collect::<Vec<_>>(), [0, 1]);
    let rest = store.write(|tx| tx.take_held("a@b")).unwrap();
    assert_eq!(
        rest.iter().map(|m| m.held_at).collect::<Vec<_>>(),
        [2, 3, 4]
    );
    store
        .read(|tx| {
            assert_eq!(tx.held_count("a@b")?, 0);
            assert_eq!(tx.held_from("a@b", "b@c")?, 0);
            assert!(tx.take_held("a@b")?.is_empty());
            Ok(())
        })
        .unwrap();
}

pub(crate) fn the_outbox_is_fifo_and_only_committed_stanzas_leave(store: &Store) {
    store
        .write(|tx| {
            for i in 0..3 {
                tx.enqueue_stanza(&message(&format!("m{i}")))?;
            }
            Ok(())
        })
        .unwrap();
    // A transaction not yet committed: nothing of it is visible to the link.
    let mut open = store.begin().unwrap();
    open.enqueue_stanza(&message("uncommitted")).unwrap();
    let ids = |found: Vec<(u64, Element)>| -> Vec<String> {
        found
            .into_iter()
            .map(|(_, el)| el.attr("id").unwrap().to_string())
            .collect()
    };
    let first = store.outbox_pending(1).unwrap();
    assert_eq!(ids(first.clone()), ["m0"]);
    store.outbox_sent(&[first[0].0]).unwrap();
    assert_eq!(ids(store.outbox_pending(10).unwrap()), ["m1", "m2"]);
    drop(open);
    assert_eq!(ids(store.outbox_pending(10).unwrap()), ["m1", "m2"]);
    assert_eq!(store.outbox_len().unwrap(), 2);
}

pub(crate) fn queued_jobs_come_due_by_time_are_claimed_once_and_settled(store: &Store) {
    let seqs = store
        .write(|tx| {
            Ok(vec![
                tx.enqueue_sms(&sms_job("late", 300))?,
                tx.enqueue_sms(&sms_job("early", 100))?,
                tx.enqueue_sms(&sms_job("middle", 200))?,
            ])
        })
        .unwrap();
    assert!(store
        .due_jobs::<SmsJob>(SMS_QUEUE, 99, 10)
        .unwrap()
        .is_empty());
    assert_eq!(
        texts(&store.due_jobs(SMS_QUEUE, 200, 10).unwrap()),
        ["early", "middle"]
    );
    assert_eq!(store.next_attempt(SMS_QUEUE).unwrap(), Some(100));

    // Claimed: this instance's until it reports back or the claim runs out.
    let claimed: Vec<(u64, SmsJob)> = store.claim_jobs(SMS_QUEUE, 250, 10).unwrap();
    assert_eq!(texts(&claimed), ["early", "middle"]);
    assert!(claimed
        .iter()
        .all(|(_, j)| j.claimed_by.as_deref() == Some(store.instance())));
    assert!(store
        .claim_jobs::<SmsJob>(SMS_QUEUE, 250, 10)
        .unwrap()
        .is_empty());
    assert_eq!(
        texts(&store.claim_jobs(SMS_QUEUE, 300, 10).unwrap()),
        ["late"]
    );
    // The claims run out: due again, with the same attempts.
    let again: Vec<(u64, SmsJob)> = store.claim_jobs(SMS_QUEUE, 250 + CLAIM_SECS, 10).unwrap();
    assert_eq!(texts(&again), ["early", "middle"]);

    // Settled: sent ones leave, a retried one is due when it says.
    let (early, middle) = (again[0].0, again[1].0);
    let mut retry = again[1].1.clone();
    retry.reschedule(1, 5_000);
    store
        .settle_jobs(SMS_QUEUE, &[(early, None), (middle, Some(retry))])
        .unwrap();
    // "late" is due when its claim runs out (600), "middle" when its retry says (5,000).
    let due: Vec<(u64, SmsJob)> = store.due_jobs(SMS_QUEUE, 5_000, 10).unwrap();
    assert_eq!(texts(&due), ["late", "middle"]);
    assert_eq!(due[1].1.attempts, 1);
    assert_eq!(due[1].1.claimed_by, None);
    // A job gone meanwhile (its user removed) stays gone when settled.
    store.write(|tx| tx.remove_sms_job(middle)).unwrap();
    store
        .settle_jobs(SMS_QUEUE, &[(middle, Some(sms_job("middle", 1)))])
        .unwrap();
    assert_eq!(
        texts(&store.due_jobs(SMS_QUEUE, u64::MAX - 1, 10).unwrap()),
        ["late"]
    );
    assert_eq!(seqs.len(), 3);
}

pub(crate) fn pending_forwards_are_kept_per_item_and_come_due_by_time(store: &Store) {
    store
        .write(|tx| {
            tx.add_pending("a@b", "p@q", &pending_item("one", Some(100)))?;
            tx.add_pending("a@b", "p@q", &pending_item("two", Some(50)))?;
            tx.add_pending("a@b", "r@s", &pending_item("other", Some(300)))?;
            Ok(())
        })
        .unwrap();
    store
        .write(|tx| {
            assert_eq!(tx.pending_count("a@b", "p@q")?, 2);
            assert_eq!(tx.waiting_count("a@b")?, 3);
            let p = tx.pending_of("a@b", "p@q")?.unwrap();
            assert_eq!(p.due_at, 50);
            assert_eq!(
                p.items.iter().map(|i| i.text.as_str()).collect::<Vec<_>>(),
                ["one", "two"]
            );
            assert!(tx.due_pending(49)?.is_empty());
            let due = tx.due_pending(100)?;
            assert_eq!(due.len(), 1);
            assert_eq!(due[0].0, "a@b");
            assert_eq!(due[0].1.peer, "p@q");
            Ok(())
        })
        .unwrap();
    // Replaced by a later one: due at its new time only.
    store
        .write(|tx| {
            let mut p = tx.pending_of("a@b", "p@q")?.unwrap();
            p.items.truncate(1);
            p.items[0].due_at = Some(400);
            p.due_at = 400;
            tx.put_pending("a@b", &p)
        })
        .unwrap();
    store
        .write(|tx| {
            assert!(tx.due_pending(399)?.iter().all(|(_, p)| p.peer != "p@q"));
            assert_eq!(tx.waiting_count("a@b")?, 2);
            tx.remove_pending("a@b", "p@q")?;
            tx.remove_pending("a@b", "r@s")?;
            assert_eq!(tx.waiting_count("a@b")?, 0);
            assert!(tx.due_pending(u64::MAX - 1)?.is_empty());
            Ok(())
        })
        .unwrap();
}

pub(crate) fn taken_ids_are_seen_once_per_alias_until_forgotten(store: &Store) {
    let alias_a = [1u8; 32];
    let alias_b = [2u8; 32];
    store
        .write(|tx| {
            assert!(tx.first_sight_of_mail("<m1@x>", &alias_a, 100)?);
            assert!(!tx.first_sight_of_mail("<m1@x>", &alias_a, 150)?);
            assert!(tx.first_sight_of_mail("<m1@x>", &alias_b, 150)?);
            assert!(tx.first_sight_of_sms("sms-1", 200)?);
            Ok(())
        })
        .unwrap();
    store
        .write(|tx| {
            assert!(!tx.first_sight_of_mail("<m1@x>", &alias_a, 300)?);
            assert!(!tx.first_sight_of_sms("sms-1", 300)?);
            assert_eq!(tx.seen_ids(), 3);
            assert_eq!(tx.forget_seen_before(151)?, 2);
            assert_eq!(tx.seen_ids(), 1);
            Ok(())
        })
        .unwrap();
    store
        .write(|tx| {
            assert!(tx.first_sight_of_mail("<m1@x>", &alias_a, 400)?);
            assert!(!tx.first_sight_of_sms("sms-1", 400)?);
            Ok(())
        })
        .unwrap();
}

/// A Message-ID is the sender's choice, of any length: taken once all the same.
pub(crate) fn a_huge_message_id_is_seen_once(store: &Store) {
    let id = format!("<{}@x>", "m".repeat(20_000));
    let alias = [3u8; 32];
    assert!(store
        .write(|tx| tx.first_sight_of_mail(&id, &alias, 10))
        .unwrap());
    assert!(!store
        .write(|tx| tx.first_sight_of_mail(&id, &alias, 11))
        .unwrap());
    let long_sms = "s".repeat(5_000);
    assert!(store
        .write(|tx| tx.first_sight_of_sms(&long_sms, 10))
        .unwrap());
    assert!(!store
        .write(|tx| tx.first_sight_of_sms(&long_sms, 11))
        .unwrap());
    assert_eq!(store.write(|tx| tx.forget_seen_before(100)).unwrap(), 2);
}

pub(crate) fn counters_count_per_window_and_are_pruned_when_it_ends(store: &Store) {
    let hour = 3600;
    let now = 10 * hour + 5;
    store
        .write(|tx| {
            assert_eq!(tx.bump_counter("codes", "a@b", hour, now)?, 1);
            assert_eq!(tx.bump_counter("codes", "a@b", hour, now + 10)?, 2);
            assert_eq!(tx.bump_counter("codes", "c@d", hour, now)?, 1);
            Ok(())
        })
        .unwrap();
    store
        .write(|tx| {
            assert_eq!(tx.counter("codes", "a@b", hour, now)?, 2);
            // The next window starts from nothing.
            assert_eq!(tx.counter("codes", "a@b", hour, now + hour)?, 0);
            assert_eq!(tx.counter_records(), 2);
            tx.prune_counters(now)?;
            assert_eq!(tx.counter_records(), 2);
            tx.prune_counters(11 * hour)?;
            assert_eq!(tx.counter_records(), 0);
            assert_eq!(tx.count_email("a@b", 7)?, 1);
            assert_eq!(tx.count_email("a@b", 7)?, 2);
            Ok(())
        })
        .unwrap();
    assert_eq!(store.read(|tx| tx.email_count("a@b", 7)).unwrap(), 2);
}

pub(crate) fn the_verification_index_follows_put_replace_and_remove(store: &Store) {
    let code = |address: &str| Verification {
        kind: TerminalKind::Phone,
        address: address.into(),
        code: "123456".into(),
        expires_at: 10,
        tries_left: 5,
    };
    let waiting = |address: &str| -> Vec<String> {
        store
            .read(|tx| tx.verifications_for_address(TerminalKind::Phone, address))
            .unwrap()
            .into_iter()
            .map(|(jid, _)| jid)
            .collect()
    };
    store
        .write(|tx| {
            tx.put_verification("a@x", &code("+1555"))?;
            tx.put_verification("b@x", &code("+1555"))?;
            Ok(())
        })
        .unwrap();
    assert_eq!(waiting("+1555"), ["a@x", "b@x"]);
    store
        .write(|tx| tx.put_verification("a@x", &code("+1666")))
        .unwrap();
    assert_eq!(waiting("+1555"), ["b@x"]);
    assert_eq!(waiting("+1666"), ["a@x"]);
    store
        .write(|tx| tx.remove_verification("b@x", TerminalKind::Phone))
        .unwrap();
    assert!(waiting("+1555").is_empty());
    assert_eq!(store.read(|tx| Ok(tx.verification_index_len())).unwrap(), 1);
}

pub(crate) fn an_event_rolled_back_to_its_savepoint_leaves_nothing(store: &Store) {
    let mut tx = store.begin().unwrap();
    tx.put_user(&alice()).unwrap();
    tx.savepoint();
    tx.touch_session("alice@example.org", "bob@x", 5).unwrap();
    tx.enqueue_stanza(&message("from-the-failed-event"))
        .unwrap();
    tx.rollback_to_savepoint();
    tx.commit().unwrap();
    store
        .read(|tx| {
            assert!(tx.user("alice@example.org")?.is_some());
            assert!(tx.sessions("alice@example.org")?.is_empty());
            Ok(())
        })
        .unwrap();
    assert!(store.outbox_pending(10).unwrap().is_empty());
    // Dropped without commit: nothing at all.
    let mut tx = store.begin().unwrap();
    tx.touch_session("alice@example.org", "carol@x", 5).unwrap();
    drop(tx);
    assert!(store
        .read(|tx| tx.sessions("alice@example.org"))
        .unwrap()
        .is_empty());
}

pub(crate) fn dead_letters_are_kept_found_by_fingerprint_and_redriven_once(store: &Store) {
    let letter = DeadLetter {
        at: 1,
        kind: "stanza".into(),
        reason: "test".into(),
        payload: "<message/>".into(),
        fingerprint: b"fp".to_vec(),
        redrive: false,
    };
    let id = store.write(|tx| tx.put_dead_letter(&letter)).unwrap();
    assert_eq!(
        store
            .read(|tx| tx.dead_letter_by_fingerprint(b"fp"))
            .unwrap(),
        Some(id)
    );
    assert!(store.take_redrives().unwrap().is_empty());
    assert!(store.mark_for_redrive(id).unwrap());
    assert_eq!(store.take_redrives().unwrap().len(), 1);
    assert!(store.dead_letters().unwrap().is_empty());
    assert_eq!(
        store
            .read(|tx| tx.dead_letter_by_fingerprint(b"fp"))
            .unwrap(),
        None
    );
    assert!(!store.remove_dead_letter(id).unwrap());
}

// ---- the guarantees, with two transactions at once ----

/// Take a user for update: a second transaction waits for the first to end, and a second
/// lock while holding another is Busy, not a wait.
pub(crate) fn a_user_taken_for_update_makes_the_other_wait_or_busy(store: &Store) {
    store.write(|tx| tx.put_user(&alice())).unwrap();
    let mut first = store.begin().unwrap();
    first.lock_user("alice@example.org").unwrap();
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let started = std::time::Instant::now();
            let mut second = store.begin().unwrap();
            second.user("alice@example.org").unwrap();
            second.commit().unwrap();
            started.elapsed()
        });
        let busy = s.spawn(|| {
            let mut third = store.begin().unwrap();
            third.lock_user("carol@example.org").unwrap();
            let outcome = third.user("alice@example.org");
            matches!(outcome, Err(StoreError::Busy))
        });
        assert!(busy.join().unwrap(), "a second lock held elsewhere is Busy");
        std::thread::sleep(std::time::Duration::from_millis(200));
        first.commit().unwrap();
        let waited = waiter.join().unwrap();
        assert!(
            waited >= std::time::Duration::from_millis(150),
            "the second transaction waited for the first: {waited:?}"
        );
    });
    // A claim never waits.
    let mut holder = store.begin().unwrap();
    holder.lock_user("alice@example.org").unwrap();
    std::thread::scope(|s| {
        let claimed = s
            .spawn(|| {
                store
                    .begin()
                    .unwrap()
                    .claim_user("alice@example.org")
                    .unwrap()
            })
            .join()
            .unwrap();
        assert!(!claimed);
    });
    drop(holder);
    assert!(store
        .begin()
        .unwrap()
        .claim_user("alice@example.org")
        .unwrap());
}

/// Claims: two instances claiming the same due jobs at once get disjoint sets, all of them.
pub(crate) fn two_instances_claim_disjoint_jobs(first: &Store, second: &Store) {
    first
        .write(|tx| {
            for i in 0..40 {
                tx.enqueue_sms(&sms_job(&format!("j{i}"), 10))?;
            }
            Ok(())
        })
        .unwrap();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| {
            let mut all = Vec::new();
            loop {
                let got: Vec<(u64, SmsJob)> = first.claim_jobs(SMS_QUEUE, 20, 3).unwrap();
                if got.is_empty() {
                    return all;
                }
                all.extend(got.into_iter().map(|(seq, _)| seq));
            }
        });
        let b = s.spawn(|| {
            let mut all = Vec::new();
            loop {
                let got: Vec<(u64, SmsJob)> = second.claim_jobs(SMS_QUEUE, 20, 3).unwrap();
                if got.is_empty() {
                    return all;
                }
                all.extend(got.into_iter().map(|(seq, _)| seq));
            }
        });
        (a.join().unwrap(), b.join().unwrap())
    });
    let mut both: Vec<u64> = a.iter().chain(&b).copied().collect();
    both.sort_unstable();
    let before = both.len();
    both.dedup();
    assert_eq!(before, both.len(), "a job was claimed twice");
    assert_eq!(both.len(), 40, "every job was claimed");
}

/// First sight and atomic counters under two instances at once: one first sight each, no
/// increment lost, and one handle for one user.
pub(crate) fn two_instances_see_an_id_once_and_lose_no_increment(first: &Store, second: &Store) {
    let (a, b) = std::thread::scope(|s| {
        let run = |store: &Store| {
            let mut firsts = 0;
            for i in 0..30 {
                if store
                    .write(|tx| {
                        tx.bump_counter("c", "shared", 86_400, 1_000)?;
                        tx.first_sight_of_sms(&format!("id-{i}"), 1_000)
                    })
                    .unwrap()
                {
                    firsts += 1;
                }
            }
            firsts
        };
        let a = s.spawn(move || run(first));
        let b = s.spawn(move || run(second));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(a + b, 30, "each id is seen first exactly once");
    assert_eq!(
        first
            .read(|tx| tx.counter("c", "shared", 86_400, 1_000))
            .unwrap(),
        60
    );
    let outcomes = std::thread::scope(|s| {
        let claim = |store: &Store, jid: &str| {
            let mut user = alice();
            user.jid = jid.into();
            store.write(|tx| tx.put_user(&user)).is_ok()
        };
        let a = s.spawn(move || claim(first, "one@x"));
        let b = s.spawn(move || claim(second, "two@x"));
        [a.join().unwrap(), b.join().unwrap()]
    });
    assert_eq!(
        outcomes.iter().filter(|ok| **ok).count(),
        1,
        "one handle, one user: {outcomes:?}"
    );
}

/// A gone instance's outbox and claims are taken over by a live one.
pub(crate) fn a_gone_instance_is_adopted(alive: &Store, gone: &Store) {
    gone.write(|tx| {
        tx.enqueue_stanza(&message("left-1"))?;
        tx.enqueue_stanza(&message("left-2"))?;
        tx.enqueue_sms(&sms_job("in flight", 10))?;
        Ok(())
    })
    .unwrap();
    let claimed: Vec<(u64, SmsJob)> = gone.claim_jobs(SMS_QUEUE, 20, 10).unwrap();
    assert_eq!(claimed.len(), 1);
    alive
        .write(|tx| tx.enqueue_stanza(&message("mine")))
        .unwrap();
    let adopted = alive.adopt_gone_instances(30).unwrap();
    assert_eq!(adopted, [gone.instance().to_owned()]);
    let ids: Vec<String> = alive
        .outbox_pending(10)
        .unwrap()
        .into_iter()
        .map(|(_, el)| el.attr("id").unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["mine", "left-1", "left-2"]);
    let due: Vec<(u64, SmsJob)> = alive.claim_jobs(SMS_QUEUE, 30, 10).unwrap();
    assert_eq!(texts(&due), ["in flight"], "the claim was released at once");
}

/// Instantiates the suite for an engine: `$store` makes a fresh, empty store (instance "one");
/// `$second` opens a second instance ("two") on the same data, if the engine has several.
#[macro_export]
#[doc(hidden)]
macro_rules! store_conformance {
    ($store:expr) => {
        use $crate::store::conformance as c;
        #[test]
        fn handles_are_unique_and_released_on_rename() {
            c::handles_are_unique_and_released_on_rename(&$store);
        }
        #[test]
        fn removing_a_user_removes_everything_of_theirs() {
            c::removing_a_user_removes_everything_of_theirs(&$store);
        }
        #[test]
        fn held_messages_are_counted_and_taken_a_page_at_a_time_in_order() {
            c::held_messages_are_counted_and_taken_a_page_at_a_time_in_order(&$store);
        }
        #[test]
        fn the_outbox_is_fifo_and_only_committed_stanzas_leave() {
            c::the_outbox_is_fifo_and_only_committed_stanzas_leave(&$store);
        }
        #[test]
        fn queued_jobs_come_due_by_time_are_claimed_once_and_settled() {
            c::queued_jobs_come_due_by_time_are_claimed_once_and_settled(&$store);
        }
        #[test]
        fn pending_forwards_are_kept_per_item_and_come_due_by_time() {
            c::pending_forwards_are_kept_per_item_and_come_due_by_time(&$store);
        }
        #[test]
        fn taken_ids_are_seen_once_per_alias_until_forgotten() {
            c::taken_ids_are_seen_once_per_alias_until_forgotten(&$store);
        }
        #[test]
        fn a_huge_message_id_is_seen_once() {
            c::a_huge_message_id_is_seen_once(&$store);
        }
        #[test]
        fn counters_count_per_window_and_are_pruned_when_it_ends() {
            c::counters_count_per_window_and_are_pruned_when_it_ends(&$store);
        }
        #[test]
        fn the_verification_index_follows_put_replace_and_remove() {
            c::the_verification_index_follows_put_replace_and_remove(&$store);
        }
        #[test]
        fn an_event_rolled_back_to_its_savepoint_leaves_nothing() {
            c::an_event_rolled_back_to_its_savepoint_leaves_nothing(&$store);
        }
        #[test]
        fn dead_letters_are_kept_found_by_fingerprint_and_redriven_once() {
            c::dead_letters_are_kept_found_by_fingerprint_and_redriven_once(&$store);
        }
        #[test]
        fn a_user_taken_for_update_makes_the_other_wait_or_busy() {
            c::a_user_taken_for_update_makes_the_other_wait_or_busy(&$store);
        }
    };
}

mod sled {
    crate::store_conformance!(crate::store::Store::temporary().unwrap());

    /// One sled store is one instance: the two-instance guarantees hold between its
    /// threads (the batch, the senders), which share one `Store`.
    #[test]
    fn two_threads_claim_disjoint_jobs() {
        let store = crate::store::Store::temporary().unwrap();
        super::two_instances_claim_disjoint_jobs(&store, &store);
    }

    #[test]
    fn two_threads_see_an_id_once_and_lose_no_increment() {
        let store = crate::store::Store::temporary().unwrap();
        super::two_instances_see_an_id_once_and_lose_no_increment(&store, &store);
    }
}

mod postgres {
    use crate::store::pg_cluster::PgCluster;
    use crate::store::Store;

    /// A store on a database of its own, on the test binary's PostgreSQL server.
    fn store() -> Store {
        Store::postgres(&PgCluster::shared().create_database(), "one").unwrap()
    }

    /// Two instances ("one", "two") on one new database.
    fn two() -> (Store, Store) {
        let url = PgCluster::shared().create_database();
        let first = Store::postgres(&url, "one").unwrap();
        first.register_instance(1).unwrap();
        (first, Store::postgres(&url, "two").unwrap())
    }

    crate::store_conformance!(store());

    #[test]
    fn two_instances_claim_disjoint_jobs() {
        let (first, second) = two();
        super::two_instances_claim_disjoint_jobs(&first, &second);
    }

    #[test]
    fn two_instances_see_an_id_once_and_lose_no_increment() {
        let (first, second) = two();
        super::two_instances_see_an_id_once_and_lose_no_increment(&first, &second);
    }

    #[test]
    fn a_gone_instance_is_adopted() {
        let (alive, gone) = two();
        super::a_gone_instance_is_adopted(&alive, &gone);
    }

    #[test]
    fn a_second_process_under_a_name_in_use_is_refused() {
        let url = PgCluster::shared().create_database();
        let first = Store::postgres(&url, "one").unwrap();
        first.register_instance(1).unwrap();
        let again = Store::postgres(&url, "one").unwrap();
        let refused = again.register_instance(2).unwrap_err().to_string();
        assert!(refused.contains("already running"), "{refused}");
        drop(first);
        again.register_instance(3).unwrap();
    }

    #[test]
    fn a_sled_store_is_copied_into_postgres_whole() {
        let from = Store::temporary().unwrap();
        from.write(|tx| {
            use crate::store::Transaction;
            tx.put_user(&super::alice())?;
            tx.count_email("alice@example.org", 9)?;
            tx.enqueue_stanza(&super::message("queued"))
        })
        .unwrap();
        let to = store();
        let copied = crate::store::migrate::copy(&from, &to, |_, _| {}).unwrap();
        assert!(copied.total() >= 4, "{copied:?}");
        to.read(|tx| {
            use crate::store::Transaction;
            assert!(tx.user("alice@example.org")?.is_some());
            assert_eq!(tx.email_count("alice@example.org", 9)?, 1);
            Ok(())
        })
        .unwrap();
        // The embedded store's outbox ("local") is sent by the first instance to start.
        to.register_instance(1).unwrap();
        to.adopt_gone_instances(1).unwrap();
        let ids: Vec<String> = to
            .outbox_pending(10)
            .unwrap()
            .into_iter()
            .map(|(_, el)| el.attr("id").unwrap().to_owned())
            .collect();
        assert_eq!(ids, ["queued"]);
    }
}
