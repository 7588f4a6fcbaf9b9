//! `kordctl member ...`: membership administration and its text and JSON renderings.

use std::time::Duration;

use clap::Subcommand;
use serde_json::{json, Value};

use super::CliError;
use crate::{Client, Member, MemberList, MemberRole, NewMember, DEFAULT_ADMIN_TIMEOUT};

#[derive(Debug, Subcommand)]
pub enum MemberCommand {
    /// List the members as the leader sees them: role, replication progress, last contact.
    List,
    /// Add a member as a learner; unless --learner or --observer, promote it to voter once it
    /// has caught up.
    Add {
        /// The new member's id: never used before in this cluster.
        id: u64,
        /// Its peer address (host:port).
        #[arg(long)]
        peer_addr: String,
        /// Its client address (host:port), published in member lists.
        #[arg(long, default_value = "")]
        client_addr: String,
        /// A human name (e.g. the pod name).
        #[arg(long, default_value = "")]
        name: String,
        /// Stay a learner (promote it later with `member promote`).
        #[arg(long)]
        learner: bool,
        /// An observer: never a voter, serves local reads and watches.
        #[arg(long)]
        observer: bool,
        /// Return only once the learner has caught up (within --max-lag entries).
        #[arg(long)]
        wait: bool,
        /// Catch-up threshold in log entries [default: the server's].
        #[arg(long, value_name = "N", default_value_t = 0)]
        max_lag: u64,
        /// Deadline of the whole change, catch-up included.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        deadline: Option<Duration>,
    },
    /// Promote a caught-up learner to voter (refused for observers and lagging learners).
    Promote {
        id: u64,
        /// Catch-up threshold in log entries [default: the server's].
        #[arg(long, value_name = "N", default_value_t = 0)]
        max_lag: u64,
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        deadline: Option<Duration>,
    },
    /// Remove a member; its id is never accepted again.
    Remove {
        id: u64,
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        deadline: Option<Duration>,
    },
    /// Replace member OLD_ID by a new member NEW_ID: the new one catches up as a learner, then
    /// one joint-consensus change swaps it in and removes the old one.
    Replace {
        old_id: u64,
        new_id: u64,
        /// The new member's peer address (host:port).
        #[arg(long)]
        peer_addr: String,
        #[arg(long, default_value = "")]
        client_addr: String,
        #[arg(long, default_value = "")]
        name: String,
        /// Catch-up threshold in log entries [default: the server's].
        #[arg(long, value_name = "N", default_value_t = 0)]
        max_lag: u64,
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        deadline: Option<Duration>,
    },
    /// Make voter ID the leader; prints the leader afterwards.
    TransferLeader {
        id: u64,
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        deadline: Option<Duration>,
    },
}

pub async fn run(client: &Client, command: MemberCommand, json: bool) -> Result<String, CliError> {
    let deadline = |d: Option<Duration>| d.unwrap_or(DEFAULT_ADMIN_TIMEOUT);
    let members = match command {
        MemberCommand::List => {
            let list = client.member_list().await?;
            return Ok(if json {
                render(list_json(&list))
            } else {
                list_text(&list)
            });
        }
        MemberCommand::Add {
            id,
            peer_addr,
            client_addr,
            name,
            learner,
            observer,
            wait,
            max_lag,
            deadline: d,
        } => {
            let new = NewMember {
                id,
                peer_addr,
                client_addr,
                name,
                observer,
                learner_only: learner || observer,
                wait_caught_up: wait,
                max_lag,
            };
            client.add_member(new, deadline(d)).await?
        }
        MemberCommand::Promote {
            id,
            max_lag,
            deadline: d,
        } => client.promote_member(id, max_lag, deadline(d)).await?,
        MemberCommand::Remove { id, deadline: d } => client.remove_member(id, deadline(d)).await?,
        MemberCommand::Replace {
            old_id,
            new_id,
            peer_addr,
            client_addr,
            name,
            max_lag,
            deadline: d,
        } => {
            let new = NewMember {
                id: new_id,
                peer_addr,
                client_addr,
                name,
                max_lag,
                ..Default::default()
            };
            client.replace_member(old_id, new, deadline(d)).await?
        }
        MemberCommand::TransferLeader { id, deadline: d } => {
            let leader = client.transfer_leader(id, deadline(d)).await?;
            return Ok(if json {
                render(json!({ "leader_id": leader }))
            } else {
                format!("leader {leader}\n")
            });
        }
    };
    let leader_id = members.iter().find(|m| m.is_leader).map_or(0, |m| m.id);
    let list = MemberList {
        leader_id,
        members,
        change_in_progress: false,
    };
    Ok(if json {
        render(json!({ "members": members_json(&list.members) }))
    } else {
        list_text(&list)
    })
}

fn render(value: Value) -> String {
    format!("{value:#}\n")
}

fn role_name(role: i32) -> String {
    MemberRole::try_from(role)
        .map(|r| r.as_str_name().to_ascii_lowercase())
        .unwrap_or_else(|_| format!("role-{role}"))
}

fn member_json(m: &Member) -> Value {
    json!({
        "id": m.id,
        "name": m.name,
        "role": role_name(m.role),
        "is_leader": m.is_leader,
        "peer_addr": m.peer_addr,
        "client_addr": m.client_addr,
        "matched_index": m.matched_index,
        "lag": m.lag,
        "last_contact_ms": m.last_contact_ms,
    })
}

fn members_json(members: &[Member]) -> Vec<Value> {
    members.iter().map(member_json).collect()
}

pub fn list_json(list: &MemberList) -> Value {
    json!({
        "leader_id": list.leader_id,
        "change_in_progress": list.change_in_progress,
        "members": members_json(&list.members),
    })
}

pub fn list_text(list: &MemberList) -> String {
    let header = [
        "ID",
        "NAME",
        "ROLE",
        "CLIENT_ADDR",
        "PEER_ADDR",
        "MATCHED",
        "LAG",
        "LAST_CONTACT",
    ];
    let rows: Vec<[String; 8]> = list
        .members
        .iter()
        .map(|m| {
            let mark = if m.is_leader { "*" } else { "" };
            [
                format!("{}{mark}", m.id),
                m.name.clone(),
                role_name(m.role),
                m.client_addr.clone(),
                m.peer_addr.clone(),
                m.matched_index.to_string(),
                m.lag.to_string(),
                m.last_contact_ms
                    .map_or("-".to_owned(), |ms| format!("{ms}ms")),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(header.to_vec());
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    if list.change_in_progress {
        out.push_str("(a membership change is in progress)\n");
    }
    out.push_str("(* = leader)\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_renders_roles_and_leader() {
        let list = MemberList {
            leader_id: 1,
            change_in_progress: true,
            members: vec![
                Member {
                    id: 1,
                    name: "kord-0".into(),
                    role: MemberRole::Voter as i32,
                    is_leader: true,
                    last_contact_ms: Some(0),
                    ..Default::default()
                },
                Member {
                    id: 4,
                    role: MemberRole::Observer as i32,
                    lag: 7,
                    ..Default::default()
                },
            ],
        };
        let text = list_text(&list);
        assert!(text.contains("1*"), "{text}");
        assert!(text.contains("observer"), "{text}");
        assert!(text.contains("in progress"), "{text}");
        let v = list_json(&list);
        assert_eq!(v["members"][1]["role"], "observer");
        assert_eq!(v["members"][1]["lag"], 7);
        assert_eq!(v["members"][0]["last_contact_ms"], 0);
        assert!(v["members"][1]["last_contact_ms"].is_null());
    }
}
