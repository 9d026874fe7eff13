//! What only the embedded engine has: a folder that is reopened, and stores written by earlier
//! versions of Reach (the shared behaviour is in `super::conformance`).

use super::*;

/// Opens the store again once the previous `Store` is dropped. sled lets go of its file lock
/// a moment after the drop (its flusher thread ends on its own), so wait for it briefly.
fn reopen(path: &std::path::Path) -> Store {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match Store::open(path) {
            Ok(store) => return store,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("cannot reopen the store: {e}"),
        }
    }
}

/// The raw sled database at `path`, once no `Store` holds it.
fn raw(path: &std::path::Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match sled::open(path) {
            Ok(db) => return db,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("cannot open the raw store: {e}"),
        }
    }
}

#[test]
fn what_was_committed_survives_a_reopen_and_the_outbox_keeps_its_order() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = reopen(dir.path());
        store
            .write(|tx| {
                tx.put_user(&conformance::alice())?;
                for i in 0..3 {
                    let el: Element =
                        format!("<message xmlns='jabber:component:accept' id='m{i}'/>")
                            .parse()
                            .unwrap();
                    tx.enqueue_stanza(&el)?;
                }
                Ok(())
            })
            .unwrap();
        let first = store.outbox_pending(1).unwrap();
        store.outbox_sent(&[first[0].0]).unwrap();
        // Written but never committed: gone with the process.
        let mut open = store.begin().unwrap();
        open.touch_session("alice@example.org", "bob@x", 1).unwrap();
        std::mem::forget(open);
    }
    let store = reopen(dir.path());
    let ids: Vec<String> = store
        .outbox_pending(10)
        .unwrap()
        .into_iter()
        .map(|(_, el)| el.attr("id").unwrap().to_string())
        .collect();
    assert_eq!(ids, ["m1", "m2"]);
    store
        .read(|tx| {
            assert!(tx.user("alice@example.org")?.is_some());
            assert!(tx.sessions("alice@example.org")?.is_empty());
            Ok(())
        })
        .unwrap();
    // New ids sort after the old ones.
    store
        .write(|tx| {
            let el: Element = "<message xmlns='jabber:component:accept' id='m3'/>"
                .parse()
                .unwrap();
            tx.enqueue_stanza(&el)
        })
        .unwrap();
    let last = store.outbox_pending(10).unwrap().pop().unwrap().1;
    assert_eq!(last.attr("id"), Some("m3"));
}

/// A store of the first layout (Reach before several instances): version 1 in sled's default
/// tree, an outbox keyed by sequence alone, counters as JSON records, 4-byte daily counts, a
/// pending forward in one record, and none of the indexes added later.
#[test]
fn a_store_of_the_first_layout_is_converted_when_it_opens() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = raw(dir.path());
        db.insert(b"schema_version", &1u32.to_be_bytes()).unwrap();
        let alice = conformance::alice();
        db.open_tree("users")
            .unwrap()
            .insert(alice.jid.as_bytes(), serde_json::to_vec(&alice).unwrap())
            .unwrap();
        db.open_tree("handles")
            .unwrap()
            .insert(b"alice", alice.jid.as_bytes())
            .unwrap();
        let outbox = db.open_tree("outbox").unwrap();
        for (seq, id) in [(7u64, "first"), (9, "second")] {
            outbox
                .insert(
                    seq.to_be_bytes(),
                    format!("<message xmlns='jabber:component:accept' id='{id}'/>").as_bytes(),
                )
                .unwrap();
        }
        let hour = 3600u64;
        db.open_tree("counters")
            .unwrap()
            .insert(
                key("codes", "alice@example.org"),
                serde_json::to_vec(&serde_json::json!({"period": hour, "window": 5, "count": 4}))
                    .unwrap(),
            )
            .unwrap();
        db.open_tree("sms_counts")
            .unwrap()
            .insert(key("alice@example.org", "20000"), &3u32.to_be_bytes())
            .unwrap();
        let item = serde_json::json!({
            "at": 1, "id": null, "text": "waiting", "stanza": "<message/>", "on_xmpp": false
        });
        db.open_tree("pending")
            .unwrap()
            .insert(
                key("alice@example.org", "bob@x"),
                serde_json::to_vec(
                    &serde_json::json!({"peer": "bob@x", "due_at": 50, "items": [item]}),
                )
                .unwrap(),
            )
            .unwrap();
        db.open_tree("held")
            .unwrap()
            .insert(
                [key("alice@example.org", ""), 3u64.to_be_bytes().to_vec()].concat(),
                serde_json::to_vec(&HeldMessage {
                    peer: "bob@x".into(),
                    stanza: "<message/>".into(),
                    held_at: 1,
                })
                .unwrap(),
            )
            .unwrap();
        db.open_tree("seen_mail")
            .unwrap()
            .insert(b"mail\0old", &100u64.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let store = reopen(dir.path());
    let ids: Vec<String> = store
        .outbox_pending(10)
        .unwrap()
        .into_iter()
        .map(|(_, el)| el.attr("id").unwrap().to_string())
        .collect();
    assert_eq!(ids, ["first", "second"]);
    store
        .write(|tx| {
            assert_eq!(tx.counter("codes", "alice@example.org", 3600, 5 * 3600)?, 4);
            assert_eq!(tx.sms_count("alice@example.org", 20000)?, 3);
            assert_eq!(tx.held_count("alice@example.org")?, 1);
            assert_eq!(tx.held_from("alice@example.org", "bob@x")?, 1);
            let due = tx.due_pending(50)?;
            assert_eq!(due.len(), 1);
            assert_eq!(due[0].1.items[0].text, "waiting");
            assert_eq!(tx.forget_seen_before(101)?, 1);
            tx.prune_counters(6 * 3600)?;
            assert_eq!(tx.counter_records(), 0);
            Ok(())
        })
        .unwrap();
    drop(store);
    // Converted once: a second open finds the current version.
    let store = reopen(dir.path());
    assert_eq!(store.outbox_pending(10).unwrap().len(), 2);
}

