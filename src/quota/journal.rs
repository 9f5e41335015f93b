//! The quota journal: consumed quota and Knoq-imposed cool-downs, kept in
//! the state directory so a restart (even `kill -9` in the middle of a
//! minute) cannot open a burst past a limit.
//!
//! Why an append-only text file and not an embedded database: the only
//! operations are "append one admission" (on the hot path) and "read it all
//! back at start-up"; one `write(2)` on an `O_APPEND` file is atomic with
//! respect to other writers and survives the process being killed the
//! moment it returns, with no extra dependency and a format an operator can
//! read. Lines are not `fsync`ed one by one (that would cost a disk flush
//! per request): a power cut may lose the last moments of admissions, a
//! killed process loses nothing. At start-up the file is checked line by
//! line, replayed, and rewritten atomically with only what is still within
//! a window, so it stays small across restarts.
//!
//! A damaged line stops the start-up with its line number: the gateway
//! never guesses what was consumed, and never silently resets.
//!
//! ```text
//! knoq-gateway quota journal v1
//! A <unix-ms> <user> <token> <bucket>     an admission
//! C <until-unix-ms> <user> <bucket>       a cool-down from Knoq's 429
//! ```

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use super::Bucket;
use crate::clock::Millis;

pub const FILE_NAME: &str = "quota.journal";
/// Size at which the current segment is sealed and a new one started.
pub const SEGMENT_BYTES: u64 = 8 << 20;
const HEADER: &str = "knoq-gateway quota journal v1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Admit {
        at: Millis,
        user: String,
        token: String,
        bucket: Bucket,
    },
    CoolDown {
        until: Millis,
        user: String,
        bucket: Bucket,
    },
}

impl Record {
    fn line(&self) -> String {
        // By hand, not `format!`: one of these is written per admission.
        let (kind, at, user, token, bucket) = match self {
            Record::Admit {
                at,
                user,
                token,
                bucket,
            } => ("A ", *at, user, Some(token), bucket),
            Record::CoolDown {
                until,
                user,
                bucket,
            } => ("C ", *until, user, None, bucket),
        };
        let mut line = String::with_capacity(64);
        line.push_str(kind);
        crate::units::push_decimal(&mut line, at);
        line.push(' ');
        line.push_str(user);
        if let Some(token) = token {
            line.push(' ');
            line.push_str(token);
        }
        line.push(' ');
        line.push_str(bucket.label());
        line.push('\n');
        line
    }

    fn parse(line: &str) -> Option<Record> {
        let f: Vec<&str> = line.split(' ').collect();
        match f.as_slice() {
            ["A", at, user, token, bucket] => Some(Record::Admit {
                at: at.parse().ok()?,
                user: user.to_string(),
                token: token.to_string(),
                bucket: Bucket::from_label(bucket)?,
            }),
            ["C", until, user, bucket] => Some(Record::CoolDown {
                until: until.parse().ok()?,
                user: user.to_string(),
                bucket: Bucket::from_label(bucket)?,
            }),
            _ => None,
        }
    }
}

/// How far back the journal must remember one bucket's admissions: its
/// longest sliding window (with the margin), or, when it has a monthly
/// window, the start of the month less the margin (a request sent in the
/// last `margin` of a month also counts in the next one). Kept per bucket,
/// so a busy bucket with a short window (reads, say) is not held as long
/// as the hourly session window.
#[derive(Debug, Clone, Copy, Default)]
pub struct Retention {
    pub span: Millis,
    pub months: bool,
    pub margin: Millis,
}

impl Retention {
    /// The oldest admission time still needed at `now`.
    pub fn horizon(self, now: Millis) -> Millis {
        let sliding = now.saturating_sub(self.span);
        if self.months {
            let month = crate::clock::month_start(crate::clock::month_index(now));
            sliding.min(month.saturating_sub(self.margin))
        } else {
            sliding
        }
    }
}

/// Retention per bucket, indexed by `Bucket as usize`.
pub type Retentions = [Retention; 4];

/// What a segment holds that may still matter: the newest admission of each
/// bucket and the latest end of a cool-down (0: none; an admission at time 0
/// counts as 1).
#[derive(Debug, Default)]
struct Newest {
    admit: [AtomicU64; 4],
    cool_down: AtomicU64,
}

/// A sealed segment's [`Newest`], read once.
struct Sealed {
    path: PathBuf,
    admit: [Millis; 4],
    cool_down: Millis,
}

