//! Renders kordctl results as text for people or JSON for scripts. Stat fields keep the proto's
//! snake_case names in both.

use serde_json::{json, Value};

use crate::{
    Created, Event, EventType, LeaseInfo, LeaseTtl, MemberRole, NodeKind, Op, OpResult, Stat,
    StatusResponse, WatchEvent,
};

/// `persistent`, `ephemeral`, `container` or `ttl`.
pub fn kind_name(kind: i32) -> String {
    NodeKind::try_from(kind)
        .map(|k| k.as_str_name().to_ascii_lowercase())
        .unwrap_or_else(|_| format!("kind-{kind}"))
}

pub fn stat_json(stat: &Stat) -> Value {
    json!({
        "create_revision": stat.create_revision,
        "modify_revision": stat.modify_revision,
        "children_revision": stat.children_revision,
        "ctime_ms": stat.ctime_ms,
        "mtime_ms": stat.mtime_ms,
        "version": stat.version,
        "cversion": stat.cversion,
        "ephemeral_owner": stat.ephemeral_owner,
        "data_length": stat.data_length,
        "num_children": stat.num_children,
        "kind": kind_name(stat.kind),
        "ttl_ms": stat.ttl_ms,
    })
}

/// `name = value` lines, one per Stat field, in proto order.
pub fn stat_text(stat: &Stat) -> String {
    let Value::Object(fields) = stat_json(stat) else {
        return String::new();
    };
    let order = [
        "create_revision",
        "modify_revision",
        "children_revision",
        "ctime_ms",
        "mtime_ms",
        "version",
        "cversion",
        "ephemeral_owner",
        "data_length",
        "num_children",
        "kind",
        "ttl_ms",
    ];
    order
        .iter()
        .filter_map(|k| fields.get(*k).map(|v| format!("{k} = {}\n", plain(v))))
        .collect()
}

/// A JSON value as text: strings without their quotes.
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// `created`, `deleted`, `data_changed` or `children_changed`.
pub fn event_type_name(kind: EventType) -> String {
    kind.as_str_name().to_ascii_lowercase()
}

/// `REVISION TYPE PATH [DATA]` per event (DATA for creations and data changes that carry any,
/// with newlines shown as `\n`); nothing for progress notifications.
pub fn watch_text(event: &WatchEvent) -> String {
    let WatchEvent::Events { events, .. } = event else {
        return String::new();
    };
    events
        .iter()
        .map(|e| {
            let mut line = format!("{} {} {}", e.revision, event_type_name(e.kind), e.path);
            let has_data = matches!(e.kind, EventType::Created | EventType::DataChanged);
            if has_data && !e.data.is_empty() {
                let data = String::from_utf8_lossy(&e.data)
                    .replace('\n', "\\n")
                    .replace('\r', "\\r");
                line.push(' ');
                line.push_str(&data);
            }
            line.push('\n');
            line
        })
        .collect()
}

pub fn event_json(e: &Event, with_prev: bool) -> Value {
    let mut value = json!({
        "revision": e.revision,
        "type": event_type_name(e.kind),
        "path": e.path,
        "data": String::from_utf8_lossy(&e.data),
        "stat": stat_json(&e.stat),
    });
    if with_prev {
        let (data, stat) = match &e.prev {
            Some(p) => (json!(String::from_utf8_lossy(&p.data)), stat_json(&p.stat)),
            None => (Value::Null, Value::Null),
        };
        value["prev_data"] = data;
        value["prev_stat"] = stat;
    }
    value
}

/// One compact JSON object per line: each event, or `{"revision":N,"progress":true}`.
pub fn watch_json_lines(event: &WatchEvent, with_prev: bool) -> String {
    match event {
        WatchEvent::Events { events, .. } => events
            .iter()
            .map(|e| format!("{}\n", event_json(e, with_prev)))
            .collect(),
        WatchEvent::Progress { revision } => {
            format!("{}\n", json!({ "revision": revision, "progress": true }))
        }
    }
}

pub fn created_json(created: &Created) -> Value {
    json!({ "path": created.path, "stat": stat_json(&created.stat) })
}

/// Children as a table: name, kind, version, data length, child count, last modify revision.
pub fn children_text(children: &[(String, Stat)]) -> String {
    let rows: Vec<[String; 6]> = children
        .iter()
        .map(|(name, s)| {
            [
                name.clone(),
                kind_name(s.kind),
                s.version.to_string(),
                s.data_length.to_string(),
                s.num_children.to_string(),
                s.modify_revision.to_string(),
            ]
        })
        .collect();
    table(
        [
            "NAME",
            "KIND",
            "VERSION",
            "DATA_LENGTH",
            "NUM_CHILDREN",
            "MODIFY_REVISION",
        ],
        &rows,
    )
}

