//! The Raft log's bytes: records appended to preallocated segment files, synced by the caller.
//!
//! Why not RocksDB: its WAL grows its file on every append, so each fdatasync also commits the
//! inode's new size to the filesystem journal. Writing inside space allocated in advance (as
//! ZooKeeper pads its logs) leaves nothing but data to sync: about 90 µs per sync here against
//! 120-150 µs for an append that grows the file (BENCHMARKS.md, "The Raft log in segment
//! files").
//!
//! Layout: `<dir>/<sequence number, 20 digits>.log`, each allocated to its capacity and
//! zero-filled up front (the next one by a helper thread while the active one fills). A record
//! is a 16-byte header — payload length (u32 LE), CRC-32 of index and payload (u32 LE), log
//! index (u64 LE) — then the payload. Everything after the last record of the last segment is
//! zero; a zero length marks the end. Invariants that recovery relies on:
//! - a segment is synced before any record is written to the next, so only the last segment
//!   with records can end torn;
//! - records are contiguous by index across segments (a gap only where everything before it
//!   is purged);
//! - a truncation or a torn tail is overwritten with zeros and synced before anything new is
//!   written after it, so no stale record can reappear behind a newer one.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;

const HEADER: usize = 16;
/// Zeros are written over stale bytes this much at a time.
const ZERO_CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum LogFileError {
    #[error("raft log {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("raft log {path} is corrupt at byte {offset}: {what}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    /// A caller broke the log's rules (a gap in indexes, an empty record).
    #[error("raft log: {0}")]
    Misuse(String),
    /// A helper thread could not start or could not make the purge point durable.
    #[error("raft log: {0}")]
    Helper(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogFileError + '_ {
    move |source| LogFileError::Io {
        path: path.to_owned(),
        source,
    }
}

struct Segment {
    /// Index of the first record written to this file, purged or not. For a segment without
    /// records, the index its first record will have.
    first_index: u64,
    path: PathBuf,
    file: Arc<File>,
    capacity: u64,
    /// End offset of each record, in index order from `first_index`.
    ends: Vec<u64>,
}

impl Segment {
    fn write_offset(&self) -> u64 {
        self.ends.last().copied().unwrap_or(0)
    }

    fn next_index(&self) -> u64 {
        self.first_index + self.ends.len() as u64
    }

    /// Byte range of the record with `index`, which must be in this segment.
    fn span(&self, index: u64) -> (u64, u64) {
        let i = (index - self.first_index) as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        (start, self.ends[i])
    }
}

struct Inner {
    /// Oldest first; the last one is the active segment. Never empty once opened.
    segments: VecDeque<Segment>,
    /// Records at or below this index are purged: never read, and their segments are deleted
    /// once nothing else lives in them.
    purged: Option<u64>,
    /// The next segment, being made ahead of time by a helper thread so that rolling over
    /// changes no filesystem metadata on the write path.
    spare: Option<JoinHandle<Result<Segment, LogFileError>>>,
    next_seq: u64,
    /// Helper threads deleting purged segments, joined on drop.
    helpers: Vec<JoinHandle<()>>,
}

impl Inner {
    fn active(&self) -> &Segment {
        self.segments
            .back()
            .expect("a log always has an active segment")
    }

    /// The first readable index, if any record is readable.
    fn first(&self) -> Option<u64> {
        let first = self
            .purged
            .map_or(self.segments.front()?.first_index, |p| p + 1);
        (first < self.active().next_index()).then_some(first)
    }

    fn last(&self) -> Option<u64> {
        let next = self.active().next_index();
        let last = next.checked_sub(1)?;
        (self.first().is_some()).then_some(last)
    }

    fn segment_of(&self, index: u64) -> Option<&Segment> {
        let pos = self
            .segments
            .partition_point(|s| s.first_index <= index)
            .checked_sub(1)?;
        let seg = &self.segments[pos];
        (index < seg.next_index()).then_some(seg)
    }
}

/// The Raft log's segment files. Appends are written at once and made durable by [`sync`];
/// truncations and purges are durable when they return.
///
/// [`sync`]: LogFile::sync
/// Makes the purge point durable; run before purged segments are deleted.
pub type BeforeDelete = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

pub struct LogFile {
    dir: PathBuf,
    segment_bytes: u64,
    before_delete: BeforeDelete,
    /// Readers share it for the whole read, so a truncation (which zeroes records) or an append
    /// never changes bytes under a read: a read sees the log before or after, as with RocksDB's
    /// iterators.
    inner: RwLock<Inner>,
}

impl LogFile {
    /// Opens the log in `dir` (creating it), dropping records at or below `purged`, and cuts
    /// off a torn tail left by a crash. New segments take `segment_bytes` (more for a larger
    /// append).
    pub fn open(dir: &Path, segment_bytes: u64, purged: Option<u64>) -> Result<Self, LogFileError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut seqs = Vec::new();
        for item in fs::read_dir(dir).map_err(io_err(dir))? {
            let name = item.map_err(io_err(dir))?.file_name();
            if let Some(seq) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".log"))
                .and_then(|n| n.parse::<u64>().ok())
            {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        let next_seq = seqs.last().map_or(0, |s| s + 1);

        let mut found = Vec::new();
        for seq in seqs {
            found.push(read_segment(&dir.join(segment_name(seq)))?);
        }
        // Segments without records are spares made ahead of time (or a segment rolled over
        // to just before a crash): only the oldest of them is kept, and only when no segment
        // has records.
        // A segment whose first record is bad has data all the same: it is never taken for one
        // of those.
        let has_data = |r: &Recovered| !r.segment.ends.is_empty() || r.torn.is_some();
        let with_data = found.iter().filter(|r| has_data(r)).count();
        let mut segments: VecDeque<Segment> = VecDeque::new();
        let mut stale = Vec::new();
        for recovered in found {
            if !has_data(&recovered) && (with_data > 0 || !segments.is_empty()) {
                stale.push(recovered.segment.path);
                continue;
            }
            let is_last = segments.len() + 1 >= with_data.max(1);
            let mut seg = recovered.segment;
            if let Some((offset, what)) = recovered.torn {
                if !is_last {
                    return Err(LogFileError::Corrupt {
                        path: seg.path,
                        offset,
                        what,
                    });
                }
                tracing::warn!(path = %seg.path.display(), offset, %what, "cutting off the raft log's torn tail");
            }
            if is_last {
                // Whatever follows the last good record was never synced: zero it so that a
                // later, shorter record cannot leave an older one readable behind it.
                if let Some(dirty_end) = recovered.dirty_end {
                    zero_range(&seg.file, &seg.path, seg.write_offset(), dirty_end)?;
                }
                // After a process crash the page cache may still hold records that were never
                // synced; this member is about to count them as its log (and a follower to
                // acknowledge them), so they must be on disk first.
                seg.file.sync_data().map_err(io_err(&seg.path))?;
            }
            if seg.ends.is_empty() {
                seg.first_index = segments
                    .back()
                    .map_or(purged.map_or(0, |p| p + 1), Segment::next_index);
            }
            if let Some(prev) = segments.back() {
                let all_purged = purged.is_some_and(|p| seg.first_index <= p + 1);
                if seg.first_index != prev.next_index() && !all_purged {
                    return Err(LogFileError::Corrupt {
                        path: seg.path.clone(),
                        offset: 0,
                        what: format!(
                            "starts at index {} but the previous segment ends before {}",
                            seg.first_index,
                            prev.next_index()
                        ),
                    });
                }
            }
            segments.push_back(seg);
        }
        for path in &stale {
            fs::remove_file(path).map_err(io_err(path))?;
        }
        let log = LogFile {
            dir: dir.to_owned(),
            segment_bytes,
            before_delete: Arc::new(|| Ok(())),
            inner: RwLock::new(Inner {
                segments,
                purged,
                spare: None,
                next_seq,
                helpers: Vec::new(),
            }),
        };
        {
            let mut inner = log.lock();
            if inner.segments.is_empty() {
                let seq = inner.next_seq;
                inner.next_seq += 1;
                let first = purged.map_or(0, |p| p + 1);
                let seg = create_segment(&log.dir, seq, first, segment_bytes)?;
                inner.segments.push_back(seg);
            } else if !stale.is_empty() {
                sync_dir(dir)?;
            }
            log.delete_purged_segments(&mut inner, false)?;
        }
        Ok(log)
    }

    /// Runs `hook` on the helper thread before it deletes purged segments, and deletes none if
    /// it fails: the caller records its purge point without waiting for a sync, and the hook
    /// makes it durable (off the write path) before anything depends on it.
    pub fn with_before_delete(mut self, hook: BeforeDelete) -> Self {
        self.before_delete = hook;
        self
    }

    fn lock(&self) -> RwLockWriteGuard<'_, Inner> {
        // A panic while holding the lock leaves the log as consistent as a crash would.
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read_lock(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The first and last readable index, if any record is readable.
    pub fn bounds(&self) -> Option<(u64, u64)> {
        let inner = self.read_lock();
        Some((inner.first()?, inner.last()?))
    }

    /// Writes records (index, payload) in order; they are readable at once and durable after
    /// the next [`LogFile::sync`]. The first index must follow the last record, or anything
    /// when every record is purged.
    pub fn append(&self, records: &[(u64, Vec<u8>)]) -> Result<(), LogFileError> {
        let Some((first, _)) = records.first() else {
            return Ok(());
        };
        let mut buf = Vec::with_capacity(records.iter().map(|(_, p)| HEADER + p.len()).sum());
        for (expected, (index, payload)) in (*first..).zip(records) {
            if *index != expected {
                return Err(LogFileError::Misuse(format!(
                    "append of index {index} after {}",
                    expected - 1
                )));
            }
            encode_record(&mut buf, *index, payload)?;
        }

        let mut inner = self.lock();
        let next = inner.active().next_index();
        let fits = inner.active().write_offset() + buf.len() as u64 <= inner.active().capacity;
        if *first != next && inner.first().is_some() {
            return Err(LogFileError::Misuse(format!(
                "append of index {first}, the log ends before {next}"
            )));
        }
        if inner.active().ends.is_empty() {
            // A segment without records takes whatever index comes first (after a snapshot
            // was installed past our last record, that is not the next one).
            let active = inner.segments.back_mut().expect("active segment");
            active.first_index = *first;
            if !fits {
                let need = buf.len() as u64;
                allocate(&active.file, &active.path, need)?;
                active.file.sync_all().map_err(io_err(&active.path))?;
                active.capacity = need;
            }
        } else if *first != next || !fits {
            // Everything is purged and the log goes on at another index, or the segment is
            // full: records stay contiguous within a segment either way.
            self.roll_over(&mut inner, *first, buf.len() as u64)?;
        }
        let active = inner.segments.back_mut().expect("active segment");
        let mut offset = active.write_offset();
        active
            .file
            .write_all_at(&buf, offset)
            .map_err(io_err(&active.path))?;
        for (_, payload) in records {
            offset += (HEADER + payload.len()) as u64;
            active.ends.push(offset);
        }
        if offset > active.capacity / 2 && inner.spare.is_none() {
            self.prepare_spare(&mut inner);
        }
        Ok(())
    }

    /// Makes every record appended so far durable.
    pub fn sync(&self) -> Result<(), LogFileError> {
        // Earlier segments were synced when the log rolled over to the active one.
        let (file, path) = {
            let inner = self.read_lock();
            (inner.active().file.clone(), inner.active().path.clone())
        };
        file.sync_data().map_err(io_err(&path))
    }

    /// Bytes the readable records with index `from` and above take in the segment files,
    /// headers included.
    pub fn bytes_from(&self, from: u64) -> u64 {
        let inner = self.read_lock();
        let Some(first) = inner.first() else {
            return 0;
        };
        let from = from.max(first);
        inner
            .segments
            .iter()
            .filter(|s| s.next_index() > from)
            .map(|s| {
                let start = if from <= s.first_index {
                    0
                } else {
                    s.span(from).0
                };
                s.write_offset() - start
            })
            .sum()
    }

    /// Payloads of the records with index in `from..to`, stopping at the end of the log.
    pub fn read(&self, from: u64, to: u64) -> Result<Vec<Vec<u8>>, LogFileError> {
        let inner = self.read_lock();
        let Some(first) = inner.first() else {
            return Ok(Vec::new());
        };
        let end = to.min(inner.active().next_index());
        let mut index = from.max(first);
        let mut out = Vec::new();
        while index < end {
            let Some(seg) = inner.segment_of(index) else {
                break;
            };
            let upto = end.min(seg.next_index());
            let (start, _) = seg.span(index);
            let (_, stop) = seg.span(upto - 1);
            let mut bytes = vec![0u8; (stop - start) as usize];
            seg.file
                .read_exact_at(&mut bytes, start)
                .map_err(io_err(&seg.path))?;
            let mut at = 0usize;
            while at < bytes.len() {
                let corrupt = |what: String| LogFileError::Corrupt {
                    path: seg.path.clone(),
                    offset: start + at as u64,
                    what,
                };
                match decode_record(&bytes[at..], Some(index)) {
                    Ok(Some((len, _, payload))) => {
                        out.push(payload.to_vec());
                        at += len;
                        index += 1;
                    }
                    Ok(None) => return Err(corrupt(format!("record {index} is missing"))),
                    Err(what) => return Err(corrupt(what)),
                }
            }
        }
        Ok(out)
    }

    /// Removes every record at or after `from`; durable on return.
    pub fn truncate(&self, from: u64) -> Result<(), LogFileError> {
        let mut inner = self.lock();
        if from >= inner.active().next_index() {
            return Ok(());
        }
        // Later segments go first: a crash midway leaves a shorter prefix of the old log,
        // never a gap. The oldest segment always stays (emptied below if need be).
        let mut removed = false;
        while inner.segments.len() > 1 && inner.active().first_index >= from {
            let seg = inner.segments.pop_back().expect("segment");
            fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
            removed = true;
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        let active = inner.segments.back_mut().expect("active segment");
        let keep = from.saturating_sub(active.first_index) as usize;
        let old_end = active.write_offset();
        active.ends.truncate(keep);
        let new_end = active.write_offset();
        zero_range(&active.file, &active.path, new_end, old_end)?;
        active.file.sync_data().map_err(io_err(&active.path))?;
        Ok(())
    }

    /// Forgets every record at or below `upto` and deletes the segments that hold nothing else,
    /// on a helper thread, once the before-delete hook has made the purge point durable:
    /// recovery skips records at or below it, and deletes leftover purged segments.
    pub fn purge(&self, upto: u64) -> Result<(), LogFileError> {
        let mut inner = self.lock();
        if inner.purged.is_some_and(|p| p >= upto) {
            return Ok(());
        }
        inner.purged = Some(upto);
        self.delete_purged_segments(&mut inner, true)
    }

    /// Drops the segments that hold only purged records, deleting their files on a helper
    /// thread if `in_background` (a sync, and unlinking a large file, which commits the
    /// filesystem journal, can wait behind other files' writeback).
    fn delete_purged_segments(
        &self,
        inner: &mut Inner,
        in_background: bool,
    ) -> Result<(), LogFileError> {
        let Some(purged) = inner.purged else {
            return Ok(());
        };
        let mut paths = Vec::new();
        // A segment goes when the next one starts at or below the first unpurged index; the
        // active segment always stays.
        while inner.segments.len() > 1 && inner.segments[1].first_index <= purged + 1 {
            paths.push(inner.segments.pop_front().expect("segment").path);
        }
        if paths.is_empty() {
            return Ok(());
        }
        let dir = self.dir.clone();
        let before_delete = self.before_delete.clone();
        let delete = move || -> Result<(), LogFileError> {
            before_delete().map_err(|e| {
                LogFileError::Helper(format!("making the purge point durable: {e}"))
            })?;
            for path in &paths {
                fs::remove_file(path).map_err(io_err(path))?;
            }
            sync_dir(&dir)
        };
        if !in_background {
            return delete();
        }
        inner.helpers.retain(|h| !h.is_finished());
        let spawned = std::thread::Builder::new()
            .name("kord-log-purge".into())
            .spawn(move || {
                if let Err(e) = delete() {
                    // Left for the next start, which deletes purged segments again.
                    tracing::warn!(error = %e, "deleting purged raft log segments");
                }
            })
            .map_err(|e| LogFileError::Helper(format!("starting a helper thread: {e}")))?;
        inner.helpers.push(spawned);
        Ok(())
    }

    /// Starts making the next segment on a helper thread.
    fn prepare_spare(&self, inner: &mut Inner) {
        let (dir, seq, capacity) = (self.dir.clone(), inner.next_seq, self.segment_bytes);
        inner.next_seq += 1;
        // The index is set when the segment becomes the active one.
        let spawned = std::thread::Builder::new()
            .name("kord-log-segment".into())
            .spawn(move || create_segment(&dir, seq, 0, capacity));
        match spawned {
            Ok(handle) => inner.spare = Some(handle),
            // Rolling over makes the segment itself then.
            Err(e) => tracing::warn!(error = %e, "starting the raft log's segment thread"),
        }
    }

    /// Syncs the active segment and continues in a new one whose first record is
    /// `first_index`: the spare if it is ready and large enough, else one made now.
    fn roll_over(
        &self,
        inner: &mut Inner,
        first_index: u64,
        need: u64,
    ) -> Result<(), LogFileError> {
        let active = inner.active();
        active.file.sync_data().map_err(io_err(&active.path))?;
        let spare = match inner.spare.take().map(JoinHandle::join) {
            Some(Ok(Ok(seg))) if seg.capacity >= need => Some(seg),
            Some(Ok(Ok(seg))) => {
                fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
                None
            }
            Some(Ok(Err(e))) => {
                tracing::warn!(error = %e, "making the raft log's next segment ahead of time");
                None
            }
            Some(Err(_)) | None => None,
        };
        let mut seg = match spare {
            Some(seg) => seg,
            None => {
                let seq = inner.next_seq;
                inner.next_seq += 1;
                create_segment(&self.dir, seq, first_index, self.segment_bytes.max(need))?
            }
        };
        seg.first_index = first_index;
        inner.segments.push_back(seg);
        self.delete_purged_segments(inner, true)
    }
}

impl Drop for LogFile {
    fn drop(&mut self) {
        let mut inner = self.lock();
        if let Some(spare) = inner.spare.take() {
            let _ = spare.join();
        }
        for helper in std::mem::take(&mut inner.helpers) {
            let _ = helper.join();
        }
    }
}

fn create_segment(
    dir: &Path,
    seq: u64,
    first_index: u64,
    capacity: u64,
) -> Result<Segment, LogFileError> {
    let path = dir.join(segment_name(seq));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(io_err(&path))?;
    allocate(&file, &path, capacity)?;
    file.sync_all().map_err(io_err(&path))?;
    sync_dir(dir)?;
    Ok(Segment {
        first_index,
        path,
        file: Arc::new(file),
        capacity,
        ends: Vec::new(),
    })
}

fn segment_name(seq: u64) -> String {
    format!("{seq:020}.log")
}

fn checksum(index: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&index.to_le_bytes());
    h.update(payload);
    h.finalize()
}

fn encode_record(buf: &mut Vec<u8>, index: u64, payload: &[u8]) -> Result<(), LogFileError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l > 0)
        .ok_or_else(|| {
            LogFileError::Misuse(format!("record {index} has {} bytes", payload.len()))
        })?;
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&checksum(index, payload).to_le_bytes());
    buf.extend_from_slice(&index.to_le_bytes());
    buf.extend_from_slice(payload);
    Ok(())
}

