//! The store's one writer (issue 16, "group commit"): a plain, ordered log of changes
//! ([`Write`]) that any thread appends to, and one std thread (not the async runtime's) that
//! takes everything appended so far, applies it in order in ONE redb write transaction, commits
//! it durably (one fsync) and then completes every [`Ticket`] of that batch.
//!
//! Why: a redb commit is an fsync, and a commit per change, each under a lock, made the store
//! the gate's bottleneck in a burst of submissions (one fsync per `POST /prompt`). Changes that
//! arrive while a commit runs share the next one, so the cost of an fsync is spread over as many
//! changes as arrived during the previous one.
//!
//! Order: the log is applied in the order it was appended, so a caller that appends while
//! holding the lock under which the state changed (the scheduler's) gets the store's order equal
//! to the order of the state changes, and waits for durability after releasing that lock.
//! Errors: a batch whose transaction fails (or whose commit does) fails every ticket in it; none
//! of its changes is in the store. The log has no redb types in it: another backing store (a
//! shared one, design "Redis replicas") could apply the same changes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use redb::{Database, Durability, TableDefinition};

use super::store::StoreError;

/// A table of byte values, keyed by string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// Prompt id → the prompt's record (JSON).
    Prompts,
    /// Prompt id → `{finished_at, entry}` (JSON).
    History,
    /// Shown file key (JSON array) → `[owner, real name]` (JSON).
    Aliases,
    /// `[hour, tenant key]` → a usage row (JSON).
    Usage,
}

