//! The state machine's write batches, written to RocksDB on a thread of their own, in apply
//! order.
//!
//! The batches skip RocksDB's WAL: the Raft log makes an applied entry durable, and a batch that
//! a crash loses is applied again from the log (`state_machine`). So when a batch reaches the
//! memtable does not matter for durability; only that batches land whole and in order. Written
//! here, RocksDB's write path is off the apply, which lies between the log's fsync and the
//! client's reply (BENCHMARKS.md, "The state machine's tables written off the reply's path").
//!
//! Readers of what the batches write wait for them: the watch history up to a revision
//! ([`Written::through`]); a snapshot build or install lets the queue drain first
//! ([`TableWriter::drain`]).
//!
//! A failed write stops the writer. It drops every later batch, and the next `write` or `drain`
//! returns the error, which stops openraft (a storage error). The tables then hold a whole
//! prefix of the applied entries, and the rest is applied again from the log on restart.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use rocksdb::WriteBatch;
use tokio::sync::watch;

use super::StoreError;

/// Batches waiting to be written, at most: an apply that finds the queue full waits.
const QUEUE: usize = 256;

/// How far the tables are written, or why they stopped.
type Tables = Result<u64, String>;

enum Job {
    /// A batch and the revision the tables reach with it.
    Write(WriteBatch, u64),
    /// Answered once every job before it is done.
    Drain(SyncSender<()>),
}

pub struct TableWriter {
    jobs: SyncSender<Job>,
    /// The revision the tables hold, or the first failed write's error, for every later caller.
    written: Arc<watch::Sender<Tables>>,
}

impl TableWriter {
    /// Starts the writer thread; the tables already hold revision `written`.
    pub fn start<W>(write: W, written: u64) -> Result<Self, StoreError>
    where
        W: FnMut(WriteBatch) -> Result<(), String> + Send + 'static,
    {
        let (jobs, queue) = sync_channel(QUEUE);
        let written = Arc::new(watch::Sender::new(Ok(written)));
        {
            let written = written.clone();
            std::thread::Builder::new()
                .name("kord-table-writer".into())
                .spawn(move || run(queue, write, &written))
                .map_err(|e| StoreError::Thread(e.to_string()))?;
        }
        Ok(TableWriter { jobs, written })
    }

    /// Queues `batch`, which takes the tables to `revision`.
    pub fn write(&self, batch: WriteBatch, revision: u64) -> Result<(), StoreError> {
        self.check()?;
        self.jobs
            .send(Job::Write(batch, revision))
            .map_err(|_| stopped())
    }

    /// Blocks until every batch queued before is written.
    pub fn drain(&self) -> Result<(), StoreError> {
        let (done, wait) = sync_channel(1);
        self.jobs.send(Job::Drain(done)).map_err(|_| stopped())?;
        wait.recv().map_err(|_| stopped())?;
        self.check()
    }

    /// After a snapshot install replaced the tables (queue drained): they are at `revision`.
    pub fn reset(&self, revision: u64) {
        self.written.send_modify(|w| *w = Ok(revision));
    }

    /// How far the tables are written, for readers.
    pub fn written(&self) -> Written {
        Written(self.written.subscribe())
    }

    fn check(&self) -> Result<(), StoreError> {
        match &*self.written.borrow() {
            Err(e) => Err(StoreError::TableWrite(e.clone())),
            Ok(_) => Ok(()),
        }
    }
}

fn stopped() -> StoreError {
    StoreError::TableWrite("the table writer stopped".into())
}

