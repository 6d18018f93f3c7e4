//! The metadata store: snapshot records in an embedded transactional database (redb).
//!
//! Every change is one write transaction, so a crash (even `kill -9` in the middle of a Commit)
//! leaves either the old state or the new one, never a half-made snapshot. A snapshot is created
//! in two phases: a pending record (in its own table, so invisible to get and list) reserves the
//! key and the id, the directory is made (and a remote layer mounted) outside any transaction,
//! then a second transaction moves the record into place. redb has one writer: a mount inside a
//! transaction would make every other change wait for it. Pending records left by a crash are
//! dropped at start-up and their directories reclaimed as orphans.

use parking_lot::{Condvar, Mutex};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::SystemTime;

use redb::{
    Database, MultimapTableDefinition, ReadableMultimapTable, ReadableTable, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};

use crate::error::SnapshotError;
use crate::remote::RemoteLayer;

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// Reserved keys whose snapshot is being made: never read by get, list or walk.
const PENDING: TableDefinition<&str, &[u8]> = TableDefinition::new("pending");
const CHILDREN: MultimapTableDefinition<&str, &str> = MultimapTableDefinition::new("children");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const NEXT_ID: &str = "next_id";

/// The kind of a snapshot, as containerd names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Active,
    View,
    Committed,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Active => "active",
            Kind::View => "view",
            Kind::Committed => "committed",
        }
    }
}

/// Disk resources of one snapshot alone, excluding its parents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskUsage {
    pub size: i64,
    pub inodes: i64,
}

/// What the store keeps per snapshot key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Directory name under `snapshots/`; stays the same across Commit.
    pub id: u64,
    pub kind: Kind,
    /// Parent key, empty for none.
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
    /// Measured at Commit; active snapshots are measured on demand.
    pub usage: DiskUsage,
    /// Set when the snapshot is a lazily mounted layer rather than a directory of files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteLayer>,
}

/// A snapshot key with its record.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub record: Record,
}

pub struct Store {
    db: Database,
    /// Keys this process is creating; a second create of one waits for the first to end, as it
    /// would have waited for the single writer when creation was one transaction.
    creating: Mutex<HashSet<String>>,
    created: Condvar,
}

/// Releases a key held in [`Store::creating`], however the creation ends.
struct Creating<'a> {
    store: &'a Store,
    key: String,
}

impl Drop for Creating<'_> {
    fn drop(&mut self) {
        self.store.creating_keys().remove(&self.key);
        self.store.created.notify_all();
    }
}

