//! Basic reads and writes through every member of a 3-node cluster: CRUD, children, txn,
//! linearizable reads on followers, sequential suffixes, and local reads converging.

use std::time::Duration;

use kord_e2e::v1::{txn_op_result, TxnRequest};
use kord_e2e::*;
use tonic::Code;

fn next_of(ids: &[u64], id: u64, step: usize) -> u64 {
    let pos = ids.iter().position(|&x| x == id).expect("id");
    ids[(pos + step) % ids.len()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crud_children_and_txn_through_every_member() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    let leader = c.leader().await;
    let ids = c.ids();
    let followers = c.followers().await;
    assert_eq!(followers.len(), 2);
    let (f1, f2) = (followers[0], followers[1]);

    // The parent, through a follower (forwarded to the leader).
    let created = c
        .kv(f1)
        .create(create_req("/basic", b"root"))
        .await
        .expect("create /basic via a follower")
        .into_inner();
    assert_eq!(created.path, "/basic");
    let header = created.header.expect("create header");
    let stat = created.stat.expect("create stat");
    assert!(header.revision > 0);
    assert_eq!(stat.create_revision, header.revision);
    assert_eq!(stat.modify_revision, header.revision);
    assert_eq!(
        (stat.version, stat.data_length, stat.num_children),
        (0, 4, 0)
    );

    for &id in &ids {
        let other = next_of(&ids, id, 1);
        let third = next_of(&ids, id, 2);
        let path = format!("/basic/m{id}");
        let value = format!("v{id}");

        // Create via `id`, read back through the two other members right after the ack.
        let created = c
            .kv(id)
            .create(create_req(&path, &value))
            .await
            .unwrap_or_else(|e| panic!("create {path} via member {id}: {e}"))
            .into_inner();
        assert_eq!(created.path, path);
        let create_rev = created.header.expect("header").revision;

        let got = get(&mut c.kv(other), &path, LINEARIZABLE)
            .await
            .unwrap_or_else(|e| panic!("get {path} via member {other}: {e}"));
        assert_eq!(got.data, value.as_bytes(), "{path} read via member {other}");
        let st = got.stat.expect("stat");
        assert_eq!((st.version, st.create_revision), (0, create_rev));
        let ex = exists(&mut c.kv(third), &path, LINEARIZABLE)
            .await
            .unwrap_or_else(|e| panic!("exists {path} via member {third}: {e}"));
        assert_eq!(ex.map(|s| s.create_revision), Some(create_rev));

        // Conditional set via another member; a stale version is refused.
        let set = c
            .kv(other)
            .set(set_req(&path, format!("{value}-2"), Some(0)))
            .await
            .unwrap_or_else(|e| panic!("set {path} via member {other}: {e}"))
            .into_inner();
        let st = set.stat.expect("set stat");
        assert_eq!(st.version, 1);
        assert_eq!(st.create_revision, create_rev);
        assert!(st.modify_revision > create_rev);
        expect_code(
            c.kv(third).set(set_req(&path, b"stale", Some(0))).await,
            Code::Aborted,
            "set with a stale version",
        );
        let got = get(&mut c.kv(id), &path, LINEARIZABLE)
            .await
            .expect("get after set");
        assert_eq!(got.data, format!("{value}-2").as_bytes());
        assert_eq!(got.stat.expect("stat").version, 1);
    }

    // Children through every member.
    for &id in &ids {
        let mut kv = c.kv(id);
        let mut req = children_req("/basic", LINEARIZABLE);
        req.with_stats = true;
        let resp = kv.children(req).await.expect("children").into_inner();
        let mut expected: Vec<String> = ids.iter().map(|i| format!("m{i}")).collect();
        expected.sort();
        assert_eq!(resp.names, expected, "children of /basic via member {id}");
        assert_eq!(resp.stats.len(), 3);
        assert!(resp.stats.iter().all(|s| s.version == 1));
        let st = resp.stat.expect("parent stat");
        assert_eq!((st.num_children, st.cversion), (3, 3));
    }

    // Delete via a follower (with the right version); gone everywhere.
    let gone = format!("/basic/m{f1}");
    expect_code(
        c.kv(f2).delete(delete_req(&gone, Some(0))).await,
        Code::Aborted,
        "delete with a wrong version",
    );
    c.kv(f2)
        .delete(delete_req(&gone, Some(1)))
        .await
        .expect("delete via follower");
    for &id in &ids {
        assert_eq!(
            exists(&mut c.kv(id), &gone, LINEARIZABLE)
                .await
                .expect("exists"),
            None
        );
        expect_code(
            get(&mut c.kv(id), &gone, LINEARIZABLE).await,
            Code::NotFound,
            "get deleted",
        );
    }

    // A txn via a follower: all four kinds, applied under one revision.
    let kept = format!("/basic/m{leader}");
    let removed = format!("/basic/m{f2}");
    let txn = c
        .kv(f1)
        .txn(TxnRequest {
            write_id: None,
            ops: vec![
                op_create("/basic/t", b"t", false),
                op_check(&kept, Some(1)),
                op_set(&kept, b"txn", Some(1)),
                op_delete(&removed, None),
            ],
        })
        .await
        .expect("txn via follower")
        .into_inner();
    let rev = txn.header.expect("txn header").revision;
    assert_eq!(txn.results.len(), 4);
    match &txn.results[0].result {
        Some(txn_op_result::Result::Create(r)) => {
            assert_eq!(r.path, "/basic/t");
            assert_eq!(r.stat.expect("stat").create_revision, rev);
        }
        other => panic!("txn result 0: expected create, got {other:?}"),
    }
    assert!(matches!(
        txn.results[1].result,
        Some(txn_op_result::Result::Check(_))
    ));
    match &txn.results[2].result {
        Some(txn_op_result::Result::Set(r)) => {
            let st = r.stat.expect("stat");
            assert_eq!((st.version, st.modify_revision), (2, rev));
        }
        other => panic!("txn result 2: expected set, got {other:?}"),
    }
    assert!(matches!(
        txn.results[3].result,
        Some(txn_op_result::Result::Delete(_))
    ));

    for &id in &ids {
        let resp = children(&mut c.kv(id), "/basic", LINEARIZABLE)
            .await
            .expect("children");
        let mut expected = vec![format!("m{leader}"), "t".to_string()];
        expected.sort();
        assert_eq!(resp.names, expected, "children after txn via member {id}");
        let got = get(&mut c.kv(id), &kept, LINEARIZABLE).await.expect("get");
        assert_eq!(got.data, b"txn");
    }

    // Local reads converge: every member eventually serves the same data from its own state.
    for &id in &ids {
        wait_until(
            &format!("member {id} to apply the txn locally"),
            Duration::from_secs(10),
            || {
                let mut kv = c.kv(id);
                async move {
                    match exists(&mut kv, "/basic/t", LOCAL).await {
                        Ok(Some(_)) => Ok(()),
                        other => Err(format!("{other:?}")),
                    }
                }
            },
        )
        .await;
    }
    let statuses = c.wait_converged(Duration::from_secs(20)).await;
    assert_same_state(&statuses);
    let mut views = Vec::new();
    for &id in &ids {
        let mut kv = c.kv(id);
        let names = children(&mut kv, "/basic", LOCAL)
            .await
            .expect("local children")
            .names;
        let mut values = Vec::new();
        for name in &names {
            let got = get(&mut kv, &format!("/basic/{name}"), LOCAL)
                .await
                .expect("local get");
            values.push((name.clone(), got.data, got.stat.expect("stat")));
        }
        views.push(values);
    }
    assert!(
        views.windows(2).all(|w| w[0] == w[1]),
        "local views differ: {views:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linearizable_follower_reads_and_sequential_suffixes() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    let ids = c.ids();
    c.kv(ids[0])
        .create(create_req("/lin", b"0"))
        .await
        .expect("create /lin");

    // A write acknowledged by one member is visible to a linearizable read on any other,
    // immediately (no waiting).
    for round in 1..=15u32 {
        let writer = ids[round as usize % 3];
        let value = format!("{round}");
        c.kv(writer)
            .set(set_req("/lin", &value, None))
            .await
            .unwrap_or_else(|e| panic!("set round {round} via {writer}: {e}"));
        let child = format!("/lin/c{round:02}");
        c.kv(writer)
            .create(create_req(&child, &value))
            .await
            .expect("create child");
        for step in 1..3 {
            let reader = next_of(&ids, writer, step);
            let mut kv = c.kv(reader);
            let got = get(&mut kv, "/lin", LINEARIZABLE)
                .await
                .expect("linearizable get");
            assert_eq!(
                got.data,
                value.as_bytes(),
                "round {round}: member {reader} missed a write acknowledged by member {writer}"
            );
            assert_eq!(got.stat.expect("stat").version, round as i32);
            let names = children(&mut kv, "/lin", LINEARIZABLE)
                .await
                .expect("children")
                .names;
            assert_eq!(
                names.len(),
                round as usize,
                "round {round} via member {reader}"
            );
            assert_eq!(names.last().map(String::as_str), Some(&child[5..]));
        }
    }

    // Sequential creates, each through a different member: 10-digit suffixes from the parent's
    // cversion, increasing.
    c.kv(ids[1])
        .create(create_req("/seq", b""))
        .await
        .expect("create /seq");
    let mut paths = Vec::new();
    for i in 0..5usize {
        let via = ids[i % 3];
        let resp = c
            .kv(via)
            .create(seq_create_req("/seq/n-", format!("{i}")))
            .await
            .unwrap_or_else(|e| panic!("sequential create {i} via {via}: {e}"))
            .into_inner();
        assert_eq!(seq_suffix(&resp.path, "/seq/n-"), i as u64, "{resp:?}");
        paths.push(resp.path);
    }
    assert_eq!(paths[0], "/seq/n-0000000000");
    // A plain child also bumps the parent's cversion, so the counter skips one.
    c.kv(ids[2])
        .create(create_req("/seq/plain", b""))
        .await
        .expect("plain");
    let resp = c
        .kv(ids[0])
        .create(seq_create_req("/seq/n-", b"6"))
        .await
        .expect("sequential after plain")
        .into_inner();
    assert_eq!(resp.path, "/seq/n-0000000006");
    // Deleting one does not make the counter reuse a number.
    c.kv(ids[1])
        .delete(delete_req("/seq/n-0000000006", None))
        .await
        .expect("delete");
    let resp = c
        .kv(ids[2])
        .create(seq_create_req("/seq/n-", b"8"))
        .await
        .expect("sequential after delete")
        .into_inner();
    assert_eq!(resp.path, "/seq/n-0000000008");
    paths.push(resp.path.clone());
    for &id in &ids {
        let mut kv = c.kv(id);
        let names = children(&mut kv, "/seq", LINEARIZABLE)
            .await
            .expect("children")
            .names;
        let mut expected: Vec<String> = paths
            .iter()
            .map(|p| p["/seq/".len()..].to_string())
            .collect();
        expected.push("plain".into());
        expected.sort();
        assert_eq!(names, expected, "children of /seq via member {id}");
        for (i, p) in paths.iter().enumerate().take(5) {
            let got = get(&mut kv, p, LINEARIZABLE)
                .await
                .expect("get sequential node");
            assert_eq!(got.data, format!("{i}").as_bytes());
        }
    }

    // Local reads eventually agree.
    let statuses = c.wait_converged(Duration::from_secs(20)).await;
    assert_same_state(&statuses);
    for &id in &ids {
        let names = children(&mut c.kv(id), "/seq", LOCAL)
            .await
            .expect("local children")
            .names;
        assert_eq!(
            names.len(),
            7,
            "local children of /seq on member {id}: {names:?}"
        );
        let got = get(&mut c.kv(id), "/lin", LOCAL).await.expect("local get");
        assert_eq!(got.data, b"15");
    }
}