fn run<W>(queue: Receiver<Job>, mut write: W, written: &watch::Sender<Tables>)
where
    W: FnMut(WriteBatch) -> Result<(), String>,
{
    for job in queue {
        match job {
            Job::Write(_, _) if written.borrow().is_err() => {}
            // A panic counts as a failure: readers must not wait for a writer that is gone.
            Job::Write(batch, revision) => match catch_unwind(AssertUnwindSafe(|| write(batch)))
                .unwrap_or_else(|_| Err("the write panicked".into()))
            {
                Ok(()) => {
                    written.send_modify(|w| *w = Ok(revision));
                }
                Err(e) => {
                    tracing::error!(error = %e, "writing the state machine's tables failed");
                    // Readers waiting for a revision wake and find the failure.
                    written.send_modify(|w| *w = Err(e));
                }
            },
            Job::Drain(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// How far the state machine's tables are written ([`TableWriter`]).
#[derive(Clone)]
pub struct Written(watch::Receiver<Tables>);

impl Written {
    /// Tables that are always written through (tests that write them directly).
    pub fn always() -> Self {
        Written(watch::channel(Ok(u64::MAX)).1)
    }

    /// Waits until the tables hold every revision up to `revision`.
    pub async fn through(&self, revision: u64) -> Result<(), StoreError> {
        let mut rx = self.0.clone();
        let reached = rx
            .wait_for(|w| w.as_ref().map_or(true, |&w| w >= revision))
            .await
            .map(|w| w.is_ok());
        match reached {
            Ok(true) => Ok(()),
            Ok(false) => Err(StoreError::TableWrite(
                "the state machine's tables are not written (see the log)".into(),
            )),
            Err(_) => Err(stopped()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    /// How the `n`th write of a test writer goes wrong.
    enum Fault {
        Fails(usize),
        Panics(usize),
    }

    /// A writer whose batches are recorded by their number of puts, in the order written.
    fn recording(fault: Option<Fault>) -> (TableWriter, mpsc::Receiver<usize>) {
        let (tx, rx) = mpsc::channel();
        let mut n = 0;
        let writer = TableWriter::start(
            move |batch: WriteBatch| {
                n += 1;
                match &fault {
                    Some(Fault::Fails(at)) if *at == n => return Err(format!("write {n} failed")),
                    Some(Fault::Panics(at)) if *at == n => panic!("write {n} panicked"),
                    _ => {}
                }
                tx.send(batch.len()).map_err(|e| e.to_string())
            },
            5,
        )
        .unwrap();
        (writer, rx)
    }

    fn batch_of(puts: usize) -> WriteBatch {
        let mut b = WriteBatch::default();
        for i in 0..puts {
            b.put(i.to_be_bytes(), b"v");
        }
        b
    }

    #[tokio::test]
    async fn batches_are_written_in_order_and_readers_wait_for_theirs() {
        let (writer, written) = recording(None);
        let readers = writer.written();
        readers.through(5).await.unwrap();
        for (puts, revision) in [(1, 6), (2, 7), (3, 9)] {
            writer.write(batch_of(puts), revision).unwrap();
        }
        tokio::time::timeout(Duration::from_secs(10), readers.through(9))
            .await
            .expect("revision 9 written")
            .unwrap();
        writer.drain().unwrap();
        assert_eq!(written.try_iter().collect::<Vec<_>>(), [1, 2, 3]);
        // A revision still to come keeps its reader waiting.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), readers.through(10))
                .await
                .is_err()
        );
        writer.reset(20);
        readers.through(20).await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_write_stops_the_writer_and_every_caller_learns_it() {
        let (writer, written) = recording(Some(Fault::Fails(2)));
        let readers = writer.written();
        writer.write(batch_of(1), 6).unwrap();
        writer.write(batch_of(2), 7).unwrap();
        let err = writer.drain().unwrap_err().to_string();
        assert!(err.contains("write 2 failed"), "{err}");
        assert!(writer.write(batch_of(3), 8).is_err());
        // Nothing after the failed batch reaches the tables.
        assert_eq!(written.try_iter().collect::<Vec<_>>(), [1]);
        let err = tokio::time::timeout(Duration::from_secs(10), readers.through(7))
            .await
            .expect("the reader wakes")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not written"), "{err}");
    }

    #[tokio::test]
    async fn a_panicking_write_counts_as_a_failed_one() {
        let (writer, written) = recording(Some(Fault::Panics(1)));
        writer.write(batch_of(1), 6).unwrap();
        let err = writer.drain().unwrap_err().to_string();
        assert!(err.contains("panicked"), "{err}");
        assert!(writer.written().through(6).await.is_err());
        assert_eq!(written.try_iter().count(), 0);
    }
}
