//! Request builders, small read helpers, and retry-with-the-same-WriteId for the Kv API.

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

use kord_api::v1::kv_client::KvClient;
use kord_api::v1::{
    txn_op, CheckOp, ChildrenRequest, ChildrenResponse, Consistency, CreateOp, CreateRequest,
    DeleteOp, DeleteRequest, ExistsRequest, GetRequest, GetResponse, SetOp, SetRequest, Stat,
    TxnOp, WriteId,
};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// A Kv client on a (lazily connected) channel to one member.
pub type Kv = KvClient<Channel>;

/// `Consistency::Linearizable` as the wire's `i32`.
pub const LINEARIZABLE: i32 = Consistency::Linearizable as i32;
/// `Consistency::Local` as the wire's `i32`.
pub const LOCAL: i32 = Consistency::Local as i32;

/// Numbers the writes of one client: a random non-zero `client_id`, `seq` 1, 2, 3, ...
/// Writes are issued one after another, so `acked_below` is always the write's own `seq`.
#[derive(Debug, Clone)]
pub struct WriteIds {
    pub client_id: u64,
    next_seq: u64,
}

impl WriteIds {
    pub fn new() -> Self {
        WriteIds {
            client_id: rand::random::<u64>() | 1,
            next_seq: 1,
        }
    }

    pub fn next_id(&mut self) -> WriteId {
        let seq = self.next_seq;
        self.next_seq += 1;
        WriteId {
            client_id: self.client_id,
            seq,
            acked_below: seq,
        }
    }
}

impl Default for WriteIds {
    fn default() -> Self {
        Self::new()
    }
}

pub fn create_req(path: &str, data: impl AsRef<[u8]>) -> CreateRequest {
    CreateRequest {
        write_id: None,
        path: path.to_string(),
        data: data.as_ref().to_vec(),
        ..Default::default()
    }
}

pub fn seq_create_req(path: &str, data: impl AsRef<[u8]>) -> CreateRequest {
    CreateRequest {
        sequential: true,
        ..create_req(path, data)
    }
}

pub fn set_req(path: &str, data: impl AsRef<[u8]>, expected_version: Option<i32>) -> SetRequest {
    SetRequest {
        write_id: None,
        path: path.to_string(),
        data: data.as_ref().to_vec(),
        expected_version,
    }
}

pub fn delete_req(path: &str, expected_version: Option<i32>) -> DeleteRequest {
    DeleteRequest {
        write_id: None,
        path: path.to_string(),
        expected_version,
    }
}

pub fn get_req(path: &str, consistency: i32) -> GetRequest {
    GetRequest {
        path: path.to_string(),
        consistency,
    }
}

pub fn exists_req(path: &str, consistency: i32) -> ExistsRequest {
    ExistsRequest {
        path: path.to_string(),
        consistency,
    }
}

pub fn children_req(path: &str, consistency: i32) -> ChildrenRequest {
    ChildrenRequest {
        path: path.to_string(),
        consistency,
        with_stats: false,
    }
}

pub fn op_create(path: &str, data: impl AsRef<[u8]>, sequential: bool) -> TxnOp {
    TxnOp {
        op: Some(txn_op::Op::Create(CreateOp {
            path: path.to_string(),
            data: data.as_ref().to_vec(),
            sequential,
            ..Default::default()
        })),
    }
}

pub fn op_set(path: &str, data: impl AsRef<[u8]>, expected_version: Option<i32>) -> TxnOp {
    TxnOp {
        op: Some(txn_op::Op::Set(SetOp {
            path: path.to_string(),
            data: data.as_ref().to_vec(),
            expected_version,
        })),
    }
}

pub fn op_delete(path: &str, expected_version: Option<i32>) -> TxnOp {
    TxnOp {
        op: Some(txn_op::Op::Delete(DeleteOp {
            path: path.to_string(),
            expected_version,
        })),
    }
}

pub fn op_check(path: &str, expected_version: Option<i32>) -> TxnOp {
    TxnOp {
        op: Some(txn_op::Op::Check(CheckOp {
            path: path.to_string(),
            expected_version,
        })),
    }
}

/// Get, returning the response (header, data, stat).
pub async fn get(kv: &mut Kv, path: &str, consistency: i32) -> Result<GetResponse, Status> {
    kv.get(get_req(path, consistency))
        .await
        .map(|r| r.into_inner())
}

