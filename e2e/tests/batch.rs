//! `Kv.Batch`: several independent writes in one call, each applied (or refused) as if sent
//! alone; and kord-client sending the writes its callers make at the same moment on one
//! connection that way (`client/src/batch.rs`).

use std::collections::BTreeSet;
use std::time::Duration;

use kord_client::{Client, Error};
use kord_e2e::v1::{batch_item, batch_result, BatchItem, BatchRequest, DeleteRequest, SetRequest};
use kord_e2e::*;
use tonic::Code;

fn set_req(path: &str, data: &[u8], expected_version: Option<i32>) -> SetRequest {
    SetRequest {
        path: path.into(),
        data: data.to_vec(),
        expected_version,
        ..Default::default()
    }
}

fn delete_req(path: &str) -> DeleteRequest {
    DeleteRequest {
        path: path.into(),
        ..Default::default()
    }
}

fn item(request: batch_item::Request) -> BatchItem {
    BatchItem {
        request: Some(request),
    }
}

/// A batch of `n` creates of the paths `path(0..n)`.
fn creates(n: usize, path: impl Fn(usize) -> String) -> BatchRequest {
    let items = (0..n)
        .map(|i| item(batch_item::Request::Create(create_req(&path(i), b"v"))))
        .collect();
    BatchRequest { items }
}

/// The code a request fails with when sent alone.
async fn alone_code(kv: &mut Kv, request: batch_item::Request) -> Code {
    let result = match request {
        batch_item::Request::Create(r) => kv.create(r).await.map(|_| ()),
        batch_item::Request::Set(r) => kv.set(r).await.map(|_| ()),
        batch_item::Request::Delete(r) => kv.delete(r).await.map(|_| ()),
    };
    result.expect_err("the request fails alone too").code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_item_succeeds_or_fails_as_if_sent_alone_in_order() {
    let c = Cluster::start(1, ClusterOpts::default()).await;
    let mut kv = c.kv(1);
    let failing = [
        // Exists by then (the batch's first item creates it).
        batch_item::Request::Create(create_req("/b", b"again")),
        batch_item::Request::Set(set_req("/b", b"x", Some(7))),
        batch_item::Request::Delete(delete_req("/missing")),
        batch_item::Request::Create(create_req("/no/parent", b"")),
        batch_item::Request::Create(create_req("bad path", b"")),
    ];
    let mut items = vec![item(batch_item::Request::Create(create_req("/b", b"one")))];
    items.extend(failing.iter().cloned().map(item));
    items.push(BatchItem { request: None });
    items.push(item(batch_item::Request::Set(set_req(
        "/b",
        b"two",
        Some(0),
    ))));
    let n = items.len();
    let results = kv
        .batch(BatchRequest { items })
        .await
        .expect("batch")
        .into_inner()
        .results;
    assert_eq!(results.len(), n, "one result per item");

    let mut revisions = Vec::new();
    match &results[0].result {
        Some(batch_result::Result::Create(r)) => {
            assert_eq!(r.path, "/b");
            revisions.push(r.stat.as_ref().expect("stat").modify_revision);
        }
        other => panic!("item 0: {other:?}"),
    }
    for (i, request) in failing.into_iter().enumerate() {
        let want = alone_code(&mut kv, request).await;
        match &results[i + 1].result {
            Some(batch_result::Result::Error(e)) => {
                assert_eq!(
                    Code::from_i32(e.code),
                    want,
                    "item {}: {}",
                    i + 1,
                    e.message
                )
            }
            other => panic!("item {}: want {want:?}, got {other:?}", i + 1),
        }
    }
    match &results[n - 2].result {
        Some(batch_result::Result::Error(e)) => {
            assert_eq!(Code::from_i32(e.code), Code::InvalidArgument);
            assert!(
                e.message.contains(&format!("items[{}].request", n - 2)),
                "the message names the item: {}",
                e.message
            );
        }
        other => panic!("the empty item: {other:?}"),
    }
    match &results[n - 1].result {
        Some(batch_result::Result::Set(r)) => {
            let stat = r.stat.as_ref().expect("stat");
            assert_eq!(stat.version, 1, "the set saw the create before it");
            revisions.push(stat.modify_revision);
        }
        other => panic!("the last item: {other:?}"),
    }
    assert!(
        revisions[0] < revisions[1],
        "each write has its own revision, in item order: {revisions:?}"
    );
    let got = kv.get(get_req("/b", 0)).await.expect("get /b").into_inner();
    assert_eq!(got.data, b"two");
}

/// The items of one batch share one log entry, even on an idle member, where a lone write
/// would go to Raft at once by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_on_an_idle_member_takes_one_log_entry() {
    let c = Cluster::start(1, ClusterOpts::default()).await;
    let mut kv = c.kv(1);
    kv.create(create_req("/e", b"")).await.expect("create /e");
    let before = c.metric(1, "kord_commit_index").await;
    let results = kv
        .batch(creates(8, |i| format!("/e/{i}")))
        .await
        .expect("batch")
        .into_inner()
        .results;
    assert!(
        results
            .iter()
            .all(|r| matches!(r.result, Some(batch_result::Result::Create(_)))),
        "{results:?}"
    );
    let after = c.metric(1, "kord_commit_index").await;
    assert_eq!(after - before, 1, "8 creates in one entry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_items_are_refused_whole_naming_the_field_and_limit() {
    let c = Cluster::start(1, ClusterOpts::default()).await;
    let mut kv = c.kv(1);
    let err = kv
        .batch(creates(1025, |i| format!("/t{i}")))
        .await
        .expect_err("1025 items");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("items") && err.message().contains("1024"),
        "{}",
        err.message()
    );
    let missing = kv
        .get(get_req("/t0", 0))
        .await
        .expect_err("nothing applied");
    assert_eq!(missing.code(), Code::NotFound);
}