#[test]
fn a_store_of_a_newer_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = reopen(dir.path());
        store
            .write(|tx| {
                tx.txn.put(
                    META,
                    DATA_VERSION_KEY,
                    (DATA_VERSION + 1).to_be_bytes().to_vec(),
                )?;
                Ok(())
            })
            .unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let err = loop {
        match Store::open(dir.path()) {
            Err(StoreError::InUse(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => break e,
            Ok(_) => panic!("a newer store was opened"),
        }
    };
    assert!(
        matches!(err, StoreError::Schema { found, expected } if found == DATA_VERSION + 1 && expected == DATA_VERSION),
        "{err}"
    );
}

#[test]
fn a_second_process_on_the_same_folder_is_told_the_store_is_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let _running = reopen(dir.path());
    assert!(matches!(Store::open(dir.path()), Err(StoreError::InUse(_))));
}

#[test]
fn a_copy_into_an_empty_store_holds_everything_and_new_ids_sort_after() {
    let from = Store::temporary().unwrap();
    from.write(|tx| {
        tx.put_user(&conformance::alice())?;
        for i in 0..2500 {
            tx.hold(
                "alice@example.org",
                &HeldMessage {
                    peer: "bob@x".into(),
                    stanza: format!("<m{i}/>"),
                    held_at: i,
                },
            )?;
        }
        tx.count_sms("alice@example.org", 5)?;
        Ok(())
    })
    .unwrap();
    let to = Store::temporary().unwrap();
    let copied = migrate::copy(&from, &to, |_, _| {}).unwrap();
    assert!(copied.total() > 2500);
    to.write(|tx| {
        tx.hold(
            "alice@example.org",
            &HeldMessage {
                peer: "bob@x".into(),
                stanza: "<newest/>".into(),
                held_at: 9_999,
            },
        )
    })
    .unwrap();
    to.read(|tx| {
        assert!(tx.user("alice@example.org")?.is_some());
        assert_eq!(tx.held_count("alice@example.org")?, 2501);
        assert_eq!(tx.sms_count("alice@example.org", 5)?, 1);
        let held = tx.take_held("alice@example.org")?;
        assert_eq!(held.first().unwrap().held_at, 0);
        assert_eq!(held.last().unwrap().stanza, "<newest/>");
        Ok(())
    })
    .unwrap();
    // Not into a store that holds something.
    assert!(matches!(
        migrate::copy(&from, &to, |_, _| {}),
        Err(StoreError::InUse(_))
    ));
}