/// A record's length on disk, its index and its payload.
type Decoded<'a> = (usize, u64, &'a [u8]);

/// Decodes the record at the start of `bytes`, expected to have `index` if given: `Ok(None)`
/// at the end of the written part (a zero length), `Err` for a record that is cut short,
/// fails its checksum or has another index. Returns its length, index and payload.
fn decode_record(bytes: &[u8], index: Option<u64>) -> Result<Option<Decoded<'_>>, String> {
    if bytes.len() < HEADER {
        return if bytes.iter().all(|&b| b == 0) {
            Ok(None)
        } else {
            Err("a record header is cut short".into())
        };
    }
    let len = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
    if len == 0 {
        return Ok(None);
    }
    let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    let found = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let Some(payload) = bytes.get(HEADER..HEADER + len) else {
        return Err(format!("record {found} is cut short"));
    };
    if checksum(found, payload) != crc {
        return Err(format!("record at index {found} fails its checksum"));
    }
    if index.is_some_and(|i| i != found) {
        return Err(format!(
            "record has index {found}, expected {}",
            index.unwrap_or(0)
        ));
    }
    Ok(Some((HEADER + len, found, payload)))
}

/// A segment as found on disk.
struct Recovered {
    segment: Segment,
    /// Where and why reading stopped early, if it did.
    torn: Option<(u64, String)>,
    /// The end of nonzero bytes after the last good record, if there are any.
    dirty_end: Option<u64>,
}