fn op_name(op: &Op) -> &'static str {
    match op {
        Op::Create {
            sequential: true, ..
        } => "create-seq",
        Op::Create { .. } => "create",
        Op::Set { .. } => "set",
        Op::Delete { .. } => "delete",
        Op::Check { .. } => "check",
    }
}

/// One line per op: its kind, the path it acted on (the created one for creates) and, for
/// writes that produce one, the new version.
pub fn txn_text(ops: &[Op], results: &[OpResult]) -> String {
    ops.iter()
        .zip(results)
        .map(|(op, result)| match result {
            OpResult::Create(c) => format!("{} {}\n", op_name(op), c.path),
            OpResult::Set(stat) => format!("set {} version={}\n", op.path(), stat.version),
            OpResult::Delete | OpResult::Check => format!("{} {}\n", op_name(op), op.path()),
        })
        .collect()
}

pub fn txn_json(ops: &[Op], results: &[OpResult]) -> Value {
    let results: Vec<Value> = ops
        .iter()
        .zip(results)
        .map(|(op, result)| match result {
            OpResult::Create(c) => json!({
                "op": op_name(op), "path": c.path, "stat": stat_json(&c.stat)
            }),
            OpResult::Set(stat) => json!({
                "op": "set", "path": op.path(), "stat": stat_json(stat)
            }),
            OpResult::Delete | OpResult::Check => json!({ "op": op_name(op), "path": op.path() }),
        })
        .collect();
    json!({ "results": results })
}

pub fn lease_ttl_json(t: &LeaseTtl) -> Value {
    json!({
        "id": t.id,
        "granted_ttl_ms": duration_ms(t.granted),
        "remaining_ms": duration_ms(t.remaining),
        "session": t.session,
        "nodes": t.nodes,
    })
}

/// `name = value` lines; the nodes as a JSON array, so any path reads back unambiguously.
pub fn lease_ttl_text(t: &LeaseTtl) -> String {
    format!(
        "id = {}\ngranted_ttl_ms = {}\nremaining_ms = {}\nsession = {}\nnodes = {}\n",
        t.id,
        duration_ms(t.granted),
        duration_ms(t.remaining),
        t.session,
        json!(t.nodes),
    )
}

pub fn lease_list_json(leases: &[LeaseInfo]) -> Value {
    let leases: Vec<Value> = leases
        .iter()
        .map(|l| {
            json!({
                "id": l.id,
                "granted_ttl_ms": duration_ms(l.granted_ttl),
                "session": l.session,
                "node_count": l.node_count,
            })
        })
        .collect();
    json!({ "leases": leases })
}

/// Leases as a table: id, granted TTL, whether a session, attached node count.
pub fn lease_list_text(leases: &[LeaseInfo]) -> String {
    let rows: Vec<[String; 4]> = leases
        .iter()
        .map(|l| {
            [
                l.id.to_string(),
                duration_ms(l.granted_ttl).to_string(),
                l.session.to_string(),
                l.node_count.to_string(),
            ]
        })
        .collect();
    table(["ID", "TTL_MS", "SESSION", "NODES"], &rows)
}

fn duration_ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn role_name(role: i32) -> String {
    MemberRole::try_from(role)
        .map(|r| r.as_str_name().to_ascii_lowercase())
        .unwrap_or_else(|_| format!("role-{role}"))
}

pub fn status_json(s: &StatusResponse) -> Value {
    let members: Vec<Value> = s
        .members
        .iter()
        .map(|m| {
            json!({
                "id": m.id,
                "peer_addr": m.peer_addr,
                "client_addr": m.client_addr,
                "role": role_name(m.role),
                "matched_index": m.matched_index,
                "is_leader": m.id == s.leader_id,
            })
        })
        .collect();
    json!({
        "member_id": s.member_id,
        "leader_id": s.leader_id,
        "raft_term": s.raft_term,
        "raft_state": s.raft_state,
        "commit_index": s.commit_index,
        "applied_index": s.applied_index,
        "last_log_index": s.last_log_index,
        "snapshot_index": s.snapshot_index,
        "state_digest": s.state_digest,
        "znode_count": s.znode_count,
        "compacted_revision": s.compacted_revision,
        "revision": s.revision,
        "members": members,
    })
}

