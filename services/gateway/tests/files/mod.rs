//! A temporary directory for the files a test hands to processes (certificates, keys, seeds,
//! configurations), removed when the test ends.

#![allow(dead_code, clippy::unwrap_used, clippy::disallowed_methods)]

use std::path::PathBuf;

/// A directory of files, removed on drop.
pub struct Files(pub PathBuf);

impl Files {
    /// A new directory; `purpose` goes into its name.
    pub fn new(purpose: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "secsync-{purpose}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// Writes `name`; its path.
    pub fn write(&self, name: &str, contents: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path.display().to_string()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
