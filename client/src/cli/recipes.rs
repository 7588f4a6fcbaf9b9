//! `kordctl lock` and `kordctl elect`: commands that hold a session while they run.

use std::process::ExitStatus;
use std::time::Duration;

use serde_json::{json, Value};

use super::{write_stdout, CliError, Signals};
use crate::{Client, Election, Error, LeaderInfo, Mutex, MutexGuard, Session};

/// Exit code when interrupted before the lock or leadership was acquired.
const INTERRUPTED: u8 = 130;

/// `kordctl lock`: acquire, print the fencing token, then run COMMAND (or hold until a signal),
/// then release.
pub(super) async fn lock(
    client: &Client,
    name: &str,
    session_timeout: Duration,
    wait: Option<Duration>,
    command: Vec<String>,
    json: bool,
) -> Result<String, CliError> {
    // Installed first: a signal after the token is printed must release, not kill the process.
    let mut signals = Signals::install()?;
    let session = client.session(session_timeout).await?;
    let mutex = Mutex::new(&session, name);
    let acquire = async {
        match wait {
            Some(w) => mutex.try_lock(w).await,
            None => mutex.lock().await.map(Some),
        }
    };
    let acquired = tokio::select! {
        () = signals.recv() => None,
        r = acquire => Some(r),
    };
    let guard = match acquired {
        Some(Ok(Some(guard))) => guard,
        other => {
            let _ = session.close().await;
            return Err(match other {
                None => CliError::Exit(INTERRUPTED),
                Some(Ok(None)) => CliError::LockTimeout(name.to_owned()),
                Some(Err(err)) => err.into(),
                Some(Ok(Some(_))) => unreachable!("handled above"),
            });
        }
    };
    let printed = if json {
        format!(
            "{}\n",
            json!({ "key": guard.key(), "fencing_token": guard.fencing_token() })
        )
    } else {
        format!("{}\n", guard.fencing_token())
    };
    let _ = write_stdout(&printed);

    if command.is_empty() {
        return tokio::select! {
            () = signals.recv() => {
                release(guard, session).await;
                Ok(String::new())
            }
            () = session.expired() => Err(CliError::LockLost),
        };
    }

    let mut child = match tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .env("KORD_FENCING_TOKEN", guard.fencing_token().to_string())
        .env("KORD_LOCK_KEY", guard.key())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(err) => {
            release(guard, session).await;
            return Err(CliError::Usage(format!("cannot run {}: {err}", command[0])));
        }
    };
    tokio::select! {
        status = child.wait() => {
            release(guard, session).await;
            match status {
                Ok(status) => Err(CliError::Exit(exit_code(status))),
                Err(err) => Err(CliError::Usage(format!("waiting for {}: {err}", command[0]))),
            }
        }
        () = session.expired() => {
            // The lock may already be someone else's: stop the command at once.
            let _ = child.start_kill();
            let _ = child.wait().await;
            Err(CliError::LockLost)
        }
        () = signals.recv() => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            release(guard, session).await;
            Err(CliError::Exit(INTERRUPTED))
        }
    }
}

/// Unlocks, then closes the session (which would release the claim by itself too).
async fn release(guard: MutexGuard, session: Session) {
    if let Err(err) = guard.unlock().await {
        tracing::debug!(error = %err, "unlock failed; closing the session releases the lock");
    }
    let _ = session.close().await;
}

/// The child's exit code, or 128 + the signal that killed it.
fn exit_code(status: ExitStatus) -> u8 {
    if let Some(code) = status.code() {
        return (code & 0xff) as u8;
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            return (128 + (signal & 0x7f)) as u8;
        }
    }
    1
}

/// `kordctl elect NAME VALUE`: campaign, print `leader KEY token N`, hold until a signal
/// (resign, exit 0) or until leadership is lost (exit 1).
pub(super) async fn elect(
    client: &Client,
    name: &str,
    value: Vec<u8>,
    session_timeout: Duration,
    json: bool,
) -> Result<String, CliError> {
    let mut signals = Signals::install()?;
    let session = client.session(session_timeout).await?;
    let election = Election::new(&session, name);
    let won = tokio::select! {
        () = signals.recv() => None,
        r = election.campaign(value) => Some(r),
    };
    let leadership = match won {
        Some(Ok(leadership)) => leadership,
        Some(Err(err)) => {
            let _ = session.close().await;
            return Err(err.into());
        }
        None => {
            let _ = session.close().await;
            return Err(CliError::Exit(INTERRUPTED));
        }
    };
    let printed = if json {
        format!(
            "{}\n",
            json!({
                "name": name,
                "key": leadership.key(),
                "fencing_token": leadership.fencing_token(),
                "lease_id": session.id(),
            })
        )
    } else {
        format!(
            "leader {} token {}\n",
            leadership.key(),
            leadership.fencing_token()
        )
    };
    let _ = write_stdout(&printed);
    tokio::select! {
        () = signals.recv() => {
            if let Err(err) = leadership.resign().await {
                tracing::debug!(error = %err, "resign failed; closing the session ends it");
            }
            let _ = session.close().await;
            Ok(String::new())
        }
        () = leadership.lost() => Err(CliError::LeadershipLost),
    }
}

/// `kordctl elect --observe NAME`: prints the leader, then each change, until killed.
pub(super) async fn observe(client: &Client, name: &str, json: bool) -> Result<String, CliError> {
    let mut signals = Signals::install()?;
    let mut stream = client.observe(name);
    loop {
        let item = tokio::select! {
            () = signals.recv() => return Ok(String::new()),
            item = stream.next() => item,
        };
        let info = match item {
            Some(Ok(info)) => info,
            Some(Err(err)) => return Err(err.into()),
            None => return Err(Error::Unavailable(format!("observe of {name} ended")).into()),
        };
        let text = if json {
            format!("{}\n", leader_json(&info))
        } else {
            leader_text(&info)
        };
        if write_stdout(&text).is_err() {
            return Ok(String::new());
        }
    }
}

/// `KEY VALUE` (newlines in VALUE shown as \n), or `none`.
fn leader_text(info: &LeaderInfo) -> String {
    match info {
        Some((leader, value)) => format!(
            "{} {}\n",
            leader.key,
            String::from_utf8_lossy(value).replace('\n', "\\n")
        ),
        None => "none\n".to_owned(),
    }
}

fn leader_json(info: &LeaderInfo) -> Value {
    match info {
        Some((leader, value)) => json!({
            "key": leader.key,
            "value": String::from_utf8_lossy(value),
            "fencing_token": leader.fencing_token,
            "lease_id": leader.lease_id,
        }),
        None => json!({ "key": null, "value": null }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LeaderKey;

    #[test]
    fn leader_lines() {
        let info = Some((
            LeaderKey {
                name: "e".into(),
                key: "/kord/elections/e/claim-0000000003".into(),
                lease_id: 7,
                fencing_token: 12,
            },
            b"a\nb".to_vec(),
        ));
        assert_eq!(
            leader_text(&info),
            "/kord/elections/e/claim-0000000003 a\\nb\n"
        );
        assert_eq!(leader_text(&None), "none\n");
        assert_eq!(leader_json(&info)["fencing_token"], 12);
        assert!(leader_json(&None)["key"].is_null());
    }

    #[cfg(unix)]
    #[test]
    fn child_exit_codes_pass_through() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
    }
}
