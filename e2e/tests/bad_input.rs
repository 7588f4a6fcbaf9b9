//! Rejected requests on a 1-member cluster: each returns the documented status code and leaves
//! the znode tree exactly as it was.

use kord_e2e::v1::{TxnOp, TxnRequest};
use kord_e2e::*;
use tonic::{Code, Status};

const INVALID_PATHS: &[&str] = &[
    "", "a", "/a/", "//a", "/a//b", "/a/./b", "/a/../b", "/.", "/a\0b", "/a/.", "/..",
];

/// What must not change when a request is rejected.
#[derive(Debug, PartialEq)]
struct Snapshot {
    digest: u64,
    znode_count: u64,
    a: (Vec<u8>, i32),
    a_children: Vec<String>,
}

async fn snapshot(c: &Cluster) -> Snapshot {
    let s = c.status(1).await.expect("status");
    let mut kv = c.kv(1);
    let a = get(&mut kv, "/a", LINEARIZABLE).await.expect("get /a");
    Snapshot {
        digest: s.state_digest,
        znode_count: s.znode_count,
        a: (a.data, a.stat.expect("stat").version),
        a_children: children(&mut kv, "/a", LINEARIZABLE)
            .await
            .expect("children /a")
            .names,
    }
}

/// Asserts the code, that nothing changed, and returns the status for message checks.
async fn rejected<T: std::fmt::Debug>(
    c: &Cluster,
    before: &Snapshot,
    result: Result<T, Status>,
    code: Code,
    what: &str,
) -> Status {
    let status = expect_code(result, code, what);
    let after = snapshot(c).await;
    assert_eq!(
        &after, before,
        "{what}: the rejected request changed the state"
    );
    status
}

fn txn(ops: Vec<TxnOp>) -> TxnRequest {
    TxnRequest {
        write_id: None,
        ops,
    }
}