impl Table {
    /// Its definition in the redb file.
    pub(super) fn definition(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        match self {
            Table::Prompts => super::store::PROMPTS,
            Table::History => super::store::HISTORY,
            Table::Aliases => super::store::ALIASES,
            Table::Usage => super::store::USAGE,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One change to the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Sets `key` to `value` in `table`.
    Put {
        table: Table,
        key: String,
        value: Vec<u8>,
    },
    /// Removes `key` from `table` (absent: no error).
    Delete { table: Table, key: String },
    /// The number counter (`PromptTable::counter`).
    Counter(i64),
}

/// What a batch came to: `Err` names why its transaction failed.
type Outcome = Result<(), String>;

/// Where a ticket's outcome lands.
#[derive(Default)]
struct Slot {
    outcome: Mutex<Option<Outcome>>,
    /// For a blocking waiter.
    ready: Condvar,
    /// For an async waiter (`notify_one` keeps a permit for a waiter not yet waiting).
    notify: tokio::sync::Notify,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, Option<Outcome>> {
        self.outcome.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn complete(&self, outcome: Outcome) {
        *self.lock() = Some(outcome);
        self.ready.notify_all();
        self.notify.notify_one();
    }
}

/// A claim on the commit of some appended changes: [`Ticket::wait`] (blocking) or
/// [`Ticket::durable`] (async) returns once they are durable, or with the error that failed
/// their batch. Dropping it leaves the changes to be written all the same.
#[must_use = "a write is durable only once its ticket says so"]
pub struct Ticket(Arc<Slot>);

impl Ticket {
    fn done(outcome: Outcome) -> Ticket {
        let slot = Slot::default();
        *slot.lock() = Some(outcome);
        Ticket(Arc::new(slot))
    }

    /// A ticket already failed with `e` (changes that could not even be encoded).
    pub fn failed(e: &StoreError) -> Ticket {
        Ticket::done(Err(match e {
            StoreError::Write(m) => m.clone(),
            other => other.to_string(),
        }))
    }

    fn into_result(outcome: Outcome) -> Result<(), StoreError> {
        outcome.map_err(StoreError::Write)
    }

    /// Waits for the commit, blocking the thread (on a multi-threaded tokio runtime the worker
    /// hands its other tasks over first, `block_in_place`). For synchronous callers that need
    /// the change durable when they return. Errors: [`StoreError::Write`] naming why the batch
    /// failed (its transaction or commit, or the writer stopped).
    pub fn wait(self) -> Result<(), StoreError> {
        let block = || {
            let mut outcome = self.0.lock();
            loop {
                if let Some(o) = outcome.take() {
                    return o;
                }
                outcome = self
                    .0
                    .ready
                    .wait(outcome)
                    .unwrap_or_else(|e| e.into_inner());
            }
        };
        let multi_threaded = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let outcome = if multi_threaded {
            tokio::task::block_in_place(block)
        } else {
            block()
        };
        Self::into_result(outcome)
    }

    /// Waits for the commit without blocking a thread. Errors: as [`Ticket::wait`].
    pub async fn durable(self) -> Result<(), StoreError> {
        loop {
            if let Some(o) = self.0.lock().take() {
                return Self::into_result(o);
            }
            self.0.notify.notified().await;
        }
    }
}

/// What is appended and not yet taken by the writer thread.
#[derive(Default)]
struct Log {
    writes: Vec<Write>,
    tickets: Vec<Arc<Slot>>,
    /// The store is closing (or its thread stopped): nothing more is taken.
    closed: bool,
}

struct Shared {
    log: Mutex<Log>,
    appended: Condvar,
    /// Batches still to fail on purpose ([`Writer::fail_next_commits`]; tests only).
    fail_next: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The writer: the log and the thread that commits it. Dropping it commits what was appended,
/// then stops the thread.
pub struct Writer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts the writer thread over `db`. Errors: the thread could not be spawned
    /// (`std::io::Error`, from `std::thread::Builder::spawn`).
    pub fn start(db: Arc<Database>) -> std::io::Result<Writer> {
        let shared = Arc::new(Shared {
            log: Mutex::new(Log::default()),
            appended: Condvar::new(),
            fail_next: AtomicUsize::new(0),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("store-writer".into())
                .spawn(move || run(&shared, &db))?
        };
        Ok(Writer {
            shared,
            thread: Some(thread),
        })
    }

    /// Appends `writes` to the log, in order, after everything appended before. Cheap (a short
    /// lock, no I/O): call it under the lock that ordered the changes.
    pub fn append(&self, writes: Vec<Write>) -> Ticket {
        if writes.is_empty() {
            return Ticket::done(Ok(()));
        }
        let slot = Arc::new(Slot::default());
        {
            let mut log = self.shared.lock();
            if log.closed {
                return Ticket::done(Err("the store's writer has stopped".into()));
            }
            log.writes.extend(writes);
            log.tickets.push(slot.clone());
        }
        self.shared.appended.notify_one();
        Ticket(slot)
    }

    /// Makes the next `n` batches fail as a failed commit would (each of their tickets gets
    /// an error; none of their changes is stored). For tests of the error paths only (the
    /// gate reaches it through `server.test_faults`).
    pub fn fail_next_commits(&self, n: usize) {
        self.shared.fail_next.store(n, Ordering::SeqCst);
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.appended.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Completes the tickets of a batch taken: with its outcome, or, if the thread unwinds
/// before one is known, with an error (a waiter never hangs on a writer that died).
struct Batch(Vec<Arc<Slot>>);

impl Batch {
    fn complete(mut self, outcome: Outcome) {
        for slot in std::mem::take(&mut self.0) {
            slot.complete(outcome.clone());
        }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        for slot in self.0.drain(..) {
            slot.complete(Err("the store's writer stopped".into()));
        }
    }
}

/// Closes the log if the thread unwinds, so later appends fail at once instead of waiting.
struct CloseOnExit<'a>(&'a Shared);

impl Drop for CloseOnExit<'_> {
    fn drop(&mut self) {
        let mut log = self.0.lock();
        log.closed = true;
        let tickets = std::mem::take(&mut log.tickets);
        drop(log);
        Batch(tickets).complete(Err("the store's writer stopped".into()));
    }
}

/// The writer thread: take everything appended, commit it once, complete its tickets; until
/// closed and empty.
fn run(shared: &Shared, db: &Database) {
    let _close = CloseOnExit(shared);
    loop {
        let (writes, batch) = {
            let mut log = shared.lock();
            while log.tickets.is_empty() && !log.closed {
                log = shared.appended.wait(log).unwrap_or_else(|e| e.into_inner());
            }
            if log.tickets.is_empty() {
                return;
            }
            (
                std::mem::take(&mut log.writes),
                Batch(std::mem::take(&mut log.tickets)),
            )
        };
        let injected = shared
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if injected.is_ok() {
            batch.complete(Err("injected commit failure (server.test_faults)".into()));
            continue;
        }
        batch.complete(commit(db, &writes));
    }
}

/// A table of the batch's transaction, opened once, when the batch first touches it (redb
/// refuses a table open twice in one transaction).
type Open<'txn> = Option<redb::Table<'txn, &'static str, &'static [u8]>>;

fn open<'a, 'txn>(
    txn: &'txn redb::WriteTransaction,
    tables: &'a mut [Open<'txn>; 4],
    t: Table,
) -> Result<&'a mut redb::Table<'txn, &'static str, &'static [u8]>, String> {
    let slot = &mut tables[t.index()];
    if slot.is_none() {
        *slot = Some(txn.open_table(t.definition()).map_err(|e| e.to_string())?);
    }
    slot.as_mut()
        .ok_or_else(|| "a table did not open".to_string())
}

/// Applies `writes` in order in one write transaction and commits it durably.
fn commit(db: &Database, writes: &[Write]) -> Outcome {
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let mut txn = db.begin_write().map_err(|e| err(&e))?;
    txn.set_durability(Durability::Immediate)
        .map_err(|e| err(&e))?;
    {
        let mut tables: [Open<'_>; 4] = [None, None, None, None];
        let mut counter = None;
        for write in writes {
            match write {
                Write::Put { table, key, value } => {
                    open(&txn, &mut tables, *table)?
                        .insert(key.as_str(), value.as_slice())
                        .map_err(|e| err(&e))?;
                }
                Write::Delete { table, key } => {
                    open(&txn, &mut tables, *table)?
                        .remove(key.as_str())
                        .map_err(|e| err(&e))?;
                }
                // Applied in order, the last one is what stays: written once.
                Write::Counter(c) => counter = Some(*c),
            }
        }
        if let Some(c) = counter {
            let mut meta = txn.open_table(super::store::META).map_err(|e| err(&e))?;
            meta.insert("counter", c.to_string().as_str())
                .map_err(|e| err(&e))?;
        }
    }
    txn.commit().map_err(|e| err(&e))
}
