use super::*;

fn cmd(op: SubOp) -> Command {
    Command {
        write_id: WriteId::default(),
        time_ms: 1_000,
        op: Op::Single(op),
    }
}

fn create(path: &str, data: &str) -> SubOp {
    SubOp::Create {
        path: path.into(),
        data: data.into(),
        sequential: false,
        mode: CreateMode::Persistent,
    }
}

fn seq(path: &str) -> SubOp {
    SubOp::Create {
        path: path.into(),
        data: Vec::new(),
        sequential: true,
        mode: CreateMode::Persistent,
    }
}

#[test]
fn create_sets_stats_and_parent() {
    let mut s = State::new();
    let (out, events) = s.apply(5, &cmd(create("/a", "x")));
    let Ok(Reply::Single(SubReply::Created { path, stat })) = out.reply else {
        panic!("{out:?}")
    };
    assert_eq!(path, "/a");
    assert_eq!((stat.create_revision, stat.modify_revision), (5, 5));
    assert_eq!((stat.ctime_ms, stat.data_length), (1_000, 1));
    let root = s.get("/").unwrap();
    assert_eq!(root.stat.cversion, 1);
    assert_eq!(root.stat.children_revision, 5);
    assert_eq!(root.stat.num_children, 1);
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].kind, EventKind::Created);
    assert_eq!(events[1].kind, EventKind::ChildrenChanged);
}

#[test]
fn sequential_names_use_parent_cversion() {
    let mut s = State::new();
    s.apply(1, &cmd(create("/q", "")));
    s.apply(2, &cmd(create("/q/other", "")));
    let (out, _) = s.apply(3, &cmd(seq("/q/n-")));
    assert!(
        matches!(out.reply, Ok(Reply::Single(SubReply::Created { ref path, .. })) if path == "/q/n-0000000001")
    );
    let (out, _) = s.apply(4, &cmd(seq("/q/n-")));
    assert!(
        matches!(out.reply, Ok(Reply::Single(SubReply::Created { ref path, .. })) if path == "/q/n-0000000002")
    );
}

#[test]
fn errors_change_nothing() {
    let mut s = State::new();
    s.apply(1, &cmd(create("/a", "x")));
    s.apply(2, &cmd(create("/a/b", "")));
    let before = s.digest();
    let cases = [
        create("/missing/x", ""),
        create("/a", ""),
        SubOp::Set {
            path: "/a".into(),
            data: vec![],
            expected_version: Some(7),
        },
        SubOp::Delete {
            path: "/a".into(),
            expected_version: None,
        },
        SubOp::Delete {
            path: "/nope".into(),
            expected_version: None,
        },
        SubOp::Delete {
            path: "/".into(),
            expected_version: None,
        },
    ];
    for (i, op) in cases.into_iter().enumerate() {
        let (out, events) = s.apply(10 + i as u64, &cmd(op.clone()));
        assert!(out.reply.is_err(), "{op:?}");
        assert!(events.is_empty());
        assert_eq!(s.digest(), before, "{op:?}");
    }
}

#[test]
fn failed_txn_rolls_back_every_op() {
    let mut s = State::new();
    s.apply(1, &cmd(create("/a", "x")));
    let before = s.digest();
    let txn = Command {
        write_id: WriteId::default(),
        time_ms: 5,
        op: Op::Txn(vec![
            create("/b", "1"),
            seq("/a/s-"),
            SubOp::Set {
                path: "/a".into(),
                data: b"y".to_vec(),
                expected_version: None,
            },
            SubOp::Check {
                path: "/a".into(),
                expected_version: Some(0),
            },
        ]),
    };
    let (out, events) = s.apply(2, &txn);
    let Err(ApplyError::TxnOp { index, .. }) = out.reply else {
        panic!("{out:?}")
    };
    assert_eq!(index, 3);
    assert!(events.is_empty());
    assert_eq!(s.digest(), before);
    assert!(s.get("/b").is_none());
    assert_eq!(s.get("/a").unwrap().children.len(), 0);
}

