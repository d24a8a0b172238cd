//! The store's tests: refusing foreign and incompatible files, names for positions, the gate
//! id, and the writer's order, durability and failed batches.

use super::*;

#[test]
fn garbage_and_foreign_files_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(Store::file(dir.path()), vec![0x5Au8; 8192]).unwrap();
    let err = Store::open(dir.path(), &[])
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("comfy-gate.redb"), "{err}");
    assert!(err.contains("Nothing was changed"), "{err}");
    assert_eq!(
        std::fs::read(Store::file(dir.path())).unwrap(),
        vec![0x5Au8; 8192],
        "left as it was"
    );
}

#[test]
fn incompatible_versions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, loaded) = Store::open(dir.path(), &[]).unwrap();
        assert_eq!(loaded.counter, 0);
        let txn = store.db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert("schema", "99")
            .unwrap();
        txn.commit().unwrap();
    }
    let err = Store::open(dir.path(), &[])
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("schema version 99"), "{err}");
}

#[test]
fn owners_stored_by_position_are_read_by_name() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = Store::open(dir.path(), &[]).unwrap();
        let txn = store.db.begin_write().unwrap();
        {
            let mut t = txn.open_table(PROMPTS).unwrap();
            let old = serde_json::json!({"id": "p", "number": 1, "body": {}, "client_id": null,
                "identity": "x", "stage": "on_backend", "owner": 1, "create_time": 0, "tried": [0]});
            t.insert("p", serde_json::to_vec(&old).unwrap().as_slice())
                .unwrap();
            let mut a = txn.open_table(ALIASES).unwrap();
            a.insert(r#"["output","","x.png"]"#, br#"[1,"y.png"]"#.as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let names = ["a".to_string(), "b".to_string()];
    let (_, loaded) = Store::open(dir.path(), &names).unwrap();
    assert_eq!(loaded.records[0].owner.as_deref(), Some("b"));
    assert_eq!(loaded.records[0].tried, ["a"]);
    assert_eq!(loaded.aliases[0].1, ("b".to_string(), "y.png".to_string()));
}

/// A row of the usage table (the test rows are JSON numbers, so a reopen loads them).
fn usage_row(store: &Store, id: &str) -> Option<Vec<u8>> {
    let read = store.db.begin_read().unwrap();
    let t = read.open_table(USAGE).unwrap();
    t.get(id).unwrap().map(|v| v.value().to_vec())
}

fn put(id: &str, value: &[u8]) -> Write {
    Write::Put {
        table: Table::Usage,
        key: id.into(),
        value: value.to_vec(),
    }
}

#[test]
fn appends_from_many_threads_commit_in_their_order_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = Store::open(dir.path(), &[]).unwrap();
        let store = Arc::new(store);
        // Each thread rewrites its own key; the last value appended must be what stays.
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..50u32 {
                        let key = format!("k{t}");
                        let ticket = store.append(vec![
                            put(&key, i.to_string().as_bytes()),
                            Write::Counter(i64::from(i)),
                        ]);
                        ticket.wait().unwrap();
                        assert_eq!(usage_row(&store, &key).unwrap(), i.to_string().as_bytes());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        // Put then delete in one append: applied in order, nothing stays.
        store
            .append(vec![
                put("gone", b"0"),
                Write::Delete {
                    table: Table::Usage,
                    key: "gone".into(),
                },
            ])
            .wait()
            .unwrap();
        assert_eq!(usage_row(&store, "gone"), None);
        // Appended and not waited for: still committed before the store closes.
        drop(store.append(vec![put("late", b"1")]));
    }
    let (store, loaded) = Store::open(dir.path(), &[]).unwrap();
    assert_eq!(loaded.counter, 49);
    for t in 0..8 {
        assert_eq!(usage_row(&store, &format!("k{t}")).unwrap(), b"49");
    }
    assert_eq!(usage_row(&store, "late").unwrap(), b"1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_commit_fails_every_write_of_its_batch_and_writes_none() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), &[]).unwrap();
    store.append(vec![put("before", b"1")]).wait().unwrap();
    store.fail_next_commits(1);
    // Both may land in the failed batch, or the second in the next: either way a ticket
    // that says durable means the row is there, and an error means it is not.
    let first = store.append(vec![put("a", b"2")]);
    let second = store.append(vec![put("b", b"3")]);
    let a = first.durable().await;
    let b = second.wait();
    assert!(a.is_err(), "the batch after the hook fails");
    assert_eq!(usage_row(&store, "a"), None);
    assert_eq!(b.is_ok(), usage_row(&store, "b").is_some());
    // The writer goes on after a failed batch.
    store.append(vec![put("after", b"4")]).wait().unwrap();
    assert!(usage_row(&store, "after").is_some());
    assert!(usage_row(&store, "before").is_some());
}

#[test]
fn reopening_keeps_the_gate_id() {
    let dir = tempfile::tempdir().unwrap();
    let id = Store::open(dir.path(), &[]).unwrap().1.gate_id;
    assert_eq!(Store::open(dir.path(), &[]).unwrap().1.gate_id, id);
}