impl Sealed {
    /// Whether anything in it still matters at `now`.
    fn needed(&self, retention: &Retentions, now: Millis) -> bool {
        self.cool_down > now
            || Bucket::ALL.iter().any(|&b| {
                let newest = self.admit[b as usize];
                newest != 0 && newest >= retention[b as usize].horizon(now)
            })
    }
}

/// A segment being appended to.
struct Segment {
    file: File,
    path: PathBuf,
    bytes: AtomicU64,
    newest: Newest,
}

impl Segment {
    fn create(path: PathBuf) -> std::io::Result<Segment> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)?;
        let bytes = file.metadata()?.len();
        Ok(Segment {
            file,
            path,
            bytes: AtomicU64::new(bytes),
            newest: Newest::default(),
        })
    }
}

/// The open journal, appended to on every admission.
///
/// A long-running gateway keeps it bounded without rewriting it under
/// load: past `segment_bytes` the current file is sealed and appends move
/// to a new segment (`quota.journal.1`, `.2`, ...); a sealed segment is
/// deleted once every record in it is older than the retention horizon. At
/// start-up all segments are read in order and folded into one file.
pub struct Journal {
    dir: PathBuf,
    current: RwLock<Segment>,
    sealed: Mutex<Vec<Sealed>>,
    next_seq: AtomicU64,
    /// The last segment number folded into the base file at start-up.
    through: u64,
    retention: Mutex<Retentions>,
    segment_bytes: u64,
    failed: AtomicBool,
}

impl Journal {
    /// Reads and checks every segment in `dir`, keeps what is still needed
    /// at `now`, folds it into one file written atomically, and opens that
    /// file for appending.
    pub fn open(
        dir: &Path,
        now: Millis,
        retention: Retentions,
        segment_bytes: u64,
    ) -> Result<(Journal, Vec<Record>), String> {
        let Replay {
            records,
            segments,
            through,
            ..
        } = replay(dir, now, &retention)?;
        let mut text = header(through);
        for r in &records {
            text.push_str(&r.line());
        }
        let base = dir.join(FILE_NAME);
        crate::state::write_atomic(&base, text.as_bytes())
            .map_err(|e| format!("{}: cannot rewrite the quota journal: {e}", base.display()))?;
        for path in segments.iter().filter_map(|(seq, p)| seq.map(|_| p)) {
            std::fs::remove_file(path)
                .map_err(|e| format!("{}: cannot remove a folded segment: {e}", path.display()))?;
        }
        let current = Segment::create(base.clone())
            .map_err(|e| format!("{}: cannot open the quota journal: {e}", base.display()))?;
        // The folded file matters as long as its admissions (treated as
        // made now) and its longest cool-down do.
        for r in &records {
            match r {
                Record::Admit { bucket, .. } => {
                    current.newest.admit[*bucket as usize].store(now.max(1), Ordering::Relaxed)
                }
                Record::CoolDown { until, .. } => {
                    current
                        .newest
                        .cool_down
                        .fetch_max(*until, Ordering::Relaxed);
                }
            }
        }
        Ok((
            Journal {
                dir: dir.to_path_buf(),
                current: RwLock::new(current),
                sealed: Mutex::new(Vec::new()),
                next_seq: AtomicU64::new(through + 1),
                through,
                retention: Mutex::new(retention),
                segment_bytes,
                failed: AtomicBool::new(false),
            },
            records,
        ))
    }

    /// What [`open`](Self::open) would replay at `now`, read without
    /// changing any file (carrying it into the shared store).
    pub fn read(dir: &Path, now: Millis, retention: &Retentions) -> Result<Replay, String> {
        replay(dir, now, retention)
    }