/// Creates the tables up front so that readers never meet a missing one.
fn create_tables(db: &Database) -> Result<(), Box<redb::Error>> {
    let txn = db.begin_write().map_err(|e| Box::new(e.into()))?;
    txn.open_table(SNAPSHOTS).map_err(|e| Box::new(e.into()))?;
    txn.open_table(PENDING).map_err(|e| Box::new(e.into()))?;
    txn.open_multimap_table(CHILDREN)
        .map_err(|e| Box::new(e.into()))?;
    txn.open_table(COUNTERS).map_err(|e| Box::new(e.into()))?;
    txn.commit().map_err(|e| Box::new(e.into()))?;
    Ok(())
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, SnapshotError> {
        let open_err = |source: redb::Error| SnapshotError::OpenStore {
            path: path.to_owned(),
            source: Box::new(source),
        };
        if !path.exists() {
            // Made whole beside it, then renamed into place: a daemon killed while creating
            // its store leaves no half-made file that every later start would refuse.
            let fresh = path.with_extension("db.new");
            let _ = std::fs::remove_file(&fresh);
            let db = Database::create(&fresh).map_err(|e| open_err(e.into()))?;
            create_tables(&db).map_err(|e| open_err(*e))?;
            drop(db);
            std::fs::rename(&fresh, path).map_err(|e| open_err(redb::Error::Io(e)))?;
        }
        // Every image's name and layer digests are in it: root's alone.
        shoal_fetcher::private::narrow(path, shoal_fetcher::private::FILE_MODE)
            .map_err(|e| open_err(redb::Error::Io(e)))?;
        let db = Database::create(path).map_err(|e| open_err(e.into()))?;
        create_tables(&db).map_err(|e| open_err(*e))?;
        let store = Store {
            db,
            creating: Mutex::new(HashSet::new()),
            created: Condvar::new(),
        };
        // Decode everything once so a damaged store fails at start-up, not mid-request.
        store.list()?;
        Ok(store)
    }

    pub fn get(&self, key: &str) -> Result<Record, SnapshotError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| SnapshotError::store("begin read", e))?;
        let table = txn
            .open_table(SNAPSHOTS)
            .map_err(|e| SnapshotError::store("open table", e))?;
        read_record(&table, key)?.ok_or_else(|| SnapshotError::NotFound { key: key.into() })
    }

    pub fn list(&self) -> Result<Vec<Entry>, SnapshotError> {
        let txn = self
            .db
            .begin_read()
            .map_err(|e| SnapshotError::store("begin read", e))?;
        let table = txn
            .open_table(SNAPSHOTS)
            .map_err(|e| SnapshotError::store("open table", e))?;
        entries(&table, "iterate")
    }

    /// Ids of `key`'s ancestors, nearest first.
    #[cfg(test)]
    pub fn parent_ids(&self, record: &Record) -> Result<Vec<u64>, SnapshotError> {
        let mut ids = Vec::new();
        let mut parent = record.parent.clone();
        while !parent.is_empty() {
            let rec = self.get(&parent)?;
            ids.push(rec.id);
            parent = rec.parent;
        }
        Ok(ids)
    }

    /// Creates a snapshot: active or view, or committed for a remote layer. The key is reserved
    /// by a pending record first; `make_dir(id, parent_id)` then lays out its directory (and
    /// mounts a remote layer) outside any transaction, and the record becomes visible only once
    /// it returned Ok. On failure the reservation is dropped; the directory is the caller's.
    pub fn create(
        &self,
        key: &str,
        parent: &str,
        kind: Kind,
        labels: BTreeMap<String, String>,
        remote: Option<RemoteLayer>,
        make_dir: impl FnOnce(u64, Option<u64>) -> Result<(), SnapshotError>,
    ) -> Result<Record, SnapshotError> {
        let _creating = self.hold(key);
        let (record, parent_id) = self.reserve(key, parent, kind, labels, remote)?;
        if let Err(err) = make_dir(record.id, parent_id) {
            self.abandon(key, &record)?;
            return Err(err);
        }
        match self.publish(key) {
            Ok(record) => Ok(record),
            Err(err) => {
                let _ = self.abandon(key, &record);
                Err(err)
            }
        }
    }

    /// Waits until no other create of `key` runs in this process, then holds it.
    fn hold(&self, key: &str) -> Creating<'_> {
        let mut creating = self.creating_keys();
        while creating.contains(key) {
            self.created.wait(&mut creating);
        }
        creating.insert(key.to_owned());
        Creating {
            store: self,
            key: key.to_owned(),
        }
    }

    fn creating_keys(&self) -> parking_lot::MutexGuard<'_, HashSet<String>> {
        self.creating.lock()
    }

    /// Phase one: checks the key and parent, takes an id and stores a pending record.
    pub(crate) fn reserve(
        &self,
        key: &str,
        parent: &str,
        kind: Kind,
        labels: BTreeMap<String, String>,
        remote: Option<RemoteLayer>,
    ) -> Result<(Record, Option<u64>), SnapshotError> {
        let txn = self.begin_write()?;
        let reserved = {
            let table = txn
                .open_table(SNAPSHOTS)
                .map_err(|e| SnapshotError::store("open table", e))?;
            let mut pending = txn
                .open_table(PENDING)
                .map_err(|e| SnapshotError::store("open pending", e))?;
            if read_record(&table, key)?.is_some() || read_record(&pending, key)?.is_some() {
                return Err(SnapshotError::AlreadyExists { key: key.into() });
            }
            let parent_id = if parent.is_empty() {
                None
            } else {
                let parent_record =
                    read_record(&table, parent)?.ok_or_else(|| SnapshotError::ParentNotFound {
                        parent: parent.into(),
                    })?;
                if parent_record.kind != Kind::Committed {
                    return Err(SnapshotError::ParentNotCommitted {
                        parent: parent.into(),
                    });
                }
                Some(parent_record.id)
            };
            let id = next_id(&txn)?;
            let now = SystemTime::now();
            let record = Record {
                id,
                kind,
                parent: parent.into(),
                labels,
                created: now,
                updated: now,
                usage: DiskUsage::default(),
                remote,
            };
            write_record(&mut pending, key, &record)?;
            if !parent.is_empty() {
                // Listed as a child already, so the parent cannot be removed under it.
                let mut children = txn
                    .open_multimap_table(CHILDREN)
                    .map_err(|e| SnapshotError::store("open children", e))?;
                children
                    .insert(parent, key)
                    .map_err(|e| SnapshotError::store("insert child", e))?;
            }
            (record, parent_id)
        };
        commit(txn)?;
        Ok(reserved)
    }

    /// Phase two: the pending record of `key` becomes visible.
    fn publish(&self, key: &str) -> Result<Record, SnapshotError> {
        let txn = self.begin_write()?;
        let record = {
            let mut pending = txn
                .open_table(PENDING)
                .map_err(|e| SnapshotError::store("open pending", e))?;
            let mut record = read_record(&pending, key)?
                .ok_or_else(|| SnapshotError::NotFound { key: key.into() })?;
            pending
                .remove(key)
                .map_err(|e| SnapshotError::store("remove pending", e))?;
            let now = SystemTime::now();
            record.created = now;
            record.updated = now;
            let mut table = txn
                .open_table(SNAPSHOTS)
                .map_err(|e| SnapshotError::store("open table", e))?;
            write_record(&mut table, key, &record)?;
            record
        };
        commit(txn)?;
        Ok(record)
    }

    /// Drops the reservation of `key` made for `record`.
    fn abandon(&self, key: &str, record: &Record) -> Result<(), SnapshotError> {
        let txn = self.begin_write()?;
        forget_pending(&txn, key, record)?;
        commit(txn)
    }

    /// Drops every pending record (a crash left them between the two phases) and returns them;
    /// their directories are orphans from then on. Only at start-up, before any create.
    pub fn abandon_all_pending(&self) -> Result<Vec<Entry>, SnapshotError> {
        let txn = self.begin_write()?;
        let entries = {
            let pending = txn
                .open_table(PENDING)
                .map_err(|e| SnapshotError::store("open pending", e))?;
            entries(&pending, "iterate pending")?
        };
        for entry in &entries {
            forget_pending(&txn, &entry.key, &entry.record)?;
        }
        commit(txn)?;
        Ok(entries)
    }

    /// Turns active snapshot `key` into committed snapshot `name`, keeping its directory.
    pub fn commit(
        &self,
        key: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        usage: DiskUsage,
    ) -> Result<Record, SnapshotError> {
        let txn = self.begin_write()?;
        let record = {
            let mut table = txn
                .open_table(SNAPSHOTS)
                .map_err(|e| SnapshotError::store("open table", e))?;
            let active = read_record(&table, key)?
                .ok_or_else(|| SnapshotError::NotFound { key: key.into() })?;
            if active.kind != Kind::Active {
                return Err(SnapshotError::NotActive {
                    key: key.into(),
                    kind: active.kind.as_str(),
                });
            }
            let reserved = {
                let pending = txn
                    .open_table(PENDING)
                    .map_err(|e| SnapshotError::store("open pending", e))?;
                read_record(&pending, name)?.is_some()
            };
            if reserved || read_record(&table, name)?.is_some() {
                return Err(SnapshotError::AlreadyExists { key: name.into() });
            }
            let now = SystemTime::now();
            let record = Record {
                kind: Kind::Committed,
                labels,
                created: now,
                updated: now,
                usage,
                ..active
            };
            table
                .remove(key)
                .map_err(|e| SnapshotError::store("remove record", e))?;
            write_record(&mut table, name, &record)?;
            if !record.parent.is_empty() {
                let mut children = txn
                    .open_multimap_table(CHILDREN)
                    .map_err(|e| SnapshotError::store("open children", e))?;
                children
                    .remove(record.parent.as_str(), key)
                    .map_err(|e| SnapshotError::store("remove child", e))?;
                children
                    .insert(record.parent.as_str(), name)
                    .map_err(|e| SnapshotError::store("insert child", e))?;
            }
            record
        };
        commit(txn)?;
        Ok(record)
    }

    /// Forgets `key`; its directory is the caller's to remove once this returns.
    pub fn remove(&self, key: &str) -> Result<Record, SnapshotError> {
        let txn = self.begin_write()?;
        let record = {
            let mut table = txn
                .open_table(SNAPSHOTS)
                .map_err(|e| SnapshotError::store("open table", e))?;
            let record = read_record(&table, key)?
                .ok_or_else(|| SnapshotError::NotFound { key: key.into() })?;
            let mut children = txn
                .open_multimap_table(CHILDREN)
                .map_err(|e| SnapshotError::store("open children", e))?;
            let has_children = children
                .get(key)
                .map_err(|e| SnapshotError::store("read children", e))?
                .next()
                .is_some();
            if has_children {
                return Err(SnapshotError::HasChildren { key: key.into() });
            }
            table
                .remove(key)
                .map_err(|e| SnapshotError::store("remove record", e))?;
            if !record.parent.is_empty() {
                children
                    .remove(record.parent.as_str(), key)
                    .map_err(|e| SnapshotError::store("remove child", e))?;
            }
            record
        };
        commit(txn)?;
        Ok(record)
    }

    /// Applies `change` to the record of `key` and stores the result.
    pub fn update(
        &self,
        key: &str,
        change: impl FnOnce(&mut Record) -> Result<(), SnapshotError>,
    ) -> Result<Record, SnapshotError> {
        let txn = self.begin_write()?;
        let record = {
            let mut table = txn
                .open_table(SNAPSHOTS)
                .map_err(|e| SnapshotError::store("open table", e))?;
            let mut record = read_record(&table, key)?
                .ok_or_else(|| SnapshotError::NotFound { key: key.into() })?;
            change(&mut record)?;
            record.updated = SystemTime::now();
            write_record(&mut table, key, &record)?;
            record
        };
        commit(txn)?;
        Ok(record)
    }

    /// Runs `sweep` with the ids of every live snapshot (pending ones included: their directory
    /// is being made) while holding the write lock, so that no snapshot is reserved or committed
    /// while directories are being reclaimed.
    pub fn with_live_ids<T>(
        &self,
        sweep: impl FnOnce(&HashSet<u64>) -> T,
    ) -> Result<T, SnapshotError> {
        let txn = self.begin_write()?;
        let ids = {
            let table = txn
                .open_table(SNAPSHOTS)
                .map_err(|e| SnapshotError::store("open table", e))?;
            let mut ids = HashSet::new();
            for row in table
                .iter()
                .map_err(|e| SnapshotError::store("iterate", e))?
            {
                let (key, value) = row.map_err(|e| SnapshotError::store("iterate", e))?;
                ids.insert(decode(key.value(), value.value())?.id);
            }
            let pending = txn
                .open_table(PENDING)
                .map_err(|e| SnapshotError::store("open pending", e))?;
            for row in pending
                .iter()
                .map_err(|e| SnapshotError::store("iterate pending", e))?
            {
                let (key, value) = row.map_err(|e| SnapshotError::store("iterate pending", e))?;
                ids.insert(decode(key.value(), value.value())?.id);
            }
            ids
        };
        let result = sweep(&ids);
        txn.abort()
            .map_err(|e| SnapshotError::store("end sweep", e))?;
        Ok(result)
    }

    fn begin_write(&self) -> Result<WriteTransaction, SnapshotError> {
        self.db
            .begin_write()
            .map_err(|e| SnapshotError::store("begin write", e))
    }
}

