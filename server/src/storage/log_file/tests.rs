use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use super::*;

const SMALL: u64 = 4096;

fn payload(index: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (index as usize * 31 + i) as u8 | 1)
        .collect()
}

fn records(from: u64, to: u64, len: usize) -> Vec<(u64, Vec<u8>)> {
    (from..to).map(|i| (i, payload(i, len))).collect()
}

/// Appends one record at a time, so that small segments fill up and roll over.
fn append_each(log: &LogFile, from: u64, to: u64, len: usize) {
    for record in records(from, to, len) {
        log.append(&[record]).unwrap();
    }
}

fn segment_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn assert_reads(log: &LogFile, from: u64, to: u64, len: usize) {
    let got = log.read(from, to).unwrap();
    let want: Vec<Vec<u8>> = (from..to).map(|i| payload(i, len)).collect();
    assert_eq!(got.len(), want.len(), "records {from}..{to}");
    assert!(got == want, "payloads of {from}..{to} differ");
}

#[test]
fn appended_records_survive_reopen_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogFile::open(dir.path(), SMALL, None).unwrap();
    assert_eq!(log.bounds(), None);
    // 100 records of 200 bytes need about five 4 KiB segments.
    for chunk in records(1, 101, 200).chunks(7) {
        log.append(chunk).unwrap();
    }
    log.sync().unwrap();
    assert_eq!(log.bounds(), Some((1, 100)));
    assert_reads(&log, 1, 101, 200);
    assert_reads(&log, 40, 60, 200);
    assert!(segment_files(dir.path()).len() >= 5);
    drop(log);

    let log = LogFile::open(dir.path(), SMALL, None).unwrap();
    assert_eq!(log.bounds(), Some((1, 100)));
    assert_reads(&log, 1, 101, 200);
    // Reads past the end stop at the end.
    assert_eq!(log.read(99, 500).unwrap().len(), 2);
    log.append(&records(101, 102, 200)).unwrap();
    assert_reads(&log, 95, 102, 200);
}

#[test]
fn an_append_that_does_not_follow_the_last_record_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogFile::open(dir.path(), SMALL, None).unwrap();
    log.append(&records(0, 3, 10)).unwrap();
    let err = log.append(&records(5, 6, 10)).unwrap_err();
    assert!(err.to_string().contains("append of index 5"), "{err}");
    let err = log
        .append(&[(3, payload(3, 1)), (5, payload(5, 1))])
        .unwrap_err();
    assert!(
        err.to_string().contains("append of index 5 after 3"),
        "{err}"
    );
    assert_eq!(log.bounds(), Some((0, 2)));
}

#[test]
fn a_record_larger_than_a_segment_gets_a_segment_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogFile::open(dir.path(), SMALL, None).unwrap();
    log.append(&records(1, 3, 100)).unwrap();
    log.append(&records(3, 4, 10_000)).unwrap();
    log.append(&records(4, 6, 100)).unwrap();
    log.sync().unwrap();
    drop(log);
    let log = LogFile::open(dir.path(), SMALL, None).unwrap();
    assert_reads(&log, 1, 3, 100);
    assert_reads(&log, 3, 4, 10_000);
    assert_reads(&log, 4, 6, 100);
}

/// The last segment's path and the offset where its next record would go.
fn tail(dir: &Path) -> (PathBuf, u64) {
    let log = LogFile::open(dir, SMALL, None).unwrap();
    let inner = log.lock();
    (inner.active().path.clone(), inner.active().write_offset())
}

#[test]
fn a_torn_tail_is_cut_off_and_cannot_resurface_behind_a_newer_record() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogFile::open(dir.path(), 1 << 20, None).unwrap();
    log.append(&records(1, 11, 50)).unwrap();
    log.sync().unwrap();
    drop(log);

    // A crash while records 11 and 12 were being written: 11's payload is half there, 12
    // landed whole behind it.
    let (path, end) = tail(dir.path());
    let mut torn = Vec::new();
    encode_record(&mut torn, 11, &payload(11, 50)).unwrap();
    let whole_11 = torn.len();
    encode_record(&mut torn, 12, &payload(12, 50)).unwrap();
    for b in &mut torn[HEADER + 10..whole_11] {
        *b = 0;
    }
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&torn, end).unwrap();
    drop(file);

    let log = LogFile::open(dir.path(), 1 << 20, None).unwrap();
    assert_eq!(
        log.bounds(),
        Some((1, 10)),
        "the log ends before the torn record"
    );
    // The bytes behind the tail were zeroed, so a new record 11 of the same size followed by
    // nothing cannot make the old record 12 readable again.
    let rest = fs::read(&path).unwrap();
    assert!(rest[end as usize..].iter().all(|&b| b == 0));
    log.append(&records(11, 12, 50)).unwrap();
    log.sync().unwrap();
    drop(log);
    let log = LogFile::open(dir.path(), 1 << 20, None).unwrap();
    assert_eq!(log.bounds(), Some((1, 11)));
    assert_reads(&log, 1, 12, 50);
}