    /// Checks every segment in `dir` without changing anything (`check`).
    pub fn inspect(dir: &Path) -> Result<usize, String> {
        let mut n = 0;
        for (_, path) in segment_paths(dir)? {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("{}: cannot read the quota journal: {e}", path.display()))?;
            n += parse_all(&path, &text)?.1.len();
        }
        Ok(n)
    }

    pub fn admit(&self, at: Millis, user: &str, token: &str, bucket: Bucket) {
        let record = Record::Admit {
            at,
            user: user.to_string(),
            token: token.to_string(),
            bucket,
        };
        self.append(&record, at, |n| {
            n.admit[bucket as usize].fetch_max(at.max(1), Ordering::Relaxed);
        });
    }

    pub fn cool_down(&self, now: Millis, until: Millis, user: &str, bucket: Bucket) {
        let record = Record::CoolDown {
            until,
            user: user.to_string(),
            bucket,
        };
        self.append(&record, now, |n| {
            n.cool_down.fetch_max(until, Ordering::Relaxed);
        });
    }

    /// Appends one record at `now`; `note` records in the segment how long
    /// it may be needed.
    fn append(&self, record: &Record, now: Millis, note: impl FnOnce(&Newest)) {
        let line = record.line();
        let full = {
            let seg = self.current.read().unwrap_or_else(|p| p.into_inner());
            // One write of one whole line: atomic with respect to other appends.
            if let Err(e) = (&seg.file).write_all(line.as_bytes()) {
                self.report(&seg.path, &e);
                return;
            }
            note(&seg.newest);
            seg.bytes.fetch_add(line.len() as u64, Ordering::Relaxed) + line.len() as u64
                >= self.segment_bytes
        };
        if full {
            self.rotate(now);
        }
    }

    /// Seals the current segment, starts a new one, and deletes sealed
    /// segments that hold nothing still needed at `now`.
    fn rotate(&self, now: Millis) {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if current.bytes.load(Ordering::Relaxed) < self.segment_bytes {
            return; // another thread rotated first
        }
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{FILE_NAME}.{seq}"));
        let next = match Segment::create(path.clone()) {
            Ok(mut s) => {
                if let Err(e) = (&s.file).write_all(header(0).as_bytes()) {
                    self.report(&path, &e);
                    return;
                }
                s.bytes = AtomicU64::new(0);
                s
            }
            Err(e) => {
                self.report(&path, &e);
                return;
            }
        };
        let old = std::mem::replace(&mut *current, next);
        drop(current);
        let mut sealed = self.sealed.lock().unwrap_or_else(|p| p.into_inner());
        sealed.push(Sealed {
            admit: std::array::from_fn(|b| old.newest.admit[b].load(Ordering::Relaxed)),
            cool_down: old.newest.cool_down.load(Ordering::Relaxed),
            path: old.path,
        });
        let retention = *self.retention.lock().unwrap_or_else(|p| p.into_inner());
        sealed.retain(|s| {
            if s.needed(&retention, now) {
                return true;
            }
            let path = &s.path;
            // The base file is kept (it may hold the header only): truncate
            // by replacing it; numbered segments are simply removed.
            let done = if path.file_name().and_then(|n| n.to_str()) == Some(FILE_NAME) {
                crate::state::write_atomic(path, header(self.through).as_bytes())
            } else {
                std::fs::remove_file(path)
            };
            done.is_err()
        });
    }

    /// A reload changed the windows: sealed segments are kept for the new
    /// ones from the next rotation on (the fold at start-up reads the
    /// config's windows itself).
    pub fn set_retention(&self, retention: Retentions) {
        *self.retention.lock().unwrap_or_else(|p| p.into_inner()) = retention;
    }

    fn report(&self, path: &Path, e: &std::io::Error) {
        // Quotas are still enforced in memory; say so once, loudly.
        if !self.failed.swap(true, Ordering::Relaxed) {
            tracing::error!(path = %path.display(), error = %e, "cannot write the quota journal; quota used from now on may not survive a restart");
        }
    }
}

fn header(through: u64) -> String {
    if through == 0 {
        format!("{HEADER}\n")
    } else {
        format!("{HEADER} through={through}\n")
    }
}

/// The base journal (sequence `None`) and its numbered segments, in order.
/// A journal as read back: what still matters at the time it was read,
/// in time order.
pub struct Replay {
    pub records: Vec<Record>,
    /// SHA-256 over every segment's bytes, in order: which journal this
    /// was (empty: there was none).
    pub digest: Vec<u8>,
    segments: Vec<(Option<u64>, PathBuf)>,
    through: u64,
}