#[test]
fn txn_applies_all_under_one_revision() {
    let mut s = State::new();
    let txn = Command {
        write_id: WriteId::default(),
        time_ms: 5,
        op: Op::Txn(vec![create("/a", "1"), create("/a/b", "2")]),
    };
    let (out, events) = s.apply(9, &txn);
    assert!(matches!(out.reply, Ok(Reply::Txn(ref r)) if r.len() == 2));
    assert_eq!(events.len(), 4);
    assert_eq!(s.get("/a/b").unwrap().stat.create_revision, 9);
}

#[test]
fn retried_write_returns_first_result() {
    let mut s = State::new();
    s.apply(1, &cmd(create("/q", "")));
    let mut c = cmd(seq("/q/n-"));
    c.write_id = WriteId {
        client_id: 42,
        seq: 1,
        acked_below: 1,
    };
    let (first, _) = s.apply(2, &c);
    let (again, events) = s.apply(3, &c);
    assert_eq!(first, again);
    assert!(events.is_empty());
    assert_eq!(s.get("/q").unwrap().children.len(), 1);
    // Once the client acknowledged seq 1, a replay of it is refused, not re-applied.
    let mut next = cmd(create("/r", ""));
    next.write_id = WriteId {
        client_id: 42,
        seq: 2,
        acked_below: 2,
    };
    s.apply(4, &next);
    let (stale, _) = s.apply(5, &c);
    assert!(matches!(stale.reply, Err(ApplyError::StaleWrite { .. })));
    assert_eq!(s.get("/q").unwrap().children.len(), 1);
}

#[test]
fn load_rebuilds_children_and_digest() {
    let mut s = State::new();
    s.apply(1, &cmd(create("/a", "x")));
    s.apply(2, &cmd(create("/a/b", "y")));
    let dirty = s.take_dirty();
    let nodes: Vec<_> = dirty
        .nodes
        .iter()
        .map(|p| (p.clone(), s.stored_node(p).unwrap()))
        .collect();
    let loaded = State::load(nodes, [], []);
    assert_eq!(loaded.digest(), s.digest());
    assert!(loaded.get("/a").unwrap().children.contains("b"));
}

fn raw(op: Op) -> Command {
    Command {
        write_id: WriteId::default(),
        time_ms: 7,
        op,
    }
}

fn create_mode(path: &str, mode: CreateMode) -> SubOp {
    SubOp::Create {
        path: path.into(),
        data: Vec::new(),
        sequential: false,
        mode,
    }
}

fn granted(out: &ApplyOutput) -> u64 {
    match out.reply {
        Ok(Reply::LeaseGranted { id, .. }) => id,
        ref other => panic!("{other:?}"),
    }
}

/// Grants a 1 s session at `revision` and returns its id.
fn grant_session(s: &mut State, revision: u64) -> u64 {
    let grant = raw(Op::LeaseGrant {
        id: 0,
        ttl_ms: 1_000,
        session: true,
    });
    granted(&s.apply(revision, &grant).0)
}

#[test]
fn ephemeral_nodes_die_with_their_lease_atomically() {
    let mut s = State::new();
    let lease = granted(
        &s.apply(
            3,
            &raw(Op::LeaseGrant {
                id: 0,
                ttl_ms: 5_000,
                session: true,
            }),
        )
        .0,
    );
    assert_eq!(lease, 3, "an automatic id is the grant's revision");
    s.apply(4, &cmd(create("/svc", "")));
    let (out, _) = s.apply(
        5,
        &cmd(create_mode("/svc/a", CreateMode::Ephemeral { lease })),
    );
    assert!(out.reply.is_ok());
    s.apply(
        6,
        &cmd(create_mode("/svc/b", CreateMode::Ephemeral { lease })),
    );
    let stat = s.get("/svc/a").unwrap().stat;
    assert_eq!(
        (stat.kind, stat.ephemeral_owner),
        (NodeKind::Ephemeral, lease)
    );
    // No children under an ephemeral node.
    let (out, _) = s.apply(7, &cmd(create("/svc/a/x", "")));
    assert!(matches!(out.reply, Err(ApplyError::EphemeralParent { .. })));
    // Unknown lease.
    let (out, _) = s.apply(
        8,
        &cmd(create_mode("/svc/c", CreateMode::Ephemeral { lease: 999 })),
    );
    assert!(matches!(
        out.reply,
        Err(ApplyError::LeaseNotFound { id: 999 })
    ));

    let (out, events) = s.apply(
        9,
        &raw(Op::LeaseExpire {
            ids: vec![lease, 12345],
        }),
    );
    assert_eq!(
        out.reply,
        Ok(Reply::Deleted {
            paths: vec!["/svc/a".into(), "/svc/b".into()]
        })
    );
    assert!(events.iter().all(|e| e.stat.modify_revision <= 9));
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == EventKind::Deleted)
            .count(),
        2
    );
    assert!(s.get("/svc/a").is_none() && s.lease(lease).is_none());
    assert_eq!(s.get("/svc").unwrap().children.len(), 0);
    // Expiring again changes nothing; revoking an unknown lease is an error.
    let before = s.digest();
    s.apply(10, &raw(Op::LeaseExpire { ids: vec![lease] }));
    let (out, _) = s.apply(11, &raw(Op::LeaseRevoke { id: lease }));
    assert!(matches!(out.reply, Err(ApplyError::LeaseNotFound { .. })));
    assert_eq!(s.digest(), before);
}

