//! The HTTP endpoints: /healthz, /readyz (200 only with a leader) and Prometheus /metrics.

use std::time::Duration;

use kord_e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_and_metrics_on_a_single_member() {
    let c = Cluster::start(1, ClusterOpts::default()).await;
    let addr = c.http_addr(1);

    let health = http_get(addr, "/healthz").await.expect("GET /healthz");
    assert_eq!(health.status, 200, "/healthz: {health:?}");
    wait_until(
        "/readyz to answer 200",
        Duration::from_secs(10),
        || async move {
            match http_get(addr, "/readyz").await {
                Ok(r) if r.status == 200 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    // Some traffic, so that request metrics exist.
    c.kv(1)
        .create(create_req("/m", b""))
        .await
        .expect("create /m");
    get(&mut c.kv(1), "/m", LINEARIZABLE).await.expect("get /m");

    let metrics = http_get(addr, "/metrics").await.expect("GET /metrics");
    assert_eq!(metrics.status, 200, "/metrics: {metrics:?}");
    let samples: Vec<&str> = metrics
        .body
        .lines()
        .filter(|l| !l.starts_with('#') && l.starts_with("kord_"))
        .collect();
    assert!(
        !samples.is_empty(),
        "no kord_ samples in /metrics:\n{}",
        metrics.body
    );
    for line in &samples {
        let value = line.rsplit(' ').next().unwrap_or_default();
        assert!(
            value.parse::<f64>().is_ok(),
            "not a Prometheus sample line: {line:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_leadership() {
    let mut c = Cluster::start(3, ClusterOpts::default()).await;
    for id in c.ids() {
        let r = http_get(c.http_addr(id), "/readyz")
            .await
            .expect("GET /readyz");
        assert_eq!(r.status, 200, "member {id} /readyz with a leader: {r:?}");
    }

    // Leave one follower alone: it loses its leader and must stop reporting ready.
    let leader = c.leader().await;
    let followers = c.followers().await;
    let (alone, other) = (followers[0], followers[1]);
    c.kill(leader);
    c.kill(other);
    let addr = c.http_addr(alone);
    wait_until(
        "the lone member's /readyz to fail",
        Duration::from_secs(30),
        || async move {
            match http_get(addr, "/readyz").await {
                Ok(r) if r.status != 200 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let health = http_get(addr, "/healthz").await.expect("GET /healthz");
    assert_eq!(
        health.status, 200,
        "/healthz must stay 200 without a leader"
    );
    let status = c.status(alone).await.expect("status of the lone member");
    assert_eq!(
        status.leader_id, 0,
        "a lone member of three cannot know a leader: {status:?}"
    );

    // A majority again: ready again.
    c.restart(other).await;
    c.wait_for_leader(Duration::from_secs(30)).await;
    wait_until(
        "/readyz to answer 200 again",
        Duration::from_secs(10),
        || async move {
            match http_get(addr, "/readyz").await {
                Ok(r) if r.status == 200 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
}