fn replay(dir: &Path, now: Millis, retention: &Retentions) -> Result<Replay, String> {
    let mut records = Vec::new();
    let segments = segment_paths(dir)?;
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    // The base file names the last segment folded into it: a segment
    // still on disk with that number or lower is a leftover of a crash
    // between folding and deleting, already counted in the base.
    let mut through = 0;
    for (seq, path) in &segments {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read the quota journal: {e}", path.display()))?;
        digest.update(text.as_bytes());
        let (folded, parsed) = parse_all(path, &text)?;
        match seq {
            None => through = folded,
            Some(n) if *n <= through => continue,
            Some(n) => through = through.max(*n),
        }
        records.extend(parsed);
    }
    records.retain(|r| match r {
        Record::Admit { at, bucket, .. } => *at >= retention[*bucket as usize].horizon(now),
        Record::CoolDown { until, .. } => *until > now,
    });
    // Concurrent appends may land a millisecond out of order.
    records.sort_by_key(|r| match r {
        Record::Admit { at, .. } => *at,
        Record::CoolDown { .. } => 0,
    });
    Ok(Replay {
        records,
        digest: if segments.is_empty() {
            Vec::new()
        } else {
            digest.finish().as_ref().to_vec()
        },
        segments,
        through,
    })
}

fn segment_paths(dir: &Path) -> Result<Vec<(Option<u64>, PathBuf)>, String> {
    let base = dir.join(FILE_NAME);
    let mut numbered: Vec<(u64, PathBuf)> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let seq = name
                    .strip_prefix(FILE_NAME)?
                    .strip_prefix('.')?
                    .parse()
                    .ok()?;
                Some((seq, e.path()))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    };
    numbered.sort();
    let mut out = Vec::new();
    if base.exists() {
        out.push((None, base));
    }
    out.extend(numbered.into_iter().map(|(n, p)| (Some(n), p)));
    Ok(out)
}