#[test]
fn a_bad_record_in_an_older_segment_is_reported_as_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogFile::open(dir.path(), SMALL, None).unwrap();
    append_each(&log, 1, 60, 200);
    log.sync().unwrap();
    drop(log);
    let first = dir.path().join(&segment_files(dir.path())[0]);
    let file = OpenOptions::new().write(true).open(&first).unwrap();
    file.write_all_at(b"XX", (HEADER + 5) as u64).unwrap();
    drop(file);
    let err = match LogFile::open(dir.path(), SMALL, None) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a corrupt older segment must not open"),
    };
    assert!(err.contains("corrupt") && err.contains("checksum"), "{err}");
    assert!(
        err.contains(&segment_files(dir.path())[0]),
        "names the file: {err}"
    );
}

#[test]
fn truncation_is_durable_and_leaves_no_stale_records() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogFile::open(dir.path(), SMALL, None).unwrap();
    append_each(&log, 1, 101, 200);
    log.sync().unwrap();
    let before = segment_files(dir.path()).len();
    // Into an earlier segment: the later ones go.
    log.truncate(30).unwrap();
    assert_eq!(log.bounds(), Some((1, 29)));
    assert!(segment_files(dir.path()).len() < before);
    assert!(log.read(29, 40).unwrap().len() == 1);
    // New records at the truncation point, shorter than the old ones.
    log.append(&records(30, 35, 20)).unwrap();
    log.sync().unwrap();
    drop(log);

    let log = LogFile::open(dir.path(), SMALL, None).unwrap();
    assert_eq!(log.bounds(), Some((1, 34)));
    assert_reads(&log, 1, 30, 200);
    assert_reads(&log, 30, 35, 20);
    // Truncating everything, then starting again at the same index.
    log.truncate(1).unwrap();
    assert_eq!(log.bounds(), None);
    log.append(&records(1, 3, 20)).unwrap();
    log.sync().unwrap();
    drop(log);
    let log = LogFile::open(dir.path(), SMALL, None).unwrap();
    assert_eq!(log.bounds(), Some((1, 2)));
    assert_reads(&log, 1, 3, 20);
}

#[test]
fn purged_segments_are_deleted_and_purged_records_stay_unreadable() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogFile::open(dir.path(), SMALL, None).unwrap();
    append_each(&log, 1, 101, 200);
    log.sync().unwrap();
    let before = segment_files(dir.path()).len();
    log.purge(80).unwrap();
    assert_eq!(log.bounds(), Some((81, 100)));
    assert!(log.read(1, 81).unwrap().is_empty());
    assert_reads(&log, 81, 101, 200);
    drop(log); // waits for the helper thread deleting the purged segments
    let after = segment_files(dir.path()).len();
    assert!(after < before && after >= 1, "{before} -> {after} segments");

    let log = LogFile::open(dir.path(), SMALL, Some(80)).unwrap();
    assert_eq!(log.bounds(), Some((81, 100)));
    assert_reads(&log, 81, 101, 200);

    // A snapshot past the last record: everything is purged and the log goes on at a new
    // index, which survives a restart.
    log.purge(500).unwrap();
    assert_eq!(log.bounds(), None);
    log.append(&records(501, 504, 200)).unwrap();
    log.sync().unwrap();
    drop(log);
    // The segment written to, and perhaps a spare made ahead of time.
    assert!(segment_files(dir.path()).len() <= 2);
    let log = LogFile::open(dir.path(), SMALL, Some(500)).unwrap();
    assert_eq!(log.bounds(), Some((501, 503)));
    assert_reads(&log, 501, 504, 200);
}

#[test]
fn a_fresh_log_may_start_at_any_index() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogFile::open(dir.path(), SMALL, None).unwrap();
    log.append(&records(7, 9, 20)).unwrap();
    log.sync().unwrap();
    drop(log);
    assert_eq!(segment_files(dir.path()), vec![segment_name(0)]);
    let log = LogFile::open(dir.path(), SMALL, None).unwrap();
    assert_eq!(log.bounds(), Some((7, 8)));
}

#[test]
fn segments_are_allocated_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogFile::open(dir.path(), SMALL, None).unwrap();
    log.append(&records(0, 2, 20)).unwrap();
    let path = dir.path().join(segment_name(0));
    let meta = fs::metadata(&path).unwrap();
    assert_eq!(
        meta.len(),
        SMALL,
        "the size is set when the segment is made"
    );
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 >= SMALL, "and its blocks are allocated");
}

#[test]
fn rolling_over_uses_a_segment_made_ahead_and_leftover_spares_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogFile::open(dir.path(), SMALL, None).unwrap();
    append_each(&log, 1, 12, 200);
    // Past half of the first segment, the next one is being made.
    drop(log);
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 2, "{files:?}");
    let spare = dir.path().join(&files[1]);
    assert_eq!(fs::metadata(&spare).unwrap().len(), SMALL);

    // On open a segment without records after the last one with records is a leftover: it
    // goes, and the records are all there.
    let log = LogFile::open(dir.path(), SMALL, None).unwrap();
    assert!(!spare.exists());
    assert_eq!(log.bounds(), Some((1, 11)));
    append_each(&log, 12, 101, 200);
    log.sync().unwrap();
    drop(log);
    let log = LogFile::open(dir.path(), SMALL, None).unwrap();
    assert_eq!(log.bounds(), Some((1, 100)));
    assert_reads(&log, 1, 101, 200);
}