#[test]
fn failed_txn_leaves_lease_index_intact() {
    let mut s = State::new();
    let lease = granted(
        &s.apply(
            1,
            &raw(Op::LeaseGrant {
                id: 77,
                ttl_ms: 1_000,
                session: false,
            }),
        )
        .0,
    );
    assert_eq!(lease, 77);
    let txn = raw(Op::Txn(vec![
        create_mode("/e", CreateMode::Ephemeral { lease }),
        create("/missing/x", ""),
    ]));
    let (out, _) = s.apply(2, &txn);
    assert!(out.reply.is_err());
    assert!(s.lease(lease).unwrap().nodes.is_empty());
    let (out, _) = s.apply(3, &raw(Op::LeaseRevoke { id: lease }));
    assert_eq!(out.reply, Ok(Reply::Deleted { paths: vec![] }));
}

#[test]
fn reap_deletes_only_what_is_still_due() {
    let mut s = State::new();
    s.apply(1, &cmd(create_mode("/locks", CreateMode::Container)));
    s.apply(
        2,
        &cmd(create_mode("/t", CreateMode::Ttl { ttl_ms: 1_000 })),
    );
    let candidates = |s: &State| -> Vec<ReapCandidate> {
        s.reapable()
            .map(|(p, st)| ReapCandidate {
                path: p.to_owned(),
                modify_revision: st.modify_revision,
            })
            .collect()
    };
    // A container that never had a child stays; an unmodified childless TTL node goes.
    let (out, _) = s.apply(
        3,
        &raw(Op::Reap {
            nodes: candidates(&s),
        }),
    );
    assert_eq!(
        out.reply,
        Ok(Reply::Deleted {
            paths: vec!["/t".into()]
        })
    );
    assert!(s.get("/locks").is_some());
    // After its last child goes, the container goes too.
    s.apply(4, &cmd(create("/locks/a", "")));
    let stale = candidates(&s);
    s.apply(
        5,
        &cmd(SubOp::Delete {
            path: "/locks/a".into(),
            expected_version: None,
        }),
    );
    let (out, _) = s.apply(6, &raw(Op::Reap { nodes: stale }));
    assert_eq!(
        out.reply,
        Ok(Reply::Deleted {
            paths: vec!["/locks".into()]
        })
    );
    // A TTL node modified after the leader looked is kept.
    s.apply(
        7,
        &cmd(create_mode("/t2", CreateMode::Ttl { ttl_ms: 1_000 })),
    );
    let seen = candidates(&s);
    s.apply(
        8,
        &cmd(SubOp::Set {
            path: "/t2".into(),
            data: b"x".to_vec(),
            expected_version: None,
        }),
    );
    let (out, _) = s.apply(9, &raw(Op::Reap { nodes: seen }));
    assert_eq!(out.reply, Ok(Reply::Deleted { paths: vec![] }));
}