/// Many tasks writing through one client at once: their writes travel in batches, each caller
/// gets its own result (one of several creates of the same path wins, the others see it
/// exists); a lone caller's writes go alone, and so do all of a client built without batching.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_client_writes_share_calls_and_each_gets_its_own_result() {
    let c = Cluster::start(1, ClusterOpts::default()).await;
    let client = Client::builder([c.client_endpoint(1)])
        .request_timeout(Duration::from_secs(20))
        .connect()
        .await
        .expect("client");
    client.create("/c", "").await.expect("create /c");
    let tasks = (0..32).map(|t| {
        let client = client.clone();
        tokio::spawn(async move {
            let mut won = 0;
            for i in 0..20 {
                let path = format!("/c/{t}-{i}");
                client
                    .create(&path, format!("{t}"))
                    .await
                    .unwrap_or_else(|e| panic!("create {path}: {e}"));
                let stat = client
                    .set(&path, format!("{t}-{i}"), Some(0))
                    .await
                    .unwrap_or_else(|e| panic!("set {path}: {e}"));
                assert_eq!(stat.version, 1, "{path}");
                match client.create(&format!("/c/shared-{i}"), "").await {
                    Ok(_) => won += 1,
                    Err(Error::NodeExists { .. }) => {}
                    Err(e) => panic!("create /c/shared-{i}: {e}"),
                }
            }
            won
        })
    });
    let mut won = 0;
    for t in futures::future::join_all(tasks).await {
        won += t.expect("writer task");
    }
    assert_eq!(won, 20, "each shared path created exactly once");

    let batched = c
        .metric(1, r#"kord_requests_total{op="batch",code="ok"}"#)
        .await;
    assert!(batched > 0, "concurrent writes went in batches");
    let children: BTreeSet<String> = client
        .children("/c")
        .await
        .expect("children")
        .into_iter()
        .collect();
    assert_eq!(children.len(), 32 * 20 + 20);
    for t in [0, 17, 31] {
        let (data, _) = client.get(&format!("/c/{t}-19")).await.expect("get");
        assert_eq!(data, format!("{t}-19").into_bytes());
    }

    for i in 0..10 {
        client
            .set("/c", format!("{i}"), None)
            .await
            .expect("lone set");
    }
    assert_eq!(
        c.metric(1, r#"kord_requests_total{op="batch",code="ok"}"#)
            .await,
        batched,
        "a lone caller's writes go alone"
    );

    let unbatched = Client::builder([c.client_endpoint(1)])
        .batch_writes(false)
        .connect()
        .await
        .expect("client without batching");
    let writes = (0..16).map(|i| {
        let client = unbatched.clone();
        async move { client.create(&format!("/c/alone-{i}"), "").await }
    });
    for r in futures::future::join_all(writes).await {
        r.expect("create without batching");
    }
    assert_eq!(
        c.metric(1, r#"kord_requests_total{op="batch",code="ok"}"#)
            .await,
        batched,
        "batch_writes(false) sends each write alone"
    );
}