fn failed_op(status: &Status) -> Option<String> {
    status
        .metadata()
        .get("kord-failed-op")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_requests_change_nothing() {
    let c = Cluster::start(
        1,
        ClusterOpts::new().args(["--max-value-size", "1024", "--max-txn-ops", "4"]),
    )
    .await;
    let mut kv = c.kv(1);
    kv.create(create_req("/a", b"a0")).await.expect("create /a");
    kv.create(create_req("/a/child", b""))
        .await
        .expect("create /a/child");
    let before = snapshot(&c).await;

    // Malformed paths, on every RPC (with /a existing, so only the syntax is wrong).
    for &p in INVALID_PATHS {
        let what = |rpc: &str| format!("{rpc} {p:?}");
        rejected(
            &c,
            &before,
            kv.create(create_req(p, b"x")).await,
            Code::InvalidArgument,
            &what("create"),
        )
        .await;
        // As in ZooKeeper, a sequential create validates the path with the counter appended:
        // "/a/" makes "/a/0000000001" and "/." makes "/.0000000001", both fine.
        if !(p.ends_with('/') || p.ends_with('.')) {
            rejected(
                &c,
                &before,
                kv.create(seq_create_req(p, b"x")).await,
                Code::InvalidArgument,
                &what("sequential create"),
            )
            .await;
        }
        rejected(
            &c,
            &before,
            kv.get(get_req(p, LINEARIZABLE)).await,
            Code::InvalidArgument,
            &what("get"),
        )
        .await;
        rejected(
            &c,
            &before,
            kv.set(set_req(p, b"x", None)).await,
            Code::InvalidArgument,
            &what("set"),
        )
        .await;
        rejected(
            &c,
            &before,
            kv.delete(delete_req(p, None)).await,
            Code::InvalidArgument,
            &what("delete"),
        )
        .await;
        rejected(
            &c,
            &before,
            kv.exists(exists_req(p, LINEARIZABLE)).await,
            Code::InvalidArgument,
            &what("exists"),
        )
        .await;
        rejected(
            &c,
            &before,
            kv.children(children_req(p, LINEARIZABLE)).await,
            Code::InvalidArgument,
            &what("children"),
        )
        .await;
        rejected(
            &c,
            &before,
            kv.txn(txn(vec![op_create(p, b"x", false)])).await,
            Code::InvalidArgument,
            &what("txn create"),
        )
        .await;
        rejected(
            &c,
            &before,
            kv.txn(txn(vec![op_check(p, None)])).await,
            Code::InvalidArgument,
            &what("txn check"),
        )
        .await;
    }

    // Missing node or parent.
    rejected(
        &c,
        &before,
        kv.create(create_req("/nope/x", b"")).await,
        Code::NotFound,
        "create under a missing parent",
    )
    .await;
    rejected(
        &c,
        &before,
        kv.create(seq_create_req("/nope/s-", b"")).await,
        Code::NotFound,
        "sequential create under a missing parent",
    )
    .await;
    rejected(
        &c,
        &before,
        kv.get(get_req("/nope", LINEARIZABLE)).await,
        Code::NotFound,
        "get missing",
    )
    .await;
    rejected(
        &c,
        &before,
        kv.set(set_req("/nope", b"", None)).await,
        Code::NotFound,
        "set missing",
    )
    .await;
    rejected(
        &c,
        &before,
        kv.delete(delete_req("/nope", None)).await,
        Code::NotFound,
        "delete missing",
    )
    .await;
    rejected(
        &c,
        &before,
        kv.children(children_req("/nope", LINEARIZABLE)).await,
        Code::NotFound,
        "children of missing",
    )
    .await;
    assert_eq!(
        exists(&mut kv, "/nope", LINEARIZABLE)
            .await
            .expect("exists missing"),
        None
    );
    assert_eq!(
        exists(&mut kv, "/a/child/deeper", LOCAL)
            .await
            .expect("exists missing, local"),
        None
    );

    // Existing node, wrong versions, non-empty delete.
    let st = rejected(
        &c,
        &before,
        kv.create(create_req("/a", b"again")).await,
        Code::AlreadyExists,
        "create existing",
    )
    .await;
    assert!(
        st.message().contains("/a"),
        "the message names the path: {:?}",
        st.message()
    );
    rejected(
        &c,
        &before,
        kv.set(set_req("/a", b"x", Some(5))).await,
        Code::Aborted,
        "set with a wrong version",
    )
    .await;
    rejected(
        &c,
        &before,
        kv.delete(delete_req("/a/child", Some(5))).await,
        Code::Aborted,
        "delete with a wrong version",
    )
    .await;
    rejected(
        &c,
        &before,
        kv.delete(delete_req("/a", None)).await,
        Code::FailedPrecondition,
        "delete of a node with children",
    )
    .await;
    rejected(
        &c,
        &before,
        kv.delete(delete_req("/a", Some(0))).await,
        Code::FailedPrecondition,
        "versioned delete of a node with children",
    )
    .await;

    // Value size limit: 1025 bytes rejected naming the limit, 1024 accepted.
    let big = vec![b'x'; 1025];
    let st = rejected(
        &c,
        &before,
        kv.create(create_req("/big", &big)).await,
        Code::InvalidArgument,
        "create 1025 bytes",
    )
    .await;
    assert!(
        st.message().contains("1024"),
        "the message names the limit: {:?}",
        st.message()
    );
    let st = rejected(
        &c,
        &before,
        kv.set(set_req("/a", &big, None)).await,
        Code::InvalidArgument,
        "set 1025 bytes",
    )
    .await;
    assert!(
        st.message().contains("1024"),
        "the message names the limit: {:?}",
        st.message()
    );
    rejected(
        &c,
        &before,
        kv.txn(txn(vec![op_set("/a", &big, None)])).await,
        Code::InvalidArgument,
        "txn set 1025 bytes",
    )
    .await;

    // Too many txn ops: 5 rejected naming the limit of 4.
    let five: Vec<TxnOp> = (0..5)
        .map(|i| op_create(&format!("/many{i}"), b"", false))
        .collect();
    let st = rejected(
        &c,
        &before,
        kv.txn(txn(five)).await,
        Code::InvalidArgument,
        "txn with 5 ops",
    )
    .await;
    assert!(
        st.message().contains('4'),
        "the message names the limit: {:?}",
        st.message()
    );

    // A txn with one failing op applies none of its ops.
    let st = rejected(
        &c,
        &before,
        kv.txn(txn(vec![
            op_create("/t1", b"", false),
            op_set("/a", b"changed", None),
            op_create("/nope/x", b"", false),
        ]))
        .await,
        Code::NotFound,
        "txn whose third op has a missing parent",
    )
    .await;
    assert_eq!(
        failed_op(&st).as_deref(),
        Some("2"),
        "kord-failed-op of {st:?}"
    );
    assert!(
        st.message().contains('2'),
        "the message names the failing op: {:?}",
        st.message()
    );
    let st = rejected(
        &c,
        &before,
        kv.txn(txn(vec![
            op_set("/a", b"changed", None),
            op_check("/a", Some(7)),
        ]))
        .await,
        Code::Aborted,
        "txn whose check has a wrong version, after a set",
    )
    .await;
    assert_eq!(
        failed_op(&st).as_deref(),
        Some("1"),
        "kord-failed-op of {st:?}"
    );
    let st = rejected(
        &c,
        &before,
        kv.txn(txn(vec![
            op_create("/t3", b"", false),
            op_create("/t3", b"", false),
        ]))
        .await,
        Code::AlreadyExists,
        "txn creating the same node twice",
    )
    .await;
    assert_eq!(
        failed_op(&st).as_deref(),
        Some("1"),
        "kord-failed-op of {st:?}"
    );
    let st = rejected(
        &c,
        &before,
        kv.txn(txn(vec![
            op_create("/t4", b"", false),
            op_delete("/a", None),
        ]))
        .await,
        Code::FailedPrecondition,
        "txn deleting a node with children",
    )
    .await;
    assert_eq!(
        failed_op(&st).as_deref(),
        Some("1"),
        "kord-failed-op of {st:?}"
    );
    rejected(
        &c,
        &before,
        kv.txn(txn(vec![
            op_delete("/a/child", None),
            op_check("/a/child", None),
        ]))
        .await,
        Code::NotFound,
        "txn checking a node its own delete removed",
    )
    .await;
    for p in ["/t1", "/t3", "/t4", "/big", "/many0"] {
        assert_eq!(
            exists(&mut kv, p, LINEARIZABLE).await.expect("exists"),
            None,
            "{p} must not exist"
        );
    }

    // The boundaries are accepted: 1024 bytes, 4 ops, the right versions.
    let exact = vec![b'y'; 1024];
    kv.create(create_req("/max", &exact))
        .await
        .expect("create 1024 bytes");
    assert_eq!(
        get(&mut kv, "/max", LINEARIZABLE).await.expect("get").data,
        exact
    );
    let four: Vec<TxnOp> = (0..4)
        .map(|i| op_create(&format!("/many{i}"), b"", false))
        .collect();
    kv.txn(txn(four)).await.expect("txn with 4 ops");
    for i in 0..4 {
        assert!(exists(&mut kv, &format!("/many{i}"), LINEARIZABLE)
            .await
            .expect("exists")
            .is_some());
    }
    kv.set(set_req("/a", b"a1", Some(0)))
        .await
        .expect("set with the right version");
    kv.delete(delete_req("/a/child", Some(0)))
        .await
        .expect("delete with the right version");
    kv.delete(delete_req("/a", Some(1)))
        .await
        .expect("delete once empty");
    assert_eq!(
        exists(&mut kv, "/a", LINEARIZABLE).await.expect("exists"),
        None
    );
}

/// Membership tombstones (`/kord/members/...`) are written only by the membership service:
/// a client's create, set or delete there is refused, so a removed id can never be made
/// addable again through the Kv API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_tombstones_are_read_only_for_clients() {
    let c = Cluster::start(1, ClusterOpts::new()).await;
    let mut kv = c.kv(1);
    kv.create(create_req("/a", b"a0")).await.expect("create /a");
    let before = snapshot(&c).await;
    for (what, result) in [
        (
            "create /kord/members",
            kv.create(create_req("/kord/members", b""))
                .await
                .map(|_| ()),
        ),
        (
            "create /kord/members/removed/9",
            kv.create(create_req("/kord/members/removed/9", b""))
                .await
                .map(|_| ()),
        ),
        (
            "set /kord/members/removed",
            kv.set(set_req("/kord/members/removed", b"x", None))
                .await
                .map(|_| ()),
        ),
        (
            "delete /kord/members/removed/9",
            kv.delete(delete_req("/kord/members/removed/9", None))
                .await
                .map(|_| ()),
        ),
    ] {
        let status = rejected(&c, &before, result, Code::PermissionDenied, what).await;
        assert!(
            status
                .message()
                .contains("reserved for the membership service"),
            "{what}: {}",
            status.message()
        );
    }
    // Other paths under /kord stay writable (client recipes keep their queues there).
    kv.create(create_req("/kord", b""))
        .await
        .expect("create /kord");
    kv.create(create_req("/kord/membersx", b""))
        .await
        .expect("a sibling with the same prefix is not reserved");
}