/// Removes the pending record of `key` and its place among its parent's children.
fn forget_pending(txn: &WriteTransaction, key: &str, record: &Record) -> Result<(), SnapshotError> {
    let mut pending = txn
        .open_table(PENDING)
        .map_err(|e| SnapshotError::store("open pending", e))?;
    pending
        .remove(key)
        .map_err(|e| SnapshotError::store("remove pending", e))?;
    if !record.parent.is_empty() {
        let mut children = txn
            .open_multimap_table(CHILDREN)
            .map_err(|e| SnapshotError::store("open children", e))?;
        children
            .remove(record.parent.as_str(), key)
            .map_err(|e| SnapshotError::store("remove child", e))?;
    }
    Ok(())
}

fn next_id(txn: &WriteTransaction) -> Result<u64, SnapshotError> {
    let mut counters = txn
        .open_table(COUNTERS)
        .map_err(|e| SnapshotError::store("open counters", e))?;
    let id = counters
        .get(NEXT_ID)
        .map_err(|e| SnapshotError::store("read counter", e))?
        .map(|v| v.value())
        .unwrap_or(1);
    counters
        .insert(NEXT_ID, id + 1)
        .map_err(|e| SnapshotError::store("write counter", e))?;
    Ok(id)
}

fn read_record(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<Record>, SnapshotError> {
    let value = table
        .get(key)
        .map_err(|e| SnapshotError::store("read record", e))?;
    value.map(|v| decode(key, v.value())).transpose()
}

fn write_record(
    table: &mut redb::Table<&'static str, &'static [u8]>,
    key: &str,
    record: &Record,
) -> Result<(), SnapshotError> {
    let bytes = serde_json::to_vec(record).map_err(|source| SnapshotError::DecodeRecord {
        key: key.into(),
        source,
    })?;
    table
        .insert(key, bytes.as_slice())
        .map_err(|e| SnapshotError::store("write record", e))?;
    Ok(())
}

/// Every record of `table`; `step` names the iteration in errors.
fn entries(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    step: &'static str,
) -> Result<Vec<Entry>, SnapshotError> {
    let mut entries = Vec::new();
    for row in table.iter().map_err(|e| SnapshotError::store(step, e))? {
        let (key, value) = row.map_err(|e| SnapshotError::store(step, e))?;
        let key = key.value().to_string();
        let record = decode(&key, value.value())?;
        entries.push(Entry { key, record });
    }
    Ok(entries)
}

fn decode(key: &str, bytes: &[u8]) -> Result<Record, SnapshotError> {
    serde_json::from_slice(bytes).map_err(|source| SnapshotError::DecodeRecord {
        key: key.into(),
        source,
    })
}

fn commit(txn: WriteTransaction) -> Result<(), SnapshotError> {
    txn.commit().map_err(|e| SnapshotError::store("commit", e))
}

#[cfg(test)]
mod tests;
