//! Serve a tagged image of a store as a read-only FUSE mount until it is unmounted:
//!
//! ```text
//! cargo run --release -p layerstore-core --example fusemount -- STORE TAG MOUNTPOINT
//! ls -l MOUNTPOINT; fusermount3 -u MOUNTPOINT     # (or umount) ends the server
//! ```
//!
//! Killed instead, the server leaves no mount behind: `fusermount3` unmounts it.

use std::path::PathBuf;
use std::sync::Arc;

use layerstore_core::fusefs::{FuseMount, FuseOptions};
use layerstore_core::tar::Limits;
use layerstore_core::Store;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [store, tag, mountpoint] = args.as_slice() else {
        return Err("usage: fusemount STORE TAG MOUNTPOINT".into());
    };
    let store = Arc::new(Store::open_readonly(
        &PathBuf::from(store),
        Limits::default(),
    )?);
    let stack = store.get(tag)?;
    let mount = FuseMount::mount(
        store,
        stack,
        &PathBuf::from(mountpoint),
        &FuseOptions::default(),
    )?;
    eprintln!("serving {tag} at {}", mount.mountpoint().display());
    mount.wait()?;
    eprintln!("unmounted");
    Ok(())
}