/// Reads a segment's records up to the first zero length or bad record.
fn read_segment(path: &Path) -> Result<Recovered, LogFileError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(path))?;
    let bytes = fs::read(path).map_err(io_err(path))?;
    let mut ends = Vec::new();
    let mut first_index = 0;
    let mut at = 0usize;
    let mut torn = None;
    loop {
        let expected = (!ends.is_empty()).then(|| first_index + ends.len() as u64);
        match decode_record(&bytes[at..], expected) {
            Ok(Some((len, index, _))) => {
                if ends.is_empty() {
                    first_index = index;
                }
                at += len;
                ends.push(at as u64);
            }
            Ok(None) => break,
            Err(what) => {
                torn = Some((at as u64, what));
                break;
            }
        }
    }
    let dirty_end = bytes[at..]
        .iter()
        .rposition(|&b| b != 0)
        .map(|last| (at + last + 1) as u64);
    Ok(Recovered {
        segment: Segment {
            first_index,
            path: path.to_owned(),
            file: Arc::new(file),
            capacity: bytes.len() as u64,
            ends,
        },
        torn,
        dirty_end,
    })
}

fn zero_range(file: &File, path: &Path, from: u64, to: u64) -> Result<(), LogFileError> {
    let zeros = vec![0u8; ZERO_CHUNK.min((to.saturating_sub(from)) as usize)];
    let mut at = from;
    while at < to {
        let n = ((to - at) as usize).min(zeros.len());
        file.write_all_at(&zeros[..n], at).map_err(io_err(path))?;
        at += n as u64;
    }
    Ok(())
}

