//! The data directory: created on start and locked for as long as the process runs, so a
//! second `secsync` on the same directory stops with a clear error instead of sharing the
//! database file with the first.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

/// Why the data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("cannot create or open the data directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the data directory {path} is in use by another secsync process (it holds {lock}); \
         stop that process or choose another --data-dir"
    )]
    InUse { path: PathBuf, lock: PathBuf },
}

/// A locked data directory; the lock is released when this is dropped (or the process ends,
/// however it ends: the operating system drops the lock with the file descriptor).
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    _lock: File,
}

impl DataDir {
    /// Creates `path` when missing and takes its lock.
    pub fn lock(path: &Path) -> Result<Self, DataDirError> {
        let io = |source| DataDirError::Io {
            path: path.to_owned(),
            source,
        };
        std::fs::create_dir_all(path).map_err(io)?;
        let lock_path = path.join("LOCK");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => Ok(Self {
                path: path.to_owned(),
                _lock: file,
            }),
            Err(TryLockError::WouldBlock) => Err(DataDirError::InUse {
                path: path.to_owned(),
                lock: lock_path,
            }),
            Err(TryLockError::Error(source)) => Err(io(source)),
        }
    }

    /// The SQLite database file inside the directory.
    pub fn database_file(&self) -> PathBuf {
        self.path.join("secsync.sqlite3")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_second_lock_is_refused_until_the_first_is_released() {
        let dir = std::env::temp_dir().join(format!("secsync-lock-{}", rand::random::<u64>()));
        let first = DataDir::lock(&dir).unwrap();
        let second = DataDir::lock(&dir).unwrap_err();
        assert!(matches!(second, DataDirError::InUse { .. }), "{second}");
        assert!(second
            .to_string()
            .contains("in use by another secsync process"));
        drop(first);
        let again = DataDir::lock(&dir).unwrap();
        assert_eq!(again.database_file(), dir.join("secsync.sqlite3"));
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
