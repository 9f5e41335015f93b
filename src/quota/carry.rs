//! Carrying a state directory's quota into the shared store: what a
//! gateway that ran on `kind = "local"` consumed (its journal's admissions
//! still inside a window, and Knoq's cool-downs still running) is recorded
//! in Redis before the gateway serves on `kind = "redis"`, so the move
//! never opens a burst past a limit.
//!
//! Once per journal: each admission goes in under an id made from this
//! carry's own random id and its place in the journal, so a carry cut
//! short and run again counts each once (the sliding windows' members are
//! those ids; a month counter dedupes for the id's ten minutes). A mark in
//! the state directory, `quota.carried`, names the journal it carried (by
//! digest) and whether it finished; the journal itself is left as it was,
//! for a return to `local`. The cookies need no carrying: the first sync
//! with an empty shared record writes this replica's current cookie.

use std::path::{Path, PathBuf};

use super::journal::{Journal, Record, Replay};
use super::shared::SharedQuotaStore;
use super::store::{Demand, QuotaStore};
use super::Policy;
use crate::clock::Millis;
use crate::shared_store::StoreError;

pub const MARK: &str = "quota.carried";
const HEADER: &str = "knoq-gateway quota carried v1";

/// A journal still to carry.
pub struct Carry {
    mark: PathBuf,
    replay: Replay,
    digest: String,
    id: String,
}

/// What one carry recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Carried {
    pub admissions: usize,
    pub cool_downs: usize,
}

impl Carry {
    /// The journal in `dir` if it holds anything that still matters at
    /// `now` and has not been carried yet. Keeps this carry's id in the
    /// mark first, so a second attempt reuses it.
    pub fn pending(
        dir: &Path,
        policy: &Policy,
        margin: Millis,
        now: Millis,
    ) -> Result<Option<Carry>, String> {
        let replay = Journal::read(dir, now, &policy.retention(margin))?;
        if replay.digest.is_empty() {
            return Ok(None);
        }
        let digest = hex(&replay.digest);
        let mark = dir.join(MARK);
        let (id, done) = match read_mark(&mark)? {
            Some((id, of, done)) if of == digest => (id, done),
            _ => {
                let mut bytes = [0u8; 8];
                getrandom::getrandom(&mut bytes).expect("the OS has a random source");
                let id = hex(&bytes);
                write_mark(&mark, &id, &digest, false)?;
                (id, false)
            }
        };
        if done || replay.records.is_empty() {
            return Ok(None);
        }
        Ok(Some(Carry {
            mark,
            replay,
            digest,
            id,
        }))
    }

    /// How many admissions and cool-downs there are to carry.
    pub fn size(&self) -> Carried {
        let admissions = self
            .replay
            .records
            .iter()
            .filter(|r| matches!(r, Record::Admit { .. }))
            .count();
        Carried {
            admissions,
            cool_downs: self.replay.records.len() - admissions,
        }
    }