/// Allocates the segment's blocks, sets its size and writes zeros over it, synced a chunk at a
/// time, so that appends inside it change no metadata. Zeros and not just `fallocate`: ext4
/// marks fallocated blocks unwritten, and the first write to each turns it written, a metadata
/// change that every log fsync then commits through the filesystem journal, waiting behind
/// other files' data (RocksDB's) as well: 146 against 93 µs per fdatasync of 6 KB appends
/// beside 32 MB/s of other writes (BENCHMARKS.md, "The state machine without RocksDB's WAL").
fn allocate(file: &File, path: &Path, len: u64) -> Result<(), LogFileError> {
    let size = libc::off_t::try_from(len)
        .map_err(|_| io_err(path)(io::Error::other("segment too large")))?;
    // SAFETY: the descriptor is open and owned by `file` for the duration of the call.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, size) };
    if rc != 0 {
        return Err(io_err(path)(io::Error::from_raw_os_error(rc)));
    }
    // A chunk at a time: one large writeback would queue ahead of the log's own fsyncs.
    let mut at = 0;
    while at < len {
        let end = len.min(at + ZERO_CHUNK as u64);
        zero_range(file, path, at, end)?;
        file.sync_data().map_err(io_err(path))?;
        at = end;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), LogFileError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

#[cfg(test)]
mod tests;
