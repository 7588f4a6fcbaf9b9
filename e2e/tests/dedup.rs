//! Exactly-once writes: re-sending a write with the same WriteId returns the original result,
//! also after the leader that applied it was killed.

use std::time::Duration;

use kord_e2e::v1::{
    txn_op_result, CreateRequest, DeleteRequest, SetRequest, TxnOpResult, TxnRequest, WriteId,
};
use kord_e2e::*;
use tonic::Code;

/// Txn results without their per-op headers (which name the member that served the request).
fn without_headers(results: &[TxnOpResult]) -> Vec<TxnOpResult> {
    let mut results = results.to_vec();
    for r in &mut results {
        match &mut r.result {
            Some(txn_op_result::Result::Create(x)) => x.header = None,
            Some(txn_op_result::Result::Set(x)) => x.header = None,
            Some(txn_op_result::Result::Delete(x)) => x.header = None,
            _ => {}
        }
    }
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_create_retried_after_leader_kill_is_applied_once() {
    let mut c = Cluster::start(3, ClusterOpts::default()).await;
    let leader = c.leader().await;
    c.kv(leader)
        .create(create_req("/dedup", b""))
        .await
        .expect("create /dedup");

    let client_id = WriteIds::new().client_id;
    let req = CreateRequest {
        write_id: Some(WriteId {
            client_id,
            seq: 1,
            acked_below: 1,
        }),
        path: "/dedup/n-".into(),
        data: b"once".to_vec(),
        sequential: true,
        ..Default::default()
    };
    let first = c
        .kv(leader)
        .create(req.clone())
        .await
        .expect("first sequential create via the leader")
        .into_inner();
    assert_eq!(seq_suffix(&first.path, "/dedup/n-"), 0);
    let first_rev = first.stat.expect("stat").create_revision;

    c.kill(leader);
    let survivors: Vec<Kv> = c.live_ids().into_iter().map(|id| c.kv(id)).collect();
    let retry = Retry {
        budget: Duration::from_secs(30),
        ..Retry::default()
    };
    let again = retry_rotating(&survivors, 0, &retry, |mut kv| {
        let req = req.clone();
        async move { kv.create(req).await }
    })
    .await
    .unwrap_or_else(|e| panic!("the retried create never succeeded on the survivors: {e:?}"));
    eprintln!("retry answered after {} attempts", again.attempts);
    assert_eq!(
        again.value.path, first.path,
        "the retry was applied again instead of deduplicated"
    );
    assert_eq!(again.value.stat.expect("stat").create_revision, first_rev);

    let new_leader = c.leader().await;
    assert_ne!(new_leader, leader);
    for id in c.live_ids() {
        let listing = children(&mut c.kv(id), "/dedup", LINEARIZABLE)
            .await
            .expect("children");
        assert_eq!(
            listing.names,
            vec!["n-0000000000".to_string()],
            "children via member {id}"
        );
        assert_eq!(listing.stat.expect("stat").num_children, 1);
    }

    // A new seq from the same client is a new write.
    let second = c
        .kv(new_leader)
        .create(CreateRequest {
            write_id: Some(WriteId {
                client_id,
                seq: 2,
                acked_below: 2,
            }),
            ..req.clone()
        })
        .await
        .expect("second create")
        .into_inner();
    assert_eq!(second.path, "/dedup/n-0000000001");

    // The killed member comes back with the same view.
    c.restart(leader).await;
    let statuses = c.wait_converged(Duration::from_secs(30)).await;
    assert_same_state(&statuses);
    for id in c.ids() {
        let names = children(&mut c.kv(id), "/dedup", LOCAL)
            .await
            .expect("local children")
            .names;
        assert_eq!(names, vec!["n-0000000000", "n-0000000001"], "member {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_write_id_without_failover_returns_the_original_result() {
    let c = Cluster::start(3, ClusterOpts::default()).await;
    let leader = c.leader().await;
    let followers = c.followers().await;
    let mut ids = WriteIds::new();
    c.kv(leader)
        .create(create_req("/dd", b""))
        .await
        .expect("create /dd");

    // Sequential create: the same request three times (leader, leader, follower).
    let req = CreateRequest {
        write_id: Some(ids.next_id()),
        ..seq_create_req("/dd/s-", b"x")
    };
    let first = c
        .kv(leader)
        .create(req.clone())
        .await
        .expect("create")
        .into_inner();
    let second = c
        .kv(leader)
        .create(req.clone())
        .await
        .expect("retry via leader")
        .into_inner();
    let third = c
        .kv(followers[0])
        .create(req.clone())
        .await
        .expect("retry via follower")
        .into_inner();
    assert_eq!(first.path, "/dd/s-0000000000");
    assert_eq!(second.path, first.path);
    assert_eq!(third.path, first.path);
    assert_eq!(second.stat, first.stat);
    let names = children(&mut c.kv(followers[1]), "/dd", LINEARIZABLE)
        .await
        .expect("children")
        .names;
    assert_eq!(names, vec!["s-0000000000"]);

    // Set: retried, the version is bumped once.
    c.kv(leader)
        .create(CreateRequest {
            write_id: Some(ids.next_id()),
            ..create_req("/dd/v", b"0")
        })
        .await
        .expect("create /dd/v");
    let set = SetRequest {
        write_id: Some(ids.next_id()),
        ..set_req("/dd/v", b"1", None)
    };
    let s1 = c
        .kv(followers[0])
        .set(set.clone())
        .await
        .expect("set")
        .into_inner();
    let s2 = c
        .kv(followers[1])
        .set(set.clone())
        .await
        .expect("set retry")
        .into_inner();
    assert_eq!(s1.stat.expect("stat").version, 1);
    assert_eq!(s2.stat, s1.stat, "a retried set returns the original stat");
    let got = get(&mut c.kv(leader), "/dd/v", LINEARIZABLE)
        .await
        .expect("get");
    assert_eq!(
        got.stat.expect("stat").version,
        1,
        "the set was applied twice"
    );

    // Txn: retried, applied once.
    let txn = TxnRequest {
        write_id: Some(ids.next_id()),
        ops: vec![
            op_create("/dd/s-", b"t", true),
            op_set("/dd/v", b"2", Some(1)),
        ],
    };
    let t1 = c
        .kv(leader)
        .txn(txn.clone())
        .await
        .expect("txn")
        .into_inner();
    let t2 = c
        .kv(followers[1])
        .txn(txn.clone())
        .await
        .expect("txn retry")
        .into_inner();
    assert_eq!(
        without_headers(&t1.results),
        without_headers(&t2.results),
        "a retried txn returns the original results"
    );
    assert_eq!(
        t1.header.map(|h| h.revision),
        t2.header.map(|h| h.revision),
        "a retried txn reports the original revision"
    );
    match &t1.results[0].result {
        Some(txn_op_result::Result::Create(r)) => assert_eq!(r.path, "/dd/s-0000000002"),
        other => panic!("expected a create result, got {other:?}"),
    }
    let got = get(&mut c.kv(followers[0]), "/dd/v", LINEARIZABLE)
        .await
        .expect("get");
    assert_eq!(
        (got.data.as_slice(), got.stat.expect("stat").version),
        (&b"2"[..], 2)
    );

    // Delete: the retry answers OK (the original result), not NOT_FOUND.
    let del = DeleteRequest {
        write_id: Some(ids.next_id()),
        ..delete_req("/dd/s-0000000000", None)
    };
    c.kv(leader).delete(del.clone()).await.expect("delete");
    c.kv(followers[0])
        .delete(del.clone())
        .await
        .expect("retried delete returns the original OK");
    let names = children(&mut c.kv(leader), "/dd", LINEARIZABLE)
        .await
        .expect("children")
        .names;
    assert_eq!(names, vec!["s-0000000002", "v"]);

    // client_id 0 opts out of deduplication: the same request applies twice.
    let plain = seq_create_req("/dd/p-", b"");
    let a = c
        .kv(leader)
        .create(plain.clone())
        .await
        .expect("plain 1")
        .into_inner();
    let b = c
        .kv(leader)
        .create(plain.clone())
        .await
        .expect("plain 2")
        .into_inner();
    assert_ne!(a.path, b.path);
    // And a deduplicated write that failed keeps failing the same way on retry.
    let dup = CreateRequest {
        write_id: Some(ids.next_id()),
        ..create_req("/dd/v", b"")
    };
    expect_code(
        c.kv(leader).create(dup.clone()).await,
        Code::AlreadyExists,
        "create existing",
    );
    expect_code(
        c.kv(followers[0]).create(dup).await,
        Code::AlreadyExists,
        "retried create existing",
    );

    let statuses = c.wait_converged(Duration::from_secs(20)).await;
    assert_same_state(&statuses);
}