/// Parses a journal file: the `through=` of its header (0 if none) and
/// its records.
fn parse_all(path: &Path, text: &str) -> Result<(u64, Vec<Record>), String> {
    let mut lines = text.split_inclusive('\n').enumerate();
    let through = match lines.next().map(|(_, first)| first.trim_end()) {
        Some(first) if first == HEADER => 0,
        Some(first) if first.starts_with(HEADER) => first[HEADER.len()..]
            .trim()
            .strip_prefix("through=")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("{} has a damaged first line", path.display()))?,
        _ => {
            return Err(format!(
                "{} is not a knoq-gateway quota journal (bad first line); move it aside if it is not ours",
                path.display()
            ))
        }
    };
    let mut records = Vec::new();
    for (i, line) in lines {
        let record = line
            .strip_suffix('\n')
            .and_then(Record::parse)
            .ok_or_else(|| {
                format!(
                    "{} line {} is damaged; the gateway will not guess how much quota was used. \
                     Repair or delete that line (deleting the file resets every quota)",
                    path.display(),
                    i + 1
                )
            })?;
        records.push(record);
    }
    Ok((through, records))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_rotate_and_old_ones_are_deleted_while_running() {
        let d = dir("rotate");
        // Keep one second of history; rotate every ~3 records.
        let (j, _) = Journal::open(&d, 0, keep(1_000), 100).unwrap();
        for t in 0..30u64 {
            j.admit(t * 100, "alice", "svc", Bucket::Message);
        }
        let files: Vec<_> = segment_paths(&d)
            .unwrap()
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        // Everything older than 2_900 - 1_000 is gone; what is left is small.
        assert!(files.len() <= 6, "{files:?}");
        drop(j);
        let (_, history) = Journal::open(&d, 2_900, keep(1_000), 100).unwrap();
        let times: Vec<u64> = history
            .iter()
            .map(|r| match r {
                Record::Admit { at, .. } => *at,
                Record::CoolDown { .. } => unreachable!(),
            })
            .collect();
        assert_eq!(times, (19..30).map(|t| t * 100).collect::<Vec<_>>());
        assert_eq!(
            segment_paths(&d).unwrap(),
            [(None, d.join(FILE_NAME))],
            "folded into one file"
        );
    }

    #[test]
    fn each_bucket_is_kept_only_as_long_as_its_own_windows_need() {
        let d = dir("per-bucket");
        let mut r = Retentions::default();
        r[Bucket::Session as usize].span = 3_600_000;
        r[Bucket::Read as usize].span = 1_000;
        // Rotate every ~3 records: the first segment holds the session.
        let (j, _) = Journal::open(&d, 0, r, 100).unwrap();
        j.admit(1, "alice", "svc", Bucket::Session);
        for t in 1..=100u64 {
            j.admit(t * 100, "alice", "svc", Bucket::Read);
        }
        // Read-only segments older than a second are gone while running;
        // the session's segment stays.
        let files = segment_paths(&d).unwrap();
        assert!(files.len() <= 8, "{files:?}");
        assert!(files.iter().any(|(seq, _)| seq.is_none()), "{files:?}");
        drop(j);
        let (_, history) = Journal::open(&d, 10_000, r, 100).unwrap();
        let at = |bucket| {
            history
                .iter()
                .filter_map(|rec| match rec {
                    Record::Admit { at, bucket: b, .. } if *b == bucket => Some(*at),
                    _ => None,
                })
                .collect::<Vec<u64>>()
        };
        assert_eq!(at(Bucket::Session), [1], "within its hour");
        assert_eq!(
            at(Bucket::Read),
            (90..=100).map(|t| t * 100).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_reload_that_adds_a_window_keeps_what_it_needs_from_then_on() {
        // Started with no read window; a reload adds one of 10 s.
        let run = |tag, reload: bool| {
            let d = dir(tag);
            let (j, _) = Journal::open(&d, 0, Retentions::default(), 100).unwrap();
            if reload {
                let mut r = Retentions::default();
                r[Bucket::Read as usize].span = 10_000;
                j.set_retention(r);
            }
            for t in 1..=40u64 {
                j.admit(t * 100, "alice", "svc", Bucket::Read);
            }
            segment_paths(&d).unwrap().len()
        };
        let (kept, stale) = (run("reload-kept", true), run("reload-stale", false));
        assert!(
            kept >= 8,
            "every read of the last 10 s is kept: {kept} files"
        );
        assert!(
            stale <= 3,
            "without the new window they would go: {stale} files"
        );
    }

    #[test]
    fn a_month_window_keeps_what_the_last_margin_of_the_previous_month_spilled() {
        use crate::clock::{month_index, month_start};
        let d = dir("month-spill");
        let start = month_start(month_index(1_795_000_000_000));
        let mut r = Retentions::default();
        r[Bucket::Message as usize] = Retention {
            span: 60_250,
            months: true,
            margin: 250,
        };
        let (j, _) = Journal::open(&d, start - 5_000, r, 1 << 20).unwrap();
        j.admit(start - 1_000, "alice", "svc", Bucket::Message);
        j.admit(start - 100, "alice", "svc", Bucket::Message);
        drop(j);
        // A restart two minutes into the new month: the spilled admission
        // still counts there; the one before the margin does not.
        let (_, history) = Journal::open(&d, start + 120_000, r, 1 << 20).unwrap();
        let kept: Vec<u64> = history
            .iter()
            .filter_map(|rec| match rec {
                Record::Admit { at, .. } => Some(*at),
                Record::CoolDown { .. } => None,
            })
            .collect();
        assert_eq!(kept, [start - 100]);
    }

    /// Every bucket kept for `span` (no month windows).
    fn keep(span: Millis) -> Retentions {
        [Retention {
            span,
            ..Retention::default()
        }; 4]
    }

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kgw-journal-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn records_survive_reopen_and_old_ones_are_compacted_away() {
        let d = dir("roundtrip");
        let keep_all = keep(u64::MAX);
        let (j, history) = Journal::open(&d, 1_000, keep_all, 1 << 20).unwrap();
        assert!(history.is_empty());
        j.admit(500, "alice", "svc", Bucket::Message);
        j.admit(900, "alice", "batch", Bucket::Session);
        j.cool_down(500, 5_000, "bob", Bucket::Message);
        j.cool_down(500, 800, "bob", Bucket::Read);
        drop(j);
        let (_, history) = Journal::open(&d, 1_000, keep(400), 1 << 20).unwrap();
        assert_eq!(
            history,
            [
                Record::CoolDown {
                    until: 5_000,
                    user: "bob".into(),
                    bucket: Bucket::Message
                },
                Record::Admit {
                    at: 900,
                    user: "alice".into(),
                    token: "batch".into(),
                    bucket: Bucket::Session
                },
            ]
        );
        let text = std::fs::read_to_string(d.join(FILE_NAME)).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
    }

    #[test]
    fn a_long_cool_down_does_not_make_rotation_forget_live_admissions() {
        let d = dir("cooldown-rotate");
        let r = keep(3_600_000);
        let (j, _) = Journal::open(&d, 0, r, 60).unwrap();
        for t in 0..10 {
            j.admit(t, "alice", "svc", Bucket::Session);
        }
        // An hour-long cool-down 1 s later rotates the segment.
        j.cool_down(1_000, 3_601_000, "alice", Bucket::Session);
        j.admit(1_001, "alice", "svc", Bucket::Session);
        drop(j);
        let (_, history) = Journal::open(&d, 1_002, r, 60).unwrap();
        let admits = history
            .iter()
            .filter(|r| matches!(r, Record::Admit { .. }))
            .count();
        assert_eq!(admits, 11, "every admission within the hour is still there");
    }

    #[test]
    fn a_crash_between_folding_and_deleting_segments_does_not_double_count() {
        let d = dir("fold-crash");
        let r = keep(u64::MAX);
        let (j, _) = Journal::open(&d, 0, r, 40).unwrap();
        for t in 0..6 {
            j.admit(t, "alice", "svc", Bucket::Message);
        }
        drop(j);
        // Simulate the crash: keep copies of the numbered segments, fold,
        // then put the copies back as if the deletion never happened.
        let numbered: Vec<(PathBuf, Vec<u8>)> = segment_paths(&d)
            .unwrap()
            .into_iter()
            .filter_map(|(seq, p)| seq.map(|_| (p.clone(), std::fs::read(&p).unwrap())))
            .collect();
        assert!(!numbered.is_empty());
        let (_, once) = Journal::open(&d, 10, r, 1 << 20).unwrap();
        for (p, bytes) in &numbered {
            std::fs::write(p, bytes).unwrap();
        }
        let (_, again) = Journal::open(&d, 10, r, 1 << 20).unwrap();
        assert_eq!(once.len(), 6);
        assert_eq!(again, once);
    }

    #[test]
    fn a_damaged_journal_is_reported_with_its_line_and_left_alone() {
        let d = dir("damaged");
        let path = d.join(FILE_NAME);
        let text = format!("{HEADER}\nA 1 alice svc message\nA x alice svc message\n");
        std::fs::write(&path, &text).unwrap();
        let err = Journal::open(&d, 0, Retentions::default(), 1 << 20)
            .err()
            .unwrap();
        assert!(err.contains("line 3 is damaged"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text, "never reset");

        std::fs::write(&path, format!("{HEADER}\nA 1 alice svc message")).unwrap();
        assert!(
            Journal::open(&d, 0, Retentions::default(), 1 << 20)
                .err()
                .unwrap()
                .contains("line 2"),
            "torn last line"
        );
        std::fs::write(&path, "something else\n").unwrap();
        assert!(Journal::open(&d, 0, Retentions::default(), 1 << 20)
            .err()
            .unwrap()
            .contains("not a knoq-gateway quota journal"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn record() -> impl Strategy<Value = Record> {
            let bucket = prop_oneof![
                Just(Bucket::Message),
                Just(Bucket::Session),
                Just(Bucket::Cancel),
                Just(Bucket::Read)
            ];
            prop_oneof![
                (
                    any::<u64>(),
                    "[a-z0-9_.-]{1,8}",
                    "[a-z0-9_.()-]{1,8}",
                    bucket.clone()
                )
                    .prop_map(|(at, user, token, bucket)| Record::Admit {
                        at,
                        user,
                        token,
                        bucket
                    }),
                (any::<u64>(), "[a-z0-9_.-]{1,8}", bucket).prop_map(|(until, user, bucket)| {
                    Record::CoolDown {
                        until,
                        user,
                        bucket,
                    }
                }),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn every_record_reads_back_from_its_line(r in record()) {
                let line = r.line();
                prop_assert_eq!(Record::parse(line.strip_suffix('\n').unwrap()), Some(r));
            }

            #[test]
            fn a_journal_parses_or_names_its_first_damaged_line(
                good in proptest::collection::vec(record(), 0..5),
                junk in proptest::collection::vec("[ -~]{0,20}", 0..4),
            ) {
                let mut text = format!("{HEADER}\n");
                for r in &good {
                    text.push_str(&r.line());
                }
                for j in &junk {
                    text.push_str(j);
                    text.push('\n');
                }
                let path = Path::new("/state/quota.journal");
                match parse_all(path, &text) {
                    Ok((_, records)) => prop_assert_eq!(records.len(), good.len() + junk.len()),
                    Err(e) => {
                        let first_bad = junk.iter().position(|j| Record::parse(j).is_none()).expect("only junk can be bad");
                        let line = 1 + good.len() + first_bad + 1;
                        prop_assert!(e.contains(&format!("line {line} ")), "{e}");
                    }
                }
            }
        }
    }
}