/// Exists: `Some(stat)` when the node exists.
pub async fn exists(kv: &mut Kv, path: &str, consistency: i32) -> Result<Option<Stat>, Status> {
    kv.exists(exists_req(path, consistency))
        .await
        .map(|r| r.into_inner().stat)
}

/// Children (names, sorted bytewise) and the listed node's stat.
pub async fn children(
    kv: &mut Kv,
    path: &str,
    consistency: i32,
) -> Result<ChildrenResponse, Status> {
    kv.children(children_req(path, consistency))
        .await
        .map(|r| r.into_inner())
}

/// The 10-digit counter a sequential create appended to `prefix`; panics if `path` is not
/// `prefix` followed by exactly 10 ASCII digits.
pub fn seq_suffix(path: &str, prefix: &str) -> u64 {
    let suffix = path
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("{path:?} does not start with {prefix:?}"));
    assert!(
        suffix.len() == 10 && suffix.bytes().all(|b| b.is_ascii_digit()),
        "{path:?}: sequential suffix {suffix:?} is not 10 zero-padded digits"
    );
    suffix.parse().expect("digits")
}

/// Panics unless `result` is an error with `code`; returns the status for further checks.
#[track_caller]
pub fn expect_code<T: Debug>(result: Result<T, Status>, code: Code, what: &str) -> Status {
    match result {
        Ok(value) => panic!("{what}: expected {code:?}, got success: {value:?}"),
        Err(status) => {
            assert_eq!(
                status.code(),
                code,
                "{what}: expected {code:?}, got {:?}: {}",
                status.code(),
                status.message()
            );
            status
        }
    }
}

/// Whether a failed request may be retried (with the same WriteId, possibly on another member):
/// no leader, member gone, transport failure, or a deadline whose write outcome is unknown.
pub fn is_retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::Internal
    )
}

/// Bounds for [`retry_rotating`].
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Total time to keep retrying one request.
    pub budget: Duration,
    /// Time allowed for one attempt before it counts as a retryable DEADLINE_EXCEEDED.
    pub attempt_timeout: Duration,
    /// Pause between attempts.
    pub backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            budget: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(3),
            backoff: Duration::from_millis(50),
        }
    }
}

/// A request that eventually succeeded.
#[derive(Debug)]
pub struct Retried<T> {
    pub value: T,
    /// 1 when the first attempt succeeded.
    pub attempts: u32,
    /// Index (into the `clients` slice) of the member that answered.
    pub client_index: usize,
}

/// Why [`retry_rotating`] stopped without a success.
#[derive(Debug)]
pub enum RetryError {
    /// A non-retryable answer (e.g. ALREADY_EXISTS): the request's outcome is that error.
    Rejected { status: Status, attempts: u32 },
    /// Only retryable failures until the budget ran out: the outcome is unknown.
    GaveUp { last: Status, attempts: u32 },
}

/// Sends `call(client)` starting at `clients[start % len]`, moving to the next member after
/// each retryable failure, until success, a non-retryable error, or `retry.budget` runs out.
/// The caller builds the request once, so every attempt carries the same WriteId.
pub async fn retry_rotating<T, F, Fut>(
    clients: &[Kv],
    start: usize,
    retry: &Retry,
    mut call: F,
) -> Result<Retried<T>, RetryError>
where
    F: FnMut(Kv) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    assert!(!clients.is_empty(), "retry_rotating: no clients");
    let deadline = Instant::now() + retry.budget;
    let mut index = start % clients.len();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let outcome =
            tokio::time::timeout(retry.attempt_timeout, call(clients[index].clone())).await;
        let status = match outcome {
            Ok(Ok(response)) => {
                return Ok(Retried {
                    value: response.into_inner(),
                    attempts,
                    client_index: index,
                })
            }
            Ok(Err(status)) => status,
            Err(_) => Status::deadline_exceeded(format!(
                "e2e: no answer within {:?}",
                retry.attempt_timeout
            )),
        };
        if !is_retryable(&status) {
            return Err(RetryError::Rejected { status, attempts });
        }
        if Instant::now() + retry.backoff >= deadline {
            return Err(RetryError::GaveUp {
                last: status,
                attempts,
            });
        }
        index = (index + 1) % clients.len();
        tokio::time::sleep(retry.backoff).await;
    }
}