pub fn status_text(s: &StatusResponse) -> String {
    let leader = if s.leader_id == 0 {
        "none".to_owned()
    } else {
        s.leader_id.to_string()
    };
    let mut out = format!(
        "member {} ({})  leader {}  term {}\n\
         commit_index {}  applied_index {}  last_log_index {}  snapshot_index {}\n\
         znodes {}  state_digest {:016x}  revision {}  compacted_revision {}\n\n",
        s.member_id,
        s.raft_state,
        leader,
        s.raft_term,
        s.commit_index,
        s.applied_index,
        s.last_log_index,
        s.snapshot_index,
        s.znode_count,
        s.state_digest,
        s.revision,
        s.compacted_revision,
    );
    let rows: Vec<[String; 5]> = s
        .members
        .iter()
        .map(|m| {
            let mark = if m.id == s.leader_id { "*" } else { "" };
            [
                format!("{}{mark}", m.id),
                role_name(m.role),
                m.client_addr.clone(),
                m.peer_addr.clone(),
                m.matched_index.to_string(),
            ]
        })
        .collect();
    out.push_str(&table(
        ["ID", "ROLE", "CLIENT_ADDR", "PEER_ADDR", "MATCHED_INDEX"],
        &rows,
    ));
    out.push_str("(* = leader)\n");
    out
}

/// Left-aligned columns two spaces apart, header first.
fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: [&str; N]| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(header);
    for row in rows {
        out.push_str(&line(row.each_ref().map(String::as_str)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stat_shows_kind_and_ttl() {
        let stat = Stat {
            kind: NodeKind::Ttl as i32,
            ttl_ms: 5000,
            ..Default::default()
        };
        let text = stat_text(&stat);
        assert!(text.contains("kind = ttl\n"), "{text}");
        assert!(text.contains("ttl_ms = 5000\n"), "{text}");
        assert_eq!(stat_json(&stat)["kind"], "ttl");
        assert_eq!(kind_name(NodeKind::Ephemeral as i32), "ephemeral");
        assert_eq!(kind_name(99), "kind-99");
    }

    #[test]
    fn ls_table_has_a_kind_column() {
        let stat = Stat {
            kind: NodeKind::Container as i32,
            ..Default::default()
        };
        let text = children_text(&[("c".into(), stat)]);
        let mut lines = text.lines();
        assert!(lines.next().unwrap().starts_with("NAME  KIND"), "{text}");
        let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(row[..2], ["c", "container"]);
    }

    fn event(kind: EventType, path: &str, data: &str) -> Event {
        Event {
            revision: 9,
            kind,
            path: path.into(),
            stat: Stat::default(),
            data: data.into(),
            prev: None,
        }
    }

    #[test]
    fn watch_renderings() {
        let ev = WatchEvent::Events {
            revision: 9,
            events: vec![
                event(EventType::DataChanged, "/a", "two\nlines"),
                event(EventType::Created, "/b", ""),
                event(EventType::ChildrenChanged, "/", ""),
            ],
        };
        assert_eq!(
            watch_text(&ev),
            "9 data_changed /a two\\nlines\n9 created /b\n9 children_changed /\n"
        );
        assert_eq!(watch_text(&WatchEvent::Progress { revision: 3 }), "");

        let lines = watch_json_lines(&ev, false);
        let first: Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
        assert_eq!(first["revision"], 9);
        assert_eq!(first["type"], "data_changed");
        assert_eq!(first["data"], "two\nlines");
        assert_eq!(first["stat"]["version"], 0);
        assert!(first.get("prev_data").is_none());
        assert_eq!(lines.lines().count(), 3);

        let mut with_prev = event(EventType::DataChanged, "/a", "new");
        with_prev.prev = Some(crate::PrevNode {
            stat: Stat {
                version: 4,
                ..Default::default()
            },
            data: b"old".to_vec(),
        });
        let v = event_json(&with_prev, true);
        assert_eq!(v["prev_data"], "old");
        assert_eq!(v["prev_stat"]["version"], 4);
        let v = event_json(&event(EventType::Created, "/c", "x"), true);
        assert!(v["prev_data"].is_null() && v["prev_stat"].is_null());

        let progress = watch_json_lines(&WatchEvent::Progress { revision: 3 }, true);
        assert!(progress.ends_with('\n') && progress.lines().count() == 1);
        let v: Value = serde_json::from_str(&progress).unwrap();
        assert_eq!(v, json!({ "revision": 3, "progress": true }));
    }

    #[test]
    fn lease_renderings() {
        let ttl = LeaseTtl {
            id: 7,
            granted: Duration::from_secs(10),
            remaining: Duration::from_millis(9500),
            session: true,
            nodes: vec!["/a".into(), "/b c".into()],
        };
        assert_eq!(
            lease_ttl_text(&ttl),
            "id = 7\ngranted_ttl_ms = 10000\nremaining_ms = 9500\nsession = true\n\
             nodes = [\"/a\",\"/b c\"]\n"
        );
        assert_eq!(lease_ttl_json(&ttl)["remaining_ms"], 9500);
        let list = [LeaseInfo {
            id: 7,
            granted_ttl: Duration::from_secs(10),
            session: false,
            node_count: 2,
        }];
        assert_eq!(
            lease_list_text(&list),
            "ID  TTL_MS  SESSION  NODES\n7   10000   false    2\n"
        );
        assert_eq!(lease_list_json(&list)["leases"][0]["node_count"], 2);
    }
}
