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
    }
}

fn seq(path: &str) -> SubOp {
    SubOp::Create {
        path: path.into(),
        data: Vec::new(),
        sequential: true,
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
    let loaded = State::load(nodes, []);
    assert_eq!(loaded.digest(), s.digest());
    assert!(loaded.get("/a").unwrap().children.contains("b"));
}