#[test]
fn load_rebuilds_lease_and_reap_indexes() {
    let mut s = State::new();
    let lease = grant_session(&mut s, 1);
    s.apply(2, &cmd(create_mode("/e", CreateMode::Ephemeral { lease })));
    s.apply(3, &cmd(create_mode("/c", CreateMode::Container)));
    let dirty = s.take_dirty();
    let nodes: Vec<_> = dirty
        .nodes
        .iter()
        .filter_map(|p| s.stored_node(p).map(|n| (p.clone(), n)))
        .collect();
    let leases: Vec<_> = dirty
        .leases
        .iter()
        .filter_map(|id| s.stored_lease(*id).map(|l| (*id, l)))
        .collect();
    let loaded = State::load(nodes, [], leases);
    assert_eq!(loaded.digest(), s.digest());
    assert!(loaded.lease(lease).unwrap().nodes.contains("/e"));
    assert_eq!(loaded.reapable().count(), 1);
}

#[test]
fn ephemeral_and_sequential_combine() {
    let mut s = State::new();
    let lease = grant_session(&mut s, 1);
    s.apply(2, &cmd(create("/q", "")));
    let op = SubOp::Create {
        path: "/q/m-".into(),
        data: Vec::new(),
        sequential: true,
        mode: CreateMode::Ephemeral { lease },
    };
    let (out, _) = s.apply(3, &cmd(op));
    let Ok(Reply::Single(SubReply::Created { path, stat })) = out.reply else {
        panic!("{out:?}")
    };
    assert_eq!(path, "/q/m-0000000000");
    assert_eq!(
        (stat.kind, stat.ephemeral_owner),
        (NodeKind::Ephemeral, lease)
    );
    assert!(s.lease(lease).unwrap().nodes.contains(&path));
}

fn claimed(out: &ApplyOutput) -> (String, u64) {
    match &out.reply {
        Ok(Reply::Single(SubReply::Created { path, stat })) => (path.clone(), stat.create_revision),
        other => panic!("{other:?}"),
    }
}

#[test]
fn claim_queues_each_lease_once() {
    let mut s = State::new();
    s.apply(1, &cmd(create_mode("/q", CreateMode::Container)));
    let a = grant_session(&mut s, 2);
    let b = grant_session(&mut s, 3);
    let claim = |lease| {
        raw(Op::Claim {
            parent: "/q".into(),
            lease,
            data: b"v".to_vec(),
        })
    };
    let (out, events) = s.apply(4, &claim(a));
    assert_eq!(claimed(&out), ("/q/claim-0000000000".into(), 4));
    assert_eq!(events.len(), 2, "a new claim is a create: {events:?}");
    let node = s.get("/q/claim-0000000000").unwrap();
    assert_eq!(
        (node.stat.ephemeral_owner, node.data.as_slice()),
        (a, &b"v"[..])
    );

    let (out, _) = s.apply(5, &claim(b));
    assert_eq!(claimed(&out), ("/q/claim-0000000001".into(), 5));

    // The same lease again (a retried or concurrent Lock): its first claim, untouched.
    let digest = s.digest();
    let (out, events) = s.apply(6, &claim(a));
    assert_eq!(claimed(&out), ("/q/claim-0000000000".into(), 4));
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(s.digest(), digest);
    assert_eq!(s.get("/q").unwrap().children.len(), 2);

    // After the claim goes, the lease queues again, at the back (the parent's cversion, which
    // names sequential nodes, counted the deletion too).
    s.apply(
        7,
        &cmd(SubOp::Delete {
            path: "/q/claim-0000000000".into(),
            expected_version: None,
        }),
    );
    let (out, _) = s.apply(8, &claim(a));
    assert_eq!(claimed(&out), ("/q/claim-0000000003".into(), 8));

    // No such lease, no such queue: the create's own errors.
    let (out, _) = s.apply(9, &claim(999));
    assert!(
        matches!(out.reply, Err(ApplyError::LeaseNotFound { id: 999 })),
        "{out:?}"
    );
    let (out, _) = s.apply(
        10,
        &raw(Op::Claim {
            parent: "/gone".into(),
            lease: a,
            data: Vec::new(),
        }),
    );
    assert!(
        matches!(out.reply, Err(ApplyError::NoParent { .. })),
        "{out:?}"
    );
}