#[test]
fn a_torn_first_record_in_a_fresh_segment_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogFile::open(dir.path(), SMALL, None).unwrap();
    append_each(&log, 1, 12, 200);
    log.sync().unwrap();
    drop(log);
    // A crash while the first record went into the next segment: its header is there, its
    // payload only partly.
    let files = segment_files(dir.path());
    let next = dir.path().join(files.last().unwrap());
    let mut torn = Vec::new();
    encode_record(&mut torn, 12, &payload(12, 200)).unwrap();
    torn.truncate(HEADER + 50);
    let file = OpenOptions::new().write(true).open(&next).unwrap();
    file.write_all_at(&torn, 0).unwrap();
    drop(file);

    let log = LogFile::open(dir.path(), SMALL, None).unwrap();
    assert_eq!(log.bounds(), Some((1, 11)));
    assert!(fs::read(&next).unwrap().iter().all(|&b| b == 0), "zeroed");
    append_each(&log, 12, 40, 200);
    log.sync().unwrap();
    drop(log);
    let log = LogFile::open(dir.path(), SMALL, None).unwrap();
    assert_eq!(log.bounds(), Some((1, 39)));
    assert_reads(&log, 1, 40, 200);
}

#[test]
fn reads_never_see_a_truncation_half_done() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(LogFile::open(dir.path(), 1 << 20, None).unwrap());
    append_each(&log, 1, 201, 100);
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (log, stop) = (log.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(Ordering::Relaxed) {
                // A follower's truncation zeroes records: a concurrent read must see the log
                // before it or after it, never an error.
                let got = log.read(140, 201).expect("a read during truncations");
                assert!(!got.is_empty());
                reads += 1;
            }
            reads
        })
    };
    for round in 0..300u64 {
        let from = 150 + round % 40;
        log.truncate(from).unwrap();
        let len = if round % 2 == 0 { 60 } else { 100 };
        log.append(&records(from, 201, len)).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().expect("the reader saw no error");
    assert!(reads > 0);
}

#[test]
fn purged_segments_go_only_after_the_purge_point_is_made_durable() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let fail = Arc::new(AtomicBool::new(true));
    let hook: BeforeDelete = {
        let (calls, fail) = (calls.clone(), fail.clone());
        Arc::new(move || {
            calls.fetch_add(1, Ordering::SeqCst);
            if fail.load(Ordering::SeqCst) {
                Err("sync failed".into())
            } else {
                Ok(())
            }
        })
    };
    let log = LogFile::open(dir.path(), SMALL, None)
        .unwrap()
        .with_before_delete(hook.clone());
    append_each(&log, 1, 101, 200);
    log.sync().unwrap();
    // Compared by name, not counted: the spare segment made ahead by a helper thread may
    // appear after this listing.
    let before = segment_files(dir.path());
    let gone = |before: &[String]| {
        let now = segment_files(dir.path());
        before.iter().filter(|f| !now.contains(f)).count()
    };

    // The hook fails: the records are forgotten, the files stay.
    log.purge(50).unwrap();
    assert_eq!(log.bounds(), Some((51, 100)));
    drop(log); // joins the helper
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        gone(&before),
        0,
        "a segment was deleted though the sync failed"
    );

    // A restart that finds the older purge point (it was never made durable) finds every
    // record still there.
    let log = LogFile::open(dir.path(), SMALL, None)
        .unwrap()
        .with_before_delete(hook);
    assert_eq!(log.bounds(), Some((1, 100)));
    fail.store(false, Ordering::SeqCst);
    log.purge(50).unwrap();
    drop(log);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(gone(&before) > 0, "no purged segment was deleted");
    let log = LogFile::open(dir.path(), SMALL, Some(50)).unwrap();
    assert_eq!(log.bounds(), Some((51, 100)));
    assert_reads(&log, 51, 101, 200);
}

#[test]
fn bytes_from_counts_readable_records_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogFile::open(dir.path(), SMALL, None).unwrap();
    assert_eq!(log.bytes_from(0), 0);
    append_each(&log, 1, 101, 200);
    let record = (HEADER + 200) as u64;
    assert!(segment_files(dir.path()).len() >= 5);
    assert_eq!(log.bytes_from(0), 100 * record);
    assert_eq!(log.bytes_from(1), 100 * record);
    assert_eq!(log.bytes_from(51), 50 * record);
    assert_eq!(log.bytes_from(100), record);
    assert_eq!(log.bytes_from(101), 0);
    log.purge(30).unwrap();
    assert_eq!(
        log.bytes_from(0),
        70 * record,
        "purged records are not counted"
    );
    log.sync().unwrap();
    drop(log);
    let log = LogFile::open(dir.path(), SMALL, Some(30)).unwrap();
    assert_eq!(log.bytes_from(0), 70 * record);
    assert_eq!(log.bytes_from(91), 10 * record);
}