    /// Records everything in `store`, at the times the journal gives, in
    /// the windows `policy` gives each user and token now; then marks the
    /// journal carried. Stops at the first failure (run it again: what
    /// went in already counts once).
    pub async fn run(
        &self,
        store: &SharedQuotaStore,
        policy: &Policy,
        now: Millis,
    ) -> Result<Carried, StoreError> {
        store.learn_skew(now).await?;
        for (n, record) in self.replay.records.iter().enumerate() {
            match record {
                Record::Admit {
                    at,
                    user,
                    token,
                    bucket,
                } => {
                    let demand = Demand {
                        user,
                        token,
                        bucket: *bucket,
                        user_windows: policy.user_windows(user, *bucket),
                        token_windows: policy.token_windows(token, *bucket),
                    };
                    let id = format!("carried-{}-{n}", self.id);
                    store.record(&demand, &id, *at).await?;
                }
                Record::CoolDown {
                    until,
                    user,
                    bucket,
                } => store.cool_down(user, *bucket, now, *until).await?,
            }
        }
        write_mark(&self.mark, &self.id, &self.digest, true)
            .map_err(|e| StoreError::Failed(e.into()))?;
        Ok(self.size())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `(id, digest, done)` of the mark, if there is one.
fn read_mark(path: &Path) -> Result<Option<(String, String, bool)>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut lines = text.lines();
    let damaged = || {
        format!(
            "{} is damaged; remove it to carry the quota journal into Redis again",
            path.display()
        )
    };
    if lines.next() != Some(HEADER) {
        return Err(damaged());
    }
    let mut words = lines.next().unwrap_or_default().split(' ');
    match (words.next(), words.next(), words.next(), lines.next()) {
        (Some("id"), Some(id), Some(digest), done) => Ok(Some((
            id.to_string(),
            digest.to_string(),
            done == Some("done"),
        ))),
        _ => Err(damaged()),
    }
}

fn write_mark(path: &Path, id: &str, digest: &str, done: bool) -> Result<(), String> {
    let text = format!(
        "{HEADER}\nid {id} {digest}\n{}",
        if done { "done\n" } else { "" }
    );
    crate::state::write_atomic(path, text.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// A carry to finish before the gateway serves, with what it needs.
pub struct CarryOver {
    pub carry: Carry,
    pub store: std::sync::Arc<SharedQuotaStore>,
    pub policy: Policy,
}

impl CarryOver {
    /// Carries the journal, trying again every second while the store
    /// does not answer (one error line for the first failure): serving
    /// before it is done could admit past a limit.
    pub async fn finish(self, clock: &dyn crate::clock::Clock) {
        let size = self.carry.size();
        tracing::info!(
            admissions = size.admissions,
            cool_downs = size.cool_downs,
            "carrying the state directory's quota journal into the shared store before serving"
        );
        let mut failed = false;
        loop {
            match self.carry.run(&self.store, &self.policy, clock.now()).await {
                Ok(done) => {
                    tracing::info!(
                        admissions = done.admissions,
                        cool_downs = done.cool_downs,
                        "carried the state directory's quota journal into the shared store"
                    );
                    return;
                }
                Err(e) if !failed => {
                    failed = true;
                    let error = match &e {
                        StoreError::Failed(source) => source.to_string(),
                        StoreError::Timeout(_) => e.to_string(),
                    };
                    tracing::error!(error = %error, "cannot carry the state directory's quota journal into the shared store; trying again every second, and serving nothing until it is carried");
                }
                Err(_) => {}
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kgw-carry-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn journal(d: &Path, lines: &str) {
        let text = format!("knoq-gateway quota journal v1\n{lines}");
        std::fs::write(d.join(super::super::journal::FILE_NAME), text).unwrap();
    }

    fn id_of(c: &Carry) -> String {
        c.id.clone()
    }

    #[test]
    fn a_journal_is_carried_under_one_id_until_marked_done_and_a_new_one_gets_a_new_id() {
        let d = dir("mark");
        let policy = Policy::default();
        assert!(
            Carry::pending(&d, &policy, 0, 1_000).unwrap().is_none(),
            "no journal"
        );
        assert!(!d.join(MARK).exists());

        journal(&d, "A 1000 alice svc message\nC 9000 alice session\n");
        let first = Carry::pending(&d, &policy, 0, 1_000)
            .unwrap()
            .expect("to carry");
        assert_eq!(
            first.size(),
            Carried {
                admissions: 1,
                cool_downs: 1
            }
        );
        // A second attempt (the first was cut short) reuses the ids.
        let again = Carry::pending(&d, &policy, 0, 1_000).unwrap().unwrap();
        assert_eq!(id_of(&again), id_of(&first));

        write_mark(&first.mark, &first.id, &first.digest, true).unwrap();
        assert!(
            Carry::pending(&d, &policy, 0, 1_000).unwrap().is_none(),
            "done"
        );

        // Back on `local` for a while: a changed journal is carried anew.
        journal(&d, "A 1000 alice svc message\nA 1200 alice svc message\n");
        let changed = Carry::pending(&d, &policy, 0, 1_000).unwrap().unwrap();
        assert_ne!(id_of(&changed), id_of(&first));
        assert_eq!(changed.size().admissions, 2);

        // Nothing that still matters: nothing to carry.
        assert!(Carry::pending(&d, &policy, 0, 50_000).unwrap().is_none());

        std::fs::write(d.join(MARK), "something else\n").unwrap();
        let err = Carry::pending(&d, &policy, 0, 1_000).err().unwrap();
        assert!(err.contains("quota.carried is damaged"), "{err}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
